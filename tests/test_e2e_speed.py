"""experiments/e2e_speed.py's command line and what it saves (CPU: no measurement here)."""
import json
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import assert_stops_without_a_gpu, experiment_module


@pytest.fixture(scope="module")
def e2e_speed():
    return experiment_module("e2e_speed")


def test_without_a_gpu_it_stops_in_one_line_before_writing_anything(e2e_speed, monkeypatch, tmp_path):
    assert_stops_without_a_gpu(e2e_speed, ["e2e_speed.py", "--out", str(tmp_path / "out")],
                               "e2e_speed.py measures GPU speed: no GPU here", tmp_path / "out", monkeypatch)


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--output-len", "1"], "argument --output-len: must be at least 2"),  # no decode step to time after the first
    (["--input-len", "0"], "argument --input-len: must be at least 1, got 0"),
])
def test_lengths_and_repeats_that_measure_nothing_are_refused_when_the_flags_are_read(e2e_speed, monkeypatch, capsys,
                                                                                      tmp_path, argv, message):
    monkeypatch.setattr(sys, "argv", ["e2e_speed.py", *argv, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        e2e_speed.main()
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_stopped_on_the_way_keeps_the_rows_it_measured(e2e_speed, monkeypatch, tmp_path):
    """Each measurement is saved as it is made: a run stopped at its second model (out of memory, a time limit)
    keeps the first model's table, with its speedups."""
    def build(config, method, **kwargs):
        if config.num_hidden_layers == 40:  # llama-2-13b
            raise RuntimeError("stopped")
        return SimpleNamespace(weight_bytes=lambda: 2e9)

    def measured_row(fast, model, method, kv_bits, batch, weight_gb, args, meta):
        speed = {"fp16": 100.0, "w4a8_rtn": 250.0}[method] * batch
        return dict(model=model, batch=batch, method=method, kv_bits=kv_bits, input_len=args.input_len,
                    output_len=args.output_len, weight_gb=weight_gb, ttft_ms=10.0, decode_tok_s=speed,
                    decode_ms_per_step=1e3 * batch / speed, status="ok", peak_mem_gb=3.0, device="test")

    monkeypatch.setattr(e2e_speed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(e2e_speed, "provenance", lambda: {"command": "test", "device": "test", "date": "today"})
    monkeypatch.setattr(e2e_speed, "check_method", lambda method: 0.0)
    monkeypatch.setattr(e2e_speed, "FastLlama", SimpleNamespace(random=build))
    monkeypatch.setattr(e2e_speed, "measured_row", measured_row)
    monkeypatch.setattr(sys, "argv", ["e2e_speed.py", "--models", "llama-2-7b", "llama-2-13b", "--methods", "fp16",
                                      "w4a8_rtn", "--batches", "1", "4", "--out", str(tmp_path)])
    with pytest.raises(RuntimeError, match="stopped"):
        e2e_speed.main()
    table = pd.read_csv(tmp_path / "e2e_speed.csv")
    assert sorted(zip(table["method"], table["batch"], table["speedup_vs_fp16"])) == [
        ("fp16", 1, 1.0), ("fp16", 4, 1.0), ("w4a8_rtn", 1, 2.5), ("w4a8_rtn", 4, 2.5)]
    assert set(table["model"]) == {"llama-2-7b"}
    assert "## llama-2-7b" in (tmp_path / "e2e_speed.md").read_text()


def test_merge_reads_the_csv_it_names_dots_and_all_into_the_out_folder(e2e_speed, monkeypatch, tmp_path):
    """``--out`` is a folder (``merged.v2``: merged.v2/e2e_speed.csv); a ``--merge`` csv named e2e_speed.v1.csv is that
    file with its e2e_speed.v1.runs.json, not the e2e_speed.csv beside it."""
    def table(name, decode_tok_s):
        row = dict(model="llama-2-7b", batch=1, method="fp16", kv_bits=16, input_len=8, output_len=4, weight_gb=13.0,
                   ttft_ms=10.0, decode_tok_s=decode_tok_s, decode_ms_per_step=1.0, status="ok", peak_mem_gb=14.0,
                   device="test", speedup_vs_fp16=1.0, ttft_vs_fp16=1.0, weight_vs_fp16=1.0)
        pd.DataFrame([row]).assign(run=0).to_csv(tmp_path / "parts" / f"{name}.csv", index=False)
        (tmp_path / "parts" / f"{name}.runs.json").write_text(json.dumps([{"run": 0, "command": name}]))

    (tmp_path / "parts").mkdir()
    table("e2e_speed", 50.0)
    table("e2e_speed.v1", 75.0)
    monkeypatch.setattr(sys, "argv", ["e2e_speed.py", "--merge", str(tmp_path / "parts" / "e2e_speed.v1.csv"),
                                      "--out", str(tmp_path / "merged.v2")])
    e2e_speed.main()
    merged = pd.read_csv(tmp_path / "merged.v2" / "e2e_speed.csv")
    assert list(merged["decode_tok_s"]) == [75.0]
    assert "e2e_speed.v1" in (tmp_path / "merged.v2" / "e2e_speed.md").read_text()


def test_merge_of_a_missing_csv_stops_in_one_line(e2e_speed, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["e2e_speed.py", "--merge", str(tmp_path / "e2e_speed.csv"),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        e2e_speed.main()
    assert stop.value.code == 2 and f"--merge: {tmp_path / 'e2e_speed.csv'} not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, runs, message", [
    # another results csv of this script, with its runs.json: the profile, not the table
    ("model,method,kv_bits,batch,kernel,us_per_step,run\nllama-2-7b,fp16,16,1,gemv,3.0,0\n", True,
     "is not a results table of this kind: it lacks the columns input_len, output_len, status"),
    ("model,batch\nllama-2-7b,1\n", False, "does not start with its provenance (# command: ..., # device: ...)"),
    ("# command: python e2e_speed.py\n# device: test\n", False, "is not a results table: No columns to parse"),
])
def test_merge_of_a_csv_that_is_not_a_results_table_stops_in_one_line(e2e_speed, monkeypatch, capsys, tmp_path,
                                                                      content, runs, message):
    (tmp_path / "e2e_speed.csv").write_text(content)
    if runs:
        (tmp_path / "e2e_speed.runs.json").write_text(json.dumps([{"run": 0, "command": "profile"}]))
    monkeypatch.setattr(sys, "argv", ["e2e_speed.py", "--merge", str(tmp_path / "e2e_speed.csv"),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        e2e_speed.main()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and error.startswith(f"e2e_speed.py: error: --merge: {tmp_path / 'e2e_speed.csv'} ")
    assert message in error
    assert not (tmp_path / "out").exists()


def test_append_to_a_malformed_table_stops_in_one_line_writing_nothing(e2e_speed, monkeypatch, tmp_path):
    (tmp_path / "e2e_speed.csv").write_text("model,batch,method,run\nllama-2-7b,1,\"fp16,0\n")  # a quote left open
    (tmp_path / "e2e_speed.runs.json").write_text(json.dumps([{"run": 0, "command": "old"}]))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    monkeypatch.setattr(e2e_speed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(e2e_speed, "provenance", lambda: {"command": "test", "device": "test", "date": "today"})
    monkeypatch.setattr(e2e_speed, "run", lambda *args: pytest.fail("measured before the table was read"))
    monkeypatch.setattr(sys, "argv", ["e2e_speed.py", "--append", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=f"^e2e_speed.py: error: --out: {tmp_path / 'e2e_speed.csv'} is not a results "
                                         "table: Error tokenizing data"):
        e2e_speed.main()
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_profiled_batches_write_the_decode_step_and_the_prefill_and_append_keeps_other_runs(e2e_speed, monkeypatch,
                                                                                             tmp_path, capsys):
    """``--profile-batches``: one decode step's kernels into e2e_speed_profile.csv and one prefill's into
    e2e_speed_prefill_profile.csv, per method, KV cache and batch; ``--append`` replaces only what it measures."""
    def measured_row(fast, model, method, kv_bits, batch, weight_gb, args, meta):
        return dict(model=model, batch=batch, method=method, kv_bits=kv_bits, input_len=args.input_len,
                    output_len=args.output_len, weight_gb=weight_gb, ttft_ms=10.0, decode_tok_s=100.0,
                    decode_ms_per_step=10.0, status="ok", peak_mem_gb=3.0, device="test")

    prefill_ms = {"fp16": 20.0, "w4a8_rtn": 5.0}
    monkeypatch.setattr(e2e_speed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(e2e_speed, "provenance", lambda: {"command": "test", "device": "test", "date": "today"})
    monkeypatch.setattr(e2e_speed, "check_method", lambda method: 0.0)
    monkeypatch.setattr(e2e_speed, "check_int8_kv_attention", lambda: 0.0)
    monkeypatch.setattr(e2e_speed, "FastLlama", SimpleNamespace(random=lambda config, method, **kwargs: SimpleNamespace(
        weight_bytes=lambda: 2e9, method=method)))
    monkeypatch.setattr(e2e_speed, "measured_row", measured_row)
    monkeypatch.setattr(e2e_speed, "profile_decode", lambda fast, batch, context: [("gemv", 4.0, 30.0),
                                                                                   ("_decode_split_kernel", 2.0, 9.0)])
    monkeypatch.setattr(e2e_speed, "step_part_bytes", lambda fast, batch, context: {"linear": 3e7, "attention": 9e6})
    monkeypatch.setattr(e2e_speed, "profile_prefill", lambda fast, batch, input_len: (
        {"rope": (32, 1e3 * prefill_ms[fast.method]), "gemm": (96, 2000.0)}, 1.5 * prefill_ms[fast.method]))

    def main(*argv):
        monkeypatch.setattr(sys, "argv", ["e2e_speed.py", "--models", "llama-2-7b", "--batches", "1",
                                          "--profile-batches", "1", "--out", str(tmp_path), *argv])
        e2e_speed.main()

    main("--methods", "fp16", "w4a8_rtn", "--kv-bits", "16", "8")
    prefills = pd.read_csv(tmp_path / "e2e_speed_prefill_profile.csv", comment="#")
    assert len(prefills) == 2 * 2 * 3  # methods x caches x (2 kernels + the total)
    totals = prefills[prefills["kernel"] == "[prefill]"].set_index(["method", "kv_bits"])
    assert totals.loc[("fp16", 8), "ms"] == 22.0 and totals.loc[("w4a8_rtn", 16), "wall_ms"] == 7.5
    decode = pd.read_csv(tmp_path / "e2e_speed_profile.csv", comment="#")
    assert set(decode["kernel"]) == {"gemv", "_decode_split_kernel", "[linear]", "[attention]", "[other]", "[step]"}
    assert "prefill at batch 1: 22.0 ms of GPU kernel time, 30.0 ms wall" in capsys.readouterr().out

    prefill_ms["fp16"] = 40.0
    main("--methods", "fp16", "--kv-bits", "16", "--append")
    totals = pd.read_csv(tmp_path / "e2e_speed_prefill_profile.csv", comment="#").query("kernel == '[prefill]'")
    assert sorted(zip(totals["method"], totals["kv_bits"], totals["ms"])) == [
        ("fp16", 8, 22.0), ("fp16", 16, 42.0), ("w4a8_rtn", 8, 7.0), ("w4a8_rtn", 16, 7.0)]
