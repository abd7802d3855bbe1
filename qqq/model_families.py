"""Model-family adapters: where the decoder layers, norms, linears and smoothing points of a family are.

The algorithms (smoothing, GPTQ) only talk to a :class:`ModelFamily`; no other module knows attribute names
of a Hugging Face architecture.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class SmoothingPoint:
    """One place where an activation can be divided by a per-channel scale ``s`` and the consumer
    linears' input columns multiplied by it. ``producer`` is the module whose weight (a norm) or whose
    output rows (a linear) absorb ``1/s``. ``loss`` names what the threshold search compares:
    ``"attention"`` (the attention output before o_proj), ``"swiglu"`` (act(gate) * up) or ``"linear"``."""

    name: str
    producer: str
    consumers: tuple[str, ...]
    loss: str


LLAMA_SMOOTHING_POINTS = (
    SmoothingPoint("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attention"),
    SmoothingPoint("o", "self_attn.v_proj", ("self_attn.o_proj",), "linear"),
    SmoothingPoint("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "swiglu"),
    SmoothingPoint("down", "mlp.up_proj", ("mlp.down_proj",), "linear"),
)


LLAMA_NORM_CONSUMERS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


@dataclass(frozen=True)
class ModelFamily:
    """Structure of one family of decoder-only models (Llama-like: pre-norm, GQA attention with RoPE,
    SwiGLU MLP). Qwen2's q/k/v biases need no special case: biases are carried wherever weights go."""

    name: str
    model_types: tuple[str, ...]
    smoothing_points: tuple[SmoothingPoint, ...] = LLAMA_SMOOTHING_POINTS
    # for the rotation: each RMSNorm and the linears it feeds; the linears that read and write the residual stream
    norm_consumers: tuple[tuple[str, tuple[str, ...]], ...] = LLAMA_NORM_CONSUMERS
    residual_readers: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "mlp.gate_proj", "mlp.up_proj")
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    value_projection: str = "self_attn.v_proj"
    attention_projection: str = "self_attn.o_proj"  # reads the attention output, head by head

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def modules_before_layers(self, model: nn.Module) -> list[nn.Module]:
        """What runs before layer 0 (moved to the calibration device while its inputs are captured)."""
        inner = model.model
        return [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]

    def embeddings(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The decoder linears of ``layer`` by name, in the order the layer's forward calls them."""
        return {name: layer.get_submodule(name) for name in LINEAR_NAMES}

    def linear_groups(self, layer: nn.Module) -> list[dict[str, nn.Module]]:
        """The decoder linears of ``layer`` grouped by the input they read, the consumers of each smoothing point
        (q/k/v, o, gate/up, down): GPTQ needs one Hessian per group."""
        return [{name: layer.get_submodule(name) for name in point.consumers} for point in self.smoothing_points]

    def head_layout(self, model: nn.Module) -> tuple[int, int, int]:
        """(num_attention_heads, num_key_value_heads, head_dim)."""
        cfg = model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return heads, kv_heads, head_dim


FAMILIES = (
    ModelFamily("llama", ("llama", "mistral")),
    ModelFamily("qwen2", ("qwen2",)),
)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_of(model: nn.Module) -> ModelFamily:
    """The adapter for ``model``, or a clear error naming the supported architectures."""
    return family_for_type(getattr(getattr(model, "config", None), "model_type", None))


def family_for_type(model_type: str | None) -> ModelFamily:
    """The adapter for a config's ``model_type`` (checked before any weight loads), or the same error."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise NotImplementedError(
        f"model_type {model_type!r} is not supported by qqq; supported architectures: "
        f"{', '.join(supported_model_types())} (Llama 1/2/3, Mistral, SmolLM2, Qwen2)"
    )


def attention_output(attention: nn.Module, hidden: torch.Tensor, position_embeddings, q_proj, k_proj, v_proj):
    """softmax(Q K^T / sqrt(d) + causal mask) V for ``hidden`` [B, T, C] with the given q/k/v projections
    (callables), RoPE and GQA as the model does them: the loss target of the q/k/v smoothing point."""
    batch, tokens, _ = hidden.shape
    head_dim = attention.head_dim
    q = q_proj(hidden).view(batch, tokens, -1, head_dim).transpose(1, 2)
    k = k_proj(hidden).view(batch, tokens, -1, head_dim).transpose(1, 2)
    v = v_proj(hidden).view(batch, tokens, -1, head_dim).transpose(1, 2)
    apply_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    cos, sin = position_embeddings
    q, k = apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype))
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attention.scaling)
    return out.transpose(1, 2).reshape(batch, tokens, -1)
