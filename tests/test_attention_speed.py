"""The bookkeeping of experiments/attention_speed.py (CPU: no timing here): the bytes a decode step must read,
the per-problem summary of a sweep, and the markdown rewritten from a results file."""
import sys

import pandas as pd
import pytest
from conftest import experiment_module


@pytest.fixture(scope="module")
def attention_speed():
    return experiment_module("attention_speed")


def test_cache_bytes_count_k_and_v_and_the_int8_scales(attention_speed):
    assert attention_speed.cache_bytes(2, 8, 1000, 16) == 2 * 2 * 8 * 1000 * 128 * 2
    assert attention_speed.cache_bytes(2, 8, 1000, 8) == 2 * 2 * 8 * 1000 * (128 + 4)


def sweep_rows(**problem):
    configs = [dict(BLOCK_N=64, num_warps=4, num_stages=2, programs_per_sm=4, us=10.0, is_default=True),
               dict(BLOCK_N=128, num_warps=4, num_stages=3, programs_per_sm=4, us=8.0, is_default=False),
               dict(BLOCK_N=32, num_warps=8, num_stages=2, programs_per_sm=8, us=12.0, is_default=False)]
    return [{**problem, **config, "tb_s": 4.0 / config["us"], "of_copy": 1.0 / config["us"], "copy_tb_s": 4.2}
            for config in configs]


def test_summary_names_the_default_and_the_best_of_a_sweep(attention_speed):
    table = pd.DataFrame(sweep_rows(layout="llama-2-7b", kv_bits=16, batch=1, context=1024)
                         + sweep_rows(layout="llama-2-7b", kv_bits=8, batch=64, context=4096))
    summary = attention_speed.summary(table, with_best=True)
    assert len(summary) == 2
    assert list(summary["default_us"]) == [10.0, 10.0] and list(summary["best_us"]) == [8.0, 8.0]
    assert summary["best"].iloc[0] == "BLOCK_N=128 num_warps=4 num_stages=3 programs_per_sm=4"
    assert "best_us" not in attention_speed.summary(table, with_best=False)


def test_markdown_only_rewrites_the_table_of_a_results_file(attention_speed, tmp_path, monkeypatch):
    path = tmp_path / "attention_speed.csv"
    with open(path, "w") as f:
        f.write("# command: python experiments/attention_speed.py --sweep\n# device: NVIDIA H200\n")
        pd.DataFrame(sweep_rows(layout="llama-3-8b", kv_bits=16, batch=16, context=2048)).to_csv(f, index=False)
    monkeypatch.setattr(sys, "argv", ["attention_speed.py", "--markdown-only", str(path)])
    attention_speed.main()
    text = path.with_suffix(".md").read_text()
    assert "| llama-3-8b | 16 | 16 | 2048 | 10.0 |" in text
    assert "BLOCK_N=128" in text  # three launches per problem: a sweep, so the best is shown
    assert "- command: `python experiments/attention_speed.py --sweep`" in text and "- device: NVIDIA H200" in text


def test_the_default_launch_is_the_one_decode_attention_takes_for_the_problem(attention_speed):
    big_mha, small_mha, gqa = (attention_speed.default_launch("llama-2-7b", 8, 16, 1024),
                               attention_speed.default_launch("llama-2-7b", 8, 1, 1024),
                               attention_speed.default_launch("llama-3-8b", 8, 64, 4096))
    assert big_mha["slots"] and big_mha["int8_scores"] and not small_mha.get("slots") and not gqa.get("slots")
    tensor_core_row = {**small_mha, "us": 1.0}
    slots_row = {**small_mha, "slots": True, "int8_scores": False, "us": 1.0}
    assert attention_speed.same_launch(tensor_core_row, small_mha)
    assert not attention_speed.same_launch(slots_row, small_mha)
    assert attention_speed.same_launch({**big_mha, "us": 1.0}, big_mha)
    assert not attention_speed.same_launch({**big_mha, "int8_scores": False}, big_mha)


def test_markdown_only_of_a_missing_csv_stops_in_one_line(attention_speed, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["attention_speed.py", "--markdown-only", str(tmp_path / "attention_speed.csv")])
    with pytest.raises(SystemExit) as stop:
        attention_speed.main()
    assert stop.value.code == 2
    assert f"--markdown-only: {tmp_path / 'attention_speed.csv'} not found" in capsys.readouterr().err
