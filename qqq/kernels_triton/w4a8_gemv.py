"""W4A8 streaming kernel for decode (M <= 16): the packed int4 weights are read once, straight into registers,
and multiplied on the CUDA cores (``dp4a``): no shared memory, no tensor cores.

Why a second kernel: at M <= 16 a linear reads N * K / 2 bytes of weights for M * N * K multiply-adds (the paper
shape at M = 1: 89 MB against 178M), so the floor is the weight read (about 21 us on an H200). The tensor-core
kernel (``w4a8_gemm.py``) runs load -> shared memory -> unpack -> wgmma in series in one warpgroup per program
and streamed about 2.8 TB/s there. Here each program owns BLOCK_N output channels and all M tokens and streams
their packed rows with 16-byte loads; many small programs per SM keep loads in flight while others unpack and
multiply (the overlap a warp-specialized kernel would get from its producer warps, here from occupancy).

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

from qqq.kernels_triton.gpu import let_next_kernel_start, programmatic_launch, wait_for_previous_kernel
from qqq.kernels_triton.int8_gemm import epilogue, split_k_epilogue
from qqq.kernels_triton.unpack import int8_words_from_group_codes

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


@triton.jit(do_not_specialize=["M", "n_groups", "split_k"])
def _w4a8_gemv_kernel(
    words_ptr, a_scale_ptr, w_ptr, channel_scale_ptr, ratio_ptr, bias_ptr, out_ptr,
    workspace_ptr, tickets_ptr, acc_out_ptr, M, N, K, n_groups, stride_wn, stride_om, split_k,
    GROUP_SIZE: tl.constexpr, CLAMP: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT: tl.constexpr,
    USE_ASM: tl.constexpr, PDL: tl.constexpr,
):
    """``w_ptr``: the packed weight as int32 words [N, K // 8] (row stride ``stride_wn`` words); ``words_ptr``: the
    int8 codes [M, K] (contiguous rows) as int32 words. ``PDL``: launched as a programmatic dependent (the first
    weight tile is loaded before the wait for the kernel that wrote the activations)."""
    let_next_kernel_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_w = tl.arange(0, BLOCK_KW)

    words_per_split = tl.cdiv(K // 8 // BLOCK_KW, split_k) * BLOCK_KW
    first_word = pid_k * words_per_split
    last_word = tl.minimum(first_word + words_per_split, K // 8)
    # a split past the end of K (split_k does not divide the tiles evenly) runs no step, but its first load is
    # issued before the loop: keep that address inside the row
    first_load = tl.minimum(first_word, (K // 8 // BLOCK_KW - 1) * BLOCK_KW)  # a multiple of BLOCK_KW: 16-byte loads
    w_ptrs = w_ptr + offs_n[:, None, None] * stride_wn + (first_load + offs_w)[None, None, :]
    ratio_row = ratio_ptr + offs_n[:, None, None] * n_groups
    acc = tl.zeros([BLOCK_N, BLOCK_M, BLOCK_KW], dtype=tl.int32)
    x_rows = words_ptr + offs_m[None, :, None] * (K // 4)
    next_packed = tl.load(w_ptrs, mask=n_mask[:, None, None], other=0)
    wait_for_previous_kernel(PDL)  # everything below may read what earlier kernels wrote
    for word0 in range(first_word, last_word, BLOCK_KW):
        # the next tile's load is issued before this one is used (two tiles in flight per thread)
        packed = next_packed
        w_ptrs += tl.where(word0 + BLOCK_KW < last_word, BLOCK_KW, 0)  # the last step reloads its own tile
        next_packed = tl.load(w_ptrs, mask=n_mask[:, None, None], other=0)
        word = word0 + offs_w
        # the activation word of the low nibbles of word 8c + i is 16c + i (4 codes per word); runs of 8
        x_low_index = tl.max_contiguous(tl.multiple_of(word + (word // 8) * 8, 8), 8)[None, None, :]
        x_low = tl.load(x_rows + x_low_index, mask=m_mask[None, :, None], other=0)
        x_high = tl.load(x_rows + x_low_index + 8, mask=m_mask[None, :, None], other=0)
        if GROUP_SIZE == -1:
            w_low = (packed << 4) & SIGNED_HIGH_NIBBLES  # int8 lanes holding 16 * code
            w_high = packed & SIGNED_HIGH_NIBBLES
        else:
            # word 8c + i holds columns 64c + 4i .. + 3 (low nibbles) and 32 further (high): every supported group
            # size (>= 32) keeps each half of the 64-column chunk in one group
            chunk_column = (word // 8) * 64
            r_low = tl.load(ratio_row + (chunk_column // GROUP_SIZE)[None, None, :], mask=n_mask[:, None, None],
                            other=0.0)
            if GROUP_SIZE >= 64:
                r_high = r_low
            else:
                r_high = tl.load(ratio_row + ((chunk_column + 32) // GROUP_SIZE)[None, None, :],
                                 mask=n_mask[:, None, None], other=0.0)
            w_low, w_high = int8_words_from_group_codes(packed, r_low, r_high, USE_ASM, CLAMP)
        acc = dot4_int8(w_low, x_low, acc, USE_ASM)
        acc = dot4_int8(w_high, x_high, acc, USE_ASM)
    total = tl.sum(acc, axis=2)  # [BLOCK_N, BLOCK_M]

    if not SPLIT:
        epilogue(total, offs_n, offs_m, n_mask, m_mask, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
                 acc_out_ptr, N, stride_om, GROUP_SIZE == -1, HAS_BIAS, WRITE_ACC)
    else:
        split_k_epilogue(total, pid_n, split_k, workspace_ptr, tickets_ptr, offs_n, offs_m, n_mask, m_mask,
                         a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr, acc_out_ptr, N, stride_om,
                         GROUP_SIZE == -1, HAS_BIAS, WRITE_ACC)


def launch_w4a8_gemv(a_codes, a_scale, qweight, channel_scale, group_ratio, bias, group_size, out, acc_out, config,
                     workspace, tickets, use_asm: bool, write_acc: bool, clamp: bool) -> None:
    """Launch the streaming kernel on checked inputs (``w4a8_gemm`` checks them and owns the buffers):
    ``a_codes`` int8 [M, K] (M <= 16, contiguous), the split-K ``workspace`` / ``tickets`` when SPLIT_K > 1;
    ``clamp=False`` only when every per-group product fits int8 (``numerics.group_products_fit_int8``)."""
    m, k = a_codes.shape
    n = qweight.shape[0]
    block_n, split_k = config["BLOCK_N"], config["SPLIT_K"]
    pdl = programmatic_launch(a_codes)
    _w4a8_gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        a_codes.view(torch.int32), a_scale, qweight.view(torch.int32), channel_scale,
        group_ratio if group_size != -1 else channel_scale, bias if bias is not None else channel_scale, out,
        workspace, tickets, acc_out, m, n, k, k // group_size if group_size != -1 else 1, qweight.stride(0) // 4,
        out.stride(0), split_k,
        GROUP_SIZE=group_size, CLAMP=clamp, HAS_BIAS=bias is not None, WRITE_ACC=write_acc, BLOCK_N=block_n,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_KW=config["BLOCK_K"] // 8, SPLIT=split_k > 1, USE_ASM=use_asm,
        PDL=pdl, num_warps=config["num_warps"], num_stages=config["num_stages"], launch_pdl=pdl,
    )
