"""``gpu.programmatic_launch``: which launches may start early, and ``sequential_launches`` turning that off."""

from types import SimpleNamespace

import pytest

from qqq.kernels_triton import gpu
from qqq.kernels_triton.gpu import GpuInfo

HOPPER = GpuInfo("NVIDIA H200", "9.0", 132, 227 * 1024, 60 * 2**20)
AMPERE = GpuInfo("NVIDIA A100", "8.0", 108, 163 * 1024, 40 * 2**20)
ON_DEVICE = SimpleNamespace(is_cuda=True)


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_only_compiled_launches_on_hopper_start_early(monkeypatch, compiled):
    monkeypatch.setattr(gpu, "current_gpu", lambda: HOPPER)
    assert gpu.programmatic_launch(ON_DEVICE)
    assert not gpu.programmatic_launch(SimpleNamespace(is_cuda=False))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not gpu.programmatic_launch(ON_DEVICE)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(gpu, "current_gpu", lambda: AMPERE)
    assert not gpu.programmatic_launch(ON_DEVICE)


def test_sequential_launches_turns_early_starts_off_and_restores_them(monkeypatch, compiled):
    monkeypatch.setattr(gpu, "current_gpu", lambda: HOPPER)
    with gpu.sequential_launches():
        assert not gpu.programmatic_launch(ON_DEVICE)
        with gpu.sequential_launches():
            assert not gpu.programmatic_launch(ON_DEVICE)
        assert not gpu.programmatic_launch(ON_DEVICE)
    assert gpu.programmatic_launch(ON_DEVICE)
    with pytest.raises(RuntimeError), gpu.sequential_launches():
        raise RuntimeError("a failed profile")
    assert gpu.programmatic_launch(ON_DEVICE)
