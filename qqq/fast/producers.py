"""The producers of the fast path: the ops that feed a GEMM or the KV cache, each a fused Triton kernel
(``qqq.kernels_triton.fused_producers``) or the plain PyTorch composition below (``*_reference``), which is what
the kernels compute and are tested against.

- :func:`rmsnorm`: [residual add +] Hugging Face's Llama RMSNorm, as per-token int8 (``Int8Rows``) or fp16 rows;
- :func:`silu_mul`: ``SiLU(gate) * up`` of a fused gate/up output, as int8 or fp16 rows;
- :func:`rope_into_cache`: RoPE on q and k of a fused q/k/v output, k and v written into the KV cache (16-bit, or
  int8 codes with per-token, per-head scales: ``numerics.quantize_per_token`` over each head's ``head_dim``, and
  then q rounded onto its int8 grid per head too);
- :func:`quantize_rows`: per-token int8 of plain rows (the o_proj input).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from qqq import numerics
from qqq.fast.backend import triton_or_reference


class Int8Rows(NamedTuple):
    """Per-token int8 activations: ``codes`` int8 [M, K], ``scale`` fp32 [M]."""
    codes: torch.Tensor
    scale: torch.Tensor


def rmsnorm(x, weight, eps, residual=None, quantize=True):
    """``h = x (+ residual)``, RMSNorm of ``h``: ``Int8Rows`` if ``quantize`` else rows in ``x``'s dtype, plus ``h``
    (the updated residual stream) when ``residual`` is given."""
    out = triton_or_reference(x, "fused_producers.rmsnorm_quantize", rmsnorm_reference)(x, weight, eps, residual,
                                                                                         quantize)
    normalized, updated = (out, None) if residual is None else out
    normalized = Int8Rows(*normalized) if quantize else normalized
    return normalized if residual is None else (normalized, updated)


def silu_mul(gate_up, quantize=True):
    """``SiLU(gate) * up`` of ``gate_up = [gate | up]``: ``Int8Rows`` if ``quantize`` else rows in its dtype."""
    out = triton_or_reference(gate_up, "fused_producers.silu_mul_quantize", silu_mul_reference)(gate_up, quantize)
    return Int8Rows(*out) if quantize else out


def rope_into_cache(qkv, cos, sin, positions, k_cache, v_cache, n_heads, k_scale=None, v_scale=None):
    """q rotated [B, H, T, D]; k (rotated) and v written into the caches at ``positions`` (int8 with their scales
    when ``k_scale`` / ``v_scale`` are given)."""
    rope = triton_or_reference(qkv, "fused_producers.rope_into_cache", rope_into_cache_reference)
    return rope(qkv, cos, sin, positions, k_cache, v_cache, n_heads, k_scale, v_scale)


def quantize_rows(x: torch.Tensor) -> Int8Rows:
    """Per-token int8 rows of ``x`` [M, K]."""
    return Int8Rows(*triton_or_reference(x, "activation_quant.quantize_per_token", _per_token)(x))


def rmsnorm_reference(x, weight, eps, residual=None, quantize=True):
    """Plain composition of ``fused_producers.rmsnorm_quantize``: Hugging Face's Llama RMSNorm, then
    ``numerics.quantize_per_token``."""
    rows = x.reshape(-1, x.shape[-1])
    h = rows if residual is None else residual.reshape(rows.shape) + rows
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    out = Int8Rows(*_per_token(y)) if quantize else y
    return out if residual is None else (out, h)


def silu_mul_reference(gate_up, quantize=True):
    """Plain composition of ``fused_producers.silu_mul_quantize``: Llama's ``SiLU(gate) * up``, then quantization."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    gate, up = rows.chunk(2, dim=-1)
    y = F.silu(gate) * up
    return Int8Rows(*_per_token(y)) if quantize else y


def rope_into_cache_reference(qkv, cos, sin, positions, k_cache, v_cache, n_heads, k_scale=None, v_scale=None):
    """Plain composition of ``fused_producers.rope_into_cache`` (RoPE in fp32, one rounding to ``qkv``'s dtype;
    for an int8 cache, then ``numerics.quantize_per_token`` over each head, and q fake-quantized so)."""
    batch, t, _ = qkv.shape
    n_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    heads = qkv.reshape(batch, t, n_heads + 2 * n_kv_heads, head_dim).transpose(1, 2).float()
    cos_t, sin_t = cos[positions][:, None], sin[positions][:, None]  # [B, 1, T, D / 2]
    first, second = heads[:, : n_heads + n_kv_heads].chunk(2, dim=-1)
    rotated = torch.cat((first * cos_t - second * sin_t, second * cos_t + first * sin_t), dim=-1).to(qkv.dtype)
    index = positions[:, None, :].expand(batch, n_kv_heads, t)
    for cache, scale, values in ((k_cache, k_scale, rotated[:, n_heads:]),
                                 (v_cache, v_scale, heads[:, n_heads + n_kv_heads:].to(qkv.dtype))):
        if scale is not None:
            values, value_scale = numerics.quantize_per_token(values)
            scale[:batch].scatter_(2, index, value_scale[..., 0])
        cache[:batch].scatter_(2, index[..., None].expand(batch, n_kv_heads, t, head_dim), values)
    q = rotated[:, :n_heads]
    return (numerics.fake_quantize_per_token(q) if k_scale is not None else q).contiguous()


def _per_token(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale = numerics.quantize_per_token(y)
    return codes, scale[:, 0]
