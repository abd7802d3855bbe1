"""The pipeline and QQQLinear on a real GPU (skipped on machines without CUDA)."""

import pytest
import torch
from conftest import tiny_model, token_batch

from qqq import numerics
from qqq.linear import QQQLinear
from qqq.pipeline import QuantizeSettings, quantize_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
