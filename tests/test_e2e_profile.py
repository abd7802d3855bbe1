"""The per-step profile file of experiments/e2e_speed.py: parts of the step, the bytes each must read, and a
file that keeps the other runs' profiles on --append (CPU: no profiling here, only the bookkeeping)."""
import pandas as pd
import pytest
import torch
from conftest import experiment_module
from transformers import LlamaConfig

from qqq.fast.model import FastLlama


@pytest.fixture(scope="module")
def e2e_speed():
    return experiment_module("e2e_speed")


def test_kernels_are_sorted_into_the_parts_whose_bytes_are_known(e2e_speed):
    from qqq.kernels_triton import decode_attention

    kernels = [name for name in vars(decode_attention) if name.startswith("_decode_") and name.endswith("_kernel")]
    assert len(kernels) == 3  # every kernel of the decode attention: the split ones and the merge
    for name in kernels:
        assert e2e_speed.step_part(name) == "attention", name
    for linear in ("_w4a8_gemv_kernel", "_w4a8_gemm_kernel", "int8_gemm_kernel", "_w4a16_gemm_kernel",
                   "nvjet_hsh_128x64_64x4_1x2_h_bz_coopA_NTN", "sm90_xmma_gemm_f16f16_f16f32",
                   "void gemv2T_kernel_val<int, int, __half>"):
        assert e2e_speed.step_part(linear) == "linear", linear
    for other in ("_rmsnorm_kernel", "_rope_into_cache_kernel", "_silu_mul_kernel", "_quantize_per_token_kernel"):
        assert e2e_speed.step_part(other) == "other", other


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_step_bytes_are_the_streamed_weights_and_the_kv_cache_read(e2e_speed, kv_bits):
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, tie_word_embeddings=False)
    fast = FastLlama.random(config, "fp16", device="cpu", dtype=torch.float16, max_positions=64, kv_bits=kv_bits)
    parts = e2e_speed.step_part_bytes(fast, batch=3, context=40)
    linears = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 2 * 96 * 64 + 64 * 96) * 2 + 50 * 64 * 2  # layers + lm_head
    norms = (2 * 2 + 1) * 64 * 2
    assert parts["linear"] == linears + norms
    value_bytes = 2 if kv_bits == 16 else 1 + 4 / 16  # int8 codes + an fp32 scale per token and head (head_dim 16)
    assert parts["attention"] == int(2 * 2 * 3 * 2 * 40 * 16 * value_bytes)


def _profile(method, batch, us):
    return pd.DataFrame([dict(model="m", method=method, kv_bits=16, batch=batch, context=8, kernel="k", part="other",
                              calls_per_step=1, us_per_step=us)])


def test_appended_profiles_replace_only_their_own_method_and_batch(e2e_speed, tmp_path):
    path = tmp_path / "e2e_speed_profile.csv"
    first = {"command": "first", "date": "d1"}
    e2e_speed.write_profiles(pd.concat([_profile("fp16", 1, 10.0), _profile("w8a8", 1, 20.0)]), path, first, None)
    earlier = path.read_text()
    second = {"command": "second", "date": "d2"}
    e2e_speed.write_profiles(_profile("w8a8", 1, 30.0), path, second, earlier)
    e2e_speed.write_profiles(_profile("w8a8", 1, 30.0), path, second, earlier)  # saved again later in the run
    table = pd.read_csv(path, comment="#")
    assert sorted(zip(table["method"], table["us_per_step"], table["measured"])) == [
        ("fp16", 10.0, "d1"), ("w8a8", 30.0, "d2")]
    header = [line for line in path.read_text().splitlines() if line.startswith("# ")]
    assert header == ["# command: first", "# date: d1", "# appended:", "# command: second", "# date: d2"]
    e2e_speed.write_profiles(_profile("fp16", 16, 5.0), path, first, None)  # without --append: only this run
    assert len(pd.read_csv(path, comment="#")) == 1


def test_kernel_totals_add_launches_and_time_per_name_and_skip_host_events(e2e_speed):
    from types import SimpleNamespace

    events = [SimpleNamespace(key="k", count=2, self_device_time_total=3.0),
              SimpleNamespace(key="k", count=1, self_device_time_total=1.5),
              SimpleNamespace(key="host_op", count=4, self_device_time_total=0),
              SimpleNamespace(key="other", count=3, self_device_time_total=6.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert e2e_speed.kernel_totals(prof) == {"k": (3, 4.5), "other": (3, 6.0)}


def test_prefill_rows_list_kernels_slowest_first_then_their_total(e2e_speed):
    key = {"model": "m", "method": "w4a8_rtn", "kv_bits": 8, "batch": 1, "input_len": 1024}
    rows = e2e_speed.prefill_rows(key, {"rope": (32, 3800.0), "gemm": (96, 9500.0), "sdpa": (32, 1000.0)}, 15.2)
    assert [r["kernel"] for r in rows] == ["gemm", "rope", "sdpa", "[prefill]"]
    assert all(r["method"] == "w4a8_rtn" and r["input_len"] == 1024 for r in rows)
    assert rows[0]["ms"] == 9.5 and rows[0]["calls"] == 96
    assert rows[-1]["calls"] == 160 and rows[-1]["ms"] == pytest.approx(14.3) and rows[-1]["wall_ms"] == 15.2
