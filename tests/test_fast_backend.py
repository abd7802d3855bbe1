"""The one rule that picks a Triton kernel or its PyTorch reference, for the fast path and QQQLinear alike."""

import torch

import qqq.kernels_triton.w4a8_gemm as w4a8_kernels
from qqq.fast.backend import triton_or_reference, use_triton
from qqq.linear import QQQLinear, w4a8_linear_reference


def reference(*args):
    return "reference"


def test_the_choice_follows_the_device_and_the_environment(monkeypatch):
    x = torch.zeros(2, 64)
    assert use_triton(x)  # the tests run the kernels under TRITON_INTERPRET=1 (conftest.py)
    assert triton_or_reference(x, "w4a8_gemm.w4a8_linear", reference) is w4a8_kernels.w4a8_linear
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    assert not use_triton(x) and triton_or_reference(x, "w4a8_gemm.w4a8_linear", reference) is reference
    monkeypatch.delenv("QQQ_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not use_triton(x)  # a CPU tensor without the interpreter


def test_qqq_linear_runs_what_the_rule_picks(monkeypatch):
    torch.manual_seed(0)
    layer = QQQLinear.from_linear(torch.nn.Linear(128, 32), group_size=64)
    x = torch.randn(3, 5, 128)
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args)
        return w4a8_linear_reference(*args, **kwargs)

    monkeypatch.setattr(w4a8_kernels, "w4a8_linear", kernel)
    got = layer(x)
    assert len(calls) == 1 and calls[0][0] is x
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    assert torch.equal(layer(x), got) and len(calls) == 1
    assert got.shape == (3, 5, 32)
