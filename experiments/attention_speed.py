"""Decode attention speed against the copy bandwidth of the same run (16-bit and int8 KV caches).

For each KV cache format, batch, context and head layout, one decode step's attention (split kernel + merge) over
a cache filled to ``context`` keys is timed, and the bytes it must read (K and V up to the context, plus the int8
cache's scales) give the achieved TB/s, next to a device-to-device copy timed in the same run. ``--sweep`` times
every candidate launch (``CANDIDATES``: both split kernels, key block, warps, pipeline stages, programs per SM);
without it, the launcher's default and the best candidate of the sweep file if one is given.

Correctness first: every candidate is compared with ``qqq.fast.attention.decode_attention_reference`` on the GPU
(16-bit and int8 caches, GQA and not) before any timing; a mismatch stops the run.

Timing: the call is captured R times in a CUDA graph, each on its own cache (R chosen so the caches total 3x the
L2, so the keys are read from memory), replayed, median per call (``autotune.time_cuda_graph``).

    python experiments/attention_speed.py --sweep --out results
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qqq import numerics  # noqa: E402
from qqq.fast.attention import decode_attention_reference  # noqa: E402
from qqq.kernels_triton import autotune, decode_attention  # noqa: E402
from qqq.provenance import atomic_write, markdown_provenance, provenance, read_provenance_header  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_speed import copy_ceiling_gbs  # noqa: E402

HEAD_DIM = 128
LAYOUTS = {"llama-2-7b": (32, 32), "llama-3-8b": (32, 8)}  # (query heads, kv heads)
CANDIDATES = [{"BLOCK_N": n, "num_warps": w, "num_stages": s, "programs_per_sm": p}
              for n, w, s, p in itertools.product((32, 64, 128), (4, 8), (2, 3), (4, 8, 16, 32))]
# the int8 cache: longer key blocks, deeper pipelines, the codes' conversion in PTX or as a plain cast
CANDIDATES_INT8 = [{"BLOCK_N": n, "num_warps": w, "num_stages": s, "programs_per_sm": p, "int8_ptx": x}
                   for n, w, s, p, x in itertools.product((64, 128, 256), (4, 8), (2, 3, 4), (2, 4, 8), (True, False))]
# the CUDA-core kernel (one query head per program, a softmax per key slot), against both tensor-core defaults;
# int8_scores (int8 cache only): the query's int8 codes per head, the scores as dp4a sums
CANDIDATES_SLOTS = [{"BLOCK_N": n, "num_warps": w, "num_stages": s, "programs_per_sm": p, "int8_ptx": True, "slots": True,
                     "int8_scores": i}
                    for n, w, s, p, i in itertools.product((16, 32, 64), (4, 8), (2, 3, 4), (2, 4, 8), (False, True))]


def applies(config: dict, kv_bits: int) -> bool:
    """Whether a candidate launch can read this cache (int8_scores needs the int8 one)."""
    return kv_bits == 8 or not config.get("int8_scores", False)


def random_cache(batch: int, kv_heads: int, capacity: int, kv_bits: int, generator) -> tuple:
    """(k, v, k_scale, v_scale) on the GPU: fp16 values, or int8 codes quantized per token and head."""
    k, v = (torch.randn(batch, kv_heads, capacity, HEAD_DIM, device="cuda", generator=generator, dtype=torch.float16)
            for _ in range(2))
    if kv_bits == 16:
        return k, v, None, None
    (k_codes, k_scale), (v_codes, v_scale) = numerics.quantize_per_token(k), numerics.quantize_per_token(v)
    return k_codes, v_codes, k_scale[..., 0].contiguous(), v_scale[..., 0].contiguous()


def check_candidates(configs) -> None:
    """Every config against the reference, 16-bit and int8 caches, GQA and not, odd contexts; exits on a miss."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    failures = []
    for (heads, kv_heads), kv_bits in itertools.product(((32, 32), (28, 4)), (16, 8)):
        batch, capacity = 3, 777
        q = torch.randn(batch, heads, 1, HEAD_DIM, device="cuda", generator=generator, dtype=torch.float16)
        k, v, k_scale, v_scale = random_cache(batch, kv_heads, capacity, kv_bits, generator)
        positions = torch.tensor([capacity - 1, 0, 400], device="cuda")
        want = decode_attention_reference(q, k, v, positions, k_scale, v_scale).float()
        for config in (c for c in configs if applies(c, kv_bits)):
            try:
                got = decode_attention.decode_attention(q, k, v, positions, k_scale, v_scale, config=config).float()
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory: time_problem skips it too
            error = (got - want).abs().max().item()
            if not torch.allclose(got, want, rtol=2e-3, atol=2e-3):
                failures.append((heads, kv_heads, kv_bits, config, error))
    if failures:
        for failure in failures:
            print("MISMATCH", failure)
        sys.exit("CORRECTNESS FAILED: no timing of wrong kernels")
    print(f"correctness: {len(configs)} configs x 4 cases PASS", flush=True)


def default_launch(layout: str, kv_bits: int, batch: int, context: int) -> dict:
    """The launch ``decode_attention`` takes without a config, for a cache of ``context`` keys (its capacity)."""
    heads, kv_heads = LAYOUTS[layout]
    return decode_attention.default_config(kv_bits == 8, heads // kv_heads, batch * context)


def same_launch(row, config: dict) -> bool:
    """Whether a table row was timed with ``config`` (a missing kernel switch means off)."""
    switches = ("slots", "int8_scores")
    return all(row.get(key) == value for key, value in config.items() if key not in switches) \
        and all((row.get(key) is True) == bool(config.get(key)) for key in switches)


def cache_bytes(batch: int, kv_heads: int, context: int, kv_bits: int) -> int:
    per_key = HEAD_DIM * (2 if kv_bits == 16 else 1) + (0 if kv_bits == 16 else 4)
    return 2 * batch * kv_heads * context * per_key


def time_problem(layout: str, kv_bits: int, batch: int, context: int, configs, copy_gbs: float, meta) -> list[dict]:
    heads, kv_heads = LAYOUTS[layout]
    generator = torch.Generator(device="cuda").manual_seed(1)
    needed = cache_bytes(batch, kv_heads, context, kv_bits)
    caches = [random_cache(batch, kv_heads, context, kv_bits, generator)
              for _ in range(autotune.rotation_count(needed))]
    q = torch.randn(batch, heads, 1, HEAD_DIM, device="cuda", generator=generator, dtype=torch.float16)
    positions = torch.full((batch,), context - 1, device="cuda")
    rows = []
    for config in (c for c in configs if applies(c, kv_bits)):
        try:
            decode_attention.decode_attention(q, *caches[0][:2], positions, *caches[0][2:], config=config)
        except triton.runtime.errors.OutOfResources:
            continue
        calls = [lambda cache=cache: decode_attention.decode_attention(q, cache[0], cache[1], positions, cache[2],
                                                                       cache[3], config=config)
                 for cache in caches]
        us = autotune.time_cuda_graph(calls)
        rows.append({"layout": layout, "heads": heads, "kv_heads": kv_heads, "kv_bits": kv_bits, "batch": batch,
                     "context": context, **config, "us": round(us, 2), "bytes": needed,
                     "tb_s": round(needed / us / 1e6, 3), "copy_tb_s": round(copy_gbs / 1e3, 3),
                     "of_copy": round(needed / us / 1e3 / copy_gbs, 3), "date": meta["date"]})
    del caches
    torch.cuda.empty_cache()
    return rows


# DOT: only in the first sweep's file (False: the CUDA-core split kernel, removed after it)
CONFIG_KEYS = ("DOT", "slots", "int8_scores", "BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "int8_ptx")


def summary(table: pd.DataFrame, with_best: bool) -> pd.DataFrame:
    """Per problem: the default launch's time and share of the copy bandwidth; with ``with_best`` (a sweep) also
    the best candidate and its config."""
    keys = ["layout", "kv_bits", "batch", "context"]
    out = []
    for problem, group in table.groupby(keys, sort=False):
        default = group[group["is_default"]]
        row = {**dict(zip(keys, problem)), "default_us": default["us"].min() if len(default) else float("nan"),
               "default_tb_s": default["tb_s"].max() if len(default) else float("nan"),
               "default_of_copy": default["of_copy"].max() if len(default) else float("nan")}
        if with_best:
            best = group.loc[group["us"].idxmin()]
            row.update(best_us=best["us"], best_of_copy=best["of_copy"],
                       best=" ".join(f"{k}={best[k]}" for k in CONFIG_KEYS if k in best and not pd.isna(best[k])))
        out.append(row)
    return pd.DataFrame(out)


def write_markdown(table: pd.DataFrame, meta: dict, path: Path, with_best: bool) -> pd.DataFrame:
    best = summary(table, with_best)
    lines = ["# Decode attention against the copy bandwidth (same run)", "",
             f"Copy (device-to-device, bytes read + written per second): {table['copy_tb_s'].iloc[0]:.2f} TB/s. One "
             "decode step's attention (split + merge kernels) over a cache filled to `context` keys, each call on its "
             "own cache (rotated, 3x the L2, so read from memory); tb_s = bytes of K and V (and the int8 cache's "
             "scales) up to the context / time; of_copy = tb_s / copy (a pure read can pass a copy's rate). "
             "Layouts: llama-2-7b 32 query / 32 kv heads, llama-3-8b 32 / 8 (GQA); head dim 128.", "",
             "| " + " | ".join(best.columns) + " |", "|" + "---|" * len(best.columns)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in best.itertuples(index=False)]
    lines += ["", "## How it was made", "", markdown_provenance(meta), ""]
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--kv-bits", type=int, nargs="+", default=[16, 8], choices=[16, 8])
    parser.add_argument("--sweep", action="store_true", help="time every candidate launch, not only the default")
    parser.add_argument("--sweep-int8", action="store_true", help="time the int8 cache's candidates (CANDIDATES_INT8)")
    parser.add_argument("--sweep-slots", action="store_true",
                        help="time the CUDA-core kernel's candidates (CANDIDATES_SLOTS) and the tensor-core defaults")
    parser.add_argument("--markdown-only", type=Path, metavar="CSV",
                        help="time nothing: write the markdown of an attention_speed.csv next to it")
    args = parser.parse_args()
    if args.markdown_only and not args.markdown_only.is_file():
        parser.error(f"--markdown-only: {args.markdown_only} not found")
    if args.markdown_only:
        table, meta = pd.read_csv(args.markdown_only, comment="#"), read_provenance_header(args.markdown_only)
        per_problem = table.groupby(["layout", "kv_bits", "batch", "context"]).size().max()
        write_markdown(table, meta, args.markdown_only.with_suffix(".md"), with_best=per_problem > 2)
        return
    if not torch.cuda.is_available():
        sys.exit("attention_speed.py times CUDA kernels: no GPU here")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = provenance()
    print(meta, flush=True)
    start = time.time()
    problems = list(itertools.product(args.layouts, args.kv_bits, args.batches, args.contexts))
    defaults = {problem: default_launch(*problem) for problem in problems}
    distinct_defaults = [dict(c) for c in {tuple(sorted(c.items())) for c in defaults.values()}]
    sweep = (CANDIDATES_INT8 if args.sweep_int8 else CANDIDATES if args.sweep else
             CANDIDATES_SLOTS + distinct_defaults if args.sweep_slots else None)
    check_candidates(sweep or distinct_defaults)
    copy_gbs = copy_ceiling_gbs()
    print(f"copy: {copy_gbs / 1e3:.2f} TB/s", flush=True)
    rows = []
    for layout, kv_bits, batch, context in problems:
        default = defaults[layout, kv_bits, batch, context]
        problem = time_problem(layout, kv_bits, batch, context, sweep or [default], copy_gbs, meta)
        for row in problem:
            row["is_default"] = same_launch(row, default)
        rows += problem
        print(f"{layout} kv{kv_bits} batch {batch} context {context}: best {min(r['us'] for r in problem):.1f} us "
              f"({time.time() - start:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    with atomic_write(out_dir / "attention_speed.csv") as f:
        f.write("".join(f"# {key}: {value}\n" for key, value in meta.items()))
        table.to_csv(f, index=False)
    best = write_markdown(table, meta, out_dir / "attention_speed.md", with_best=sweep is not None)
    print(best.to_string(index=False))


if __name__ == "__main__":
    main()
