"""Attention of one decode step over a static KV cache (split-KV "flash decoding").

Each (sequence, head) reads its keys 0..position from the cache; the keys are split over several programs so
that a small batch still spreads the cache read over the whole GPU. Each program keeps an online softmax
(running max, sum and weighted values) over its keys; a second small kernel merges the splits. The sequence
lengths are read from the device (``positions``), so one CUDA graph serves every step, and nothing past a
sequence's position is read (no mask tensor is built). GQA: query head ``h`` reads kv head ``h // (H / Hkv)``.

An 8-bit cache (int8 codes, an fp32 scale per token and head) is read as codes: a key's score is
``(codes . q) * k_scale`` and a value enters the sum with weight ``p * v_scale``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qqq.kernels_triton import branches
from qqq.kernels_triton.fused_producers import check_cache_scales
from qqq.kernels_triton.gpu import current_gpu

BLOCK_KEYS = 64
PROGRAMS_PER_SM = 8  # enough loads in flight to stream the cache at small batch
MAX_SPLITS = 64
LAUNCH_BRANCHES = {"decode_attention": ("split_kv", "split_kv_int8")}


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, positions_ptr, partial_ptr, stats_ptr,
                         n_heads, group, keys_per_split, sm_scale,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_sb, stride_sh,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                         QUANTIZED: tl.constexpr):
    row = tl.program_id(0)  # batch * n_heads + head
    split = tl.program_id(1)
    batch = row // n_heads
    head = row % n_heads
    length = tl.load(positions_ptr + batch).to(tl.int32) + 1
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, length)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + dims).to(tl.float32) * sm_scale
    kv_offset = batch.to(tl.int64) * stride_kb + (head // group) * stride_kh
    scale_offset = batch.to(tl.int64) * stride_sb + (head // group) * stride_sh
    running_max = tl.zeros([], dtype=tl.float32) - float("inf")
    running_sum = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        keys = first + tl.arange(0, BLOCK_N)
        valid = keys < end
        offsets = kv_offset + keys[:, None] * stride_ks + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0).to(tl.float32)  # in flight with k
        scores = tl.sum(k * q[None, :], axis=1)
        if QUANTIZED:
            scores = scores * tl.load(k_scale_ptr + scale_offset + keys, mask=valid, other=0.0)
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max)
        value_weights = weights
        if QUANTIZED:
            value_weights = weights * tl.load(v_scale_ptr + scale_offset + keys, mask=valid, other=0.0)
        acc = acc * rescale + tl.sum(value_weights[:, None] * v, axis=0)
        running_sum = running_sum * rescale + tl.sum(weights, axis=0)
        running_max = new_max
    slot = row * SPLITS + split
    tl.store(partial_ptr + slot * HEAD_DIM + dims, acc)
    tl.store(stats_ptr + slot * 2, running_max)
    tl.store(stats_ptr + slot * 2 + 1, running_sum)


@triton.jit
def _decode_merge_kernel(partial_ptr, stats_ptr, out_ptr, n_heads, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    maxima = tl.load(stats_ptr + (row * SPLITS + splits) * 2)
    sums = tl.load(stats_ptr + (row * SPLITS + splits) * 2 + 1)
    overall = tl.max(maxima, axis=0)  # split 0 always holds key 0, so this is finite
    weights = tl.exp(maxima - overall)  # empty splits: exp(-inf) = 0
    partial = tl.load(partial_ptr + (row * SPLITS + splits[:, None]) * HEAD_DIM + dims[None, :])
    out = tl.sum(partial * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
    batch = row // n_heads
    head = row % n_heads
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def split_count(rows: int, capacity: int) -> int:
    """Splits per (sequence, head): enough programs to fill the GPU, at least a block of keys each."""
    wanted = math.ceil(PROGRAMS_PER_SM * current_gpu().sm_count / rows)
    return min(triton.next_power_of_2(wanted), MAX_SPLITS, triton.next_power_of_2(triton.cdiv(capacity, BLOCK_KEYS)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of ``q`` [B, H, 1, D] over ``k_cache``/``v_cache`` [B, Hkv, S, D], keys ``0..positions[b]``
    (int [B]) of sequence ``b``, scaled by ``1 / sqrt(D)``. Returns [B, H, 1, D] in ``q``'s dtype.

    An 8-bit cache: int8 ``k_cache``/``v_cache`` with ``k_scale``/``v_scale`` fp32 [B, Hkv, S] (the value of an
    entry is its codes times its scale)."""
    batch, n_heads, t, head_dim = q.shape
    n_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    quantized = k_scale is not None or v_scale is not None
    if t != 1:
        raise ValueError(f"decode_attention takes one query per sequence, got {t}")
    if head_dim & (head_dim - 1) or head_dim < 16 or k_cache.shape[3] != head_dim:
        raise ValueError(f"decode_attention needs a power-of-two head dim >= 16 matching the cache, got {head_dim} "
                         f"and cache {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[0] != batch \
            or k_cache.dtype != v_cache.dtype or k_cache.stride(-1) != 1 or q.stride(-1) != 1 or n_heads % n_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} and caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not match")
    if quantized:
        check_cache_scales(k_cache, k_scale, v_scale)
    elif k_cache.dtype == torch.int8:
        raise ValueError("an int8 KV cache needs its k_scale and v_scale")
    if positions.shape != (batch,):
        raise ValueError(f"positions must be [{batch}], got {tuple(positions.shape)}")
    rows = batch * n_heads
    splits = split_count(rows, capacity)
    keys_per_split = triton.cdiv(triton.cdiv(capacity, splits), BLOCK_KEYS) * BLOCK_KEYS
    partial = torch.empty((rows, splits, head_dim), dtype=torch.float32, device=q.device)
    stats = torch.empty((rows, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    positions = positions.contiguous()
    branches.record("decode_attention", "split_kv_int8" if quantized else "split_kv")
    if not quantized:
        k_scale = v_scale = partial  # unused
    _decode_split_kernel[(rows, splits)](
        q, k_cache, v_cache, k_scale, v_scale, positions, partial, stats, n_heads, n_heads // n_kv_heads,
        keys_per_split, 1.0 / math.sqrt(head_dim), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), k_scale.stride(0), k_scale.stride(1), HEAD_DIM=head_dim, BLOCK_N=BLOCK_KEYS,
        SPLITS=splits, QUANTIZED=quantized, num_warps=4)
    _decode_merge_kernel[(rows,)](partial, stats, out, n_heads, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
                                  SPLITS=splits, num_warps=1)
    return out
