"""QQQ checkpoints in Hugging Face layout.

``model.safetensors`` holds every tensor: per quantized linear ``qweight`` (packed int4, see
``qqq.kernels_triton.packing``), ``channel_scale`` (fp32 [N]), ``group_ratio`` (fp16 [N, K / g], per-group
only) and ``bias``; everything else (embeddings, norms, lm_head) in the model's dtype. ``config.json`` gains
``quantization_config = {"quant_method": "qqq", "wbits": 4, "abits": 8, "group_size": g, ...}``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
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


def check_output_folder(out: str | Path, overwrite: bool = False) -> None:
    """Raise a clear error if ``out`` cannot take a checkpoint: it is a file, or a folder with files in it
    (unless ``overwrite``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; a checkpoint is a folder: name a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds files; name a new folder, or replace it (--force, overwrite=True)")


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None, extra: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write a W4A8 model (its decoder linears are ``QQQLinear``) to ``out_dir``. The files are written into a
    temporary folder beside it, moved into place only when complete; a folder already holding files is
    replaced only with ``overwrite``."""
    out = Path(out_dir)
    check_output_folder(out, overwrite)
    config = model.config.to_dict()
    config["quantization_config"] = {**quantization_config(model), **(extra or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_safetensors_from(model, str(partial / CHECKPOINT_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        _permissions_from_umask(partial)
        _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _permissions_from_umask(folder: Path) -> None:
    """mkdtemp makes its folder 0700 and safetensors its file 0600: give them what a plain write would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def _move_into_place(partial: Path, out: Path) -> None:
    old = None
    if out.exists():  # an empty folder, or one the caller allowed to be replaced
        old = out.with_name(f"{partial.name}.old")
        out.rename(old)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old)


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
    try:
        missing, unexpected = load_safetensors_into(model, str(tensors), strict=False)
    except (SafetensorError, FileNotFoundError) as error:
        raise ValueError(f"{tensors} cannot be read ({error}): it is missing, truncated or not a safetensors "
                         "file; write the checkpoint again") from error
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
