"""FastLlama (fused producers, fused q/k/v and gate/up, static KV cache) against Hugging Face and itself."""

import pytest
import torch

from conftest import tiny_config, tiny_model, token_batch
from qqq.fast.attention import kv_cache_fake_quantized
from qqq.fast.model import FastLlama
from qqq.fast.projections import METHODS, W4A8Projection
from qqq.linear import QQQLinear
from qqq.pipeline import quantize_model


def assert_logits_close(got, expected):
    """Within 1% of the logits' range: the fused producers may differ from PyTorch in the last ulp of fp32, which
    can move an activation across an int8 rounding boundary (one code) now and then."""
    torch.testing.assert_close(got, expected, rtol=0, atol=0.01 * float(expected.abs().max()))


def last_logits(fast: FastLlama, tokens: torch.Tensor) -> torch.Tensor:
    batch, t = tokens.shape
    return fast(tokens, torch.arange(t).expand(batch, t), fast.new_cache(batch, t + 4))


def prefill_and_step(fast: FastLlama, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prefill of ``tokens`` but the last, then of one decode step with the last (read from the cache)."""
    batch, t = tokens.shape
    cache = fast.new_cache(batch, t + 3)
    prefill = fast(tokens[:, :-1], torch.arange(t - 1).expand(batch, t - 1), cache)
    return prefill, fast(tokens[:, -1:], torch.full((batch, 1), t - 1), cache)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fp16_method_matches_hugging_face(model_type):
    model = tiny_model(model_type)
    tokens = token_batch(2, 12)
    fast = FastLlama.from_hf(model)
    with torch.no_grad():
        expected = model(tokens).logits[:, -1]
    torch.testing.assert_close(last_logits(fast, tokens), expected, rtol=1e-4, atol=1e-4)


def test_qqq_checkpoint_model_matches_its_reference(monkeypatch):
    model = tiny_model()
    quantize_model(model, "w4a8_rtn", None)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QQQLinear)
    fast = FastLlama.from_hf(model)
    assert isinstance(fast.layers[0].qkv, W4A8Projection) and isinstance(fast.layers[0].gate_up, W4A8Projection)
    tokens = token_batch(2, 10)
    got = last_logits(fast, tokens)  # Triton kernels under the interpreter
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    with torch.no_grad():
        expected = model(tokens).logits[:, -1]
    assert_logits_close(got, expected)


@pytest.mark.parametrize("method", METHODS)
def test_fused_kernels_match_the_plain_composition(method, monkeypatch):
    model = tiny_model(hidden=256, intermediate=384)
    fast = FastLlama.from_hf(model, method)
    tokens = token_batch(2, 6)
    got = last_logits(fast, tokens)
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    expected = last_logits(fast, tokens)
    assert_logits_close(got, expected)
    if method != "fp16":  # quantized, so not the FP model, but close to it
        fp = last_logits(FastLlama.from_hf(model), tokens)
        assert not torch.equal(got, fp)
        assert torch.nn.functional.cosine_similarity(got.flatten(), fp.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("method", ["fp16", "w4a8_rtn"])
def test_int8_kv_cache_kernels_match_the_reference(method, monkeypatch):
    model = tiny_model(heads=4, kv_heads=2)
    fast = FastLlama.from_hf(model, method, kv_bits=8)
    assert fast.new_cache(2, 8).k.dtype == torch.int8
    tokens = token_batch(2, 9, seed=4)
    got = prefill_and_step(fast, tokens)  # the RoPE and decode-attention kernels on the int8 cache
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    expected = prefill_and_step(fast, tokens)
    for g, e in zip(got, expected):
        assert_logits_close(g, e)
    fast.kv_bits = 16
    sixteen = prefill_and_step(fast, tokens)[1]
    assert not torch.equal(expected[1], sixteen)  # the cache's rounding shows, a little
    assert torch.nn.functional.cosine_similarity(expected[1].flatten(), sixteen.flatten(), dim=0) > 0.99


def test_int8_kv_cache_reference_is_hugging_face_with_its_kv_fake_quantized(reference_backend):
    model = tiny_model(heads=4, kv_heads=2)
    tokens = token_batch(2, 12, seed=2)
    got = prefill_and_step(FastLlama.from_hf(model, kv_bits=8), tokens)
    with torch.no_grad():
        plain = model(tokens).logits
        with kv_cache_fake_quantized(model):
            expected = model(tokens).logits
        assert torch.equal(model(tokens).logits, plain)  # restored after the block
    assert not torch.equal(expected, plain)
    torch.testing.assert_close(got[0], expected[:, -2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], expected[:, -1], rtol=1e-4, atol=1e-4)


def test_random_model_has_the_config_shapes():
    config = tiny_config(hidden=128, intermediate=256, heads=4, kv_heads=2)
    fast = FastLlama.random(config, "w4a8_rtn_g128", device="cpu", dtype=torch.float32, max_positions=32,
                            kv_bits=8)
    layer = fast.layers[0]
    assert (layer.qkv.out_features, layer.qkv.in_features) == ((4 + 2 * 2) * 32, 128)
    assert (layer.gate_up.out_features, layer.down.in_features) == (512, 256)
    assert layer.qkv.group_size == 128 and fast.rope_cos.shape == (32, 16) and fast.kv_bits == 8
    assert torch.isfinite(last_logits(fast, token_batch(1, 4))).all()


def test_bad_input_gives_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown method"):
        FastLlama.from_hf(model, "w3a3")
    with pytest.raises(ValueError, match="kv_bits must be one of"):
        FastLlama.from_hf(model, kv_bits=4)


def test_query_bits_8_rounds_each_query_per_token_and_head(monkeypatch):
    """With ``query_bits=8`` SDPA gets the query (after RoPE) on its int8 grid per token and head, where
    ``query_bits=16`` gives it as the model computed it; the keys and values are rounded in both."""
    from transformers.integrations import sdpa_attention

    from qqq import numerics

    model = tiny_model(heads=4, kv_heads=2)
    tokens = token_batch(2, 12, seed=3)
    seen = {}
    original = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, *args, **kwargs):
        seen.setdefault(module.layer_idx, (query, key))
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    logits, first = {}, {}
    with torch.no_grad():
        for bits in (16, 8):
            seen.clear()
            with kv_cache_fake_quantized(model, query_bits=bits):
                logits[bits] = model(tokens).logits
            first[bits] = seen[0]
    (q16, k16), (q8, k8) = first[16], first[8]  # layer 0: the same input in both runs
    assert q16.shape[1] == 4 and torch.equal(q8, numerics.fake_quantize_per_token(q16))
    assert not torch.equal(q8, q16) and torch.equal(k8, k16)
    assert not torch.equal(logits[8], logits[16])
    assert torch.nn.functional.cosine_similarity(logits[8].flatten(), logits[16].flatten(), dim=0) > 0.99
    with pytest.raises(ValueError, match="query_bits must be one of"):
        with kv_cache_fake_quantized(model, query_bits=4):
            pass
