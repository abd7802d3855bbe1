"""SmoothAttention (QServe): a per-channel scale on the keys, folded into ``q_proj`` and ``k_proj``, so that the
8-bit KV cache rounds keys whose outlier channels are tamed. Exact in floating point: every score ``q . k`` is
unchanged.

Keys have a few channels far larger than the rest (Qwen2.5-Coder-0.5B on exllamav2-c4: the largest per-channel
maximum is up to 39x the median one), and one int8 grid per token and head then rounds the other channels
coarsely. Dividing key channel ``c`` by ``lambda_c`` and multiplying the queries' channel ``c`` by it leaves the
scores as they were. ``lambda_c = m_c ** alpha``, where ``m_c`` is the largest norm over the calibration tokens of
the channel pair that RoPE rotates together (``c`` and ``c + D/2``, a RoPE-invariant statistic); both channels of
a pair get the same ``lambda``, so the scale commutes with RoPE and folds into the projections' rows and biases.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qqq.data import calibration_windows, load_text, tokenize
from qqq.linear import FakeQuantLinear, QQQLinear

DEFAULT_ALPHA = 0.5  # QServe's
CALIBRATION_TEXT = "exllamav2-c4"
CALIBRATION_WINDOWS = (8, 512)  # windows x tokens: the key statistics settle fast (a max over 4096 tokens)


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention modules with q_proj and k_proj")
    return layers


def _head_dim(model: nn.Module, layer: nn.Module) -> int:
    return getattr(layer, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads


@torch.no_grad()
def key_pair_maxima(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per attention layer, fp32 [Hkv, D / 2]: the largest ``sqrt(k_c^2 + k_{c + D/2}^2)`` over the tokens of
    ``windows`` [n, seq_len] (the keys before RoPE, which rotates each pair without changing its norm)."""
    layers = _attention_layers(model)
    maxima: list[torch.Tensor | None] = [None] * len(layers)

    def record(index: int, head_dim: int):
        def hook(_module, _args, output):
            keys = output.float().reshape(-1, output.shape[-1] // head_dim, head_dim)
            half = head_dim // 2
            pair = keys[..., :half].hypot(keys[..., half:]).amax(dim=0)
            maxima[index] = pair if maxima[index] is None else torch.maximum(maxima[index], pair)
        return hook

    handles = [layer.k_proj.register_forward_hook(record(i, _head_dim(model, layer))) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for window in tqdm(windows, desc="key statistics", unit="window"):
            model(window[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def key_scales(maxima: list[torch.Tensor], alpha: float = DEFAULT_ALPHA) -> list[torch.Tensor]:
    """``lambda`` [Hkv, D] per layer from :func:`key_pair_maxima`: ``m ** alpha``, the same for both channels of a
    RoPE pair (``alpha`` 0 leaves the keys as they are)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    scales = []
    for pair in maxima:
        lam = pair.clamp(min=1e-5) ** alpha
        scales.append(torch.cat([lam, lam], dim=-1))
    return scales


def _scale_rows(linear: nn.Module, factor: torch.Tensor) -> None:
    """Multiply output channel ``n`` of ``linear`` by ``factor[n]`` (weight rows and bias)."""
    if isinstance(linear, QQQLinear):
        linear.channel_scale.mul_(factor.to(linear.channel_scale))
    elif isinstance(linear, (nn.Linear, FakeQuantLinear)):
        linear.weight.mul_(factor.to(linear.weight)[:, None])
    else:
        raise TypeError(f"cannot fold a key scale into a {type(linear).__name__}")
    if linear.bias is not None:
        linear.bias.mul_(factor.to(linear.bias))


@torch.no_grad()
def fold_key_scales(model: nn.Module, scales: list[torch.Tensor]) -> None:
    """Divide each layer's keys by its ``lambda`` [Hkv, D] and multiply the queries of the heads that read them by
    it, in ``k_proj`` and ``q_proj`` (in place)."""
    layers = _attention_layers(model)
    if len(scales) != len(layers):
        raise ValueError(f"{len(scales)} key scales for {len(layers)} attention layers")
    for layer, lam in zip(layers, scales):
        kv_heads, head_dim = lam.shape
        heads = layer.q_proj.out_features // head_dim
        if layer.k_proj.out_features != kv_heads * head_dim or heads % kv_heads:
            raise ValueError(f"key scales {tuple(lam.shape)} do not match k_proj ({layer.k_proj.out_features}) "
                             f"and {heads} query heads")
        _scale_rows(layer.k_proj, 1.0 / lam.reshape(-1))
        _scale_rows(layer.q_proj, lam.repeat_interleave(heads // kv_heads, dim=0).reshape(-1))


def smooth_attention(model: nn.Module, windows: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> nn.Module:
    """Calibrate the key scales on ``windows`` and fold them into ``model`` (in place); returns ``model``."""
    fold_key_scales(model, key_scales(key_pair_maxima(model, windows), alpha))
    return model


def smooth_attention_calibrated(model: nn.Module, tokenizer, alpha: float = DEFAULT_ALPHA,
                                text: str = CALIBRATION_TEXT, seed: int = 0) -> nn.Module:
    """:func:`smooth_attention` on ``CALIBRATION_WINDOWS`` windows of the calibration ``text`` (a dataset name of
    ``qqq.data``); returns ``model``."""
    windows = calibration_windows(tokenize(tokenizer, load_text(text, "train")), *CALIBRATION_WINDOWS, seed=seed)
    return smooth_attention(model, windows, alpha)
