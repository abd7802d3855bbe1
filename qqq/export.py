"""Export a QQQ checkpoint to compressed-tensors, the format vLLM and transformers load (``pack-quantized``,
the ``W4A8`` preset: int4 symmetric weights per channel or per group, int8 symmetric dynamic per-token
activations).

Per-channel checkpoints map exactly: the signed codes in [-7, 7] and the channel scale. Per-group checkpoints
carry QQQ's two-level scale: the export writes the codes minus the zero point ([-8, 7]) and the group scale
``channel_scale * ratio`` in the model dtype, so the exported layer applies ``code * channel_scale * ratio``;
QQQ's per-group GEMM first rounds ``code * ratio`` to int8, and that rounding is not part of the export.

The packing and the ``quantization_config`` are written by the ``compressed-tensors`` library itself (its
``PackedQuantizationCompressor`` and ``QuantizationConfig``); the reverse, a compressed-tensors W4A8 folder into
``QQQLinear`` layers, is ``qqq.checkpoint.load_compressed_tensors``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from qqq.checkpoint import check_output_folder, load_quantized, move_into_place
from qqq.linear import QQQLinear
from qqq.model_families import family_of
from qqq.models import source_dtype
from qqq.numerics import INT4_ZERO_POINT, safe_divisor

EXPORT_FORMATS = ("compressed-tensors",)
DEFAULT_MAX_SHARD_SIZE = "5GB"


def w4a8_scheme(group_size: int):
    """compressed-tensors' ``W4A8`` preset scheme (weights int4 symmetric, activations int8 symmetric dynamic per
    token), with QQQ's group size: per channel for ``-1``, else per group of ``group_size``."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    preset = preset_name_to_scheme("W4A8", targets=["Linear"])
    weights = preset.weights.model_dump()
    if group_size == -1:
        weights.update(strategy="channel", group_size=None)
    else:
        weights.update(group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                              input_activations=preset.input_activations,
                              format=CompressionFormat.pack_quantized.value)


def signed_codes_and_scale(layer: QQQLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's 4-bit codes as signed int8 in [-8, 7] and the scale that multiplies them in the export:
    ``channel_scale`` [N, 1] per channel, ``channel_scale * ratio`` [N, K / g] per group, in ``dtype``."""
    codes = layer.codes()
    if not layer.per_group:
        return codes, layer.channel_scale[:, None].to(dtype)
    signed = (codes.to(torch.int16) - INT4_ZERO_POINT).to(torch.int8)
    return signed, (layer.channel_scale[:, None] * layer.group_ratio.float()).to(dtype)


def compressed_linear(layer: QQQLinear, scheme, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` holding ``layer`` as compressed-tensors stores it (``weight_packed``, ``weight_scale``,
    ``weight_shape``), packed by the library's own compressor."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.utils import replace_direct_state_dict

    codes, scale = signed_codes_and_scale(layer, dtype)
    # The compressor quantizes a float weight with the given scale: code * scale / scale gives the code back
    # exactly (a 4-bit integer times the scale). A zero scale (an all-zero row or group) would give 0 / 0, a NaN
    # whose cast to int8 is undefined, so the codes are packed against 1 there and the true scale is stored.
    divisor = safe_divisor(scale)
    weight = codes.float() * divisor.float().repeat_interleave(layer.in_features // scale.shape[1], dim=1)
    state = PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": divisor}, scheme)
    state["weight_scale"] = scale
    if not torch.equal(unpack_from_int32(state["weight_packed"], 4, codes.shape), codes):
        raise RuntimeError("compressed-tensors packed different codes than the checkpoint holds")
    if layer.bias is not None:
        state["bias"] = layer.bias.to(dtype)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    replace_direct_state_dict(linear, state)
    linear.quantization_scheme = scheme
    linear.quantization_status = QuantizationStatus.COMPRESSED
    return linear


def _check_paths(checkpoint: Path, out: Path, force: bool) -> None:
    if not (checkpoint / "config.json").exists():
        raise FileNotFoundError(f"{checkpoint} has no config.json: give the folder of a QQQ checkpoint")
    quant = json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}
    method = quant.get("quant_method")
    if method != "qqq":
        found = f"its quant_method is {method!r}" if method else "its config.json has no quantization_config"
        raise ValueError(f"{checkpoint} is not a QQQ checkpoint ({found}); write one with "
                         "`qqq quantize MODEL --method qqq --out DIR` first")
    check_output_folder(out, force, checkpoint)


def export_compressed_tensors(checkpoint: str | Path, out_dir: str | Path, force: bool = False,
                              max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the QQQ checkpoint ``checkpoint`` to ``out_dir`` as a compressed-tensors W4A8 ``pack-quantized``
    model: ``config.json`` with its ``quantization_config``, the safetensors (sharded above ``max_shard_size``)
    with embeddings, norms and lm_head in the model dtype, and the tokenizer files when the checkpoint has them.

    The folder is written beside ``out_dir`` and moved into place once complete; an existing non-empty
    ``out_dir`` is refused unless ``force``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig

    checkpoint, out = Path(checkpoint), Path(out_dir).resolve()
    _check_paths(checkpoint, out, force)
    dtype = source_dtype(str(checkpoint)) or torch.float16
    model = load_quantized(checkpoint, dtype=dtype)
    family = family_of(model)
    for layer in family.decoder_layers(model):
        for name, linear in family.linears(layer).items():
            parent, _, child = name.rpartition(".")
            scheme = w4a8_scheme(linear.group_size)
            setattr(layer.get_submodule(parent) if parent else layer, child, compressed_linear(linear, scheme, dtype))
    config = QuantizationConfig.from_pretrained(model, format=CompressionFormat.pack_quantized.value)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial, max_shard_size=max_shard_size)
        ModelCompressor(quantization_config=config).update_config(str(partial))
        if (checkpoint / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(checkpoint).save_pretrained(partial)
        move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out

