"""Attention of one decode step over a static KV cache (split-KV "flash decoding").

A program owns one kv head of one sequence and all the query heads that read it (GQA: query head ``h`` reads kv
head ``h // (H / Hkv)``), as the rows of tensor-core dots padded to 16, so each key block is read once for its
group. The keys are split over several programs so that a small batch still spreads the cache read over the
whole GPU; each keeps an online softmax (running max, sum and weighted values) over its keys, its loads
pipelined (``num_stages``), and a second small kernel merges the splits. The sequence lengths are read from the
device (``positions``), so one CUDA graph serves every step, and nothing past a sequence's position is read (no
mask tensor is built).

Precision: the scores' products are exact (16-bit values into an fp32 accumulator); the softmax weights enter
the value dot in the queries' 16-bit type, as in FlashAttention. An 8-bit cache (int8 codes, an fp32 scale per
token and head) is read as codes, converted exactly to 16 bits: a key's score is ``(codes . q) * k_scale`` and
a value enters the sum with weight ``p * v_scale`` (over the block's largest ``v_scale``, rescaled in fp32). Over
an 8-bit cache every kernel attends with each query head on its own int8 grid (where ``rope_into_cache`` writes
it; a kernel rounds it there itself unless told it is), so a score is an int8 dot product times both scales
whichever kernel takes the step.
(The first kernel, one query head per program with CUDA-core fp32 products and no pipelining, was up to 1.5x
slower: see NOTES.md.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qqq.kernels_triton import branches
from qqq.kernels_triton.fused_producers import check_cache_scales
from qqq.kernels_triton.gpu import current_gpu, programmatic_launch, wait_for_previous_then_let_next_start
from qqq.kernels_triton.activation_quant import int8_codes_and_scale
from qqq.kernels_triton.unpack import use_inline_asm
from qqq.kernels_triton.w4a8_gemv import dot4_int8

BLOCK_KEYS = 64  # keys per block of the 16-bit cache (the int8 cache's blocks are twice as long)
PROGRAMS_PER_SM = 4  # with the pipelined loads, enough to stream the cache at small batch
MAX_SPLITS = 64
LAUNCH_BRANCHES = {"decode_attention": ("split_kv", "split_kv_int8", "slots", "slots_int8", "slots_int8_scores")}


@triton.jit
def fp16_from_int8(codes, USE_ASM: tl.constexpr):
    """int8 codes -> the same integers in fp16 (exact). On the GPU 4 codes at a time: the codes + 128 become the
    low mantissa bytes of 1024.0 (``prmt``), then one ``sub.f16x2`` of 1152 per pair; a plain cast elsewhere."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, magic;
            xor.b32 t, $2, 0x80808080;
            mov.b32 magic, 0x64806480;
            prmt.b32 $0, t, 0x64646464, 0x5140;
            prmt.b32 $1, t, 0x64646464, 0x5342;
            sub.f16x2 $0, $0, magic;
            sub.f16x2 $1, $1, magic;
            }""", "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return codes.to(tl.float16)


@triton.jit
def split_of(positions_ptr, batch, kv_head, split, keys_per_split, stride_kb, stride_kh, stride_sb, stride_sh):
    """The keys ``start .. end`` that program ``split`` of (``batch``, ``kv_head``) reads (up to the sequence's
    position) and where that kv head's cache rows and scales start."""
    length = tl.load(positions_ptr + batch).to(tl.int32) + 1
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, length)
    kv_offset = batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    scale_offset = batch.to(tl.int64) * stride_sb + kv_head * stride_sh
    return start, end, kv_offset, scale_offset


@triton.jit
def key_block(k_ptr, v_ptr, kv_offset, first, end, stride_ks, dims, BLOCK_N: tl.constexpr):
    """The keys ``first .. first + BLOCK_N`` of a split ending at ``end``: their indices, which are real, and their
    K and V rows (zeros past ``end``, which is never read)."""
    keys = first + tl.arange(0, BLOCK_N)
    valid = keys < end
    offsets = kv_offset + keys[:, None] * stride_ks + dims[None, :]
    k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0)
    v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0)
    return keys, valid, k, v


@triton.jit
def query_on_int8_grid(q, AXIS: tl.constexpr):
    """fp32 queries rounded onto their int8 grid per head (``numerics.fake_quantize_per_token`` along ``AXIS``,
    the head dim): what every kernel over an 8-bit cache attends with."""
    codes, scale = int8_codes_and_scale(q, tl.max(tl.abs(q), axis=AXIS, keep_dims=True))
    return codes.to(tl.float32) * scale


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, positions_ptr, partial_ptr, stats_ptr,
                         n_heads, n_kv_heads, group, keys_per_split, sm_scale,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_sb, stride_sh,
                         splits, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         QUANTIZED: tl.constexpr, ROUND_QUERY: tl.constexpr, ASM_CODES: tl.constexpr,
                         NUM_STAGES: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_then_let_next_start(PDL)
    kv_row = tl.program_id(0)  # batch * n_kv_heads + kv head
    split = tl.program_id(1)
    batch = kv_row // n_kv_heads
    kv_head = kv_row % n_kv_heads
    start, end, kv_offset, scale_offset = split_of(positions_ptr, batch, kv_head, split, keys_per_split, stride_kb,
                                                   stride_kh, stride_sb, stride_sh)
    dims = tl.arange(0, HEAD_DIM)
    members = tl.arange(0, BLOCK_H)  # the query heads of this kv head; rows >= group are padding
    heads = kv_head * group + members
    member = members < group
    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=member[:, None],
                other=0)
    if QUANTIZED:
        if ROUND_QUERY:
            q = query_on_int8_grid(q.to(tl.float32), 1).to(q.dtype)
        compute = q.dtype  # the codes are converted to the queries' type (exactly: |code| <= 127)
    else:
        compute = k_ptr.dtype.element_ty
        q = q.to(compute)
    running_max = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    running_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for first in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        keys, valid, k, v = key_block(k_ptr, v_ptr, kv_offset, first, end, stride_ks, dims, BLOCK_N)
        if QUANTIZED:
            if compute == tl.float16:
                k = fp16_from_int8(k, ASM_CODES)
                v = fp16_from_int8(v, ASM_CODES)
            else:
                k = k.to(compute)
                v = v.to(compute)
        if compute == tl.float32:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))  # fp16/bf16 products are exact in the fp32 accumulator
        scores = scores * sm_scale
        if QUANTIZED:
            scores = scores * tl.load(k_scale_ptr + scale_offset + keys, mask=valid, other=0.0)[None, :]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        running_max = new_max
        if QUANTIZED:
            # p * v_scale, over the block's largest scale so the weights stay <= 1 (no 16-bit underflow of the
            # terms that matter); the dot's result is scaled back in fp32
            v_scale = tl.load(v_scale_ptr + scale_offset + keys, mask=valid, other=0.0)
            block_scale = tl.maximum(tl.max(v_scale, axis=0), 1e-30)
            weights = weights * (v_scale / block_scale)[None, :]
        if compute == tl.float32:
            values = tl.dot(weights, v, input_precision="ieee")
        else:
            values = tl.dot(weights.to(compute), v)
        if QUANTIZED:
            values = values * block_scale
        acc = acc * rescale[:, None] + values
    slots = (batch * n_heads + heads) * splits + split
    tl.store(partial_ptr + slots[:, None] * HEAD_DIM + dims[None, :], acc, mask=member[:, None])
    tl.store(stats_ptr + slots * 2, running_max, mask=member)
    tl.store(stats_ptr + slots * 2 + 1, running_sum, mask=member)


@triton.jit
def _decode_split_slots_kernel(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, positions_ptr, partial_ptr, stats_ptr,
                               n_heads, group, keys_per_split, sm_scale,
                               stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_sb, stride_sh,
                               splits, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, QUANTIZED: tl.constexpr,
                               ROUND_QUERY: tl.constexpr, ASM_CODES: tl.constexpr, INT8_SCORES: tl.constexpr,
                               NUM_STAGES: tl.constexpr, PDL: tl.constexpr):
    """One query head per program, on the CUDA cores (fp32 products), each of the BLOCK_N key slots keeping its own
    online softmax over the keys ``slot, slot + BLOCK_N, ...`` of the split: no reduction across keys inside the
    loop, one merge of the slots at the end. For MHA, where the tensor-core kernel's dots carry one real row of 16.
    ``INT8_SCORES`` (int8 cache): the query's int8 codes per head (``numerics.quantize_per_token``), so a key's
    score is an exact int32 sum of ``dp4a`` over its code words, times both scales (the numerics of the other
    kernels over an 8-bit cache, whose queries are rounded onto the same grid, up to fp32 rounding)."""
    wait_for_previous_then_let_next_start(PDL)
    row = tl.program_id(0)  # batch * n_heads + query head
    split = tl.program_id(1)
    batch = row // n_heads
    head = row % n_heads
    kv_head = head // group
    start, end, kv_offset, scale_offset = split_of(positions_ptr, batch, kv_head, split, keys_per_split, stride_kb,
                                                   stride_kh, stride_sb, stride_sh)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + dims).to(tl.float32)
    if INT8_SCORES:
        q_codes, q_scale = int8_codes_and_scale(q, tl.max(tl.abs(q), axis=0))
        lanes = tl.reshape(q_codes.to(tl.int32) & 0xFF, [HEAD_DIM // 4, 4]) << (8 * tl.arange(0, 4))[None, :]
        q_words = tl.sum(lanes, axis=1)  # 4 codes per word, lane i in byte i (disjoint bits: the sum is the OR)
        q_scale = q_scale * sm_scale
        words = tl.arange(0, HEAD_DIM // 4)
        k_words_ptr = k_ptr.to(tl.pointer_type(tl.int32)) + kv_offset // 4  # the launcher checks the alignment
    else:
        if QUANTIZED and ROUND_QUERY:
            q = query_on_int8_grid(q, 0)
        q = q * sm_scale
    slot_max = tl.zeros([BLOCK_N], dtype=tl.float32) - float("inf")
    slot_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for first in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        if INT8_SCORES:
            keys = first + tl.arange(0, BLOCK_N)
            valid = keys < end
            k_words = tl.load(k_words_ptr + keys[:, None] * (stride_ks // 4) + words[None, :], mask=valid[:, None],
                              other=0)
            v = tl.load(v_ptr + kv_offset + keys[:, None] * stride_ks + dims[None, :], mask=valid[:, None], other=0)
            v = fp16_from_int8(v, ASM_CODES)
            sums = tl.sum(dot4_int8(k_words, q_words[None, :], tl.zeros_like(k_words), ASM_CODES), axis=1)
            scores = sums.to(tl.float32) * q_scale
        else:
            keys, valid, k, v = key_block(k_ptr, v_ptr, kv_offset, first, end, stride_ks, dims, BLOCK_N)
            if QUANTIZED:
                k = fp16_from_int8(k, ASM_CODES)
                v = fp16_from_int8(v, ASM_CODES)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if QUANTIZED:
            scores = scores * tl.load(k_scale_ptr + scale_offset + keys, mask=valid, other=0.0)
        new_max = tl.where(valid, tl.maximum(slot_max, scores), slot_max)
        reference = tl.where(new_max > float("-inf"), new_max, 0.0)  # a slot with no key yet keeps (-inf, 0, 0)
        rescale = tl.exp(slot_max - reference)
        weights = tl.where(valid, tl.exp(scores - reference), 0.0)
        slot_sum = slot_sum * rescale + weights
        slot_max = new_max
        if QUANTIZED:
            weights = weights * tl.load(v_scale_ptr + scale_offset + keys, mask=valid, other=0.0)
        acc = acc * rescale[:, None] + weights[:, None] * v.to(tl.float32)
    overall = tl.max(slot_max, axis=0)  # -inf only for an empty split, whose stats then say so: (-inf, 0)
    slot_weights = tl.exp(slot_max - tl.where(overall > float("-inf"), overall, 0.0))
    slot = row * splits + split
    tl.store(partial_ptr + slot * HEAD_DIM + dims, tl.sum(acc * slot_weights[:, None], axis=0))
    tl.store(stats_ptr + slot * 2, overall)
    tl.store(stats_ptr + slot * 2 + 1, tl.sum(slot_sum * slot_weights, axis=0))


@triton.jit
def _decode_merge_kernel(partial_ptr, stats_ptr, out_ptr, n_heads, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_then_let_next_start(PDL)
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


def split_count(rows: int, capacity: int, programs_per_sm: int = PROGRAMS_PER_SM, block_keys: int = BLOCK_KEYS) -> int:
    """Splits per program row (a (sequence, head) or (sequence, kv head)): enough programs to fill the GPU, at
    least a block of keys each."""
    wanted = math.ceil(programs_per_sm * current_gpu().sm_count / rows)
    return min(triton.next_power_of_2(wanted), MAX_SPLITS, triton.next_power_of_2(triton.cdiv(capacity, block_keys)))


SLOTS_FROM_KEYS = 4096  # batch x capacity from which the CUDA-core kernel wins over an 8-bit MHA cache


def default_config(quantized: bool, group: int = 0, keys: int = 0, words_aligned: bool = True) -> dict:
    """The launch of a decode step (``config`` of :func:`decode_attention`): keys per block, warps, pipeline
    stages, programs per SM the splits aim at, (int8) the codes' conversion in PTX, ``slots``: the CUDA-core
    kernel of one query head per program (``_decode_split_slots_kernel``) instead of the tensor cores', and with it
    ``int8_scores``: the query's int8 codes and the scores as int32 sums.

    The tensor-core launches are the best single choice per cache format over batch 1-64, contexts 1k-4k, MHA and
    GQA on the H200 (``experiments/attention_speed.py --sweep``, results/attention_speed_sweep_h200.csv). An 8-bit
    cache of ``group`` 1 (MHA) holding ``keys`` = batch x capacity >= SLOTS_FROM_KEYS takes the CUDA-core kernel
    with int8 scores instead (``words_aligned``: its cache's rows and strides are whole 32-bit words): 25% less
    time at batch 16 and 64, 1k and 4k, and at batch 1, 4k; at batch 1, 1k the tensor cores' launch is faster (9.3
    against 7.7 us; ``--sweep-slots``, results/attention_speed_sweep_slots_h200.csv). GQA was not measured with it."""
    if quantized and group == 1 and keys >= SLOTS_FROM_KEYS and words_aligned:
        return {"BLOCK_N": 16, "num_warps": 4, "num_stages": 4, "programs_per_sm": 2, "int8_ptx": True,
                "slots": True, "int8_scores": True}
    if quantized:
        return {"BLOCK_N": 2 * BLOCK_KEYS, "num_warps": 4, "num_stages": 3, "programs_per_sm": PROGRAMS_PER_SM,
                "int8_ptx": True}
    return {"BLOCK_N": BLOCK_KEYS, "num_warps": 4, "num_stages": 2, "programs_per_sm": PROGRAMS_PER_SM}


def in_words(cache: torch.Tensor) -> bool:
    """Whether an int8 cache's start, rows and strides are whole 32-bit words (``int8_scores`` loads them so)."""
    return cache.shape[-1] % 4 == 0 and cache.data_ptr() % 4 == 0 and all(s % 4 == 0 for s in cache.stride()[:3])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     config: dict | None = None, query_on_grid: bool = False) -> torch.Tensor:
    """Softmax attention of ``q`` [B, H, 1, D] over ``k_cache``/``v_cache`` [B, Hkv, S, D], keys ``0..positions[b]``
    (int [B]) of sequence ``b``, scaled by ``1 / sqrt(D)``. Returns [B, H, 1, D] in ``q``'s dtype.

    An 8-bit cache: int8 ``k_cache``/``v_cache`` with ``k_scale``/``v_scale`` fp32 [B, Hkv, S] (the value of an
    entry is its codes times its scale; the query is rounded onto its int8 grid per head first, unless
    ``query_on_grid`` says it is there already, as ``rope_into_cache`` writes it: rounding it again gives back its
    codes but cost the tensor-core kernel 1.5-8 us per call on the H200; ``int8_scores`` computes the codes
    either way). ``config``: the kernel and launch
    (:func:`default_config`'s keys; by default chosen for the cache's format, GQA group and size)."""
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
    group = n_heads // n_kv_heads
    config = config or default_config(quantized, group, batch * capacity, quantized and in_words(k_cache))
    block_n = config["BLOCK_N"]
    slots = config.get("slots", False)  # the CUDA-core kernel: one query head per program
    int8_scores = config.get("int8_scores", False)
    if int8_scores and not (slots and quantized and in_words(k_cache)):
        raise ValueError("int8_scores runs in the slots kernel over an int8 cache whose start, rows and strides are "
                         f"whole 32-bit words; got slots={slots}, quantized={quantized}, strides {k_cache.stride()}")
    program_rows = batch * (n_heads if slots else n_kv_heads)
    splits = split_count(program_rows, capacity, config["programs_per_sm"], block_n)
    keys_per_split = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    rows = batch * n_heads
    partial = torch.empty((rows, splits, head_dim), dtype=torch.float32, device=q.device)
    stats = torch.empty((rows, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    positions = positions.contiguous()
    branches.record("decode_attention", ("slots" if slots else "split_kv") + ("_int8" if quantized else "")
                    + ("_scores" if int8_scores else ""))
    if not quantized:
        k_scale = v_scale = partial  # unused
    pdl = programmatic_launch(q)
    common = dict(HEAD_DIM=head_dim, BLOCK_N=block_n, QUANTIZED=quantized, ROUND_QUERY=not query_on_grid,
                  ASM_CODES=use_inline_asm(q) and config.get("int8_ptx", True), NUM_STAGES=config["num_stages"],
                  PDL=pdl, num_warps=config["num_warps"], launch_pdl=pdl)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scale.stride(0),
               k_scale.stride(1), splits)
    if slots:
        _decode_split_slots_kernel[(program_rows, splits)](
            q, k_cache, v_cache, k_scale, v_scale, positions, partial, stats, n_heads, group, keys_per_split,
            1.0 / math.sqrt(head_dim), *strides, INT8_SCORES=int8_scores, **common)
    else:
        _decode_split_kernel[(program_rows, splits)](
            q, k_cache, v_cache, k_scale, v_scale, positions, partial, stats, n_heads, n_kv_heads, group,
            keys_per_split, 1.0 / math.sqrt(head_dim), *strides, BLOCK_H=max(16, triton.next_power_of_2(group)),
            **common)
    _decode_merge_kernel[(rows,)](partial, stats, out, n_heads, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
                                  SPLITS=splits, PDL=pdl, num_warps=1, launch_pdl=pdl)
    return out
