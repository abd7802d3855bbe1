"""How a result was made: the command, device, library versions and date, for every results file."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _git(folder: Path, *args: str, stdin: str | None = None) -> str | None:
    """``git -C folder args``'s output, or None where it fails (asked quietly: no ``fatal: not a git repository``
    outside a checkout)."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                              input=stdin)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return done.stdout.strip()


def package_tree(checkout: Path) -> str | None:
    """The git tree hash of the ``qqq`` folder as it is on disk (tracked and untracked files that git does not
    ignore), computed without writing to the repository: equal to ``git rev-parse <commit>:qqq`` of the commit
    whose package this is. None where git cannot list or hash the files."""
    listed = _git(checkout, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "qqq")
    if listed is None:
        return None
    paths = sorted({p for p in listed.split("\0") if p and (checkout / p).is_file()})
    blobs = _git(checkout, "hash-object", "--stdin-paths", stdin="\n".join(paths)) if paths else ""
    if blobs is None:
        return None
    root: dict = {}
    for path, blob in zip(paths, blobs.split()):
        *folders, name = path.split("/")
        node = root
        for folder in folders:
            node = node.setdefault(folder, {})
        node[name] = ("100755" if (checkout / path).stat().st_mode & 0o100 else "100644", blob)  # as git reads it

    def tree(node: dict) -> str:
        # git orders entries by name, a folder's name read with a trailing "/"
        entries = sorted(node.items(), key=lambda item: item[0] + ("/" if isinstance(item[1], dict) else ""))
        body = b"".join(
            (b"40000 " + name.encode() + b"\0" + bytes.fromhex(tree(value)) if isinstance(value, dict)
             else value[0].encode() + b" " + name.encode() + b"\0" + bytes.fromhex(value[1]))
            for name, value in entries)
        return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()

    return tree(root.get("qqq", {}))


def source_commit() -> str:
    """The git commit of the qqq source that runs. Where the checkout differs from it, ``+ uncommitted changes``
    and the package's tree hash (:func:`package_tree`), which names the code exactly even where the checkout's
    HEAD is not the commit it came from (a copy of a branch's files over another commit's history). A copy of qqq
    inside another checkout (an exported old tree for an A/B run) is not that checkout's code: it is named by its
    folder instead."""
    folder = Path(__file__).resolve().parent.parent
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top is None:
        return "unknown (not run from a git checkout)"
    if Path(top).resolve() != folder:
        return f"unknown (qqq in {folder}, a folder inside the git checkout {top}, not the checkout itself)"
    commit = _git(folder, "rev-parse", "--short=12", "HEAD")
    package = package_tree(folder)
    if package == _git(folder, "rev-parse", "HEAD:qqq") and not _git(folder, "status", "--porcelain",
                                                                       "--untracked-files=no"):
        return commit
    return commit + " + uncommitted changes" + (f" (qqq/ tree {package[:12]})" if package else "")


def provenance() -> dict[str, str]:
    import tokenizers
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    threads = os.environ.get("OMP_NUM_THREADS")
    return {
        "command": (f"OMP_NUM_THREADS={threads} " if threads else "")
        + " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "code": source_commit(),
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@contextlib.contextmanager
def atomic_writes(*paths: Path, binary: bool = False):
    """Files (text, or bytes with ``binary``) for the new content of ``paths``, each written beside its path and
    moved into place (``os.replace``, one after the other) only once all of them are complete: a write that is
    interrupted leaves the old files, neither half a new one nor a new one beside an old one it does not match."""
    paths = [Path(path) for path in paths]
    partials = [path.with_name(path.name + ".partial") for path in paths]
    try:
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(open(partial, "wb") if binary else open(partial, "w", newline=""))
                   for partial in partials]
        for partial, path in zip(partials, paths):
            os.replace(partial, path)
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path, binary: bool = False):
    """One file of :func:`atomic_writes`: it replaces ``path`` only once it is complete."""
    with atomic_writes(path, binary=binary) as (f,):
        yield f


SCRATCH_FOLDERS_NOTE = ("The `--out` and `--merge` folders named in the commands were scratch folders of the machine "
                        "that ran them, not kept: every row they held is in this table.")


def read_provenance_header(path: Path) -> dict[str, str]:
    """The "# key: value" lines a results csv starts with (what ``provenance()`` gave the run that wrote it)."""
    meta = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        meta[key] = value
    return meta


def results_stem(out: str | Path) -> Path:
    """What a results table's ``--out`` names: the stem of its files (stem.csv, stem.md, stem.runs.json), dots and
    all (``x.v2``: x.v2.csv, where ``Path.with_suffix`` gives x.csv), or the csv itself (``x.csv``: x.csv, not
    x.csv.csv)."""
    out = Path(out)
    return out.with_suffix("") if out.suffix == ".csv" else out


def results_file(stem: Path, extension: str) -> Path:
    """One of a results table's files: ``results_file(Path("x.v2"), ".md")`` is x.v2.md."""
    return stem.with_name(stem.name + extension)


def markdown_provenance(meta: dict[str, str]) -> str:
    return "\n".join(f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in meta.items())


class ResultsTable:
    """The rows of ``out.csv`` and the runs that made them (``out.runs.json``): each run's provenance and the
    configurations it measured. With ``append``, a run adds its rows to the table already there, replacing
    the old rows of the same ``key_columns`` (e.g. model, method, group size), and the table's markdown then
    names the run behind every row. ``defaults``: columns added after older rows were written, with the value
    those rows had without saying so (e.g. ``{"kv_bits": 16}``: every row before the 8-bit KV cache).
    ``value_columns``: the columns besides the keys that the tables read here (appended to, absorbed) must have,
    e.g. the ones the script's reports read."""

    def __init__(self, out: Path, key_columns: list[str], meta: dict[str, str], append: bool = False,
                 defaults: dict | None = None, value_columns: list[str] | None = None):
        self.out, self.key_columns, self.defaults = results_stem(out), key_columns, defaults or {}
        self.columns = [*key_columns, *(value_columns or [])]
        csv, runs = results_file(self.out, ".csv"), results_file(self.out, ".runs.json")
        self.old, self.runs = self._read(csv, runs) if append and csv.exists() else (pd.DataFrame(), [])
        self.run = max((r["run"] for r in self.runs), default=-1) + 1
        self.runs.append({"run": self.run, **meta})

    def _read(self, csv: Path, runs_file: Path) -> tuple[pd.DataFrame, list[dict]]:
        """The rows of ``csv`` and the runs of ``runs_file``; a ValueError that names the file where they are
        not a table of this kind (its columns) whose every row's run is in ``runs_file``, or cut short."""
        try:
            # every row written here ends its line; pandas would read a row cut short as one with empty cells
            text = csv.read_bytes()
            if text and not text.endswith(b"\n"):
                raise ValueError("its last line ends mid-row (a copy cut short?)")
            rows = self._completed(pd.read_csv(io.BytesIO(text)))
        except (ValueError, OSError) as error:  # pandas' ParserError and EmptyDataError, a file that is not text
            raise ValueError(f"{csv} is not a results table: {error}") from None
        missing = [column for column in self.columns if column not in rows]
        if missing:
            raise ValueError(f"{csv} is not a results table of this kind: it lacks the columns {', '.join(missing)} "
                             f"(a table of this kind has {', '.join(self.columns)})")
        try:
            runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
        except ValueError as error:
            raise ValueError(f"{runs_file} is not JSON: {error}") from None
        if not isinstance(runs, list) or not all(isinstance(run, dict) and "run" in run for run in runs):
            raise ValueError(f"{runs_file} is not a list of runs, each with its \"run\" number")
        if "run" not in rows or not set(rows["run"]) <= {r["run"] for r in runs}:
            missing = "" if runs_file.exists() else " (missing)"
            raise ValueError(f"{csv} has rows without a run in {runs_file}{missing}: cannot say how they were made; "
                             "rerun them")
        return rows, runs

    def absorb(self, part: Path) -> None:
        """Take in the rows and runs of another results file (``part``.csv and ``part``.runs.json, from runs made
        in parallel with another ``--out``), as if those runs had appended here; their runs are renumbered. A
        part that is not a table of this kind is refused (ValueError naming its file) before anything is taken."""
        part = results_stem(part)
        rows, runs = self._read(results_file(part, ".csv"), results_file(part, ".runs.json"))
        renumbered = {}
        for run in runs:
            renumbered[run["run"]] = max(r["run"] for r in self.runs) + 1
            self.runs.append({**run, "run": renumbered[run["run"]]})
        self.old = self._replaced(self.old, rows.assign(run=rows["run"].map(renumbered)))

    def _completed(self, rows: pd.DataFrame) -> pd.DataFrame:
        for column, value in self.defaults.items():
            rows[column] = rows[column].fillna(value) if column in rows else value
        return rows

    def _replaced(self, old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
        if not len(old):
            return new
        if not len(new):
            return old
        replaced = set(map(tuple, new[self.key_columns].astype(str).values))
        old = old[[tuple(r) not in replaced for r in old[self.key_columns].astype(str).values]]
        return pd.concat([old, new], ignore_index=True)

    def write(self, rows: list[dict]) -> pd.DataFrame:
        """Write the table with ``rows`` (this run's rows so far) and return it."""
        table = self._replaced(self.old, pd.DataFrame(rows).assign(run=self.run))
        used = [r for r in self.runs if r["run"] in set(table["run"])]
        # one unit: the csv's rows name runs that only this runs.json holds
        with atomic_writes(results_file(self.out, ".csv"), results_file(self.out, ".runs.json")) as (csv, runs):
            table.to_csv(csv, index=False)
            runs.write(json.dumps(used, indent=1) + "\n")
        return table

    def markdown(self, table: pd.DataFrame, describe) -> str:
        """A "How it was made" block per run; ``describe(rows)`` names the configurations of a run's rows."""
        blocks = []
        for run in self.runs:
            rows = table[table["run"] == run["run"]]
            if len(rows):
                blocks += [f"### Run {run['run']}: {describe(rows)}", "",
                           markdown_provenance({k: v for k, v in run.items() if k != "run"}), ""]
        return "\n".join(blocks)


def script_results_table(out: Path, *args, **kwargs) -> ResultsTable:
    """``ResultsTable(out, ...)`` for an experiment script's ``--out``: a table already there that it cannot take in
    (not one of its kind, unparsable, cut short) stops the script in one line naming the file, as argparse's errors
    read (``ppl_table.py: error: --out: ...``), before anything is written; not a traceback."""
    try:
        return ResultsTable(out, *args, **kwargs)
    except ValueError as error:
        raise SystemExit(f"{Path(sys.argv[0]).name}: error: --out: {error}") from None
