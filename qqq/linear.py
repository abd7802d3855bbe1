"""Quantized linear layers: the fake-quant accuracy path and the real packed W4A8 layer."""

from __future__ import annotations

import torch
from torch import nn

from qqq import numerics
from qqq.fast.backend import triton_or_reference
from qqq.kernels_triton.packing import pack_int4, unpack_int4


class FakeQuantLinear(nn.Module):
    """A linear whose weight already lies on a quantization grid and whose input is optionally
    fake-quantized per token to int8. Used for baselines that have no packed kernel here
    (W4A16, SmoothQuant W8A8) and for smoothing's calibration forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantize_input: bool):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.quantize_input = quantize_input
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = numerics.fake_quantize_per_token(x)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantize_input={self.quantize_input}"


def _cached_on(owner: nn.Module, name: str, sources: tuple, compute):
    """``compute()``, kept on ``owner`` under ``name`` until one of the ``sources`` tensors is replaced or written
    to (their identity and version counters are the key)."""
    versions = tuple(t._version for t in sources if t is not None)
    cached = owner.__dict__.get(name)
    if cached is None or any(a is not b for a, b in zip(cached[0], sources)) or cached[1] != versions:
        cached = (sources, versions, compute())
        owner.__dict__[name] = cached
    return cached[2]


def cached_int8_weight(owner: nn.Module, qweight: torch.Tensor, in_features: int, group_size: int,
                       ratio: torch.Tensor | None) -> torch.Tensor:
    """The int8 weight [N, K] that the packed ``qweight`` (and per-group ``ratio``) stand for
    (``numerics.int8_weight``), unpacked once and kept on ``owner``: the PyTorch reference path would otherwise
    unpack every weight at every call (most of a CPU decode step)."""
    def unpack():
        return numerics.int8_weight(unpack_int4(qweight, in_features, signed=group_size == -1), ratio)
    return _cached_on(owner, "_int8_weight_cache", (qweight, ratio), unpack)


def cached_ratios_fit_int8(owner: nn.Module, qweight: torch.Tensor, in_features: int, group_size: int,
                           ratio: torch.Tensor | None) -> bool:
    """``numerics.group_products_fit_int8`` of a per-group layer's buffers (the kernels then skip the int8 clamp),
    checked once and kept on ``owner``; False for per-channel weights (nothing to clamp)."""
    if group_size == -1:
        return False
    def check():
        return numerics.group_products_fit_int8(unpack_int4(qweight, in_features, signed=False), ratio)
    return _cached_on(owner, "_ratios_fit_int8_cache", (qweight, ratio), check)


class QQQLinear(nn.Module):
    """A W4A8 linear layer: packed int4 weights, per-token int8 activations, int32 accumulation.

    Buffers (the checkpoint format): ``qweight`` (packed codes, see ``qqq.kernels_triton.packing``),
    ``channel_scale`` fp32 [N], ``group_ratio`` fp16 [N, K // group_size] (per-group only, else empty),
    and an optional ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = -1, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        numerics.check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", pack_int4(codes))
        self.register_buffer("channel_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        n_groups = 0 if group_size == -1 else in_features // group_size
        self.register_buffer("group_ratio", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def per_group(self) -> bool:
        return self.group_size != -1

    @classmethod
    def from_quantized(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                       group_size: int = -1, dtype: torch.dtype = torch.float16) -> QQQLinear:
        """Build from 4-bit codes and their scales as ``numerics`` defines them: signed codes in [-7, 7] with a
        per-channel scale [N], or codes in [0, 15] with group scales [N, K // group_size] (turned into the
        two-level per-channel scale and fp16 ratios here)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, group_size, bias is not None, dtype, device=codes.device)
        layer.qweight = pack_int4(codes)
        if group_size == -1:
            layer.channel_scale = scale.float().contiguous()
        else:
            channel_scale, ratio = numerics.two_level_scales(codes, scale)
            layer.channel_scale, layer.group_ratio = channel_scale.contiguous(), ratio.contiguous()
        if bias is not None:
            layer.bias = bias.detach().to(dtype).clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = -1) -> QQQLinear:
        """Round-to-nearest W4A8 version of ``linear`` (for tests and notebooks)."""
        weight = linear.weight.detach()
        codes, scale = numerics.quantize_weight_rtn(weight, group_size)
        return cls.from_quantized(codes, scale, linear.bias, group_size, weight.dtype)

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.qweight, self.in_features, signed=not self.per_group)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective fp32 weight the GEMM applies (after the int8 step)."""
        ratio = self.group_ratio if self.per_group else None
        return numerics.int8_weight(self.codes(), ratio).float() * self.channel_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QQQLinear expects inputs with last dim {self.in_features}, got {tuple(x.shape)}")
        ratio = self.group_ratio if self.per_group else None
        linear = triton_or_reference(x, "w4a8_gemm.w4a8_linear", self._reference)
        fits = cached_ratios_fit_int8(self, self.qweight, self.in_features, self.group_size, ratio)
        return linear(x, self.qweight, self.channel_scale, ratio, self.bias, self.group_size, ratios_fit_int8=fits)

    def _reference(self, x, qweight, channel_scale, group_ratio, bias, group_size, ratios_fit_int8=False):
        """``w4a8_linear_reference`` with this layer's int8 weight unpacked once (``cached_int8_weight``)."""
        x_codes, token_scale = numerics.quantize_per_token(x.reshape(-1, self.in_features))
        weight = cached_int8_weight(self, qweight, self.in_features, group_size, group_ratio)
        y = numerics.int8_linear_reference(x_codes, token_scale[:, 0], weight, channel_scale, bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def w4a8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, channel_scale: torch.Tensor,
                          group_ratio: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          group_size: int = -1, ratios_fit_int8: bool = False) -> torch.Tensor:
    """What ``qqq.kernels_triton.w4a8_gemm.w4a8_linear`` computes for ``x`` [..., K], from ``qqq.numerics``
    (which always clamps the per-group int8 weight: a no-op where ``ratios_fit_int8`` holds)."""
    codes = unpack_int4(qweight, x.shape[-1], signed=group_size == -1)
    y = numerics.w4a8_linear_reference(x.reshape(-1, x.shape[-1]), codes, channel_scale, group_ratio, bias)
    return y.reshape(*x.shape[:-1], -1)
