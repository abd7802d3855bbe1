"""SmoothAttention's key scales: exact in floating point, and what they buy the 8-bit KV cache."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qqq import numerics
from qqq.key_smoothing import _scale_rows, fold_key_scales, key_pair_maxima, key_scales, smooth_attention
from qqq.linear import QQQLinear


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    model = (Qwen2ForCausalLM(Qwen2Config(**common)) if family == "qwen2"
             else LlamaForCausalLM(LlamaConfig(**common))).eval()
    with torch.no_grad():  # keys with outlier channels, as real ones have (one per pair half, both heads)
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[3::16] *= 25
            if layer.self_attn.k_proj.bias is not None:
                layer.self_attn.k_proj.bias.normal_()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_folded_key_scales_leave_the_logits_unchanged(family):
    model = tiny(family)
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
        smooth_attention(model, torch.randint(0, 96, (3, 16)), alpha=0.5)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_key_scales_are_equal_on_rope_pairs_and_tame_the_outlier_channels():
    model = tiny("llama")
    windows = torch.randint(0, 96, (3, 16))
    maxima = key_pair_maxima(model, windows)
    assert len(maxima) == 2 and maxima[0].shape == (2, 8)  # 2 kv heads, head_dim 16 -> 8 pairs
    scales = key_scales(maxima, 0.5)
    assert torch.equal(scales[0][:, :8], scales[0][:, 8:])
    assert torch.equal(key_scales(maxima, 0.0)[0], torch.ones(2, 16))
    keys = []
    handle = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    with torch.no_grad():
        model(windows[:1])
        fold_key_scales(model, scales)
        model(windows[:1])
    handle.remove()
    spread = [k.reshape(-1, 2, 16).abs().amax(dim=0) for k in keys]  # per-channel maxima, before and after
    ratio = [(s.amax(-1) / s.median(-1).values).max() for s in spread]
    assert ratio[1] < ratio[0] / 2


def test_smoothed_keys_round_to_int8_with_a_smaller_score_error():
    torch.manual_seed(0)
    keys = torch.randn(256, 2, 16)  # [tokens, kv heads, head dim] with two outlier channels, one per RoPE half
    keys[..., 3] *= 30
    keys[..., 11] *= 30
    queries = torch.randn(256, 2, 16)
    lam = key_scales([keys[..., :8].hypot(keys[..., 8:]).amax(dim=0)], 0.5)[0]
    exact = (queries * keys).sum(-1)
    plain = (queries * numerics.fake_quantize_per_token(keys)).sum(-1)
    smoothed = (queries * lam * numerics.fake_quantize_per_token(keys / lam)).sum(-1)
    assert (smoothed - exact).abs().mean() < 0.5 * (plain - exact).abs().mean()


def test_folding_into_a_w4a8_layer_scales_its_channels():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).requires_grad_(False)
    linear.bias.normal_()
    layer = QQQLinear.from_linear(linear)
    x = torch.randn(5, 64).to(layer.bias.dtype)
    before = layer(x).float()
    lam = torch.rand(32) + 0.5
    _scale_rows(layer, lam)
    torch.testing.assert_close(layer(x).float(), before * lam, rtol=2e-3, atol=2e-3)


def test_fold_rejects_scales_of_another_model():
    model = tiny("llama")
    with pytest.raises(ValueError, match="key scales"):
        fold_key_scales(model, [torch.ones(2, 16)])
    with pytest.raises(ValueError, match="alpha"):
        key_scales([torch.ones(2, 8)], 1.5)
