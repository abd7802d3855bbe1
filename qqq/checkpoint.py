"""QQQ checkpoints in Hugging Face layout.

``model.safetensors`` holds every tensor: per quantized linear ``qweight`` (packed int4, see
``qqq.kernels_triton.packing``), ``channel_scale`` (fp32 [N]), ``group_ratio`` (fp16 [N, K / g], per-group
only) and ``bias``; everything else (embeddings, norms, lm_head) in the model's dtype. ``config.json`` gains
``quantization_config = {"quant_method": "qqq", "wbits": 4, "abits": 8, "group_size": g, ...}``.

``load_quantized`` also reads compressed-tensors W4A8 int checkpoints (as ``qqq export`` and llm-compressor write
them) into ``QQQLinear`` layers, see :func:`load_compressed_tensors`.
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
from qqq.numerics import INT4_ZERO_POINT, SUPPORTED_GROUP_SIZES

CHECKPOINT_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
PACKING_FORMAT = "qqq-triton-v1"
COMPRESSED_TENSORS_FORMATS = ("pack-quantized", "int-quantized")  # int4 codes packed in int32, or one per int8


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


def check_output_folder(out: str | Path, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Raise a clear error if ``out`` cannot take a checkpoint: it is a file, a folder with files in it (unless
    ``overwrite``), the folder of ``source`` (the model it is made from) or one holding it, or a place where
    nothing can be written. Returns ``out`` as an absolute path (``.`` has no name to write beside)."""
    out = Path(out).resolve()
    check_replaceable(out, source)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; a checkpoint is a folder: name a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds files: name a new folder, or pass --force to replace it")
    check_writable_beside(out)
    return out


def check_replaceable(out: Path, source: str | Path | None) -> None:
    """A finished output replaces the folder ``out`` (absolute) as a whole: refuse it where that folder is or holds
    ``source`` (what the output is made from) or the current folder."""
    if source is not None and Path(source).exists():
        source = Path(source).resolve()
        if out == source or source.is_relative_to(out):
            raise ValueError(f"{out} would replace {source}, what it is made from: name another folder")
    if Path.cwd().is_relative_to(out):
        raise ValueError(f"{out} holds the current folder; the finished output replaces its folder as a whole: "
                         "name a new folder")


def check_writable_beside(out: Path) -> None:
    """The folder is written beside ``out`` and renamed into place: its nearest existing parent must be a folder
    that takes a new folder (tried, and removed at once), so that a long run does not fail at its last step."""
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"{out}: {parent} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as error:
        raise PermissionError(f"{out}: nothing can be written in {parent} ({error.strerror or error})") from None


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None, extra: dict | None = None,
                   overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a W4A8 model (its decoder linears are ``QQQLinear``) to ``out_dir``. The files are written into a
    temporary folder beside it, moved into place only when complete; a folder already holding files is
    replaced only with ``overwrite``.

    ``dtype``: the dtype of the model it was quantized from, e.g. float16 for a model quantized in float32 on
    the CPU: the tensors outside the packed format (embeddings, norms, lm_head, biases) are cast to it first, so
    the checkpoint is not larger than its source. The packed scales keep their own dtypes."""
    out = check_output_folder(out_dir, overwrite)
    if dtype is not None:
        cast_unpacked_tensors(model, dtype)
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
        move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def cast_unpacked_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's floating-point tensors to ``dtype``, except the packed format's ``channel_scale`` (fp32)
    and ``group_ratio`` (fp16) of its ``QQQLinear`` layers."""
    packed_scales = {id(t) for m in model.modules() if isinstance(m, QQQLinear) for t in (m.channel_scale, m.group_ratio)}
    for tensor in model.state_dict(keep_vars=True).values():  # persistent tensors only (not RoPE's inv_freq)
        if tensor.is_floating_point() and id(tensor) not in packed_scales:
            tensor.data = tensor.data.to(dtype)
    model.config.dtype = dtype


def _permissions_from_umask(folder: Path) -> None:
    """mkdtemp makes its folder 0700 and safetensors its file 0600: give them what a plain write would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


def move_into_place(partial: Path, out: Path) -> None:
    """Rename the finished folder ``partial`` to ``out``; an existing ``out`` (checked empty, or one the caller
    may replace) is removed only after the new folder is in place."""
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
    if quant.get("quant_method") == "compressed-tensors":
        return load_compressed_tensors(path, dtype, device)
    if quant.get("quant_method") != "qqq":
        raise ValueError(f"{path} is not a QQQ checkpoint (quantization_config.quant_method != 'qqq')")
    if quant.get("packing", PACKING_FORMAT) != PACKING_FORMAT:
        raise ValueError(f"{path} uses packing {quant['packing']!r}; this qqq reads {PACKING_FORMAT!r}")
    model = rebuild_and_load(
        raw, path / CHECKPOINT_FILE, dtype,
        lambda linear: QQQLinear(linear.in_features, linear.out_features, quant["group_size"],
                                 linear.bias is not None, dtype))
    return model.to(device)


def _describe(args) -> str:
    """compressed-tensors ``QuantizationArgs`` in words, for error messages."""
    if args is None:
        return "none"
    strategy = f"group {args.group_size}" if args.strategy == "group" else args.strategy
    return (f"{args.type} {args.num_bits}-bit, {strategy}, {'symmetric' if args.symmetric else 'asymmetric'}, "
            f"{'dynamic' if args.dynamic else 'static'}")


def compressed_tensors_w4a8_weights(quant: dict, path: Path):
    """The weight ``QuantizationArgs`` of a compressed-tensors ``quantization_config`` that qqq can run (int4
    symmetric weights per channel or per group of a supported size, int8 symmetric dynamic per-token
    activations, packed or int8 codes) and its storage format; anything else is a ``ValueError`` naming it."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(quant)
    schemes = {s.model_dump_json(exclude={"targets"}): s for s in config.config_groups.values()}
    if len(schemes) != 1:
        raise ValueError(f"{path} has {len(schemes)} different quantization schemes; qqq imports one W4A8 scheme "
                         "for all decoder linears")
    if quant.get("transform_config") or config.kv_cache_scheme is not None:
        raise ValueError(f"{path} uses compressed-tensors transforms or a quantized KV cache, which qqq does not run")
    scheme = next(iter(schemes.values()))
    weights, inputs, storage = scheme.weights, scheme.input_activations, scheme.format or config.format
    if storage not in COMPRESSED_TENSORS_FORMATS:
        raise ValueError(f"{path} stores its weights as {storage!r}; qqq imports {COMPRESSED_TENSORS_FORMATS}")
    if (weights is None or weights.type != "int" or weights.num_bits != 4 or not weights.symmetric
            or weights.dynamic or weights.strategy not in ("channel", "group")):
        raise ValueError(f"{path} has weights {_describe(weights)}; qqq imports int 4-bit symmetric static weights "
                         "per channel or per group")
    if weights.strategy == "group" and weights.group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{path} has weight group size {weights.group_size}; the W4A8 kernels take "
                         f"{[g for g in SUPPORTED_GROUP_SIZES if g > 0]} (or per-channel)")
    if (inputs is None or inputs.type != "int" or inputs.num_bits != 8 or not inputs.symmetric
            or inputs.dynamic is not True or inputs.strategy != "token"):
        raise ValueError(f"{path} has activations {_describe(inputs)}; qqq runs int 8-bit symmetric dynamic "
                         "per-token activations (a W4A8 int checkpoint)")
    return weights, storage


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, one file or shards listed in its index."""
    from safetensors.torch import load_file

    index = path / SHARD_INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [CHECKPOINT_FILE]
    tensors = {}
    for name in files:
        tensors.update(load_file(path / name))
    return tensors


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"):
    """A compressed-tensors W4A8 int checkpoint (``qqq export`` or llm-compressor) as a model with ``QQQLinear``
    layers: the signed codes and channel scale as they are per channel; per group, the codes with QQQ's zero
    point and the group scales turned into QQQ's two-level scale (``QQQLinear.from_quantized``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    weights, storage = compressed_tensors_w4a8_weights(raw.pop("quantization_config"), path)
    group_size = -1 if weights.strategy == "channel" else weights.group_size
    tensors = _read_tensors(path)
    state = {}
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        prefix = name.removesuffix(".weight_scale")
        scale = tensors.pop(name).float()
        if storage == "pack-quantized":
            codes = unpack_from_int32(tensors.pop(f"{prefix}.weight_packed"), 4, tensors.pop(f"{prefix}.weight_shape"))
        else:
            codes = tensors.pop(f"{prefix}.weight")
        groups = 1 if group_size == -1 else codes.shape[1] // group_size
        if scale.shape != (codes.shape[0], groups):
            raise ValueError(f"{path}: {name} has shape {tuple(scale.shape)}, expected {(codes.shape[0], groups)}")
        if group_size == -1:  # signed codes per channel; per group, QQQ's unsigned codes with zero point 8
            scale = scale[:, 0]
        else:
            codes = (codes + INT4_ZERO_POINT).to(torch.uint8)
        try:
            layer = QQQLinear.from_quantized(codes, scale, group_size=group_size, dtype=dtype)
        except ValueError as error:
            raise ValueError(f"{path}: layer {prefix}: {error}") from error
        state.update({f"{prefix}.{key}": value for key, value in layer.state_dict().items()})
    state.update(tensors)
    model = rebuild_and_load(raw, state, dtype, lambda linear: QQQLinear(
        linear.in_features, linear.out_features, group_size, linear.bias is not None, dtype))
    return model.to(device)


def rebuild_and_load(raw_config: dict, tensors: Path | dict[str, torch.Tensor], dtype: torch.dtype,
                     replacement: Callable[[nn.Linear], nn.Module]):
    """Build the model of ``raw_config`` (a ``config.json`` without its quantization entry) on the meta device,
    replace every decoder linear by ``replacement(linear)``, and load ``tensors`` (a safetensors file or a state
    dict)."""
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
    if isinstance(tensors, dict):
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    else:
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
        source = "the checkpoint" if isinstance(tensors, dict) else tensors
        raise ValueError(f"{source} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
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
