"""Every kernel launch branch compiles for sm_90, checked on the CPU (see compile_for_gpu.py for how)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_gpu_kernels import all_launch_branches


def test_every_launch_branch_compiles_for_hopper():
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot compile for sm_90")
    script = Path(__file__).with_name("compile_for_gpu.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200,
                          cwd=script.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in report, report.get("error")
    expected = {f"{launcher}:{branch}" for launcher, branch in all_launch_branches()}
    assert set(report["branches"]) == expected
    assert len(report["compiled"]) >= len(expected)
