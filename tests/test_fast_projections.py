"""The fast path's linear formats: sizes, fusion, names."""

import pytest
import torch

from conftest import tiny_model
from qqq.fast.model import FastLlama
from qqq.fast.producers import quantize_rows, silu_mul
from qqq.fast.projections import (METHODS, RENAMED_METHODS, W4A8Projection, fast_method, fused_projection,
                                  projection_from_weight)
from qqq.linear import QQQLinear


def test_quantized_weights_are_smaller():
    model = tiny_model(hidden=256, intermediate=512, vocab=64)
    sizes = {method: FastLlama.from_hf(model, method).weight_bytes() for method in METHODS}
    linear_params = sum(p.numel() for name, p in model.named_parameters() if "proj" in name)
    assert sizes["fp16"] - sizes["w4a8_rtn"] > 0.8 * linear_params * 4 * (1 - 1 / 8)  # fp32 -> 4 bits (+ scales)
    assert sizes["w4a8_rtn"] < sizes["w8a8"] < sizes["fp16"]
    assert sizes["w4a8_rtn"] == sizes["w4a16"] < sizes["w4a8_rtn_g128"]


@pytest.mark.parametrize("old,new,group_size", [("qqq", "w4a8_rtn", -1), ("qqq_g128", "w4a8_rtn_g128", 128)])
def test_the_old_method_names_still_work_with_a_warning(old, new, group_size):
    assert RENAMED_METHODS[old] == new and new in METHODS and old not in METHODS
    with pytest.warns(DeprecationWarning, match=f"now '{new}'"):
        fast = FastLlama.from_hf(tiny_model(), old)
    assert isinstance(fast.layers[0].qkv, W4A8Projection) and fast.layers[0].qkv.group_size == group_size
    assert fast_method(new) == new
    with pytest.raises(ValueError, match="unknown method"):
        fast_method("qqq_g64")


def test_fusing_mixed_layers_is_refused():
    model = tiny_model()
    linears = [model.model.layers[0].mlp.gate_proj, QQQLinear.from_linear(model.model.layers[0].mlp.up_proj)]
    with pytest.raises(ValueError, match="cannot build a fast projection"):
        fused_projection(linears, "fp16", torch.float32)
    with pytest.raises(ValueError, match="cannot fuse QQQLinear"):
        W4A8Projection([QQQLinear.from_linear(model.model.layers[0].mlp.up_proj),
                        QQQLinear.from_linear(model.model.layers[0].mlp.down_proj)], torch.float32)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("method", ["w4a8_rtn", "w4a8_rtn_g128", "w8a8", "fp16"])
def test_gate_up_ending_in_silu_mul_is_the_producer_on_the_plain_projection(method, backend, monkeypatch):
    """The fused gate/up projection (rows alternating gate, up; SiLU(gate) * up in the GEMM's epilogue) gives
    exactly what the plain gate/up projection followed by the SiLU*up producer gives; formats whose GEMM cannot
    end in it stay plain."""
    if backend == "reference":
        monkeypatch.setenv("QQQ_BACKEND", "reference")
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(2 * 96, 256, generator=generator) * 0.05).half().float()
    bias = torch.randn(2 * 96, generator=generator)
    x = torch.randn(3, 256, generator=generator).half()
    plain = projection_from_weight(weight.half(), bias.half(), method)
    fused = projection_from_weight(weight.half(), bias.half(), method, silu_mul=True)
    assert fused.silu_mul == (method != "fp16") and not plain.silu_mul
    if method == "fp16":
        return
    rows = quantize_rows(x)
    assert torch.equal(fused(rows), silu_mul(plain(rows), quantize=False))


def test_checkpoint_gate_up_ends_in_silu_mul_only_for_a_pair_of_one_width():
    generator = torch.Generator().manual_seed(5)
    linears = [torch.nn.Linear(128, 96) for _ in range(2)]
    for linear in linears:  # the bias too is interleaved
        torch.nn.init.normal_(linear.weight, std=0.05, generator=generator)
        torch.nn.init.normal_(linear.bias, generator=generator)
    gate, up = (QQQLinear.from_linear(linear) for linear in linears)
    plain, fused = W4A8Projection([gate, up], torch.float32), W4A8Projection([gate, up], torch.float32, silu_mul=True)
    rows = quantize_rows(torch.randn(2, gate.in_features, generator=torch.Generator().manual_seed(4)))
    assert fused.silu_mul and torch.equal(fused(rows), silu_mul(plain(rows), quantize=False))
    with pytest.raises(ValueError, match="one width"):
        W4A8Projection([gate], torch.float32, silu_mul=True)
