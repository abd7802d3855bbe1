"""W4A8 streaming kernel for decode (M <= 16): the packed int4 weights are read once and multiplied on the CUDA
cores (``dp4a``): no tensor cores.

Why a second kernel: at M <= 16 a linear reads N * K / 2 bytes of weights for M * N * K multiply-adds (the paper
shape at M = 1: 89 MB against 178M), so the floor is the weight read (about 21 us on an H200). The tensor-core
kernel (``w4a8_gemm.py``) runs load -> shared memory -> unpack -> wgmma in series in one warpgroup per program
and streamed about 2.8 TB/s there. Here each program owns BLOCK_N output channels and all M tokens and streams
their packed rows with 16-byte loads. The K loop is pipelined by Triton (``tl.range(num_stages=...)`` on a loop
without a dot): the weight and activation tiles of the next ``num_stages - 1`` steps are in flight as
``cp.async`` copies into a shared-memory ring, so the bytes in flight are no longer bounded by registers (the
first design kept one tile ahead in registers and was latency-bound at 25% occupancy: NOTES.md).

Each 32-bit word of a packed row (4 bytes of ``packing.py``'s layout) holds 8 codes: the low nibbles of the
columns ``64c + 4i .. 64c + 4i + 3`` and the high nibbles of the columns 32 further, for word ``8c + i``. Both
halves become int8x4 words (per-channel: 16 * code, as in ``w4a8_gemm``; per-group: QQQ's FusedDequantQuant)
and each meets the activation word (4 int8 codes) of its columns in one ``dp4a``. The int32 sums are those of
``qqq.numerics``, exactly.

It takes int8 codes and scales (from a fused producer or ``quantize_per_token``). ``w4a8_gemm`` launches it
for the configs that say ``GEMV=1``; the tuner times it against the tensor-core kernel for M <= 2 (at larger M
its ``dp4a`` work, M per weight word, makes it slower; see NOTES.md).

Split-K as in ``w4a8_gemm``: the ``split_k`` programs of a channel tile add their int32 partial sums atomically into
a zeroed workspace and the last to arrive (a ticket counter) runs the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qqq.kernels_triton.gpu import programmatic_launch, wait_for_previous_then_let_next_start
from qqq.kernels_triton.int8_gemm import channel_operands, scaled_store, split_k_sum
from qqq.kernels_triton.unpack import (byte_permute, group_tables, int8_words_from_group_codes,
                                      int8_words_from_group_tables)

SIGNED_HIGH_NIBBLES = tl.constexpr(-252645136)  # 0xF0F0F0F0 as int32


@triton.jit
def dot4_int8(a, b, acc, USE_ASM: tl.constexpr):
    """``acc`` + the dot product of the four int8 lanes of the int32 words ``a`` and ``b``."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for lane in tl.static_range(4):
            acc += ((a << (24 - 8 * lane)) >> 24) * ((b << (24 - 8 * lane)) >> 24)
        return acc


@triton.jit(do_not_specialize=["M", "split_k"])
def _w4a8_gemv_kernel(
    words_ptr, a_scale_ptr, w_ptr, channel_scale_ptr, bias_ptr, out_ptr, workspace_ptr, tickets_ptr, acc_out_ptr,
    M, N, K, stride_wn, stride_om, split_k,
    HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_ASM: tl.constexpr, PDL: tl.constexpr,
):
    """Per-channel. ``w_ptr``: the packed weight as int32 words [N, K // 8] (row stride ``stride_wn`` words);
    ``words_ptr``: the int8 codes [M, K] (contiguous rows) as int32 words. ``PDL``: launched as a programmatic
    dependent."""
    offs_n, offs_m, n_mask, m_mask = _program_rows(N, M, BLOCK_N, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_KW)
    first_word, last_word = _split_range(K // 8, BLOCK_KW, split_k)
    w_rows = w_ptr + offs_n[:, None, None] * stride_wn
    x_rows = words_ptr + offs_m[None, :, None] * (K // 4)
    # the weights are constants: the first tile is read before the wait, overlapping the kernel that writes the
    # activations (the pipeliner would issue the loop's first copies only after it)
    word = tl.max_contiguous(tl.multiple_of(first_word + offs_w, BLOCK_KW), BLOCK_KW)[None, None, :]
    in_split = word < last_word  # all or none: a split past the end of K has no tile
    packed = tl.load(w_rows + word, mask=n_mask[:, None, None] & in_split, other=0)
    channel_scale, bias = channel_operands(offs_n, n_mask, channel_scale_ptr, bias_ptr, HAS_BIAS)
    wait_for_previous_then_let_next_start(PDL)  # everything below may read what earlier kernels wrote
    token_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    acc = _channel_tile(packed, x_rows, word, m_mask[None, :, None] & in_split,
                        tl.zeros([BLOCK_N, BLOCK_M, BLOCK_KW], dtype=tl.int32), USE_ASM)
    for word0 in tl.range(first_word + BLOCK_KW, last_word, BLOCK_KW, num_stages=NUM_STAGES):
        word = tl.max_contiguous(tl.multiple_of(word0 + offs_w, BLOCK_KW), BLOCK_KW)[None, None, :]
        packed = tl.load(w_rows + word, mask=n_mask[:, None, None], other=0)
        acc = _channel_tile(packed, x_rows, word, m_mask[None, :, None], acc, USE_ASM)
    _epilogue(tl.sum(acc, axis=2), offs_n, offs_m, n_mask, m_mask, token_scale, channel_scale, bias, out_ptr,
              workspace_ptr, tickets_ptr, acc_out_ptr, N, stride_om, split_k, True, HAS_BIAS, WRITE_ACC, SILU_MUL,
              SPLIT)


@triton.jit
def _channel_tile(packed, x_rows, word, x_mask, acc, USE_ASM: tl.constexpr):
    """``acc`` + the products of the per-channel weight words ``packed`` and the activation words they meet."""
    x_low, x_high = _activation_words(x_rows, word, x_mask)
    w_low = (packed << 4) & SIGNED_HIGH_NIBBLES  # int8 lanes holding 16 * code
    w_high = packed & SIGNED_HIGH_NIBBLES
    acc = dot4_int8(w_low, x_low, acc, USE_ASM)
    return dot4_int8(w_high, x_high, acc, USE_ASM)


@triton.jit(do_not_specialize=["M", "n_groups", "split_k"])
def _w4a8_gemv_group_kernel(
    words_ptr, a_scale_ptr, w_ptr, channel_scale_ptr, ratio_ptr, bias_ptr, out_ptr, workspace_ptr, tickets_ptr,
    acc_out_ptr, M, N, K, n_groups, stride_wn, stride_om, split_k,
    GROUP_SIZE: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr,
    SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT: tl.constexpr,
    NUM_STAGES: tl.constexpr, USE_ASM: tl.constexpr, LOOKUP: tl.constexpr, RATIO_WORDS: tl.constexpr,
    PDL: tl.constexpr,
):
    """Per-group: the tile is [BLOCK_N, BLOCK_M, runs, RUN] words, a run being RUN consecutive words of a row under
    one ratio (per nibble half), so each ratio is loaded once per run, not once per word. ``LOOKUP`` (the launcher
    sets it for one token and groups of 64 or more columns): a word's 8 codes share one group and are looked up in
    its tables (``unpack.group_tables``); otherwise QQQ's FusedDequantQuant (the lookup's doubled sums and
    activation shuffles made two tokens slower: NOTES.md). ``RATIO_WORDS`` (lookup only): ``ratio_ptr`` holds the
    fp16 ratios [N, n_groups] (n_groups even) as int32 words, two each, which the pipeliner copies ahead with the
    weights; a 16-bit load is no ``cp.async`` copy and stays in the loop, a memory round trip every step."""
    # a group is GROUP_SIZE // 8 words holding both nibble halves when GROUP_SIZE >= 64; groups of 32 split each
    # 8-word chunk (64 columns) into a low-nibble group and a high-nibble group
    RUN: tl.constexpr = min(max(GROUP_SIZE // 8, 8), BLOCK_KW)
    offs_n, offs_m, n_mask, m_mask = _program_rows(N, M, BLOCK_N, BLOCK_M)
    offs_run = tl.arange(0, BLOCK_KW // RUN) * RUN
    offs_i = tl.arange(0, RUN)
    first_word, last_word = _split_range(K // 8, BLOCK_KW, split_k)
    rows = offs_n[:, None, None, None]
    row_mask = n_mask[:, None, None, None]
    x_rows = words_ptr + offs_m[None, :, None, None] * (K // 4)
    in_split = (first_word + offs_run < last_word)[None, None, :, None]  # all or none, as per channel
    # the first tile before the wait, as per channel
    word, packed, chunk_column = _group_words(w_ptr, rows, row_mask & in_split, stride_wn, first_word + offs_run,
                                              offs_i)
    channel_scale, bias = channel_operands(offs_n, n_mask, channel_scale_ptr, bias_ptr, HAS_BIAS)
    wait_for_previous_then_let_next_start(PDL)
    token_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    acc, acc_negative = _group_tile_dot(
        packed, word, chunk_column, x_rows, m_mask[None, :, None, None] & in_split, ratio_ptr, rows,
        row_mask & in_split, n_groups, tl.zeros([BLOCK_N, BLOCK_M, BLOCK_KW // RUN, RUN], dtype=tl.int32),
        tl.zeros([BLOCK_N, BLOCK_M, BLOCK_KW // RUN, RUN], dtype=tl.int32),
        GROUP_SIZE, LOOKUP, CLAMP, USE_ASM, RATIO_WORDS)
    for word0 in tl.range(first_word + BLOCK_KW, last_word, BLOCK_KW, num_stages=NUM_STAGES):
        word, packed, chunk_column = _group_words(w_ptr, rows, row_mask, stride_wn, word0 + offs_run, offs_i)
        acc, acc_negative = _group_tile_dot(packed, word, chunk_column, x_rows, m_mask[None, :, None, None],
                                            ratio_ptr, rows, row_mask, n_groups, acc, acc_negative, GROUP_SIZE,
                                            LOOKUP, CLAMP, USE_ASM, RATIO_WORDS)
    if LOOKUP:
        acc -= acc_negative
    _epilogue(tl.sum(tl.sum(acc, axis=3), axis=2), offs_n, offs_m, n_mask, m_mask, token_scale, channel_scale,
              bias, out_ptr, workspace_ptr, tickets_ptr, acc_out_ptr, N, stride_om, split_k, False, HAS_BIAS,
              WRITE_ACC, SILU_MUL, SPLIT)


@triton.jit
def _group_words(w_ptr, rows, row_mask, stride_wn, run_start, offs_i):
    """The per-group weight words of the runs starting at ``run_start`` ([runs]), and the first column of each
    run's 64-column chunk (word 8c + i holds columns 64c + 4i .. + 3 in its low nibbles, 32 further in its high)."""
    word = (run_start[:, None] + offs_i[None, :])[None, None, :, :]
    packed = tl.load(w_ptr + rows * stride_wn + word, mask=row_mask, other=0)
    return word, packed, ((run_start // 8) * 64)[None, None, :, None]


@triton.jit
def _group_tile_dot(packed, word, chunk_column, x_rows, x_mask, ratio_ptr, rows, row_mask, n_groups, acc,
                    acc_negative, GROUP_SIZE: tl.constexpr, LOOKUP: tl.constexpr, CLAMP: tl.constexpr,
                    USE_ASM: tl.constexpr, RATIO_WORDS: tl.constexpr):
    """``acc`` (and, by lookup, ``acc_negative``) + the products of the per-group weight words ``packed`` and the
    activation words they meet."""
    x_low, x_high = _activation_words(x_rows, word, x_mask)
    if LOOKUP:
        ratio = _group_ratio(ratio_ptr, rows, n_groups, chunk_column // GROUP_SIZE, row_mask, RATIO_WORDS)
        neg_low, neg_high, pos_low, pos_high = group_tables(ratio, USE_ASM)
        neg_a, neg_b, pos_a, pos_b = int8_words_from_group_tables(packed, neg_low, neg_high, pos_low, pos_high,
                                                                   USE_ASM)
        # the activation codes in the tables' lane order: the columns of byte 0's low and high nibble, then
        # of byte 1's (word a), of bytes 2 and 3 (word b)
        x_a = byte_permute(x_low, x_high, tl.full(x_low.shape, 0x5140, tl.int32), USE_ASM)
        x_b = byte_permute(x_low, x_high, tl.full(x_low.shape, 0x7362, tl.int32), USE_ASM)
        acc = dot4_int8(pos_a, x_a, acc, USE_ASM)
        acc = dot4_int8(pos_b, x_b, acc, USE_ASM)
        acc_negative = dot4_int8(neg_a, x_a, acc_negative, USE_ASM)
        acc_negative = dot4_int8(neg_b, x_b, acc_negative, USE_ASM)
    else:
        r_low = _group_ratio(ratio_ptr, rows, n_groups, chunk_column // GROUP_SIZE, row_mask, False)
        if GROUP_SIZE >= 64:
            r_high = r_low
        else:
            r_high = _group_ratio(ratio_ptr, rows, n_groups, (chunk_column + 32) // GROUP_SIZE, row_mask, False)
        w_low, w_high = int8_words_from_group_codes(packed, r_low, r_high, USE_ASM, CLAMP)
        acc = dot4_int8(w_low, x_low, acc, USE_ASM)
        acc = dot4_int8(w_high, x_high, acc, USE_ASM)
    return acc, acc_negative


@triton.jit
def _group_ratio(ratio_ptr, rows, n_groups, group, row_mask, RATIO_WORDS: tl.constexpr):
    """The fp16 ratio of (row, group), from the int32 words of the ratio rows (``RATIO_WORDS``) or 16 bits."""
    if RATIO_WORDS:
        words = tl.load(ratio_ptr + rows * (n_groups // 2) + group // 2, mask=row_mask, other=0)
        return ((words >> ((group % 2) * 16)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return tl.load(ratio_ptr + rows * n_groups + group, mask=row_mask, other=0.0)


@triton.jit
def _program_rows(N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's output channels (``program_id(0)``) and the tokens, with their masks."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    return offs_n, offs_m, offs_n < N, offs_m < M


@triton.jit
def _split_range(k_words, BLOCK_KW: tl.constexpr, split_k):
    """The words [first, last) of the K split of this program (``program_id(1)``); a split past the end of K
    (split_k does not divide the tiles evenly) gets an empty range."""
    words_per_split = tl.cdiv(k_words // BLOCK_KW, split_k) * BLOCK_KW
    first_word = tl.program_id(1) * words_per_split
    return first_word, tl.minimum(first_word + words_per_split, k_words)


@triton.jit
def _activation_words(x_rows, word, m_mask):
    """The activation words (4 int8 codes each) that meet the low and the high nibbles of the weight words
    ``word``: word 8c + i holds columns 64c + 4i .. + 3 (activation word 16c + i) and 32 further (16c + i + 8)."""
    x_low_index = word + (word // 8) * 8
    x_low = tl.load(x_rows + x_low_index, mask=m_mask, other=0)
    x_high = tl.load(x_rows + x_low_index + 8, mask=m_mask, other=0)
    return x_low, x_high


@triton.jit
def _epilogue(total, offs_n, offs_m, n_mask, m_mask, token_scale, channel_scale, bias, out_ptr, workspace_ptr,
              tickets_ptr, acc_out_ptr, N, stride_om, split_k, X16: tl.constexpr, HAS_BIAS: tl.constexpr,
              WRITE_ACC: tl.constexpr, SILU_MUL: tl.constexpr, SPLIT: tl.constexpr):
    """The epilogue with its operands loaded at the kernel's start (the channel scales and bias before its wait,
    the token scales right after it), so no load is left on the kernel's tail."""
    last = True
    if SPLIT:
        total, last = split_k_sum(total, tl.program_id(0), split_k, workspace_ptr, tickets_ptr, offs_n, offs_m, n_mask,
                                  m_mask, N)
    if last:
        scaled_store(total, token_scale, channel_scale, bias, offs_n, offs_m, n_mask, m_mask, out_ptr, acc_out_ptr,
                     N, stride_om, X16, HAS_BIAS, WRITE_ACC, SILU_MUL)


def launch_w4a8_gemv(a_codes, a_scale, qweight, channel_scale, group_ratio, bias, group_size, out, acc_out, config,
                     workspace, tickets, use_asm: bool, write_acc: bool, clamp: bool, silu_mul: bool = False) -> None:
    """Launch the streaming kernel on checked inputs (``w4a8_gemm`` checks them and owns the buffers):
    ``a_codes`` int8 [M, K] (M <= 16, contiguous), the split-K ``workspace`` / ``tickets`` when SPLIT_K > 1;
    ``clamp=False`` only when every per-group product fits int8 (``numerics.group_products_fit_int8``);
    ``silu_mul``: ``out`` is [M, N / 2], ``SiLU(gate) * up`` of alternating gate, up rows (``int8_gemm``)."""
    m, k = a_codes.shape
    n = qweight.shape[0]
    block_n, split_k = config["BLOCK_N"], config["SPLIT_K"]
    pdl = programmatic_launch(a_codes)
    grid = (triton.cdiv(n, block_n), split_k)
    pointers = (a_codes.view(torch.int32), a_scale, qweight.view(torch.int32), channel_scale)
    shared = dict(HAS_BIAS=bias is not None, WRITE_ACC=write_acc, SILU_MUL=silu_mul, BLOCK_N=block_n,
                  BLOCK_M=triton.next_power_of_2(m),
                  BLOCK_KW=config["BLOCK_K"] // 8, SPLIT=split_k > 1, NUM_STAGES=config["num_stages"],
                  USE_ASM=use_asm, PDL=pdl, num_warps=config["num_warps"], launch_pdl=pdl)
    bias = bias if bias is not None else channel_scale  # any pointer when unused
    if group_size == -1:
        _w4a8_gemv_kernel[grid](*pointers, bias, out, workspace, tickets, acc_out, m, n, k, qweight.stride(0) // 4,
                                out.stride(0), split_k, **shared)
    else:
        n_groups = k // group_size
        lookup = m == 1 and group_size >= 64
        ratio_words = lookup and n_groups % 2 == 0 and group_ratio.data_ptr() % 4 == 0
        _w4a8_gemv_group_kernel[grid](*pointers, group_ratio.view(torch.int32) if ratio_words else group_ratio, bias,
                                      out, workspace, tickets, acc_out, m, n, k, n_groups, qweight.stride(0) // 4,
                                      out.stride(0), split_k, GROUP_SIZE=group_size, CLAMP=clamp,
                                      LOOKUP=lookup, RATIO_WORDS=ratio_words, **shared)
