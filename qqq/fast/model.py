"""``FastLlama``: a Llama/Mistral/Qwen2 decoder rebuilt for inference, one graph for every format.

q/k/v and gate/up are one projection each (``qqq.fast.projections``); the producers (``qqq.fast.producers``) hand
each projection int8 or fp16 rows as it takes them; RoPE writes k / v into a static KV cache
(``qqq.fast.attention``, 16-bit or int8); decode attention is a split-KV kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qqq.fast.attention import KV_BITS, KVCache, attention
from qqq.fast.producers import quantize_rows, rmsnorm, rope_into_cache, silu_mul
from qqq.fast.projections import Projection, fast_method, fused_projection, projection_from_weight
from qqq.model_families import family_of


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


class FastLlama(nn.Module):
    """A Llama-family decoder for inference (see the module docstring). Build it with ``from_hf`` or ``random``.
    ``kv_bits``: the KV cache that :meth:`new_cache` makes, 16 (the model's dtype) or 8 (int8, per-token and
    per-head scales)."""

    def __init__(self, arch: Architecture, embed: torch.Tensor, layers: list[FastDecoderLayer], final_norm,
                 lm_head: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, kv_bits: int = 16):
        super().__init__()
        if kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {kv_bits}")
        self.arch, self.kv_bits = arch, kv_bits
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

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.arch, batch, capacity, self.dtype, self.embed.device, self.kv_bits)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers()
                   if not name.startswith("rope_")) - (self.lm_head.numel() * self.lm_head.element_size()
                                                        if self.lm_head.data_ptr() == self.embed.data_ptr() else 0)

    @classmethod
    def from_hf(cls, model: nn.Module, method: str = "fp16", max_positions: int | None = None,
                kv_bits: int = 16) -> FastLlama:
        """Rebuild a Hugging Face Llama-family model. ``QQQLinear`` layers (a QQQ checkpoint) keep their own W4A8
        weights; plain linears become ``method`` (see ``qqq.fast.projections.METHODS``)."""
        method = fast_method(method)
        family = family_of(model)
        if getattr(model.config, "hidden_act", "silu") != "silu":
            raise ValueError(f"FastLlama supports SiLU MLPs, got hidden_act={model.config.hidden_act!r}")
        arch = Architecture.of(model.config)
        dtype = model.model.embed_tokens.weight.dtype
        layers = []
        for layer in family.decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(FastDecoderLayer(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                fused_projection([attn.q_proj, attn.k_proj, attn.v_proj], method, dtype),
                fused_projection([attn.o_proj], method, dtype),
                fused_projection([mlp.gate_proj, mlp.up_proj], method, dtype, silu_mul=True),
                fused_projection([mlp.down_proj], method, dtype)))
        positions = max_positions or model.config.max_position_embeddings
        cos, sin = rope_tables(model, positions)
        inner = model.model
        return cls(arch, inner.embed_tokens.weight, layers, inner.norm.weight, model.lm_head.weight, cos, sin,
                   kv_bits)

    @classmethod
    def random(cls, config, method: str, device, dtype=torch.float16, max_positions: int = 4096,
               seed: int = 0, kv_bits: int = 16) -> FastLlama:
        """Random weights of ``config``'s shapes (for speed measurements), built layer by layer on ``device`` so
        only the converted weights stay in memory."""
        from transformers import AutoModelForCausalLM

        method = fast_method(method)
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
                                   projection_from_weight(weight(2 * arch.intermediate, arch.hidden), None, method,
                                                          silu_mul=True),
                                   projection_from_weight(weight(arch.hidden, arch.intermediate), None, method))
                  for _ in range(arch.layers)]
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
        cos, sin = rope_tables(shell, max_positions, device)
        return cls(arch, weight(arch.vocab, arch.hidden), layers, norm(), weight(arch.vocab, arch.hidden), cos, sin,
                   kv_bits)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] of the last position of ``tokens`` [B, T] at ``positions`` [B, T]. A prefill
        (T > 1) starts at position 0; a decode step (T == 1) attends to the cache up to its position.
        ``last`` (a 0-d long tensor): the index of the last real token of a prefill padded at its end (causal, so
        the padding changes neither those logits nor the cache below it)."""
        arch = self.arch
        batch, t = tokens.shape
        residual = F.embedding(tokens, self.embed).reshape(batch * t, arch.hidden)
        delta = None
        for index, layer in enumerate(self.layers):
            if delta is None:
                normed = rmsnorm(residual, layer.input_norm, arch.eps, quantize=layer.qkv.takes_int8)
            else:
                normed, residual = rmsnorm(delta, layer.input_norm, arch.eps, residual, layer.qkv.takes_int8)
            qkv = layer.qkv(normed).reshape(batch, t, -1)
            kv = cache.layer(index)
            q = rope_into_cache(qkv, self.rope_cos, self.rope_sin, positions, kv.k, kv.v, arch.heads, kv.k_scale,
                                kv.v_scale)
            attended = attention(q, kv, positions)
            attended = attended.transpose(1, 2).reshape(batch * t, arch.heads * arch.head_dim)
            delta = layer.o(quantize_rows(attended) if layer.o.takes_int8 else attended)
            normed, residual = rmsnorm(delta, layer.post_attention_norm, arch.eps, residual, layer.gate_up.takes_int8)
            hidden = layer.gate_up(normed)
            if layer.gate_up.silu_mul:  # the GEMM's epilogue did SiLU(gate) * up
                delta = layer.down(quantize_rows(hidden) if layer.down.takes_int8 else hidden)
            else:
                delta = layer.down(silu_mul(hidden, layer.down.takes_int8))
        if last is None:
            rows = slice(t - 1, None, t)  # the last row of each sequence
        else:
            rows = torch.arange(batch, device=tokens.device) * t + last
        final = rmsnorm(delta[rows], self.final_norm, arch.eps, residual[rows], quantize=False)[0]
        return F.linear(final, self.lm_head)


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
