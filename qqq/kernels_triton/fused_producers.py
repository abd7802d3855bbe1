"""Fused producers: the ops that feed a W4A8 (or W8A8) GEMM write int8 codes and per-token scales directly.

QQQ's end-to-end speed comes from never writing an activation in fp16 only to read it back for quantization:

- ``rmsnorm_quantize``: [residual add +] RMSNorm -> int8 + per-token scale (and the updated residual);
- ``silu_mul_quantize``: SiLU(gate) * up of a fused gate/up GEMM output -> int8 + per-token scale;
- ``rope_into_cache``: RoPE on q and k of a fused q/k/v GEMM output, q written for attention and k / v straight
  into the static KV cache (one launch instead of a dozen small PyTorch ops per layer), in the activation dtype or
  as int8 codes with a per-token, per-head scale (the 8-bit KV cache).

Each computes exactly the plain PyTorch composition in ``qqq.fast.producers`` (the Hugging Face Llama ops, rounded to
the activation dtype where they round, then ``qqq.numerics.quantize_per_token``), one pass over the data. The
normalization and SiLU outputs can also be written in the activation dtype (``quantize=False``) so the FP16
and W4A16 baselines run the same fused ops. Rows up to ``MAX_ROW`` wide stay in registers; with few rows
(decode), each row is spread over ``ROW_CHUNKS`` programs that each recompute the row's statistics (from L2) and
write only their chunk, as ``activation_quant`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qqq.kernels_triton import branches
from qqq.kernels_triton.activation_quant import (FEW_ROWS, ROW_CHUNKS, int8_codes, int8_codes_and_scale,
                                                  int8_scale)
from qqq.kernels_triton.gpu import programmatic_launch, wait_for_previous_then_let_next_start
from qqq.kernels_triton.swiglu import silu_times_up

MAX_ROW = 32768
CACHE_ROWS_PER_PROGRAM = 32  # (sequence, kv head, position) rows of an 8-bit cache that one dequantizing program takes
# a prefill's RoPE program takes this many tokens of one head: one token per program (as a decode step has) made
# 98k one-warp programs at 1024 tokens of Llama-2-7B, 119 us a layer on an H100, each waiting on its position's load
PREFILL_TOKENS_PER_PROGRAM = 16
LAUNCH_BRANCHES = {
    "rmsnorm_quantize": tuple(f"{rows}{residual}{out}" for rows in ("row", "chunked") for residual in ("", "+residual")
                              for out in ("+int8", "+fp16")),
    "silu_mul_quantize": tuple(f"{rows}{out}" for rows in ("row", "chunked") for out in ("+int8", "+fp16")),
    "rope_into_cache": ("rope", "rope_int8"),
    "dequantize_cache": ("int8",),
}


@triton.jit
def _store(y, amax, offs, mask, row, out_ptr, stride_out, codes_ptr, scale_ptr, chunk, QUANTIZE: tl.constexpr):
    """Store values ``y`` (activation dtype) of a row at ``offs``: as they are, or as int8 with the row's scale
    (``amax``: the absolute maximum of the whole row)."""
    if QUANTIZE:
        codes, scale = int8_codes_and_scale(y.to(tl.float32), amax)
        tl.store(codes_ptr + row * stride_out + offs, codes, mask=mask)
        if chunk == 0:
            tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * stride_out + offs, y, mask=mask)


@triton.jit
def _residual_sum(x_ptr, residual_ptr, row, offs, mask, stride_x, stride_residual, HAS_RESIDUAL: tl.constexpr):
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return h


@triton.jit
def _normalized(h, rstd, weight):
    return ((h.to(tl.float32) * rstd).to(h.dtype).to(tl.float32) * weight.to(tl.float32)).to(h.dtype)


@triton.jit
def _rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, codes_ptr, scale_ptr, residual_out_ptr,
                    K, eps, stride_x, stride_residual, stride_out, stride_residual_out,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QUANTIZE: tl.constexpr,
                    PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    # the norm's weight is a constant: read before the wait, overlapping the kernel that writes x
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    if CHUNK != BLOCK:
        chunk_offs = chunk * CHUNK + tl.arange(0, CHUNK)
        chunk_weight = tl.load(weight_ptr + chunk_offs, mask=chunk_offs < K, other=0.0)
    wait_for_previous_then_let_next_start(PDL)  # the next GEMM launches while this runs
    h = _residual_sum(x_ptr, residual_ptr, row, offs, mask, stride_x, stride_residual, HAS_RESIDUAL)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(hf * hf, axis=0) / K + eps)
    y = _normalized(h, rstd, weight)
    amax = tl.max(tl.abs(y.to(tl.float32)), axis=0)
    if CHUNK == BLOCK:  # one program per row
        if HAS_RESIDUAL:
            tl.store(residual_out_ptr + row * stride_residual_out + offs, h, mask=mask)
        _store(y, amax, offs, mask, row, out_ptr, stride_out, codes_ptr, scale_ptr, chunk, QUANTIZE)
    else:  # the row's statistics came from all of it; this program recomputes and writes only its chunk
        offs = chunk_offs
        mask = offs < K
        h = _residual_sum(x_ptr, residual_ptr, row, offs, mask, stride_x, stride_residual, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(residual_out_ptr + row * stride_residual_out + offs, h, mask=mask)
        y = _normalized(h, rstd, chunk_weight)
        _store(y, amax, offs, mask, row, out_ptr, stride_out, codes_ptr, scale_ptr, chunk, QUANTIZE)


@triton.jit
def _silu_mul(gate_up_ptr, row, offs, mask, width, stride_in):
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + width + offs, mask=mask, other=0.0)
    return silu_times_up(gate, up)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, codes_ptr, scale_ptr, width, stride_in, stride_out,
                     BLOCK: tl.constexpr, CHUNK: tl.constexpr, QUANTIZE: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_then_let_next_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < width
    y = _silu_mul(gate_up_ptr, row, offs, mask, width, stride_in)
    amax = tl.max(tl.abs(y.to(tl.float32)), axis=0)  # the scale needs the whole row's maximum
    if CHUNK != BLOCK:  # this program recomputes and writes only its chunk
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        mask = offs < width
        y = _silu_mul(gate_up_ptr, row, offs, mask, width, stride_in)
    _store(y, amax, offs, mask, row, out_ptr, stride_out, codes_ptr, scale_ptr, chunk, QUANTIZE)


@triton.jit
def _head_codes(first, second):
    """Each token's two head halves [tokens, HALF] (in the activation dtype) -> their int8 codes and the token's
    scale [tokens] (one grid per token and head)."""
    first, second = first.to(tl.float32), second.to(tl.float32)
    scale = int8_scale(tl.maximum(tl.max(tl.abs(first), axis=1), tl.max(tl.abs(second), axis=1)))
    return int8_codes(first, scale[:, None]), int8_codes(second, scale[:, None]), scale


@triton.jit
def _on_int8_grid(first, second):
    """Each token's two head halves rounded onto its int8 grid, in their dtype
    (``numerics.fake_quantize_per_token``)."""
    first_codes, second_codes, scale = _head_codes(first, second)
    return ((first_codes.to(tl.float32) * scale[:, None]).to(first.dtype),
            (second_codes.to(tl.float32) * scale[:, None]).to(second.dtype))


@triton.jit
def _rope_into_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                            k_scale_ptr, v_scale_ptr, tokens, T, n_heads, n_kv_heads, stride_qkv,
                            stride_qb, stride_qh, stride_qt, stride_cb, stride_ch, stride_cs, stride_sb, stride_sh,
                            HALF: tl.constexpr, BLOCK_T: tl.constexpr, QUANTIZED: tl.constexpr, PDL: tl.constexpr):
    """One head (``program_id(1)``) of BLOCK_T consecutive tokens of the flattened [B * T] rows."""
    wait_for_previous_then_let_next_start(PDL)
    token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_rows = token < tokens
    mask = in_rows[:, None]
    head = tl.program_id(1)
    batch = token // T
    pos = tl.load(positions_ptr + token, mask=in_rows, other=0).to(tl.int64)
    offs = tl.arange(0, HALF)[None, :]
    source = qkv_ptr + token[:, None] * stride_qkv + head * (2 * HALF) + offs
    first = tl.load(source, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(source + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = qkv_ptr.dtype.element_ty
    if head < n_heads + n_kv_heads:  # q and k heads rotate, v heads are copied
        cos = tl.load(cos_ptr + pos[:, None] * HALF + offs)
        sin = tl.load(sin_ptr + pos[:, None] * HALF + offs)
        first, second = first * cos - second * sin, second * cos + first * sin
    first, second = first.to(dtype), second.to(dtype)
    if head < n_heads:
        q_target = (q_ptr + batch[:, None] * stride_qb + head * stride_qh + (token - batch * T)[:, None] * stride_qt
                    + offs)
        if QUANTIZED:  # q onto its int8 grid per token and head: attention over the 8-bit cache takes it so
            first, second = _on_int8_grid(first, second)
        tl.store(q_target, first, mask=mask)
        tl.store(q_target + HALF, second, mask=mask)
    else:
        kv_head = head - n_heads
        cache_ptr = k_cache_ptr
        scale_ptr = k_scale_ptr
        if kv_head >= n_kv_heads:
            kv_head -= n_kv_heads
            cache_ptr = v_cache_ptr
            scale_ptr = v_scale_ptr
        target = cache_ptr + (batch * stride_cb + kv_head * stride_ch + pos * stride_cs)[:, None] + offs
        if QUANTIZED:  # one int8 grid per token and head (the values as rounded to the activation dtype)
            first_codes, second_codes, scale = _head_codes(first, second)
            tl.store(target, first_codes, mask=mask)
            tl.store(target + HALF, second_codes, mask=mask)
            tl.store(scale_ptr + batch * stride_sb + kv_head * stride_sh + pos, scale, mask=in_rows)
        else:
            tl.store(target, first, mask=mask)
            tl.store(target + HALF, second, mask=mask)


@triton.jit
def _dequantize_cache_kernel(codes_ptr, scale_ptr, out_ptr, rows, T, n_kv_heads, stride_cb, stride_ch, stride_cs,
                             stride_sb, stride_sh, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    """BLOCK_R rows (sequence, kv head, position) of an int8 cache slice [B, Hkv, T, D] -> ``out`` [B, Hkv, T, D]."""
    wait_for_previous_then_let_next_start(PDL)
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = row < rows
    position = row % T
    batch = row // T // n_kv_heads
    kv_head = row // T % n_kv_heads
    dims = tl.arange(0, HEAD_DIM)[None, :]
    codes = tl.load(codes_ptr + (batch * stride_cb + kv_head * stride_ch + position * stride_cs)[:, None] + dims,
                    mask=in_rows[:, None], other=0)
    scale = tl.load(scale_ptr + batch * stride_sb + kv_head * stride_sh + position, mask=in_rows, other=0.0)
    values = codes.to(tl.float32) * scale[:, None]  # exact products of the codes, rounded once to fp32
    tl.store(out_ptr + row[:, None] * HEAD_DIM + dims, values.to(out_ptr.dtype.element_ty), mask=in_rows[:, None])


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype not in (torch.float16, torch.bfloat16) and not (x.dtype == torch.float32 and not x.is_cuda):
        raise ValueError(f"{name} expects fp16 or bf16 input (fp32 only on CPU), got {x.dtype} on {x.device}")
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _grid_and_block(m: int, width: int, name: str) -> tuple[tuple[int, int], int, int]:
    if width > MAX_ROW:
        raise ValueError(f"{name} keeps a row in registers: at most {MAX_ROW} wide, got {width}")
    block = triton.next_power_of_2(width)
    chunks = ROW_CHUNKS if m < FEW_ROWS and width >= 1024 else 1
    chunk = triton.cdiv(block, chunks)
    return (m, triton.cdiv(width, chunk)), block, chunk


def _producer_branch(chunk: int, block: int, quantize: bool, residual: bool = False) -> str:
    return ("chunked" if chunk != block else "row") + ("+residual" if residual else "") + ("+int8" if quantize else "+fp16")


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _outputs(rows: torch.Tensor, width: int, quantize: bool):
    m = rows.shape[0]
    if quantize:
        codes = torch.empty((m, width), dtype=torch.int8, device=rows.device)
        return codes, torch.empty((m,), dtype=torch.float32, device=rows.device), codes
    out = torch.empty((m, width), dtype=rows.dtype, device=rows.device)
    return out, out, out


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                     quantize: bool = True):
    """``h = x (+ residual)``, then Llama's RMSNorm of ``h`` with ``weight``.

    Returns ``(codes int8 [M, K], scale fp32 [M])`` if ``quantize`` else the normalized rows [M, K] in ``x``'s dtype,
    plus ``h`` [M, K] (the updated residual stream) when ``residual`` is given: ``(normalized, h)``."""
    rows = _rows(x, "rmsnorm_quantize")
    m, k = rows.shape
    if weight.shape != (k,) or weight.dtype != rows.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous {rows.dtype} [{k}] tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    grid, block, chunk = _grid_and_block(m, k, "rmsnorm_quantize")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} does not match x "
                             f"{x.dtype} {tuple(x.shape)}")
        residual = _rows(residual, "rmsnorm_quantize")
        updated = torch.empty_like(rows)
    else:
        residual = updated = rows  # unused
    out, scale, codes = _outputs(rows, k, quantize)
    branches.record("rmsnorm_quantize", _producer_branch(chunk, block, quantize, updated is not rows))
    pdl = programmatic_launch(rows)
    if m:
        _rmsnorm_kernel[grid](rows, residual, weight, out, codes, scale, updated, k, eps, rows.stride(0),
                              residual.stride(0), out.stride(0), updated.stride(0), BLOCK=block, CHUNK=chunk,
                              HAS_RESIDUAL=updated is not rows, QUANTIZE=quantize, PDL=pdl, num_warps=_num_warps(block),
                              launch_pdl=pdl)
    normalized = (codes, scale) if quantize else out
    return (normalized, updated) if updated is not rows else normalized


def silu_mul_quantize(gate_up: torch.Tensor, quantize: bool = True):
    """``SiLU(gate) * up`` for ``gate_up = [gate | up]`` [M, 2I] (a fused gate/up GEMM's output).

    Returns ``(codes int8 [M, I], scale fp32 [M])`` if ``quantize`` else [M, I] in the input dtype."""
    rows = _rows(gate_up, "silu_mul_quantize")
    m, double = rows.shape
    if double % 2:
        raise ValueError(f"gate_up must have an even last dimension (gate and up side by side), got {double}")
    width = double // 2
    grid, block, chunk = _grid_and_block(m, width, "silu_mul_quantize")
    out, scale, codes = _outputs(rows, width, quantize)
    branches.record("silu_mul_quantize", _producer_branch(chunk, block, quantize))
    pdl = programmatic_launch(rows)
    if m:
        _silu_mul_kernel[grid](rows, out, codes, scale, width, rows.stride(0), out.stride(0), BLOCK=block,
                               CHUNK=chunk, QUANTIZE=quantize, PDL=pdl, num_warps=_num_warps(block), launch_pdl=pdl)
    return (codes, scale) if quantize else out


def rope_into_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Split a fused q/k/v output ``qkv`` [B, T, (H + 2 Hkv) * D], rotate q and k (Llama's rotate-half RoPE with
    ``cos``/``sin`` fp32 [max_positions, D / 2] at ``positions`` int [B, T]), write k and v into the caches
    [B, Hkv, S, D] at those positions and return q as [B, H, T, D] (contiguous).

    The caches are in ``qkv``'s dtype, or int8 when ``k_scale`` and ``v_scale`` fp32 [B, Hkv, S] are given: each
    (token, head) is then written as its per-token int8 codes (``numerics.quantize_per_token`` over D) and scale,
    and q is returned rounded onto its int8 grid per token and head (``numerics.fake_quantize_per_token``)."""
    batch, t, width = qkv.shape
    _, n_kv_heads, capacity, head_dim = k_cache.shape
    quantized = k_scale is not None or v_scale is not None
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"rope_into_cache needs a power-of-two head dim >= 16, got {head_dim}")
    if width != (n_heads + 2 * n_kv_heads) * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {n_heads} q and {n_kv_heads} k/v heads of {head_dim}")
    cache_dtype = torch.int8 if quantized else qkv.dtype
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[0] < batch \
            or k_cache.dtype != cache_dtype or v_cache.dtype != cache_dtype or k_cache.stride(-1) != 1:
        raise ValueError(f"k_cache and v_cache must be alike, [B, Hkv, S, D] in {cache_dtype}"
                         + (" (an int8 cache with k_scale / v_scale)" if quantized else " (qkv's dtype)"))
    if quantized:
        check_cache_scales(k_cache, k_scale, v_scale)
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim // 2 \
            or cos.dtype != torch.float32 or sin.dtype != torch.float32 \
            or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"cos/sin must be contiguous fp32 [max_positions, {head_dim // 2}], got {cos.dtype} "
                         f"{tuple(cos.shape)} and {sin.dtype} {tuple(sin.shape)}")
    if positions.shape != (batch, t) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64 [{batch}, {t}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    rows = qkv.reshape(batch * t, width)
    positions = positions.reshape(-1).contiguous()
    q = torch.empty((batch, n_heads, t, head_dim), dtype=qkv.dtype, device=qkv.device)
    branches.record("rope_into_cache", "rope_int8" if quantized else "rope")
    if not quantized:
        k_scale = v_scale = k_cache  # unused
    pdl = programmatic_launch(rows)
    block_t = 1 if t == 1 else PREFILL_TOKENS_PER_PROGRAM
    if batch * t:
        _rope_into_cache_kernel[(triton.cdiv(batch * t, block_t), n_heads + 2 * n_kv_heads)](
            rows, cos, sin, positions, q, k_cache, v_cache, k_scale, v_scale, batch * t, t, n_heads, n_kv_heads,
            rows.stride(0), q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), k_scale.stride(0), k_scale.stride(1), HALF=head_dim // 2, BLOCK_T=block_t,
            QUANTIZED=quantized, PDL=pdl, num_warps=(1 if block_t == 1 else 4) * (1 if head_dim <= 128 else 2),
            launch_pdl=pdl)
    return q


def dequantize_cache(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The entries of an 8-bit KV cache slice, int8 ``codes`` [B, Hkv, T, D] (the head dim contiguous, any other
    strides: a prefill reads the first T positions of its cache) with their fp32 ``scale`` [B, Hkv, T], as a new
    contiguous [B, Hkv, T, D] tensor in ``dtype``: each code times its scale in fp32, rounded once to ``dtype``
    (``qqq.fast.attention.dequantized``), in one launch."""
    if codes.dtype != torch.int8 or codes.dim() != 4 or codes.stride(-1) != 1:
        raise ValueError(f"dequantize_cache takes int8 codes [B, Hkv, T, D] with the head dim contiguous, got "
                         f"{codes.dtype} {tuple(codes.shape)} with strides {codes.stride()}")
    if scale.dtype != torch.float32 or scale.shape != codes.shape[:3] or scale.device != codes.device \
            or scale.stride(-1) != 1:
        raise ValueError(f"dequantize_cache needs fp32 scales {tuple(codes.shape[:3])} with contiguous positions "
                         f"beside the codes, got {scale.dtype} {tuple(scale.shape)} with strides {scale.stride()} on "
                         f"{scale.device}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dequantize_cache writes fp16, bf16 or fp32, not {dtype}")
    batch, n_kv_heads, t, head_dim = codes.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"dequantize_cache needs a power-of-two head dim, got {head_dim}")
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    rows = batch * n_kv_heads * t
    branches.record("dequantize_cache", "int8")
    pdl = programmatic_launch(codes)
    if rows:
        _dequantize_cache_kernel[(triton.cdiv(rows, CACHE_ROWS_PER_PROGRAM),)](
            codes, scale, out, rows, t, n_kv_heads, codes.stride(0), codes.stride(1), codes.stride(2),
            scale.stride(0), scale.stride(1), HEAD_DIM=head_dim, BLOCK_R=CACHE_ROWS_PER_PROGRAM, PDL=pdl,
            num_warps=4, launch_pdl=pdl)
    return out


def check_cache_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """An int8 cache [B, Hkv, S, D] needs both scales, fp32 [B, Hkv, S] alike, the positions contiguous."""
    if k_scale is None or v_scale is None or k_cache.dtype != torch.int8:
        raise ValueError("an 8-bit KV cache is int8 k / v with both k_scale and v_scale")
    for scale in (k_scale, v_scale):
        if scale.shape != k_cache.shape[:3] or scale.dtype != torch.float32 or scale.stride(-1) != 1 \
                or scale.stride() != k_scale.stride() or scale.device != k_cache.device:
            raise ValueError(f"k_scale and v_scale must be alike, fp32 {tuple(k_cache.shape[:3])} with contiguous "
                             f"positions, got {scale.dtype} {tuple(scale.shape)}")
