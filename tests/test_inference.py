"""FastLlama (fused producers, fused q/k/v and gate/up, static KV cache) against Hugging Face and itself."""

import pytest
import torch

from conftest import tiny_config, tiny_model, token_batch
from qqq.inference import METHODS, FastLlama, Generator, KVCache, W4A8Projection, fused_projection
from qqq.linear import QQQLinear
from qqq.pipeline import quantize_model


def assert_logits_close(got, expected):
    """Within 1% of the logits' range: the fused producers may differ from PyTorch in the last ulp of fp32, which
    can move an activation across an int8 rounding boundary (one code) now and then."""
    torch.testing.assert_close(got, expected, rtol=0, atol=0.01 * float(expected.abs().max()))


def last_logits(fast: FastLlama, tokens: torch.Tensor) -> torch.Tensor:
    batch, t = tokens.shape
    cache = KVCache(fast.arch, batch, t + 4, fast.dtype, tokens.device)
    return fast(tokens, torch.arange(t).expand(batch, t), cache)


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


def test_quantized_weights_are_smaller():
    model = tiny_model(hidden=256, intermediate=512, vocab=64)
    sizes = {method: FastLlama.from_hf(model, method).weight_bytes() for method in METHODS}
    linear_params = sum(p.numel() for name, p in model.named_parameters() if "proj" in name)
    assert sizes["fp16"] - sizes["qqq"] > 0.8 * linear_params * 4 * (1 - 1 / 8)  # fp32 -> 4 bits (+ scales)
    assert sizes["qqq"] < sizes["w8a8"] < sizes["fp16"]
    assert sizes["qqq"] == sizes["w4a16"] < sizes["qqq_g128"]


def test_generator_greedy_tokens_match_hugging_face(reference_backend):
    model = tiny_model()
    prompts = token_batch(2, 7)
    with torch.no_grad():
        expected = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6,
                                  do_sample=False, min_new_tokens=6, pad_token_id=0)[:, 7:]
    result = Generator(FastLlama.from_hf(model), batch=2, capacity=16).generate(prompts, 6)
    assert torch.equal(result.tokens, expected)
    assert result.ttft_s > 0 and result.decode_s > 0 and result.decode_tokens_per_s > 0


def test_decode_step_matches_a_full_prefill(reference_backend):
    fast = FastLlama.from_hf(tiny_model(), "qqq")
    prompts = token_batch(2, 9)
    generated = Generator(fast, batch=2, capacity=12).generate(prompts[:, :5], 3).tokens
    # each decoded token is the argmax of a prefill over the prompt and the tokens before it
    sequence = prompts[:, :5]
    for step in range(3):
        assert torch.equal(last_logits(fast, sequence).argmax(-1), generated[:, step])
        sequence = torch.cat((sequence, generated[:, step:step + 1]), dim=1)


def test_random_model_has_the_config_shapes():
    config = tiny_config(hidden=128, intermediate=256, heads=4, kv_heads=2)
    fast = FastLlama.random(config, "qqq_g128", device="cpu", dtype=torch.float32, max_positions=32)
    layer = fast.layers[0]
    assert (layer.qkv.out_features, layer.qkv.in_features) == ((4 + 2 * 2) * 32, 128)
    assert (layer.gate_up.out_features, layer.down.in_features) == (512, 256)
    assert layer.qkv.group_size == 128 and fast.rope_cos.shape == (32, 16)
    assert torch.isfinite(last_logits(fast, token_batch(1, 4))).all()


def test_bad_input_gives_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown method"):
        FastLlama.from_hf(model, "w3a3")
    fast = FastLlama.from_hf(model)
    with pytest.raises(ValueError, match="capacity"):
        Generator(fast, batch=1, capacity=10_000)
    with pytest.raises(ValueError, match="prompts must be"):
        Generator(fast, batch=2, capacity=8).prefill(token_batch(1, 4))
    with pytest.raises(ValueError, match="fit the cache"):
        Generator(fast, batch=2, capacity=8).generate(token_batch(2, 4), 5)
    linears = [model.model.layers[0].mlp.gate_proj, QQQLinear.from_linear(model.model.layers[0].mlp.up_proj)]
    with pytest.raises(ValueError, match="cannot build a fast projection"):
        fused_projection(linears, "fp16", torch.float32)
