"""End-to-end inference for Llama-family decoders, one harness for FP16, W8A8, W4A16 and W4A8 (QQQ).

``FastLlama`` is a Llama/Mistral/Qwen2 decoder rebuilt for speed:

- q/k/v are one linear and gate/up are one (``Projection``), in whichever format the method uses;
- the producers are fused (``qqq.kernels_triton.fused_producers``): residual add + RMSNorm and SiLU * up write
  per-token int8 straight into the W4A8 / W8A8 GEMMs (the same fused ops write fp16 for FP16 and W4A16), and
  RoPE writes k / v into a static KV cache;
- ``Generator`` prefills eagerly and decodes with one CUDA graph per step (greedy), so launch overhead does not
  hide the GEMMs.

On a CPU without ``TRITON_INTERPRET=1`` every op runs its plain PyTorch composition (the functions below named
``*_reference``), which is also what the kernels are tested against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qqq import numerics
from qqq.kernels_triton.packing import pack_int4, unpack_int4
from qqq.linear import QQQLinear, cached_int8_weight, triton_available_for
from qqq.model_families import family_of

METHODS = ("fp16", "w8a8", "w4a16", "w4a16_tinygemm", "qqq", "qqq_g128")
METHOD_NOTES = {
    "fp16": "the model's own dtype, cuBLAS GEMMs",
    "w8a8": "per-channel int8 weights, per-token int8 activations (Triton int8 GEMM)",
    "w4a16": "per-channel int4 weights, fp16 activations (Triton W4A16 GEMM)",
    "w4a16_tinygemm": "int4 weights in groups of 128, bf16 activations (torch's tinygemm kernel; CUDA, bf16 models)",
    "qqq": "QQQ W4A8 per-channel",
    "qqq_g128": "QQQ W4A8, groups of 128",
}
W4A8_GROUP_SIZES = {"qqq": -1, "qqq_g128": 128}
TINYGEMM_GROUP = 128
TINYGEMM_INNER_K_TILES = 8


class Int8Rows(NamedTuple):
    """Per-token int8 activations: ``codes`` int8 [M, K], ``scale`` fp32 [M]."""
    codes: torch.Tensor
    scale: torch.Tensor


# ------------------------------------------------------------------------------------------------ producers


def rmsnorm_reference(x, weight, eps, residual=None, quantize=True):
    """Plain composition of ``fused_producers.rmsnorm_quantize``: Hugging Face's Llama RMSNorm, then
    ``numerics.quantize_per_token``."""
    rows = x.reshape(-1, x.shape[-1])
    h = rows if residual is None else residual.reshape(rows.shape) + rows
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    out = _quantized(y) if quantize else y
    return out if residual is None else (out, h)


def silu_mul_reference(gate_up, quantize=True):
    """Plain composition of ``fused_producers.silu_mul_quantize``: Llama's ``SiLU(gate) * up``, then quantization."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    gate, up = rows.chunk(2, dim=-1)
    y = F.silu(gate) * up
    return _quantized(y) if quantize else y


def rope_into_cache_reference(qkv, cos, sin, positions, k_cache, v_cache, n_heads):
    """Plain composition of ``fused_producers.rope_into_cache`` (RoPE in fp32, one rounding)."""
    batch, t, _ = qkv.shape
    n_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    heads = qkv.reshape(batch, t, n_heads + 2 * n_kv_heads, head_dim).transpose(1, 2).float()
    cos_t, sin_t = cos[positions][:, None], sin[positions][:, None]  # [B, 1, T, D / 2]
    first, second = heads[:, : n_heads + n_kv_heads].chunk(2, dim=-1)
    rotated = torch.cat((first * cos_t - second * sin_t, second * cos_t + first * sin_t), dim=-1).to(qkv.dtype)
    index = positions[:, None, :, None].expand(batch, n_kv_heads, t, head_dim)
    k_cache[:batch].scatter_(2, index, rotated[:, n_heads:])
    v_cache[:batch].scatter_(2, index, heads[:, n_heads + n_kv_heads:].to(qkv.dtype))
    return rotated[:, :n_heads].contiguous()


def _quantized(y: torch.Tensor) -> Int8Rows:
    codes, scale = numerics.quantize_per_token(y)
    return Int8Rows(codes, scale[:, 0])


def _fused_ops(device_tensor: torch.Tensor):
    if triton_available_for(device_tensor):
        from qqq.kernels_triton import fused_producers as ops

        def rmsnorm(x, weight, eps, residual=None, quantize=True):
            out = ops.rmsnorm_quantize(x, weight, eps, residual, quantize)
            if not quantize:
                return out
            return Int8Rows(*out) if residual is None else (Int8Rows(*out[0]), out[1])

        def silu_mul(gate_up, quantize=True):
            out = ops.silu_mul_quantize(gate_up, quantize)
            return Int8Rows(*out) if quantize else out

        return rmsnorm, silu_mul, ops.rope_into_cache
    return rmsnorm_reference, silu_mul_reference, rope_into_cache_reference


# ---------------------------------------------------------------------------------------------- projections


class Projection(nn.Module):
    """A (fused) linear of ``FastLlama``. ``takes_int8``: its producer hands it ``Int8Rows``, else fp16 rows."""

    takes_int8 = False

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
        if triton_available_for(x):
            from qqq.kernels_triton.baselines import w4a16_linear

            return w4a16_linear(x, self.qweight, self.channel_scale, self.bias)
        weight = numerics.dequantize_per_channel(unpack_int4(self.qweight, self.in_features, True), self.channel_scale)
        return F.linear(x, weight.to(x.dtype), self.bias)


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
        if x.is_cuda:
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
        if triton_available_for(rows.codes):
            from qqq.kernels_triton.baselines import w8a8_gemm

            return w8a8_gemm(rows.codes, rows.scale, self.weight, self.channel_scale, self.bias, self.dtype)
        return numerics.int8_linear_reference(rows.codes, rows.scale, self.weight, self.channel_scale, self.bias,
                                              self.dtype)


class W4A8Projection(Projection):
    """QQQ W4A8: the buffers of one or more ``QQQLinear`` stacked along the output dimension."""

    takes_int8 = True

    def __init__(self, linears: list[QQQLinear], dtype: torch.dtype):
        group_sizes = {linear.group_size for linear in linears}
        in_features = {linear.in_features for linear in linears}
        if len(group_sizes) != 1 or len(in_features) != 1:
            raise ValueError(f"cannot fuse QQQLinear layers with group sizes {sorted(group_sizes)} and input sizes "
                             f"{sorted(in_features)}")
        bias = stacked_bias(linears, dtype, linears[0].qweight.device)
        super().__init__(in_features.pop(), sum(linear.out_features for linear in linears), bias, dtype)
        self.group_size = group_sizes.pop()
        self.register_buffer("qweight", torch.cat([linear.qweight for linear in linears]).contiguous())
        self.register_buffer("channel_scale", torch.cat([linear.channel_scale for linear in linears]).contiguous())
        self.register_buffer("group_ratio", torch.cat([linear.group_ratio for linear in linears]).contiguous())
        self.checked_on = None  # the device whose kernels last validated these buffers

    def forward(self, rows: Int8Rows) -> torch.Tensor:
        ratio = self.group_ratio if self.group_size != -1 else None
        if triton_available_for(rows.codes):
            from qqq.kernels_triton.w4a8_gemm import check_weights, w4a8_gemm

            if self.checked_on != rows.codes.device:
                check_weights(self.qweight, self.channel_scale, ratio, self.bias, self.group_size, self.in_features,
                              rows.codes.device)
                self.checked_on = rows.codes.device
            return w4a8_gemm(rows.codes, rows.scale, self.qweight, self.channel_scale, ratio, self.bias,
                             self.group_size, self.dtype, weights_checked=True)
        weight = cached_int8_weight(self, self.qweight, self.in_features, self.group_size, ratio)
        return numerics.int8_linear_reference(rows.codes, rows.scale, weight, self.channel_scale, self.bias, self.dtype)


def fused_projection(linears: list[nn.Module], method: str, dtype: torch.dtype) -> Projection:
    """One projection computing ``linears`` side by side (q/k/v, gate/up). ``QQQLinear`` layers keep their
    quantization; plain linears are converted by ``method`` (round to nearest for the quantized formats)."""
    if all(isinstance(linear, QQQLinear) for linear in linears):
        return W4A8Projection(linears, dtype)
    if not all(isinstance(linear, nn.Linear) for linear in linears):
        kinds = sorted({type(linear).__name__ for linear in linears})
        raise ValueError(f"cannot build a fast projection from {kinds}: expected nn.Linear or QQQLinear layers "
                         "(fake-quantized accuracy models have no fast path; save a W4A8 checkpoint instead)")
    weight = torch.cat([linear.weight.detach() for linear in linears])
    return projection_from_weight(weight, stacked_bias(linears, weight.dtype, weight.device), method)


def stacked_bias(linears: list[nn.Module], dtype: torch.dtype, device) -> torch.Tensor | None:
    """The biases of ``linears`` side by side (zeros for those without one), or None if none has a bias."""
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias.detach().to(dtype) if linear.bias is not None else
                      torch.zeros(linear.out_features, dtype=dtype, device=device) for linear in linears])


def projection_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, method: str) -> Projection:
    if method == "fp16":
        return DenseProjection(weight, bias)
    if method == "w8a8":
        return W8A8Projection(weight, bias)
    if method == "w4a16":
        return W4A16Projection(weight, bias)
    if method == "w4a16_tinygemm":
        return TinygemmW4A16Projection(weight, bias)
    if method in W4A8_GROUP_SIZES:
        group_size = W4A8_GROUP_SIZES[method]
        codes, scale = numerics.quantize_weight_rtn(weight, group_size)
        return W4A8Projection([QQQLinear.from_quantized(codes, scale, bias, group_size, weight.dtype)], weight.dtype)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, method: str) -> torch.Tensor:
    """What ``projection_from_weight(weight, bias, method)`` computes for ``x`` [M, K], straight from
    ``qqq.numerics`` (the independent check of every projection)."""
    if method == "fp16":
        return F.linear(x, weight, bias)
    if method in ("w4a16", "w4a16_tinygemm"):
        if method == "w4a16":
            dequantized = numerics.dequantize_per_channel(*numerics.quantize_weight_per_channel(weight))
        else:
            dequantized = numerics.dequantize_per_group(*numerics.quantize_weight_per_group(weight, TINYGEMM_GROUP))
        return F.linear(x.float(), dequantized, None if bias is None else bias.float()).to(x.dtype)
    if method == "w8a8":
        codes, scale = numerics.quantize_weight_int8_per_channel(weight)
        x_codes, token_scale = numerics.quantize_per_token(x)
        return numerics.int8_linear_reference(x_codes, token_scale[:, 0], codes, scale, bias, x.dtype)
    if method in W4A8_GROUP_SIZES:
        group_size = W4A8_GROUP_SIZES[method]
        codes, scale = numerics.quantize_weight_rtn(weight, group_size)
        ratio = None
        if group_size != -1:
            scale, ratio = numerics.two_level_scales(codes, scale)
        return numerics.w4a8_linear_reference(x, codes, scale, ratio, bias)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# ------------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float

    @classmethod
    def of(cls, config) -> Architecture:
        heads = config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads, config.vocab_size,
                   config.rms_norm_eps)


class FastDecoderLayer(nn.Module):
    def __init__(self, input_norm, post_attention_norm, qkv: Projection, o: Projection, gate_up: Projection,
                 down: Projection):
        super().__init__()
        self.register_buffer("input_norm", input_norm.detach().contiguous())
        self.register_buffer("post_attention_norm", post_attention_norm.detach().contiguous())
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down


class KVCache:
    """Static cache: ``k`` and ``v`` [layers, batch, kv_heads, capacity, head_dim]."""

    def __init__(self, arch: Architecture, batch: int, capacity: int, dtype: torch.dtype, device):
        shape = (arch.layers, batch, arch.kv_heads, capacity, arch.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity


class FastLlama(nn.Module):
    """A Llama-family decoder for inference (see the module docstring). Build it with ``from_hf`` or ``random``."""

    def __init__(self, arch: Architecture, embed: torch.Tensor, layers: list[FastDecoderLayer], final_norm,
                 lm_head: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        self.arch = arch
        self.register_buffer("embed", embed.detach())
        self.layers = nn.ModuleList(layers)
        self.register_buffer("final_norm", final_norm.detach().contiguous())
        self.register_buffer("lm_head", lm_head.detach())
        self.register_buffer("rope_cos", rope_cos.contiguous())
        self.register_buffer("rope_sin", rope_sin.contiguous())

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def max_positions(self) -> int:
        return self.rope_cos.shape[0]

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers()
                   if not name.startswith("rope_")) - (self.lm_head.numel() * self.lm_head.element_size()
                                                        if self.lm_head.data_ptr() == self.embed.data_ptr() else 0)

    @classmethod
    def from_hf(cls, model: nn.Module, method: str = "fp16", max_positions: int | None = None) -> FastLlama:
        """Rebuild a Hugging Face Llama-family model. ``QQQLinear`` layers (a QQQ checkpoint) stay W4A8; plain
        linears become ``method``."""
        family = family_of(model)
        if getattr(model.config, "hidden_act", "silu") != "silu":
            raise ValueError(f"FastLlama supports SiLU MLPs, got hidden_act={model.config.hidden_act!r}")
        arch = Architecture.of(model.config)
        dtype = model.model.embed_tokens.weight.dtype
        layers = []
        for layer in family.decoder_layers(model):
            attention, mlp = layer.self_attn, layer.mlp
            layers.append(FastDecoderLayer(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                fused_projection([attention.q_proj, attention.k_proj, attention.v_proj], method, dtype),
                fused_projection([attention.o_proj], method, dtype),
                fused_projection([mlp.gate_proj, mlp.up_proj], method, dtype),
                fused_projection([mlp.down_proj], method, dtype)))
        positions = max_positions or model.config.max_position_embeddings
        cos, sin = rope_tables(model, positions)
        inner = model.model
        return cls(arch, inner.embed_tokens.weight, layers, inner.norm.weight, model.lm_head.weight, cos, sin)

    @classmethod
    def random(cls, config, method: str, device, dtype=torch.float16, max_positions: int = 4096,
               seed: int = 0) -> FastLlama:
        """Random weights of ``config``'s shapes (for speed measurements), built layer by layer on ``device`` so
        only the converted weights stay in memory."""
        from transformers import AutoModelForCausalLM

        arch = Architecture.of(config)
        generator = torch.Generator(device=device).manual_seed(seed)

        def weight(rows, cols):
            return (torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)

        def norm():
            return torch.ones(arch.hidden, dtype=dtype, device=device)

        qkv_rows = (arch.heads + 2 * arch.kv_heads) * arch.head_dim
        layers = [FastDecoderLayer(norm(), norm(),
                                   projection_from_weight(weight(qkv_rows, arch.hidden), None, method),
                                   projection_from_weight(weight(arch.hidden, arch.heads * arch.head_dim), None, method),
                                   projection_from_weight(weight(2 * arch.intermediate, arch.hidden), None, method),
                                   projection_from_weight(weight(arch.hidden, arch.intermediate), None, method))
                  for _ in range(arch.layers)]
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
        cos, sin = rope_tables(shell, max_positions, device)
        return cls(arch, weight(arch.vocab, arch.hidden), layers, norm(), weight(arch.vocab, arch.hidden), cos, sin)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, vocab] of the last position of ``tokens`` [B, T] at ``positions`` [B, T]. A prefill
        (T > 1) starts at position 0; a decode step (T == 1) attends to the cache up to its position."""
        arch = self.arch
        batch, t = tokens.shape
        rmsnorm, silu_mul, rope = _fused_ops(self.embed)
        residual = F.embedding(tokens, self.embed).reshape(batch * t, arch.hidden)
        delta = None
        for index, layer in enumerate(self.layers):
            if delta is None:
                normed = rmsnorm(residual, layer.input_norm, arch.eps, quantize=layer.qkv.takes_int8)
            else:
                normed, residual = rmsnorm(delta, layer.input_norm, arch.eps, residual, layer.qkv.takes_int8)
            qkv = layer.qkv(normed).reshape(batch, t, -1)
            q = rope(qkv, self.rope_cos, self.rope_sin, positions, cache.k[index], cache.v[index], arch.heads)
            attended = attention(q, cache.k[index][:batch], cache.v[index][:batch], positions)
            attended = attended.transpose(1, 2).reshape(batch * t, arch.heads * arch.head_dim)
            delta = layer.o(quantize_rows(attended) if layer.o.takes_int8 else attended)
            normed, residual = rmsnorm(delta, layer.post_attention_norm, arch.eps, residual, layer.gate_up.takes_int8)
            delta = layer.down(silu_mul(layer.gate_up(normed), layer.down.takes_int8))
        last = slice(t - 1, None, t)  # the last row of each sequence
        final = rmsnorm(delta[last], self.final_norm, arch.eps, residual[last], quantize=False)[0]
        return F.linear(final, self.lm_head)


def quantize_rows(x: torch.Tensor) -> Int8Rows:
    """Per-token int8 rows of ``x`` [M, K] (Triton where available, else ``qqq.numerics``)."""
    if triton_available_for(x):
        from qqq.kernels_triton.activation_quant import quantize_per_token

        return Int8Rows(*quantize_per_token(x))
    return _quantized(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``q`` [B, H, T, D] over the cache ``k``/``v`` [B, Hkv, S, D]: a prefill from position 0
    (T > 1, SDPA) or one decode step per sequence (T == 1, keys up to its position: ``decode_attention``, or SDPA
    with a mask as its reference)."""
    t = q.shape[2]
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if t > 1:
        return F.scaled_dot_product_attention(q, k[:, :, :t], v[:, :, :t], is_causal=True, **gqa)
    if triton_available_for(q):
        from qqq.kernels_triton.decode_attention import decode_attention

        return decode_attention(q, k, v, positions[:, -1])
    visible = torch.arange(k.shape[2], device=k.device)[None, :] <= positions[:, -1:]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], **gqa)


def rope_tables(model: nn.Module, positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin fp32 [positions, head_dim / 2] from the model's own rotary embedding (any RoPE scaling it has)."""
    rotary = model.model.rotary_emb
    config = model.config
    if rotary.inv_freq.is_meta or device is not None:
        rotary = type(rotary)(config=config).to(device)
    device = rotary.inv_freq.device
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    cos, sin = rotary(probe, torch.arange(positions, device=device)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float(), sin[0, :, :half].float()


# ------------------------------------------------------------------------------------------------ generation


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, new_tokens], greedy
    ttft_s: float  # prefill of the prompt and the first token
    decode_s: float  # the remaining new_tokens - 1 steps

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens.shape[1] - 1
        return self.tokens.shape[0] * steps / self.decode_s if steps and self.decode_s > 0 else float("nan")


class Generator:
    """Greedy generation for a batch of equal-length prompts with a static KV cache; on CUDA each decode step
    is one CUDA-graph replay (its argmax, token and position updates included, nothing comes back to the host)."""

    def __init__(self, model: FastLlama, batch: int, capacity: int, use_graph: bool | None = None):
        if capacity > model.max_positions:
            raise ValueError(f"capacity {capacity} exceeds the model's {model.max_positions} positions")
        self.model, self.batch, self.capacity = model, batch, capacity
        device = model.embed.device
        self.cache = KVCache(model.arch, batch, capacity, model.dtype, device)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.history = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.graph = None

    @torch.no_grad()
    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """Run the prompts [B, T] (positions 0..T-1) and return the first generated token [B]."""
        batch, t = prompts.shape
        if batch != self.batch or t < 1 or t >= self.capacity:
            raise ValueError(f"prompts must be [{self.batch}, T] with 1 <= T < {self.capacity}, got {tuple(prompts.shape)}")
        positions = torch.arange(t, device=prompts.device).expand(batch, t)
        return self.model(prompts, positions, self.cache).argmax(-1)

    @torch.no_grad()
    def _decode_step(self) -> None:
        logits = self.model(self.token, self.position, self.cache)
        following = logits.argmax(-1)
        self.history.scatter_(1, self.step.expand(self.batch, 1), following[:, None])
        self.token.copy_(following[:, None])
        self.position.add_(1)
        self.step.add_(1)

    def _capture(self) -> None:
        saved = [t.clone() for t in (self.token, self.position, self.step)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and pick kernel configs outside the capture
                self._decode_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._decode_step()
        for target, value in zip((self.token, self.position, self.step), saved):
            target.copy_(value)

    def decode(self, first: torch.Tensor, start: int, steps: int) -> torch.Tensor:
        """``steps`` greedy steps after token ``first`` [B] at position ``start``; returns them [B, steps]."""
        if start + steps > self.capacity:
            raise ValueError(f"{start} + {steps} tokens exceed the cache capacity {self.capacity}")
        self.token.copy_(first[:, None])
        self.position.fill_(start)
        self.step.zero_()
        if self.use_graph and self.graph is None and steps:
            self._capture()  # leaves the buffers as they are here
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._decode_step()
        return self.history[:, :steps].clone()

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> GenerationResult:
        if new_tokens < 1 or prompts.shape[1] + new_tokens > self.capacity:
            raise ValueError(f"new_tokens must be >= 1 and fit the cache: {prompts.shape[1]} + {new_tokens} > "
                             f"{self.capacity}")
        if self.use_graph and self.graph is None and new_tokens > 1:
            # warm-up outside the timed region: compiles the prefill's kernels and captures the decode graph
            self.decode(self.prefill(prompts), prompts.shape[1], 1)
        start = _now(prompts)
        first = self.prefill(prompts)
        middle = _now(prompts)
        rest = self.decode(first, prompts.shape[1], new_tokens - 1)
        end = _now(prompts)
        return GenerationResult(torch.cat((first[:, None], rest), dim=1), middle - start, end - middle)


def _now(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()
