"""Every kernel launch branch compiles for sm_90, checked on the CPU (see compile_for_gpu.py for how)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_gpu_kernels import all_launch_branches


def _compile_report(*args: str, timeout: int = 600) -> dict:
    """The JSON report that ``compile_for_gpu.py`` prints last, run with ``args`` from the repository root."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot compile for sm_90")
    script = Path(__file__).with_name("compile_for_gpu.py")
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=script.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_launch_branch_compiles_for_hopper():
    report = _compile_report(timeout=1200)
    assert "error" not in report, report.get("error")
    expected = {f"{launcher}:{branch}" for launcher, branch in all_launch_branches()}
    assert set(report["branches"]) == expected
    assert len(report["compiled"]) >= len(expected)


@pytest.mark.parametrize("group_size", [-1, 128])
def test_streaming_kernel_loop_streams_on_hopper(group_size):
    """The K loop of the streaming kernel as compiled for sm_90 with the H200 config of the paper shape: the
    weights copied 16 bytes at a time into the pipeline's ring (with the launch's own argument specialization:
    without it the copies are 4 bytes each); per weight word two ``dp4a`` per-channel, and per-group four (the
    lookup tables' positive and negative sums) with four ``prmt`` lookups and no fp16 conversion left in the loop
    (the tables are built once per group)."""
    report = _compile_report("--gemv-loop", "8192", "21760", str(group_size))
    opcodes = report["opcodes"]
    words = report["words_per_thread"]
    assert opcodes.get("LDGSTS.E.BYPASS.128", 0) > 0
    if group_size == -1:
        assert opcodes["IDP.4A.S8.S8"] == 2 * words
    else:
        assert opcodes["IDP.4A.S8.S8"] == 4 * words
        assert opcodes["PRMT"] >= 6 * words  # four lookups, two activation words in the tables' lane order
        assert "HADD2" not in opcodes


def test_registers_of_a_shipped_config_without_and_with_the_silu_mul_epilogue():
    """``--registers``: the H200's Llama-2-7B gate/up config at M = 1024 (the fused kernel), compiled for sm_90 both
    ways: the plain kernel, and the model's gate/up with its SiLU*up epilogue under the launcher's register cap."""
    report = _compile_report("--registers", "22016", "4096", "1024")
    assert not report["config"].get("DEQUANT") and not report["config"].get("GEMV")
    plain, gated = report["plain"]["_w4a8_gemm_kernel"], report["silu_mul"]["_w4a8_gemm_kernel"]
    assert 0 < plain["registers"] <= 255 and plain["maxnreg"] is None
    # 8 warps: the epilogue's launch is capped at two programs per SM (Triton 3.6 took it to 149 uncapped), unspilled
    assert report["config"]["num_warps"] == 8 and gated["maxnreg"] == 128
    assert gated["registers"] <= 128 and gated["local_bytes"] == 0


def test_split_k_partial_sums_are_relaxed_atomics_behind_one_fenced_ticket():
    """A split-K program adds its partial sums with relaxed reductions (``RED``) and fences only around its tile's
    ticket (take and reset): with the default acq_rel each element's atomic had a GPU-wide fence of its own, 18 in the
    16-token kernel's epilogue, one after another."""
    report = _compile_report("--split-k-fences")
    assert set(report) == {f"{path}/g{g}" for path in ("split_k", "streaming_split_k") for g in (-1, 128)}
    for branch, counts in report.items():
        assert counts["REDG"] >= 1, branch
        assert counts["gpu_fences"] <= 2, (branch, counts)
