"""A disk cache of quantized models, so that one experiment script reuses what another one quantized.

An entry is keyed by the model (its name, or the resolved path of a local folder), the method, the group size,
the calibration (data set, windows, window length, smoothing windows, seed), every other quantization setting,
the dtype and :data:`CACHE_VERSION`; the key's hash names its folder under :func:`cache_root`
(``~/.cache/qqq/quantized``, or ``$QQQ_CACHE_DIR``). W4A8 models (``QQQLinear``) are stored as QQQ checkpoints
(``qqq.checkpoint``); the fake-quant baselines (``FakeQuantLinear``: W8A8, W4A16) as the same safetensors file of
all tensors plus a ``config.json`` whose ``qqq_fake_quant`` entry says how to rebuild their linears.
Unquantized models (fp16) are not cached. Writes go to a temporary folder renamed into place, so a reader never
sees half an entry and two writers of one key do not collide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model as save_safetensors_from
from torch import nn

from qqq.checkpoint import CHECKPOINT_FILE, PACKING_FORMAT, load_quantized, rebuild_and_load, save_quantized
from qqq.linear import FakeQuantLinear, QQQLinear
from qqq.model_families import family_of

# Bump when a change to the quantization code changes the models it makes: old entries then miss.
CACHE_VERSION = 1
KEY_FILE = "qqq_cache_key.json"


def cache_root() -> Path:
    return Path(os.environ.get("QQQ_CACHE_DIR") or Path.home() / ".cache" / "qqq" / "quantized")


def model_identity(name_or_path: str) -> str:
    """A hub id or qqq's embedded name as given; a local folder by its resolved path."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path


def cache_key(model: str, method, settings, calibration: dict, dtype: torch.dtype) -> dict:
    """Everything that decides the quantized model, and nothing else: ``method`` a ``pipeline.Method``,
    ``settings`` a ``QuantizeSettings``, ``calibration`` the calibration text and its sampling (dataset,
    nsamples, seqlen, smooth_samples, seed). Settings a method does not use are left out, so that, e.g., a
    round-to-nearest model is found whatever calibration the sweep had at hand."""
    used = dataclasses.asdict(settings)
    used["group_size"] = settings.group_size if method.weight_bits == 4 else -1
    if method.smoothing != "search":
        del used["min_thresholds"]
    if method.smoothing != "smoothquant":
        del used["smoothquant_alpha"]
    if not method.smoothing:
        del used["smoothing_samples"]
        calibration = {k: v for k, v in calibration.items() if k != "smooth_samples"}
    if method.rounding != "gptq":
        del used["gptq"]
    if not method.smoothing and method.rounding != "gptq":
        calibration = {}
    return {"model": model_identity(model), "method": method.name, "group_size": used.pop("group_size"),
            "calibration": dict(sorted(calibration.items())), "settings": used,
            "dtype": str(dtype).removeprefix("torch."), "version": f"cache-v{CACHE_VERSION}/{PACKING_FORMAT}"}


def entry_path(key: dict, root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(key["model"]).name)[-40:]
    return (root or cache_root()) / f"{slug}-{key['method']}-g{key['group_size']}-{digest}"


def _decoder_linears(model: nn.Module) -> list[nn.Module]:
    family = family_of(model)
    return [m for layer in family.decoder_layers(model) for m in family.linears(layer).values()]


def save_cached(model: nn.Module, key: dict, root: Path | None = None) -> Path:
    """Store a quantized ``model`` (on any device; it is not moved) under ``key``; returns the entry's folder."""
    target = entry_path(key, root)
    if (target / KEY_FILE).exists():
        return target
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    linears = _decoder_linears(model)
    if all(isinstance(m, QQQLinear) for m in linears):
        save_quantized(model, partial, extra={"method": key["method"]})
    elif all(isinstance(m, FakeQuantLinear) for m in linears):
        (flags,) = {m.quantize_input for m in linears}
        partial.mkdir(parents=True)
        config = model.config.to_dict()
        config["qqq_fake_quant"] = {"method": key["method"], "quantize_input": flags}
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_safetensors_from(model, str(partial / CHECKPOINT_FILE))
    else:
        raise ValueError("only models whose decoder linears are all QQQLinear or all FakeQuantLinear are cached")
    (partial / KEY_FILE).write_text(json.dumps(key, indent=2, sort_keys=True))
    try:
        partial.rename(target)
    except OSError:  # another process stored the same key first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_cached(key: dict, root: Path | None = None) -> nn.Module | None:
    """The model stored under ``key`` (on the CPU, in eval mode), or None when there is none."""
    path = entry_path(key, root)
    if not (path / KEY_FILE).exists():
        return None
    if json.loads((path / KEY_FILE).read_text()) != key:
        raise ValueError(f"{path} holds another key than its name says (a hash collision or an edited entry)")
    dtype = getattr(torch, key["dtype"])
    raw = json.loads((path / "config.json").read_text())
    if "quantization_config" in raw:
        return load_quantized(path, dtype=dtype)
    fake = raw.pop("qqq_fake_quant")

    def replacement(linear: nn.Linear) -> FakeQuantLinear:
        bias = None if linear.bias is None else torch.empty(linear.out_features, dtype=dtype)
        return FakeQuantLinear(torch.empty(linear.out_features, linear.in_features, dtype=dtype), bias,
                               fake["quantize_input"])

    return rebuild_and_load(raw, path / CHECKPOINT_FILE, dtype, replacement)
