"""QQQ checkpoints in Hugging Face layout.

``model.safetensors`` holds every tensor: per quantized linear ``qweight`` (packed int4, see
``qqq.kernels_triton.packing``), ``channel_scale`` (fp32 [N]), ``group_ratio`` (fp16 [N, K / g], per-group
only) and ``bias``; everything else (embeddings, norms, lm_head) in the model's dtype. ``config.json`` gains
``quantization_config = {"quant_method": "qqq", "wbits": 4, "abits": 8, "group_size": g, ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from
from torch import nn

from qqq.linear import QQQLinear
from qqq.model_families import family_of

CHECKPOINT_FILE = "model.safetensors"
PACKING_FORMAT = "qqq-triton-v1"


def quantization_config(model: nn.Module) -> dict:
    family = family_of(model)
    group_sizes = {m.group_size for layer in family.decoder_layers(model) for m in family.linears(layer).values()
                   if isinstance(m, QQQLinear)}
    if not group_sizes:
        raise ValueError("the model has no QQQLinear layers: quantize it with a W4A8 method before saving")
    if len(group_sizes) > 1:
        raise ValueError(f"mixed group sizes {sorted(group_sizes)} cannot be described by one quantization_config")
    return {"quant_method": "qqq", "wbits": 4, "abits": 8, "group_size": group_sizes.pop(),
            "packing": PACKING_FORMAT, "modules_not_converted": ["lm_head"]}


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None, extra: dict | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write a W4A8 model (its decoder linears are ``QQQLinear``) to ``out_dir``.

    ``dtype``: the dtype of the model it was quantized from, e.g. float16 for a model quantized in float32 on
    the CPU: the tensors outside the packed format (embeddings, norms, lm_head, biases) are cast to it first, so
    the checkpoint is not larger than its source. The packed scales keep their own dtypes."""
    if dtype is not None:
        cast_unpacked_tensors(model, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = {**quantization_config(model), **(extra or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_safetensors_from(model, str(out / CHECKPOINT_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def cast_unpacked_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's floating-point tensors to ``dtype``, except the packed format's ``channel_scale`` (fp32)
    and ``group_ratio`` (fp16) of its ``QQQLinear`` layers."""
    packed_scales = {id(t) for m in model.modules() if isinstance(m, QQQLinear) for t in (m.channel_scale, m.group_ratio)}
    for tensor in model.state_dict(keep_vars=True).values():  # persistent tensors only (not RoPE's inv_freq)
        if tensor.is_floating_point() and id(tensor) not in packed_scales:
            tensor.data = tensor.data.to(dtype)
    model.config.dtype = dtype


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"):
    """Rebuild the model of a QQQ checkpoint with ``QQQLinear`` layers and load its tensors."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    quant = raw.pop("quantization_config", None) or {}
    if quant.get("quant_method") != "qqq":
        raise ValueError(f"{path} is not a QQQ checkpoint (quantization_config.quant_method != 'qqq')")
    if quant.get("packing", PACKING_FORMAT) != PACKING_FORMAT:
        raise ValueError(f"{path} uses packing {quant['packing']!r}; this qqq reads {PACKING_FORMAT!r}")
    model = rebuild_and_load(
        raw, path / CHECKPOINT_FILE, dtype,
        lambda linear: QQQLinear(linear.in_features, linear.out_features, quant["group_size"],
                                 linear.bias is not None, dtype))
    return model.to(device)


def rebuild_and_load(raw_config: dict, tensors: Path, dtype: torch.dtype, replacement: Callable[[nn.Linear], nn.Module]):
    """Build the model of ``raw_config`` (a ``config.json`` without its quantization entry) on the meta device,
    replace every decoder linear by ``replacement(linear)``, and load the safetensors file ``tensors``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**raw_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    family = family_of(model)
    for layer in family.decoder_layers(model):
        for name, linear in family.linears(layer).items():
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, replacement(linear))
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied parameters separate storage
    missing, unexpected = load_safetensors_into(model, str(tensors), strict=False)
    # The file holds one name per shared tensor (tied embeddings), and no non-persistent buffers (rotary
    # inv_freq, rebuilt from the config below): neither is missing.
    state = model.state_dict(keep_vars=True)
    loaded = {id(state[k]) for k in state if k not in missing}
    missing = [k for k in missing if "rotary_emb" not in k and id(state[k]) not in loaded]
    if missing or unexpected:
        raise ValueError(f"{tensors} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _reset_rotary(model)
    return model.eval()


def _reset_rotary(model: nn.Module) -> None:
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None:
        return
    fresh = type(rotary)(config=model.config)
    for name, buffer in fresh.named_buffers():
        setattr(rotary, name, buffer)
    if hasattr(fresh, "attention_scaling"):
        rotary.attention_scaling = fresh.attention_scaling
