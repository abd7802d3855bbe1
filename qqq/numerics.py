"""The one numeric specification of QQQ's W4A8 formats, in plain PyTorch.

Everything else (the fake-quant accuracy path, the packers, the Triton kernels and their tests) is defined
by, or checked against, the functions in this file.

Activations: dynamic per-token symmetric int8, ``scale = amax(|row|) / 127`` in fp32, round half to even,
an all-zero row gets scale 0 and codes 0 (never NaN).

Weights, stored as 4-bit codes:
- per-channel (``group_size == -1``): signed codes in [-7, 7], ``scale = amax(|row|) / 7`` per output channel;
  the int8 weight the GEMM uses is the code itself.
- per-group (``group_size`` in 32/64/128/256): unsigned codes in [0, 15] with zero point 8,
  ``group_scale = 2 * amax(|group|) / 15``; the GEMM uses two-level scales: a per-channel fp32 scale
  ``channel_scale = amax(|dequantized row|) / 127`` and an fp16 ratio per group
  ``ratio = group_scale / channel_scale``; the int8 weight is ``round((code - 8) * ratio)``, which never leaves
  [-127, 127].

The product of an int8 activation row and an int8 weight row is accumulated exactly in int32, then
``y = acc * token_scale * channel_scale`` (+ bias) in fp32 and cast to the output dtype.
"""

from __future__ import annotations

import functools
import time

import torch

SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256)
INT8_MAX = 127
INT4_SIGNED_MAX = 7
INT4_ZERO_POINT = 8
INT4_UNSIGNED_MAX = 15


def check_group_size(group_size: int, in_features: int) -> None:
    """Raise a clear error if ``group_size`` is not supported or does not divide ``in_features``."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES} (-1 = per-channel), got {group_size}")
    if group_size != -1 and in_features % group_size != 0:
        raise ValueError(
            f"in_features={in_features} is not divisible by group_size={group_size}; "
            "choose a group size that divides the layer's input dimension or use per-channel (-1)"
        )


def divide_exactly(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor``, correctly rounded on every device. (CUDA turns division by a Python scalar into a
    multiplication by its reciprocal, which is not correctly rounded: scales would differ between devices.)"""
    return t / torch.full_like(t, divisor)


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with 1 where it is 0 (an all-zero row or group): a divisor that leaves zero codes."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def abs_max(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``x.abs().amax(dim, keepdim)``, from the reductions ``max`` and ``-min`` (exact, without the copy that
    ``abs`` makes; the last ``abs`` only turns an all-zero maximum into +0.0, as ``x.abs()`` would)."""
    return torch.maximum(x.amax(dim=dim, keepdim=keepdim), -x.amin(dim=dim, keepdim=keepdim)).abs()


# ---------------------------------------------------------------- activations


def quantize_per_token(x: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) symmetric int8 quantization.

    Returns ``(codes int8 [..., K], scales fp32 [..., 1])`` with ``x ~= codes * scales``. ``overwrite``: an fp32
    ``x`` the caller no longer needs is used as scratch space (its values are lost; one copy fewer).
    """
    x = x.float()
    scale = divide_exactly(abs_max(x, dim=-1, keepdim=True), INT8_MAX)
    codes = (x.div_(safe_divisor(scale)) if overwrite else x / safe_divisor(scale)).round_()
    return codes.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded onto its per-token int8 grid, in ``x``'s dtype."""
    codes, scale = quantize_per_token(x)
    return (codes.float() * scale).to(x.dtype)


# ---------------------------------------------------------------- weights


def quantize_weight_per_channel(weight: torch.Tensor, scale: torch.Tensor | None = None):
    """Signed int4 codes in [-7, 7] per output channel: ``weight ~= codes * scale[:, None]``.

    ``scale`` (fp32 [N]) defaults to ``amax(|row|) / 7``; GPTQ passes its own (e.g. clipped) scale.
    """
    w = weight.float()
    if scale is None:
        scale = divide_exactly(w.abs().amax(dim=1), INT4_SIGNED_MAX)
    codes = torch.round(w / safe_divisor(scale)[:, None]).clamp_(-INT4_SIGNED_MAX, INT4_SIGNED_MAX)
    return codes.to(torch.int8), scale.float()


def group_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group scales ``2 * amax(|group|) / 15`` (fp32 [N, K // group_size])."""
    n, k = weight.shape
    check_group_size(group_size, k)
    return divide_exactly(weight.float().reshape(n, k // group_size, group_size).abs().amax(dim=-1) * 2,
                          INT4_UNSIGNED_MAX)


def quantize_weight_per_group(weight: torch.Tensor, group_size: int, scale: torch.Tensor | None = None):
    """Unsigned int4 codes in [0, 15] with zero point 8: ``weight ~= (codes - 8) * scale`` per group.

    Returns ``(codes uint8 [N, K], group_scale fp32 [N, K // group_size])``.
    """
    n, k = weight.shape
    if scale is None:
        scale = group_scales(weight, group_size)
    check_group_size(group_size, k)
    grouped = weight.float().reshape(n, k // group_size, group_size)
    codes = (torch.round(grouped / safe_divisor(scale)[..., None]) + INT4_ZERO_POINT).clamp_(0, INT4_UNSIGNED_MAX)
    return codes.to(torch.uint8).reshape(n, k), scale.float()


def _per_group(values: torch.Tensor, per_group: torch.Tensor) -> torch.Tensor:
    """``values`` [N, K] times ``per_group`` [N, K // group_size] repeated over each group, as [N, groups, size]."""
    n, groups = per_group.shape
    return values.reshape(n, groups, -1) * per_group[..., None]


def two_level_scales(codes: torch.Tensor, group_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 scale and fp16 group ratios for per-group codes (QQQ's FusedDequantQuant format).

    Returns ``(channel_scale fp32 [N], ratio fp16 [N, K // group_size])``.
    """
    dequantized = _per_group(codes.float() - INT4_ZERO_POINT, group_scale)
    channel_scale = divide_exactly(dequantized.abs().amax(dim=(1, 2)), INT8_MAX)
    ratio = (group_scale / safe_divisor(channel_scale)[:, None]).to(torch.float16)
    return channel_scale, ratio


def int8_weight_from_groups(codes: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The int8 weight the per-group GEMM uses: ``round_half_even((code - 8) * ratio)`` in [-127, 127].

    ``(code - 8) * ratio`` is exact in fp32 (a 4-bit integer times an fp16 number), so this matches the
    original kernel's single-rounding fp16 FMA.
    """
    product = _per_group(codes.float() - INT4_ZERO_POINT, ratio.float())
    return torch.round(product).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(codes.shape)


def group_products_fit_int8(codes: torch.Tensor, ratio: torch.Tensor) -> bool:
    """Whether every ``|(code - 8) * ratio| < 127.5``, so that ``int8_weight_from_groups`` never clamps (the
    kernels may then skip the clamp). Holds for every ``two_level_scales`` result: its largest product is 127 up
    to the fp16 rounding of the ratio."""
    if codes.numel() == 0:
        return True
    product = _per_group(codes.float() - INT4_ZERO_POINT, ratio.float())
    return bool(product.abs().amax() < INT8_MAX + 0.5)


def dequantize_per_channel(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


def dequantize_per_group(codes: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """The 4-bit per-group weight itself, ``(code - 8) * group_scale`` (what a W4A16 GEMM applies)."""
    return _per_group(codes.float() - INT4_ZERO_POINT, group_scale.float()).reshape(codes.shape)


def quantize_weight_rtn(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit codes and scales, per-channel (``group_size == -1``) or per group."""
    check_group_size(group_size, weight.shape[1])
    if group_size == -1:
        return quantize_weight_per_channel(weight)
    return quantize_weight_per_group(weight, group_size)


def dequantize_two_level(codes: torch.Tensor, channel_scale: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The effective weight of the per-group GEMM: ``channel_scale * int8_weight``."""
    return int8_weight_from_groups(codes, ratio).float() * channel_scale[:, None]


def quantize_weight_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-channel weights (the SmoothQuant W8A8 baseline): codes in [-127, 127]."""
    w = weight.float()
    scale = divide_exactly(w.abs().amax(dim=1), INT8_MAX)
    codes = torch.round(w / safe_divisor(scale)[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scale


def fake_quantize_weight(weight: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Round-to-nearest weight on the W4A8 grid (per-channel or two-level per-group) or the int8 grid."""
    if bits == 8:
        codes, scale = quantize_weight_int8_per_channel(weight)
        out = dequantize_per_channel(codes, scale)
    elif bits != 4:
        raise ValueError(f"weight bits must be 4 or 8, got {bits}")
    elif group_size == -1:
        out = dequantize_per_channel(*quantize_weight_per_channel(weight))
    else:
        codes, scale = quantize_weight_per_group(weight, group_size)
        out = dequantize_two_level(codes, *two_level_scales(codes, scale))
    return out.to(weight.dtype)


def int8_weight(codes: torch.Tensor, ratio: torch.Tensor | None) -> torch.Tensor:
    """The int8 weight matrix a W4A8 GEMM multiplies: per-channel codes as they are, per-group two-level."""
    if ratio is None:
        return codes.to(torch.int8)
    return int8_weight_from_groups(codes, ratio)


EXACT_FP32_CHUNK = 1024  # 1024 * 127 * 127 < 2**24: any partial sum of int8 products is exact in fp32
INT32_EXACT_K = 2 ** 31 // (128 * 128)  # int32 holds any sum of this many int8 products


@functools.cache
def _cpu_int8_gemm() -> bool:
    """Whether this torch build has an int8 GEMM with int32 accumulation on the CPU (``torch._int_mm``)."""
    try:
        ones = torch.ones(2, 2, dtype=torch.int8)
        return bool((torch._int_mm(ones, ones) == 2).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def cpu_int8_gemm_pays() -> bool:
    """Whether this machine's CPU int8 GEMM with int32 accumulation (``torch._int_mm``) exists and beats the fp32
    matmuls of :func:`int8_matmul_exact` (timed once, on a small block). Where the CPU has int8 dot-product
    instructions (VNNI, AMX) it ran 3-4x faster than fp32; on an AVX2-only CPU it ran 27x slower (512 x 576 x
    1536: 146 ms against 5.3), which made the demo's smoothing search take 30 minutes instead of 2. Both give
    the same exact sums, so the choice changes only the time."""
    if not _cpu_int8_gemm():
        return False
    a, b = torch.ones(128, 512, dtype=torch.int8), torch.ones(256, 512, dtype=torch.int8)
    return _best_seconds(lambda: torch._int_mm(a, b.T)) < _best_seconds(lambda: _int8_matmul_in_fp32(a, b))


def _best_seconds(call, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def int8_matmul_exact(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``a [M, K] @ b [N, K]^T`` for int8 matrices, exact, as float64 [M, N] (or ``dtype``: float32 gives each
    exact sum rounded once, the same numbers as the float64 result cast to float32). On a CPU whose int8 GEMM
    pays (:func:`cpu_int8_gemm_pays`) that GEMM with int32 accumulation; otherwise fp32 matmuls over K-chunks
    short enough that every partial sum is an integer below 2**24, added in float64 (fast on any device)."""
    if takes_cpu_int8_gemm(a):
        return torch._int_mm(a.contiguous(), b.T).to(dtype)
    return _int8_matmul_in_fp32(a, b).to(dtype)


def takes_cpu_int8_gemm(a: torch.Tensor) -> bool:
    """Whether ``a`` [M, K] @ int8 [N, K]^T is exact and fastest as ``torch._int_mm``: on a CPU whose int8 GEMM
    pays, with K short enough for int32 sums."""
    return a.device.type == "cpu" and a.shape[1] <= INT32_EXACT_K and cpu_int8_gemm_pays()


def _int8_matmul_in_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[1] <= EXACT_FP32_CHUNK:  # one chunk: every partial sum, so the result, is an exact fp32 integer
        return a.float() @ b.float().T
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], EXACT_FP32_CHUNK):
        chunk = slice(start, start + EXACT_FP32_CHUNK)
        acc += (a[:, chunk].float() @ b[:, chunk].float().T).double()
    return acc


def w4a8_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    channel_scale: torch.Tensor,
    ratio: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference W4A8 linear: per-token int8 ``x`` times the int8 weight, exact int accumulation.

    The int32 accumulation is reproduced exactly by :func:`int8_matmul_exact`.
    """
    x_codes, token_scale = quantize_per_token(x)
    return int8_linear_reference(x_codes, token_scale[..., 0], int8_weight(codes, ratio), channel_scale, bias,
                                 x.dtype)


def int8_linear_reference(x_codes: torch.Tensor, token_scale: torch.Tensor, weight: torch.Tensor,
                          channel_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Already quantized activations (``x_codes`` int8 [M, K], ``token_scale`` fp32 [M]) times an int8 weight
    [N, K]: exact accumulation, then ``acc * token_scale * channel_scale`` (+ bias) in fp32, cast to ``dtype``."""
    acc = int8_matmul_exact(x_codes, weight, torch.float32)
    y = acc * token_scale.float()[:, None] * channel_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def random_quantized_weight(n: int, k: int, group_size: int, generator: torch.Generator | None = None,
                            device: str | torch.device = "cpu"):
    """A random ``[n, k]`` weight quantized by this spec (for kernel checks and benchmarks): ``(codes, channel
    scale fp32 [n], group ratio fp16 [n, k / group_size] or None)`` as ``QQQLinear`` stores them."""
    weight = torch.randn(n, k, generator=generator, device=device)
    if group_size == -1:
        codes, scale = quantize_weight_per_channel(weight)
        return codes, scale, None
    codes, group_scale = quantize_weight_per_group(weight, group_size)
    channel_scale, ratio = two_level_scales(codes, group_scale)
    return codes, channel_scale, ratio


def output_tolerance(expected: torch.Tensor, acc: torch.Tensor, token_scale: torch.Tensor,
                     channel_scale: torch.Tensor) -> torch.Tensor:
    """How far two implementations of the W4A8 epilogue may lie apart element-wise, given the exact int sums
    ``acc`` [M, N]: one rounding of the output dtype of ``expected``, plus one fp32 rounding of the scaled sum
    ``acc * token_scale * channel_scale`` (a kernel may fuse the last multiply with the bias add, rounding once
    where the reference rounds twice; where the bias cancels the product, that fp32 step is larger than the
    output's own rounding)."""
    unit = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}.get(expected.dtype, 2.0**-23)
    scaled = acc.double().abs() * token_scale.double().reshape(-1, 1) * channel_scale.double().reshape(1, -1)
    return (expected.double().abs() * unit + scaled * 2.0**-23 + 2.0**-24).float()
