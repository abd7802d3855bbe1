"""The static KV cache of the fast path and attention over it.

The cache holds k (after RoPE) and v per layer, in the model's dtype or, with ``bits=8``, as int8 codes with a
per-token, per-head fp32 scale: ``numerics.quantize_per_token`` over each head's ``head_dim`` values (symmetric,
``scale = amax / 127``). The RoPE producer writes it (``qqq.fast.producers.rope_into_cache``) and the split-KV
decode kernel reads it (``qqq.kernels_triton.decode_attention``). With ``bits=8`` the producer rounds each query
(after RoPE) onto its own int8 grid per token and head too, so that every score can be an int8 dot product times
two scales. :func:`kv_cache_fake_quantized` applies the same rounding inside a Hugging Face model, so the accuracy
cost can be measured on the reference path.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qqq import numerics
from qqq.fast.backend import triton_or_reference

KV_BITS = (16, 8)


class LayerCache(NamedTuple):
    """One layer's cache: ``k``, ``v`` [B, Hkv, S, D]; ``k_scale``, ``v_scale`` fp32 [B, Hkv, S] (int8 only)."""
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


class KVCache:
    """Static cache: ``k`` and ``v`` [layers, batch, kv_heads, capacity, head_dim] in ``dtype`` (``bits=16``, the
    model's own dtype) or int8 with scales ``k_scale`` / ``v_scale`` [layers, batch, kv_heads, capacity]
    (``bits=8``)."""

    def __init__(self, arch, batch: int, capacity: int, dtype: torch.dtype, device, bits: int = 16):
        if bits not in KV_BITS:
            raise ValueError(f"the KV cache holds {' or '.join(map(str, KV_BITS))}-bit values, not {bits}")
        shape = (arch.layers, batch, arch.kv_heads, capacity, arch.head_dim)
        storage = torch.int8 if bits == 8 else dtype
        self.k = torch.zeros(shape, dtype=storage, device=device)
        self.v = torch.zeros(shape, dtype=storage, device=device)
        self.k_scale = self.v_scale = None
        if bits == 8:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        self.capacity, self.bits = capacity, bits

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self.k[index], self.v[index], *(None if s is None else s[index]
                                                           for s in (self.k_scale, self.v_scale)))


def attention(q: torch.Tensor, cache: LayerCache, positions: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``q`` [B, H, T, D] over the first B sequences of ``cache``: a prefill from position 0
    (T > 1, SDPA over the keys just written) or one decode step per sequence (T == 1, keys up to its position:
    ``decode_attention`` or its reference). ``q`` is what ``rope_into_cache`` returned: over an 8-bit cache, on its
    int8 grid already."""
    batch, t = q.shape[0], q.shape[2]
    k, v, k_scale, v_scale = (None if part is None else part[:batch] for part in cache)
    if t > 1:
        keys = slice(None, t)
        k, v = k[:, :, keys], v[:, :, keys]
        if k_scale is not None:
            as_dtype = triton_or_reference(q, "fused_producers.dequantize_cache", dequantized)
            k, v = as_dtype(k, k_scale[:, :, keys], q.dtype), as_dtype(v, v_scale[:, :, keys], q.dtype)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **_gqa(q, k))
    decode = triton_or_reference(q, "decode_attention.decode_attention", decode_attention_reference)
    return decode(q, k, v, positions[:, -1], k_scale, v_scale, query_on_grid=True)


def decode_attention_reference(q, k_cache, v_cache, positions, k_scale=None, v_scale=None, query_on_grid=False):
    """What ``kernels_triton.decode_attention.decode_attention`` computes: SDPA of ``q`` [B, H, 1, D] over the
    (dequantized) cache [B, Hkv, S, D], keys ``0..positions[b]`` of sequence ``b``. Over an 8-bit cache, with ``q``
    rounded onto its int8 grid per head unless ``query_on_grid`` says it is there (as ``rope_into_cache`` returns
    it with that cache)."""
    if k_scale is not None and not query_on_grid:
        q = numerics.fake_quantize_per_token(q)
    k, v = dequantized(k_cache, k_scale, torch.float32), dequantized(v_cache, v_scale, torch.float32)
    visible = torch.arange(k.shape[2], device=k.device)[None, :] <= positions[:, None]
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=visible[:, None, None, :], **_gqa(q, k))
    return out.to(q.dtype)


def dequantized(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache entries as ``dtype``: int8 codes times their per-token, per-head scale, or 16-bit values as they are."""
    if scale is None:
        return values.to(dtype)
    # one elementwise pass: int8 times fp32 is computed in fp32 and rounded once to ``dtype`` as it is stored (a
    # prefill reads its whole cache through here, and a float() copy first tripled the bytes moved)
    return torch.mul(values, scale[..., None], out=torch.empty(values.shape, dtype=dtype, device=values.device))


def _gqa(q: torch.Tensor, k: torch.Tensor) -> dict:
    return {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}


QUERY_BITS = (16, 8)
KV8_ATTENTION = {16: "qqq_kv8_sdpa", 8: "qqq_kv8_q8_sdpa"}  # by query_bits


def _kv8_sdpa(module, query, key, value, attention_mask, round_query=False, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # query [B, H, T, D], key (after RoPE) and value [B, Hkv, T, D]: one int8 grid per token and head
    if round_query:
        query = numerics.fake_quantize_per_token(query)
    return sdpa_attention_forward(module, query, numerics.fake_quantize_per_token(key),
                                  numerics.fake_quantize_per_token(value), attention_mask, **kwargs)


@contextmanager
def kv_cache_fake_quantized(model, query_bits: int = 8):
    """Within the block, the Hugging Face ``model`` attends (SDPA) to keys and values rounded as the 8-bit KV
    cache stores them and (``query_bits=8``) each query rounded onto its own int8 grid per token and head: the
    numerics of the fast path's ``bits=8``, whose scores are int8 dot products (q codes . k codes times both
    scales), on the reference path. ``query_bits=16`` keeps the queries as computed (the cost of the cache
    alone)."""
    from transformers import AttentionInterface

    if query_bits not in QUERY_BITS:
        raise ValueError(f"query_bits must be one of {QUERY_BITS}, got {query_bits}")
    name = KV8_ATTENTION[query_bits]
    AttentionInterface.register(name, partial(_kv8_sdpa, round_query=query_bits == 8))
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
