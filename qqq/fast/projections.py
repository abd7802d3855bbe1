"""The linear formats of the fast path: one ``Projection`` per format, q/k/v and gate/up each fused into one.

The gate/up projection of the W4A8 and W8A8 formats ends in ``SiLU(gate) * up`` (``silu_mul``): its weight rows
alternate gate, up and the GEMM's epilogue combines each pair (``qqq.kernels_triton.int8_gemm``), so the MLP
needs no SiLU*up launch, only the per-token quantization of the result for down.

A QQQ checkpoint's ``QQQLinear`` layers keep their own weights (smoothing + GPTQ, already W4A8). A plain model is
converted by a method of :data:`METHODS`; the quantized ones round the weights to nearest, so ``w4a8_rtn`` is
*not* the pipeline's ``qqq`` (which smooths and runs GPTQ first): it has QQQ's W4A8 format and kernels, for
speed measurements and for models without a checkpoint.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qqq import numerics
from qqq.fast.backend import triton_or_reference
from qqq.fast.producers import Int8Rows, silu_mul_reference
from qqq.kernels_triton.packing import pack_int4, unpack_int4
from qqq.linear import QQQLinear, cached_int8_weight, cached_ratios_fit_int8

RENAMED_METHODS = {"qqq": "w4a8_rtn", "qqq_g128": "w4a8_rtn_g128"}  # their names until they were renamed
TINYGEMM_GROUP = 128
TINYGEMM_INNER_K_TILES = 8


def fast_method(name: str) -> str:
    """``name`` as a method of :data:`METHODS`; the old names ``qqq`` / ``qqq_g128`` still work, with a warning."""
    if name in RENAMED_METHODS:
        warnings.warn(f"the fast path's method {name!r} is now {RENAMED_METHODS[name]!r} (round-to-nearest W4A8; "
                      "the pipeline's 'qqq' is smoothing + GPTQ, kept by a checkpoint)", DeprecationWarning,
                      stacklevel=3)
        return RENAMED_METHODS[name]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    return name


class Projection(nn.Module):
    """A (fused) linear of ``FastLlama``. ``takes_int8``: its producer hands it ``Int8Rows``, else fp16 rows.
    ``silu_mul``: its weight rows alternate gate, up and it returns ``SiLU(gate) * up`` (out_features / 2 wide)."""

    takes_int8 = False
    silu_mul = False

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).contiguous())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DenseProjection(Projection):
    """FP16 (the model's dtype): cuBLAS."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias, weight.dtype)
        self.register_buffer("weight", weight.detach().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class W4A16Projection(Projection):
    """Per-channel int4 weights (round to nearest), activations in the model's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias, weight.dtype)
        codes, scale = numerics.quantize_weight_per_channel(weight)
        self.register_buffer("qweight", pack_int4(codes))
        self.register_buffer("channel_scale", scale.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = triton_or_reference(x, "baselines.w4a16_linear", _w4a16_linear_reference)
        return linear(x, self.qweight, self.channel_scale, self.bias)


def _w4a16_linear_reference(x, qweight, channel_scale, bias=None):
    weight = numerics.dequantize_per_channel(unpack_int4(qweight, x.shape[-1], True), channel_scale)
    return F.linear(x, weight.to(x.dtype), bias)


class TinygemmW4A16Projection(Projection):
    """W4A16 through torch's tinygemm int4 kernel (``torch._weight_int4pack_mm``, the fastest W4A16 GEMM here at
    M <= 4): codes [0, 15] with zero point 8 in groups of 128, bf16 activations. On the CPU it keeps the codes
    in the W4A8 packing and runs the dequantized reference."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias, weight.dtype)
        if weight.is_cuda and weight.dtype != torch.bfloat16:
            raise ValueError(f"w4a16_tinygemm runs bf16 activations: load the model in bfloat16, not {weight.dtype}")
        codes, group_scale = numerics.quantize_weight_per_group(weight, TINYGEMM_GROUP)
        if weight.is_cuda:
            even_high = (codes[:, ::2].to(torch.int32) << 4 | codes[:, 1::2].to(torch.int32)).to(torch.uint8)
            self.register_buffer("qweight", torch._convert_weight_to_int4pack(even_high, TINYGEMM_INNER_K_TILES))
            zeros = torch.zeros_like(group_scale)  # tinygemm: w = (code - 8) * scale + zero
            self.register_buffer("scales_and_zeros", torch.stack((group_scale, zeros), dim=2).transpose(0, 1)
                                 .contiguous().to(torch.bfloat16))
        else:
            self.register_buffer("qweight", pack_int4(codes))
            self.register_buffer("scales_and_zeros", group_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # torch's own CUDA kernel, not one of qqq's Triton kernels
            y = torch._weight_int4pack_mm(x.reshape(-1, self.in_features), self.qweight, TINYGEMM_GROUP,
                                          self.scales_and_zeros)
            return y if self.bias is None else y + self.bias
        codes = unpack_int4(self.qweight, self.in_features, signed=False)
        return F.linear(x, numerics.dequantize_per_group(codes, self.scales_and_zeros).to(x.dtype), self.bias)


class W8A8Projection(Projection):
    """SmoothQuant-style W8A8: per-channel int8 weights (round to nearest), per-token int8 activations."""

    takes_int8 = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias, weight.dtype)
        codes, scale = numerics.quantize_weight_int8_per_channel(weight)
        self.register_buffer("weight", codes.contiguous())
        self.register_buffer("channel_scale", scale.contiguous())

    def forward(self, rows: Int8Rows) -> torch.Tensor:
        gemm = triton_or_reference(rows.codes, "baselines.w8a8_gemm", _int8_gemm_reference)
        return gemm(rows.codes, rows.scale, self.weight, self.channel_scale, self.bias, self.dtype,
                    silu_mul=self.silu_mul)


def _int8_gemm_reference(a_codes, a_scale, weight, channel_scale, bias, out_dtype, silu_mul=False):
    """What the int8 GEMMs compute (``baselines.w8a8_gemm``; ``w4a8_gemm`` once its weight is int8), from
    ``qqq.numerics``, ending in ``SiLU(gate) * up`` with ``silu_mul``."""
    out = numerics.int8_linear_reference(a_codes, a_scale, weight, channel_scale, bias, out_dtype)
    return silu_mul_of_alternating_rows(out) if silu_mul else out


def alternate_halves(t: torch.Tensor) -> torch.Tensor:
    """``t`` = [gate; up] (rows) -> rows alternating gate, up: row ``2j`` is gate ``j``, ``2j + 1`` is up ``j``."""
    if t.shape[0] % 2:
        raise ValueError(f"gate and up must have as many rows, got {t.shape[0]} rows in all")
    return t.reshape(2, t.shape[0] // 2, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def halves_of_alternating_channels(out: torch.Tensor) -> torch.Tensor:
    """Outputs [M, N] whose channels alternate gate, up -> [gate | up] (what the SiLU*up producer takes)."""
    return torch.cat((out[:, 0::2], out[:, 1::2]), dim=1)


def silu_mul_of_alternating_rows(out: torch.Tensor) -> torch.Tensor:
    """``SiLU(gate) * up`` of outputs [M, N] whose channels alternate gate, up (the producers' reference)."""
    return silu_mul_reference(halves_of_alternating_channels(out), quantize=False)


class W4A8Projection(Projection):
    """QQQ W4A8: the buffers of one or more ``QQQLinear`` stacked along the output dimension."""

    takes_int8 = True

    def __init__(self, linears: list[QQQLinear], dtype: torch.dtype, silu_mul: bool = False):
        """``silu_mul``: ``linears`` are (gate, up), fused into one projection returning ``SiLU(gate) * up``."""
        group_sizes = {linear.group_size for linear in linears}
        in_features = {linear.in_features for linear in linears}
        if len(group_sizes) != 1 or len(in_features) != 1:
            raise ValueError(f"cannot fuse QQQLinear layers with group sizes {sorted(group_sizes)} and input sizes "
                             f"{sorted(in_features)}")
        if silu_mul and (len(linears) != 2 or linears[0].out_features != linears[1].out_features):
            raise ValueError(f"silu_mul fuses a gate and an up projection of one width, got "
                             f"{[linear.out_features for linear in linears]}")
        rows = alternate_halves if silu_mul else (lambda t: t)
        bias = stacked_bias(linears, dtype, linears[0].qweight.device)
        super().__init__(in_features.pop(), sum(linear.out_features for linear in linears),
                         None if bias is None else rows(bias), dtype)
        self.group_size = group_sizes.pop()
        self.silu_mul = silu_mul
        self.register_buffer("qweight", rows(torch.cat([linear.qweight for linear in linears])).contiguous())
        self.register_buffer("channel_scale", rows(torch.cat([linear.channel_scale for linear in linears]))
                             .contiguous())
        self.register_buffer("group_ratio", rows(torch.cat([linear.group_ratio for linear in linears]))
                             .contiguous())
        self.checked_on = None  # the device whose kernels last validated these buffers
        # checked now, not inside a CUDA-graph capture (it reads the codes back to the host)
        cached_ratios_fit_int8(self, self.qweight, self.in_features, self.group_size, self.group_ratio)

    def forward(self, rows: Int8Rows) -> torch.Tensor:
        ratio = self.group_ratio if self.group_size != -1 else None
        gemm = triton_or_reference(rows.codes, "w4a8_gemm.w4a8_gemm", self._reference)
        fits = cached_ratios_fit_int8(self, self.qweight, self.in_features, self.group_size, ratio)
        # the kernel checks the weights on its first call on a device, not on every call of an eager prefill
        out = gemm(rows.codes, rows.scale, self.qweight, self.channel_scale, ratio, self.bias, self.group_size,
                   self.dtype, weights_checked=self.checked_on == rows.codes.device, ratios_fit_int8=fits,
                   silu_mul=self.silu_mul)
        self.checked_on = rows.codes.device
        return out

    def _reference(self, a_codes, a_scale, qweight, channel_scale, group_ratio, bias, group_size, out_dtype,
                   weights_checked=False, ratios_fit_int8=False, silu_mul=False):
        """What ``w4a8_gemm`` computes, from ``qqq.numerics``, with the int8 weight unpacked once."""
        weight = cached_int8_weight(self, qweight, self.in_features, group_size, group_ratio)
        return _int8_gemm_reference(a_codes, a_scale, weight, channel_scale, bias, out_dtype, silu_mul)


def fused_projection(linears: list[nn.Module], method: str, dtype: torch.dtype, silu_mul: bool = False) -> Projection:
    """One projection computing ``linears`` side by side (q/k/v, gate/up). ``QQQLinear`` layers keep their
    quantization; plain linears are converted by ``method`` (round to nearest for the quantized formats).
    ``silu_mul``: ``linears`` are (gate, up), to end in ``SiLU(gate) * up`` where the format's kernels can (the
    result's ``silu_mul`` says whether it does)."""
    if all(isinstance(linear, QQQLinear) for linear in linears):
        return W4A8Projection(linears, dtype, silu_mul)
    if not all(isinstance(linear, nn.Linear) for linear in linears):
        kinds = sorted({type(linear).__name__ for linear in linears})
        raise ValueError(f"cannot build a fast projection from {kinds}: expected nn.Linear or QQQLinear layers "
                         "(fake-quantized accuracy models have no fast path; save a W4A8 checkpoint instead)")
    weight = torch.cat([linear.weight.detach() for linear in linears])
    return projection_from_weight(weight, stacked_bias(linears, weight.dtype, weight.device), method, silu_mul)


def stacked_bias(linears: list[nn.Module], dtype: torch.dtype, device) -> torch.Tensor | None:
    """The biases of ``linears`` side by side (zeros for those without one), or None if none has a bias."""
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias.detach().to(dtype) if linear.bias is not None else
                      torch.zeros(linear.out_features, dtype=dtype, device=device) for linear in linears])


def projection_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, method: str,
                           silu_mul: bool = False) -> Projection:
    """``weight`` [N, K] (+ ``bias``) as a projection of ``method`` (the quantized ones round to nearest).
    ``silu_mul``: ``weight`` is [gate; up], to end in ``SiLU(gate) * up`` where the format's kernels can (the
    result's ``silu_mul`` says whether it does; each row is quantized on its own, so alternating the rows first
    changes no code)."""
    spec = FORMATS[fast_method(method)]
    if not (silu_mul and spec.fuses_silu_mul):
        return spec.build(weight, bias)
    projection = spec.build(alternate_halves(weight), None if bias is None else alternate_halves(bias))
    projection.silu_mul = True
    return projection


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, method: str) -> torch.Tensor:
    """What ``projection_from_weight(weight, bias, method)`` computes for ``x`` [M, K], straight from
    ``qqq.numerics`` (the independent check of every projection)."""
    return FORMATS[fast_method(method)].reference(x, weight, bias)


def _w4a16_reference(x, weight, bias, group_size):
    if group_size == -1:
        dequantized = numerics.dequantize_per_channel(*numerics.quantize_weight_per_channel(weight))
    else:
        dequantized = numerics.dequantize_per_group(*numerics.quantize_weight_per_group(weight, group_size))
    return F.linear(x.float(), dequantized, None if bias is None else bias.float()).to(x.dtype)


def _w8a8_reference(x, weight, bias):
    codes, scale = numerics.quantize_weight_int8_per_channel(weight)
    x_codes, token_scale = numerics.quantize_per_token(x)
    return numerics.int8_linear_reference(x_codes, token_scale[:, 0], codes, scale, bias, x.dtype)


def _w4a8_rtn(weight, bias, group_size):
    codes, scale = numerics.quantize_weight_rtn(weight, group_size)
    return W4A8Projection([QQQLinear.from_quantized(codes, scale, bias, group_size, weight.dtype)], weight.dtype)


def _w4a8_rtn_reference(x, weight, bias, group_size):
    codes, scale = numerics.quantize_weight_rtn(weight, group_size)
    ratio = None
    if group_size != -1:
        scale, ratio = numerics.two_level_scales(codes, scale)
    return numerics.w4a8_linear_reference(x, codes, scale, ratio, bias)


@dataclass(frozen=True)
class Format:
    """A method of the fast path: ``build(weight, bias)`` makes its projection, ``reference(x, weight, bias)``
    computes the same from ``qqq.numerics``; ``fuses_silu_mul``: its GEMM can end in ``SiLU(gate) * up``."""
    note: str
    build: Callable[[torch.Tensor, torch.Tensor | None], Projection]
    reference: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    fuses_silu_mul: bool = False


FORMATS = {
    "fp16": Format("the model's own dtype, cuBLAS GEMMs", DenseProjection, F.linear),
    "w8a8": Format("per-channel int8 weights, per-token int8 activations (Triton int8 GEMM)", W8A8Projection,
                   _w8a8_reference, fuses_silu_mul=True),
    "w4a16": Format("per-channel int4 weights, fp16 activations (Triton W4A16 GEMM)", W4A16Projection,
                    partial(_w4a16_reference, group_size=-1)),
    "w4a16_tinygemm": Format(f"int4 weights in groups of {TINYGEMM_GROUP}, bf16 activations (torch's tinygemm "
                             "kernel; CUDA, bf16 models)", TinygemmW4A16Projection,
                             partial(_w4a16_reference, group_size=TINYGEMM_GROUP)),
    "w4a8_rtn": Format("QQQ's W4A8 format and kernels, per-channel weights rounded to nearest",
                       partial(_w4a8_rtn, group_size=-1), partial(_w4a8_rtn_reference, group_size=-1),
                       fuses_silu_mul=True),
    "w4a8_rtn_g128": Format("QQQ's W4A8 format and kernels, weights rounded to nearest in groups of 128",
                            partial(_w4a8_rtn, group_size=128), partial(_w4a8_rtn_reference, group_size=128),
                            fuses_silu_mul=True),
}
METHODS = tuple(FORMATS)
METHOD_NOTES = {method: spec.note for method, spec in FORMATS.items()}
