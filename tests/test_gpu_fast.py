"""The qqq.fast path on a real GPU (skipped without one): CUDA-graph decode with both KV caches, the renamed
methods, and the backend rule on CUDA tensors (the 8-bit cache's kernels are in test_gpu_kernels.py)."""

import pytest
import torch
from conftest import compiled_kernels, tiny_model, token_batch


pytestmark = compiled_kernels


@pytest.mark.parametrize("method", ["fp16", "w8a8", "w4a16", "w4a8_rtn", "w4a8_rtn_g128"])
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
    import qqq.fast.generation as generation  # the greedy step's kernel, against the plain argmax and updates

    monkeypatch.setattr(generation, "triton_or_reference", lambda x, kernel, reference: reference)
    assert torch.equal(Generator(fast, 2, 24).generate(prompts, 10).tokens, graph.tokens)
    assert Generator(fast, 2, 24).cache.k.dtype == (torch.int8 if kv_bits == 8 else torch.float16)


@pytest.mark.parametrize("method", ["fp16", "w4a8_rtn_g128"])
def test_graphed_prefill_replays_the_padded_prefill(method):
    """Prompts of 20, 7 and 17 tokens (buckets 32, 16, 32) replay prefill graphs: the tokens are those of the same
    padded prefill run eagerly (the padding a 17-token prompt finds is the 20-token prompt's tail, never attended to)."""
    from qqq.fast.generation import Generator, prefill_bucket
    from qqq.fast.model import FastLlama

    fast = FastLlama.from_hf(tiny_model(hidden=256, intermediate=512, heads=4, kv_heads=2).half().cuda(), method,
                             kv_bits=8)
    graphed, eager = Generator(fast, 2, 40), Generator(fast, 2, 40, use_graph=False)
    for length in (20, 7, 17):
        prompts = token_batch(2, length, seed=length).cuda()
        got = graphed.generate(prompts, 6).tokens
        tokens = torch.zeros(2, prefill_bucket(length, 40), dtype=torch.long, device="cuda")
        tokens[:, :length] = prompts
        eager.last.fill_(length - 1)
        eager.padded_prefill(tokens)
        expected = torch.cat((eager.first[:, None], eager.decode(eager.first.clone(), length, 5)), dim=1)
        assert torch.equal(got, expected)
    assert sorted(graphed.prefill_graphs) == [16, 32] and not eager.prefill_graphs


def test_a_graphed_decode_past_the_cache_is_refused_on_cuda():
    from qqq.fast.generation import Generator
    from qqq.fast.model import FastLlama

    runner = Generator(FastLlama.from_hf(tiny_model().half().cuda(), kv_bits=8), 2, 12)
    first = runner.prefill(token_batch(2, 5).cuda())
    with pytest.raises(ValueError, match="would write past the KV cache"):
        runner.decode(first, 5, 8)
    assert runner.graph is None and runner.decode(first, 5, 7).shape == (2, 7)


def test_the_backend_rule_picks_the_kernels_for_cuda_tensors(monkeypatch):
    import qqq.kernels_triton.w4a8_gemm as kernels
    from qqq.fast.backend import triton_or_reference
    from qqq.linear import w4a8_linear_reference

    x = torch.zeros(2, 64, device="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_or_reference(x, "w4a8_gemm.w4a8_linear", w4a8_linear_reference) is kernels.w4a8_linear
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    assert triton_or_reference(x, "w4a8_gemm.w4a8_linear", w4a8_linear_reference) is w4a8_linear_reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_prefill_dequantizes_the_int8_cache_as_on_the_cpu(dtype):
    """On CUDA the one-pass ``dequantized`` (int8 times the fp32 scale, stored as ``dtype``) gives the CPU's values."""
    from qqq.fast.attention import dequantized

    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(-127, 128, (2, 4, 300, 128), dtype=torch.int8, generator=gen)
    scale = torch.rand(2, 4, 300, generator=gen) / 50
    got = dequantized(codes.cuda()[:, :, :257], scale.cuda()[:, :, :257], dtype)
    assert torch.equal(got.cpu(), dequantized(codes[:, :, :257], scale[:, :, :257], dtype))
