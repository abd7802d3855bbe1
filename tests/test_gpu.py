"""The pipeline, QQQLinear and the fast model on a real GPU (skipped without one; the kernels' own branches are
checked in test_gpu_kernels.py)."""

import pytest
import torch
from conftest import compiled_kernels, tiny_model, token_batch

from qqq import numerics
from qqq.linear import QQQLinear
from qqq.pipeline import QuantizeSettings, quantize_model

pytestmark = compiled_kernels


@pytest.mark.parametrize("group_size", [-1, 128])
def test_layerwise_quantization_on_the_gpu_keeps_the_model_on_the_cpu(group_size):
    model = tiny_model("qwen2").half()
    settings = QuantizeSettings(group_size=group_size, smoothing_samples=2, min_thresholds=20)
    quantize_model(model, "qqq", token_batch(4, 64), settings, torch.device("cuda"))
    assert all(p.device.type == "cpu" for p in model.parameters())
    model.cuda()
    ids = token_batch(2, 32, seed=3).cuda()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qqq_linear_kernel_matches_the_reference_on_cuda(group_size, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 768, bias=True).to(dtype)
    layer = QQQLinear.from_linear(linear, group_size).cuda()
    for m in (1, 7, 64, 300):
        x = torch.randn(m, 1024, dtype=dtype, device="cuda")
        ratio = layer.group_ratio if group_size != -1 else None
        expected = numerics.w4a8_linear_reference(x, layer.codes(), layer.channel_scale, ratio, layer.bias)
        got = layer(x)
        assert got.dtype == dtype and got.shape == (m, 768)
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["fp16", "w8a8", "w4a16", "w4a16_tinygemm", "w4a8_rtn", "w4a8_rtn_g128"])
def test_every_fast_projection_matches_its_reference_on_cuda(method):
    from qqq.fast.producers import quantize_rows
    from qqq.fast.projections import projection_from_weight, reference_linear

    dtype = torch.bfloat16 if method == "w4a16_tinygemm" else torch.float16
    torch.manual_seed(0)
    weight = (torch.randn(640, 1024, device="cuda") * 0.02).to(dtype)
    bias = torch.randn(640, device="cuda").to(dtype)
    projection = projection_from_weight(weight, bias, method)
    for m in (1, 3, 64, 257):
        x = torch.randn(m, 1024, device="cuda").to(dtype)
        got = projection(quantize_rows(x) if projection.takes_int8 else x).float()
        expected = reference_linear(x, weight, bias, method).float()
        torch.testing.assert_close(got, expected, rtol=0, atol=0.01 * float(expected.abs().max()))
