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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 4096), (1, 11008), (7, 5120), (300, 4096)])
def test_fused_producers_match_the_composition_on_cuda(dtype, m, k):
    from qqq.inference import rmsnorm_reference, silu_mul_reference
    from qqq.kernels_triton.fused_producers import rmsnorm_quantize, silu_mul_quantize

    torch.manual_seed(0)
    x, residual = (torch.randn(m, k, device="cuda") * 4).to(dtype), torch.randn(m, k, device="cuda").to(dtype)
    weight = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    (codes, scale), h = rmsnorm_quantize(x, weight, 1e-5, residual)
    expected, expected_h = rmsnorm_reference(x, weight, 1e-5, residual)
    assert torch.equal(h, expected_h)
    for got, want in (((codes, scale), expected), (silu_mul_quantize(x), silu_mul_reference(x))):
        torch.testing.assert_close(got[1], want.scale, rtol=1e-2, atol=0)
        assert (got[0].int() - want.codes.int()).abs().max() <= 2
        assert (got[0] == want.codes).float().mean() > 0.98


@pytest.mark.parametrize("method", ["fp16", "w8a8", "w4a16", "qqq", "qqq_g128"])
def test_fast_model_kernels_and_cuda_graph_decode_on_cuda(method, monkeypatch):
    from qqq.inference import FastLlama, Generator, KVCache

    model = tiny_model(hidden=256, intermediate=512, heads=4, kv_heads=2).half().cuda()
    fast = FastLlama.from_hf(model, method)
    prompts = token_batch(2, 12).cuda()
    positions = torch.arange(12, device="cuda").expand(2, 12)
    got = fast(prompts, positions, KVCache(fast.arch, 2, 16, fast.dtype, "cuda"))
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    expected = fast(prompts, positions, KVCache(fast.arch, 2, 16, fast.dtype, "cuda"))
    monkeypatch.setenv("QQQ_BACKEND", "auto")
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0.02 * float(expected.abs().max()))
    graph = Generator(fast, 2, 24).generate(prompts, 10)
    eager = Generator(fast, 2, 24, use_graph=False).generate(prompts, 10)
    assert torch.equal(graph.tokens, eager.tokens)


@pytest.mark.parametrize("method", ["fp16", "w8a8", "w4a16", "w4a16_tinygemm", "qqq", "qqq_g128"])
def test_every_fast_projection_matches_its_reference_on_cuda(method):
    from qqq.inference import projection_from_weight, quantize_rows, reference_linear

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


@pytest.mark.parametrize("batch,heads,kv_heads", [(1, 32, 32), (5, 8, 2)])
def test_decode_attention_matches_masked_sdpa_on_cuda(batch, heads, kv_heads):
    from qqq.kernels_triton.decode_attention import decode_attention

    torch.manual_seed(0)
    capacity = 1152
    q = torch.randn(batch, heads, 1, 128, device="cuda").half()
    k, v = (torch.randn(batch, kv_heads, capacity, 128, device="cuda").half() for _ in range(2))
    positions = torch.randint(0, capacity, (batch,), device="cuda")
    visible = torch.arange(capacity, device="cuda")[None, :] <= positions[:, None]
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(repeat, 1), v.float().repeat_interleave(repeat, 1),
        attn_mask=visible[:, None, None, :])
    torch.testing.assert_close(decode_attention(q, k, v, positions).float(), expected, rtol=2e-3, atol=2e-3)
