"""Per-token int8 activation quantization (QQQ's FastFP16toINT8 step) as a Triton kernel.

Computes exactly ``qqq.numerics.quantize_per_token``: ``scale = amax(|row|) / 127`` (fp32, correctly rounded
division), ``code = round_half_even(x / scale)`` clamped to [-127, 127], an all-zero row gives scale 0 and
codes 0. Three launch shapes, one formula:

- rows up to ``MAX_SINGLE_PASS_K`` wide: one program per row, the row stays in registers (one read of x);
- longer rows with many tokens: one program per row, two passes over the row (the second hits L1/L2);
- longer rows (up to ``MAX_CHUNKED_K``) with few tokens (decode): each row is cut into ``ROW_CHUNKS`` chunks over
  as many programs; each program reads the whole row once for its absmax (from L2, all loads in flight) and
  quantizes only its chunk, so a decode step does not wait on one program streaming a 20k-wide row. Rows of
  ``DECODE_CHUNKED_MIN_K`` to ``MAX_SINGLE_PASS_K`` with at most ``DECODE_ROWS`` tokens are cut the same way, into
  ``SHORT_ROW_CHUNKS``: on the H200 that took the o_proj input of a decode step (M = 1) from 2.17 to 1.79 us at
  K = 4096, 4.75 to 1.80 at 5120 and 2.87 to 1.91 at 8192 (``kernels_triton/NOTES.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qqq.kernels_triton import branches
from qqq.kernels_triton.gpu import programmatic_launch, wait_for_previous_then_let_next_start

MAX_SINGLE_PASS_K = 8192
TWO_PASS_BLOCK_K = 4096
ROW_CHUNKS = 16  # chunks per row on the decode path
MAX_CHUNKED_K = 32768
FEW_ROWS = 128  # fewer rows than this (and rows longer than MAX_SINGLE_PASS_K) take the chunked path
DECODE_ROWS = 16  # at most this many rows of DECODE_CHUNKED_MIN_K..MAX_SINGLE_PASS_K take it too
DECODE_CHUNKED_MIN_K = 4096
SHORT_ROW_CHUNKS = 8  # chunks per row of at most MAX_SINGLE_PASS_K
ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding it rounds an fp32 |v| < 2**22 to an integer, half to even
ROUND_MAGIC_BITS = 0x4B400000  # its bit pattern: (bits(v + MAGIC) - MAGIC_BITS) is that integer
LAUNCH_BRANCHES = {"quantize_per_token": ("single_pass", "two_pass", "chunked")}


@triton.jit
def round_to_int32(v):
    """Round fp32 ``v`` (|v| < 2**22) to the nearest integer, ties to even, as int32 (no cvt instruction)."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def int8_scale(amax):
    """The per-token scale of a row with absolute maximum ``amax``: ``amax / 127``, correctly rounded."""
    return tl.div_rn(amax, 127.0)


@triton.jit
def int8_codes(x, scale):
    """fp32 values ``x`` of one row with scale ``scale`` -> int8 codes, as numerics (scale 0 gives codes 0)."""
    divisor = tl.where(scale > 0.0, scale, 1.0)
    codes = round_to_int32(tl.div_rn(x, divisor))
    return tl.minimum(tl.maximum(codes, -127), 127).to(tl.int8)


@triton.jit
def int8_codes_and_scale(x, amax):
    """fp32 values ``x`` of one row with absolute maximum ``amax`` -> (int8 codes, fp32 scale), as numerics."""
    scale = int8_scale(amax)
    return int8_codes(x, scale), scale


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, codes_ptr, scale_ptr, K, stride_x, stride_codes,
    BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_then_let_next_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    codes_row = codes_ptr + row * stride_codes
    offs = tl.arange(0, BLOCK_K)
    if SINGLE_PASS:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        running = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            running = tl.maximum(running, tl.abs(xk))
        amax = tl.max(running, axis=0)
    scale = int8_scale(amax)
    if SINGLE_PASS:
        tl.store(codes_row + offs, int8_codes(x, scale), mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            xk = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(codes_row + k0 + offs, int8_codes(xk, scale), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _quantize_chunk_kernel(x_ptr, codes_ptr, scale_ptr, K, stride_x, stride_codes,
                           ROW_BLOCK: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_then_let_next_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs_row = tl.arange(0, ROW_BLOCK)
    whole = tl.load(x_ptr + row * stride_x + offs_row, mask=offs_row < K, other=0.0)
    amax = tl.max(tl.abs(whole), axis=0).to(tl.float32)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    codes, scale = int8_codes_and_scale(x, amax)
    tl.store(codes_ptr + row * stride_codes + offs, codes, mask=mask)
    if chunk == 0:
        tl.store(scale_ptr + row, scale)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of ``x`` [..., K]: returns ``(codes int8 [M, K], scales fp32 [M])`` with
    ``M = x.numel() // K`` (rows flattened). fp16/bf16 on any device, fp32 too (the interpreter's CPU tests)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"quantize_per_token expects fp16, bf16 or fp32 input, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize_per_token expects a non-empty last dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scales = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    single_pass = k <= MAX_SINGLE_PASS_K
    pdl = programmatic_launch(rows)
    decode_rows = m <= DECODE_ROWS and k >= DECODE_CHUNKED_MIN_K
    if k <= MAX_CHUNKED_K and (decode_rows or (not single_pass and m < FEW_ROWS)):
        branches.record("quantize_per_token", "chunked")
        chunk = triton.next_power_of_2(triton.cdiv(k, SHORT_ROW_CHUNKS if single_pass else ROW_CHUNKS))
        _quantize_chunk_kernel[(m, triton.cdiv(k, chunk))](
            rows, codes, scales, k, rows.stride(0), codes.stride(0),
            ROW_BLOCK=triton.next_power_of_2(k), CHUNK=chunk, PDL=pdl, num_warps=8, launch_pdl=pdl)
        return codes, scales
    branches.record("quantize_per_token", "single_pass" if single_pass else "two_pass")
    block_k = triton.next_power_of_2(k) if single_pass else TWO_PASS_BLOCK_K
    num_warps = 4 if block_k <= 2048 else 8
    _quantize_per_token_kernel[(m,)](
        rows, codes, scales, k, rows.stride(0), codes.stride(0),
        BLOCK_K=block_k, SINGLE_PASS=single_pass, PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )
    return codes, scales
