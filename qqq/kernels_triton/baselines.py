"""Baselines measured in the same harness as the W4A8 kernels.

- W8A8 (SmoothQuant-style): per-token int8 activations x per-channel int8 weights [N, K] -> int32 -> scaled
  fp16/bf16. ``w8a8_linear`` runs our Triton int8 GEMM (``int8_gemm.py``, pointer-fed or, ``TMA=1``, persistent
  and TMA-fed: the same kernels the W4A8 prefill path uses after dequantizing); ``w8a8_linear_cublas`` runs
  cuBLAS through ``torch._int_mm`` (needs M > 16) plus the scale epilogue in PyTorch. Both quantize the
  activations with ``activation_quant``.
- W4A16: fp16/bf16 activations x per-channel int4 weights in the W4A8 packing -> fp32 accumulation. The
  nibbles are unpacked to ``16 * code`` exactly as in the W4A8 kernel, converted to the activation dtype
  (exact) and multiplied on the fp16 tensor cores; ``scale / 16`` is applied in the epilogue.
FP16 itself is ``torch.nn.functional.linear`` (cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qqq.kernels_triton import branches, config_table
from qqq.kernels_triton.activation_quant import quantize_per_token
from qqq.kernels_triton.int8_gemm import epilogue_width, grouped_tile_ids, launch_int8_gemm
from qqq.kernels_triton.packing import check_packable
from qqq.kernels_triton.unpack import unpack_signed_x16

LAUNCH_BRANCHES = {"w8a8_gemm": tuple(kernel + silu for kernel in ("int8_gemm", "int8_gemm_tma", "int8_gemm_ws")
                                 for silu in ("", "+silu_mul")),
                   "w4a16_linear": ("w4a16",)}


@triton.jit
def _scaled_store(acc, offs_n, offs_m, n_mask, m_mask, a_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
                  stride_om, HAS_TOKEN_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    channel_scale = tl.load(channel_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32)
    if HAS_TOKEN_SCALE:
        token_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        y = y * token_scale[None, :]
    y = y * channel_scale[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], y.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemm_kernel(
    x_ptr, w_ptr, channel_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    HALF: tl.constexpr = 32
    pid_n, pid_m = grouped_tile_ids(N, M, BLOCK_N, BLOCK_M, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_byte = tl.arange(0, BLOCK_K // 2)
    offs_k_low = (offs_byte // HALF) * (2 * HALF) + offs_byte % HALF
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_byte[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k_low[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        packed = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        x_low = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
        x_high = tl.load(x_ptrs + HALF, mask=m_mask[None, :], other=0.0)
        w_low, w_high = unpack_signed_x16(packed, False)
        w_low, w_high = w_low.to(x_ptr.dtype.element_ty), w_high.to(x_ptr.dtype.element_ty)
        acc = tl.dot(w_low, x_low, acc=acc)
        acc = tl.dot(w_high, x_high, acc=acc)
        w_ptrs += BLOCK_K // 2
        x_ptrs += BLOCK_K
    acc = acc * 0.0625
    _scaled_store(acc, offs_n, offs_m, n_mask, m_mask, channel_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr,
                  stride_om, False, HAS_BIAS)


def _check_common(n, k, channel_scale, bias):
    if channel_scale.dtype != torch.float32 or channel_scale.shape != (n,) or not channel_scale.is_contiguous():
        raise ValueError(f"channel_scale must be a contiguous fp32 [{n}] tensor")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor")


def _launch_config(kernel, config, m, n, k):
    if config is None:
        config = config_table.get_config(kernel, m, n, k, -1)
    else:
        config_table.check_config(kernel, config, m, n, k, -1)
    if config["SPLIT_K"] != 1:
        config = dict(config, SPLIT_K=1)  # the baselines have no split-K
    return config


def w8a8_gemm(a_codes, a_scale, weight, channel_scale, bias, out_dtype, config: dict | None = None,
              silu_mul: bool = False):
    """Triton W8A8 GEMM on quantized activations: int8 [M, K] x int8 weight [N, K] -> [M, N]; ``silu_mul``:
    the weight rows alternate gate, up and the result is ``SiLU(gate) * up`` [M, N / 2] (``int8_gemm``)."""
    if a_codes.dtype != torch.int8 or weight.dtype != torch.int8 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError("w8a8_gemm expects int8 activations and a contiguous int8 [N, K] weight")
    m, k = a_codes.shape
    n = weight.shape[0]
    if weight.shape[1] != k or k % 64:
        raise ValueError(f"weight {tuple(weight.shape)} does not match K={k} (K must be a multiple of 64)")
    _check_common(n, k, channel_scale, bias)
    width = epilogue_width(n, silu_mul)
    config = _launch_config("w8a8", config, m, n, k)
    out = torch.empty((m, width), dtype=out_dtype, device=a_codes.device)
    kernel = launch_int8_gemm(a_codes, a_scale, weight, channel_scale, bias, out, out, config, False, False, silu_mul)
    branches.record("w8a8_gemm", kernel + ("+silu_mul" if silu_mul else ""))
    return out


def w8a8_linear(x, weight, channel_scale, bias=None, config: dict | None = None):
    """W8A8 linear with the Triton int8 GEMM: per-token quantization of ``x`` [..., K], then the GEMM."""
    a_codes, a_scale = quantize_per_token(x)
    out = w8a8_gemm(a_codes, a_scale, weight, channel_scale, bias, x.dtype, config)
    return out.reshape(*x.shape[:-1], -1)


def w8a8_linear_cublas(x, weight_t, channel_scale, bias=None):
    """W8A8 linear through cuBLAS ``torch._int_mm`` (int8 [M, K] x int8 [K, N] -> int32; needs M > 16).

    ``weight_t`` is the int8 weight transposed, [K, N] (column-major view of [N, K] is what cuBLAS likes)."""
    a_codes, a_scale = quantize_per_token(x)
    acc = torch._int_mm(a_codes, weight_t)
    y = acc.float() * a_scale[:, None] * channel_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def w4a16_linear(x, qweight, channel_scale, bias=None, config: dict | None = None):
    """W4A16 linear (per-channel int4 weights in the W4A8 packing, fp16/bf16 activations)."""
    if x.dtype not in (torch.float16, torch.bfloat16) and not (x.dtype == torch.float32 and not x.is_cuda):
        raise ValueError(f"w4a16_linear expects fp16/bf16 input, got {x.dtype}")
    k = x.shape[-1]
    check_packable(k)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != k // 2:
        raise ValueError(f"qweight must be uint8 [N, {k // 2}], got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    _check_common(n, k, channel_scale, bias)
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    config = _launch_config("w4a16", config, m, n, k)
    branches.record("w4a16_linear", "w4a16")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config["BLOCK_N"]) * triton.cdiv(m, config["BLOCK_M"]),)
    _w4a16_gemm_kernel[grid](
        rows, qweight, channel_scale, bias if bias is not None else channel_scale, out,
        m, n, k, rows.stride(0), qweight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=config["BLOCK_N"], BLOCK_M=config["BLOCK_M"],
        BLOCK_K=config["BLOCK_K"], GROUP_N=config["GROUP_N"], num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out.reshape(*x.shape[:-1], n)
