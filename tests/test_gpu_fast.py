"""The qqq.fast path's new branches on a real GPU (skipped on machines without CUDA): the 8-bit KV cache in the
RoPE producer and in decode attention, the renamed methods, and the backend rule on CUDA tensors."""

import pytest
import torch
from conftest import tiny_model, token_batch

from qqq import numerics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,start", [(37, 0), (1, 1500)])
def test_rope_into_int8_cache_matches_the_reference_on_cuda(dtype, t, start):
    from qqq.fast.producers import rope_into_cache_reference
    from qqq.kernels_triton.fused_producers import rope_into_cache

    batch, heads, kv_heads, head_dim, capacity = 3, 32, 8, 128, 2048
    torch.manual_seed(0)
    qkv = (torch.randn(batch, t, (heads + 2 * kv_heads) * head_dim, device="cuda") * 3).to(dtype)
    angles = torch.arange(capacity, device="cuda")[:, None] * 10000.0 ** (-torch.arange(head_dim // 2, device="cuda")
                                                                          / (head_dim // 2))
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    positions = (torch.arange(t, device="cuda") + start).expand(batch, t)
    caches = [torch.zeros(batch, kv_heads, capacity, head_dim, dtype=torch.int8, device="cuda") for _ in range(4)]
    scales = [torch.zeros(batch, kv_heads, capacity, device="cuda") for _ in range(4)]
    q = rope_into_cache(qkv, cos, sin, positions, caches[0], caches[1], heads, scales[0], scales[1])
    q_ref = rope_into_cache_reference(qkv, cos, sin, positions, caches[2], caches[3], heads, scales[2], scales[3])
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(caches[1], caches[3]) and torch.equal(scales[1], scales[3])  # v: copied, then quantized
    torch.testing.assert_close(scales[0], scales[2], rtol=1e-2, atol=0)
    assert (caches[0].int() - caches[2].int()).abs().max() <= 2
    assert (caches[0] == caches[2]).float().mean() > 0.98


@pytest.mark.parametrize("batch,heads,kv_heads,capacity", [(1, 32, 32, 4096), (5, 32, 8, 1153), (16, 8, 2, 1030)])
def test_decode_attention_over_an_int8_cache_matches_the_reference_on_cuda(batch, heads, kv_heads, capacity):
    from qqq.fast.attention import decode_attention_reference
    from qqq.kernels_triton.decode_attention import decode_attention

    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, 128, device="cuda").half()
    k, v = (torch.randn(batch, kv_heads, capacity, 128, device="cuda") for _ in range(2))
    (k_codes, k_scale), (v_codes, v_scale) = numerics.quantize_per_token(k), numerics.quantize_per_token(v)
    positions = torch.randint(0, capacity, (batch,), device="cuda")
    positions[0] = capacity - 1
    cache = (k_codes, v_codes, positions, k_scale[..., 0], v_scale[..., 0])
    expected = decode_attention_reference(q, *cache).float()
    torch.testing.assert_close(decode_attention(q, *cache).float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", ["fp16", "w4a8_rtn", "w4a8_rtn_g128"])
@pytest.mark.parametrize("kv_bits", [16, 8])
def test_fast_model_and_cuda_graph_decode_on_cuda(method, kv_bits, monkeypatch):
    from qqq.fast.generation import Generator
    from qqq.fast.model import FastLlama

    model = tiny_model(hidden=256, intermediate=512, heads=4, kv_heads=2).half().cuda()
    fast = FastLlama.from_hf(model, method, kv_bits=kv_bits)
    prompts = token_batch(2, 12).cuda()
    positions = torch.arange(12, device="cuda").expand(2, 12)
    got = fast(prompts, positions, fast.new_cache(2, 16))
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    expected = fast(prompts, positions, fast.new_cache(2, 16))
    monkeypatch.setenv("QQQ_BACKEND", "auto")
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0.02 * float(expected.abs().max()))
    graph = Generator(fast, 2, 24).generate(prompts, 10)
    eager = Generator(fast, 2, 24, use_graph=False).generate(prompts, 10)
    assert torch.equal(graph.tokens, eager.tokens)
    assert Generator(fast, 2, 24).cache.k.dtype == (torch.int8 if kv_bits == 8 else torch.float16)


def test_a_graphed_decode_past_the_cache_is_refused_on_cuda():
    from qqq.fast.generation import Generator
    from qqq.fast.model import FastLlama

    runner = Generator(FastLlama.from_hf(tiny_model().half().cuda(), kv_bits=8), 2, 12)
    first = runner.prefill(token_batch(2, 5).cuda())
    with pytest.raises(ValueError, match="would write past the KV cache"):
        runner.decode(first, 5, 8)
    assert runner.graph is None and runner.decode(first, 5, 7).shape == (2, 7)


@pytest.mark.parametrize("method", ["w4a8_rtn", "w4a8_rtn_g128"])
def test_renamed_projections_match_their_reference_on_cuda(method):
    from qqq.fast.producers import quantize_rows
    from qqq.fast.projections import projection_from_weight, reference_linear

    torch.manual_seed(0)
    weight = (torch.randn(640, 1024, device="cuda") * 0.02).half()
    bias = torch.randn(640, device="cuda").half()
    projection = projection_from_weight(weight, bias, method)
    for m in (1, 3, 64, 257):
        x = torch.randn(m, 1024, device="cuda").half()
        expected = reference_linear(x, weight, bias, method).float()
        torch.testing.assert_close(projection(quantize_rows(x)).float(), expected, rtol=0,
                                   atol=0.01 * float(expected.abs().max()))


def test_the_backend_rule_picks_the_kernels_for_cuda_tensors(monkeypatch):
    import qqq.kernels_triton.w4a8_gemm as kernels
    from qqq.fast.backend import triton_or_reference
    from qqq.linear import w4a8_linear_reference

    x = torch.zeros(2, 64, device="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_or_reference(x, "w4a8_gemm.w4a8_linear", w4a8_linear_reference) is kernels.w4a8_linear
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    assert triton_or_reference(x, "w4a8_gemm.w4a8_linear", w4a8_linear_reference) is w4a8_linear_reference
