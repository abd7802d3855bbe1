"""End-to-end generation speed of FP16, W8A8, W4A16 and W4A8 (QQQ's format) on the Llama-2 architectures, on one GPU.

Random weights of the real shapes (built from the config, layer by layer on the GPU), the paper's serving setup
without a server: a batch of prompts of ``--input-len`` tokens, ``--output-len`` greedy tokens each. Every method
runs the same harness (``qqq.fast``): fused q/k/v and gate/up linears, fused producers (int8 for W8A8 and
W4A8, fp16 for FP16 and W4A16), static KV cache, one CUDA graph per decode step. The lm_head and embeddings stay
fp16 in every method (as in the paper). ``--kv-bits 16 8`` measures every method with the 16-bit KV cache and with
the 8-bit one (int8, per-token and per-head scales) as rows of their own (column ``kv_bits``); speedups are over
FP16 with the 16-bit cache.

Measured per (model, method, batch), after a warm-up generation (compilation, graph capture):
- ``ttft_ms``: prefill of the batch and the first token (median over ``--repeats``);
- ``decode_tok_s``: batch x (output_len - 1) / time of the remaining steps (median over ``--repeats``);
- ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` over the run (weights + cache + activations + graph);
- ``weight_gb``: the model's weights on the GPU.

Writes ``<out>/e2e_speed.csv`` (+ ``e2e_speed.runs.json``: each run's command, device, versions, date),
``e2e_speed.md`` and ``e2e_speed.png``, and with ``--profile-batches`` the kernels of one decode step per method,
KV cache and batch in ``e2e_speed_profile.csv`` (the bytes of the linears and of the attention, so each
step's time can be traced to what it reads) and the kernels of one eager prefill of ``--input-len`` tokens at that
batch in ``e2e_speed_prefill_profile.csv`` (what the time to first token is made of); ``--append`` adds a run
(e.g. another model) to the table, ``--merge`` the runs of tables written elsewhere.

    python experiments/e2e_speed.py --models llama-2-7b --kv-bits 16 8 --profile-batches 1 16 64 --out results
    python experiments/e2e_speed.py --models llama-2-13b --append --out results
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qqq.cli import positive_int  # noqa: E402
from qqq.fast.attention import KV_BITS, decode_attention_reference  # noqa: E402
from qqq.fast.generation import Generator  # noqa: E402
from qqq.fast.model import FastLlama  # noqa: E402
from qqq.fast.producers import quantize_rows, silu_mul_reference  # noqa: E402
from qqq.fast.projections import (METHOD_NOTES, METHODS, RENAMED_METHODS, projection_from_weight,  # noqa: E402
                                  reference_linear)
from qqq.kernels_triton.gpu import sequential_launches  # noqa: E402
from qqq.provenance import (SCRATCH_FOLDERS_NOTE, ResultsTable, atomic_write, provenance,  # noqa: E402
                            read_provenance_header, results_file, results_stem, script_results_table)

KEY_COLUMNS = ["model", "method", "kv_bits", "batch"]
KV_BITS_BEFORE_THE_COLUMN = 16  # rows measured before kv_bits existed had the 16-bit cache
REPORTED_COLUMNS = ["input_len", "output_len", "status", "weight_gb", "peak_mem_gb", "ttft_ms", "ttft_vs_fp16",
                    "decode_tok_s", "decode_ms_per_step", "speedup_vs_fp16"]  # what the reports read of a row

LLAMA2 = dict(num_key_value_heads=None, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)
ARCHITECTURES = {
    "llama-2-7b": dict(LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32),
    "llama-2-13b": dict(LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40),
}


# tinygemm is the faster W4A16 GEMM only at M <= 4 (results/gemm_speed.csv: 7.7 ms at M = 16 against 4.5 ms for
# the Triton W4A16 over a Llama-2-7B step, 29 ms at M = 64, 449 ms at M = 1024), so larger batches use "w4a16"
TINYGEMM_MAX_BATCH = 4


def architecture(name: str):
    from transformers import LlamaConfig

    kwargs = dict(ARCHITECTURES[name])
    kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    return LlamaConfig(**kwargs)


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def method_dtype(method: str) -> torch.dtype:
    return torch.bfloat16 if method == "w4a16_tinygemm" else torch.float16


def check_method(method: str, n: int = 768, k: int = 1024) -> float:
    """Largest error of the method's GPU projection against ``qqq.fast.projections.reference_linear``, relative to the
    output's range (before any timing: no speed of a wrong kernel); the gate/up projection that ends in SiLU*up
    (rows [gate; up] of ``weight``) against the reference followed by the SiLU*up producer's reference."""
    dtype = method_dtype(method)
    generator = torch.Generator(device="cuda").manual_seed(1)
    weight = (torch.randn(n, k, generator=generator, device="cuda") * 0.02).to(dtype)
    bias = None
    plain = projection_from_weight(weight, bias, method)
    gate_up = projection_from_weight(weight, bias, method, silu_mul=True)
    worst = 0.0
    for m in (1, 5, 64, 300):
        x = torch.randn(m, k, generator=generator, device="cuda").to(dtype)
        rows = quantize_rows(x) if plain.takes_int8 else x
        expected = reference_linear(x, weight, bias, method)
        checks = [(plain, expected)]
        if gate_up.silu_mul:
            checks.append((gate_up, silu_mul_reference(expected, quantize=False)))
        for projection, want in checks:
            want = want.float()
            worst = max(worst, float((projection(rows).float() - want).abs().max() / want.abs().max()))
    return worst


def check_int8_kv_attention(batch: int = 3, heads: int = 32, kv_heads: int = 8, capacity: int = 1100) -> float:
    """Largest error of decode attention over an int8 cache against its reference (the same codes and scales,
    dequantized, then SDPA), relative to the output's range."""
    from qqq import numerics
    from qqq.kernels_triton.decode_attention import decode_attention

    generator = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(batch, heads, 1, 128, generator=generator, device="cuda").half()
    k, v = (torch.randn(batch, kv_heads, capacity, 128, generator=generator, device="cuda") for _ in range(2))
    (k_codes, k_scale), (v_codes, v_scale) = numerics.quantize_per_token(k), numerics.quantize_per_token(v)
    positions = torch.tensor([capacity - 1, 0, capacity // 3], device="cuda")[:batch]
    cache = (k_codes, v_codes, positions, k_scale[..., 0], v_scale[..., 0])
    expected = decode_attention_reference(q, *cache).float()
    return float((decode_attention(q, *cache).float() - expected).abs().max() / expected.abs().max())


def measure(fast: FastLlama, batch: int, input_len: int, output_len: int, repeats: int, seed: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    prompts = torch.randint(0, fast.arch.vocab, (batch, input_len), generator=generator, device="cuda")
    runner = Generator(fast, batch, input_len + output_len)
    runner.generate(prompts, 2)  # warm-up: kernel compilation and config choice, graph capture
    results = [runner.generate(prompts, output_len) for _ in range(repeats)]
    steps = output_len - 1
    decode_s = statistics.median(r.decode_s for r in results)
    del runner
    return {"ttft_ms": 1e3 * statistics.median(r.ttft_s for r in results),
            "decode_tok_s": batch * steps / decode_s, "decode_ms_per_step": 1e3 * decode_s / steps}


def profile_decode(fast: FastLlama, batch: int, context: int, steps: int = 3) -> list[tuple[str, float, float]]:
    """(kernel, calls, us) per decode step over eager decode steps at ``context`` tokens (the graph replays the
    same kernels), the slowest first. Launched plainly (``sequential_launches``), so each kernel's time is its own
    work, not a wait for the kernel before it."""
    from torch.profiler import ProfilerActivity, profile

    runner = Generator(fast, batch, context + steps + 1, use_graph=False)
    first = torch.zeros(batch, dtype=torch.long, device="cuda")
    with sequential_launches():
        runner.decode(first, context, 1)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.decode(first, context, steps)
            torch.cuda.synchronize()
    return sorted(((name, calls / steps, us / steps) for name, (calls, us) in kernel_totals(prof).items()),
                  key=lambda row: -row[2])


# the decode step's parts whose bytes are known: every linear (and the lm_head) reads its weights once, the decode
# attention reads the KV cache up to each sequence's position
ATTENTION_KERNELS = ("_decode_split_kernel", "_decode_split_slots_kernel", "_decode_merge_kernel")
LINEAR_KERNEL_MARKS = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "tinygemm", "_int_mm")


def step_part(kernel: str) -> str:
    if any(name in kernel for name in ATTENTION_KERNELS):
        return "attention"
    return "linear" if any(mark in kernel.lower() for mark in LINEAR_KERNEL_MARKS) else "other"


def step_part_bytes(fast: FastLlama, batch: int, context: int) -> dict[str, int]:
    """Bytes a decode step must read per part: the weights of every linear and the lm_head (all buffers but the
    embedding table, of which a step reads ``batch`` rows), and the KV cache of ``context`` tokens (int8 codes
    and their fp32 scales for the 8-bit cache)."""
    arch = fast.arch
    embedding = 0 if fast.lm_head.data_ptr() == fast.embed.data_ptr() else fast.embed.numel() * fast.embed.element_size()
    per_value = 1 + 4 / arch.head_dim if fast.kv_bits == 8 else fast.embed.element_size()
    kv = 2 * arch.layers * batch * arch.kv_heads * context * arch.head_dim * per_value
    return {"linear": fast.weight_bytes() - embedding, "attention": int(kv)}


def profile_rows(fast: FastLlama, model_name: str, method: str, batch: int, context: int) -> list[dict]:
    """The decode step's kernels at ``batch`` (one row each: calls and us per step), then one row per part
    (linear, attention, other) with its bytes and achieved TB/s where the bytes are known."""
    kernels = profile_decode(fast, batch, context)
    key = {"model": model_name, "method": method, "kv_bits": fast.kv_bits, "batch": batch, "context": context}
    rows = [dict(key, kernel=name, part=step_part(name), calls_per_step=calls, us_per_step=us)
            for name, calls, us in kernels]
    known = step_part_bytes(fast, batch, context)
    for part in ("linear", "attention", "other"):
        us = sum(r["us_per_step"] for r in rows if r["part"] == part)
        calls = sum(r["calls_per_step"] for r in rows if r["part"] == part)
        moved = known.get(part)
        rows.append(dict(key, kernel=f"[{part}]", part=part, calls_per_step=calls, us_per_step=us,
                         bytes_per_step=moved, tb_s=moved / us / 1e6 if moved and us else None))
    rows.append(dict(key, kernel="[step]", part="step", calls_per_step=sum(calls for _, calls, _ in kernels),
                     us_per_step=sum(us for _, _, us in kernels)))
    return rows


def kernel_totals(prof) -> dict[str, tuple[int, float]]:
    """(launches, GPU time in us) per kernel name in a torch profiler's trace."""
    totals: dict[str, tuple[int, float]] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0)
        if us:
            calls, total = totals.get(event.key, (0, 0.0))
            totals[event.key] = (calls + event.count, total + us)
    return totals


def profile_prefill(fast: FastLlama, batch: int, input_len: int) -> tuple[dict[str, tuple[int, float]], float]:
    """The ``kernel_totals`` of one eager prefill of ``input_len`` tokens per sequence, and its wall time in ms."""
    from torch.profiler import ProfilerActivity, profile

    runner = Generator(fast, batch, input_len + 1, use_graph=False)
    prompts = torch.zeros(batch, input_len, dtype=torch.long, device="cuda")
    runner.prefill(prompts)
    torch.cuda.synchronize()
    start = time.perf_counter()
    runner.prefill(prompts)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.prefill(prompts)
        torch.cuda.synchronize()
    return kernel_totals(prof), wall * 1e3


def prefill_rows(key: dict, kernels: dict[str, tuple[int, float]], wall_ms: float) -> list[dict]:
    """One row per kernel of a profiled prefill (``kernel_totals``; launches and ms, the slowest first), then the
    ``[prefill]`` row: all launches, their summed GPU time and the prefill's wall time."""
    rows = [dict(key, kernel=name, calls=calls, ms=us / 1e3)
            for name, (calls, us) in sorted(kernels.items(), key=lambda item: -item[1][1])]
    return rows + [dict(key, kernel="[prefill]", calls=sum(r["calls"] for r in rows), ms=sum(r["ms"] for r in rows),
                        wall_ms=wall_ms)]


def measured_row(fast: FastLlama, model_name: str, method: str, kv_bits: int, batch: int, weight_gb: float, args,
                 meta) -> dict:
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    row = {"model": model_name, "batch": batch, "method": method, "kv_bits": kv_bits, "input_len": args.input_len,
           "output_len": args.output_len, "weight_gb": round(weight_gb, 3)}
    try:
        row.update(measure(fast, batch, args.input_len, args.output_len, args.repeats, args.seed))
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row.update(ttft_ms=float("nan"), decode_tok_s=float("nan"), decode_ms_per_step=float("nan"),
                   status="out of memory")
    row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    row["device"] = meta["device"]
    print(f"  {kv_bits}-bit KV, batch {batch:3d}: {row['status']}, decode {row['decode_tok_s']:9.1f} tok/s "
          f"({row['decode_ms_per_step']:.2f} ms/step), TTFT {row['ttft_ms']:8.1f} ms, "
          f"peak {row['peak_mem_gb']:.1f} GB", flush=True)
    return row


def print_profile(rows: list[dict], fast: FastLlama, batch: int) -> None:
    step = next(r for r in rows if r["kernel"] == "[step]")
    print(f"  decode step kernels at batch {batch}, {fast.kv_bits}-bit KV ({step['us_per_step']:.0f} us of GPU time per "
          "step):")
    for r in rows:
        if r["kernel"].startswith("["):
            rate = f", {r['bytes_per_step'] / 1e6:.0f} MB at {r['tb_s']:.2f} TB/s" if r.get("tb_s") else ""
            print(f"    {r['kernel']:12s} {r['us_per_step']:8.1f} us, {r['calls_per_step']:.0f} launches{rate}")
    for r in [r for r in rows if not r["kernel"].startswith("[")][:8]:
        print(f"    {r['us_per_step']:8.1f} us  {r['calls_per_step']:4.0f} x  {r['kernel'][:90]}")


def print_prefill(rows: list[dict]) -> None:
    total = rows[-1]
    print(f"  prefill at batch {total['batch']}: {total['ms']:.1f} ms of GPU kernel time, {total['wall_ms']:.1f} ms "
          "wall (eager)", flush=True)
    for r in rows[:-1][:8]:
        print(f"    {r['ms']:8.2f} ms  {r['calls']:4d} x  {r['kernel'][:90]}")


def run(args, meta, save) -> None:
    """Measure every model, method, KV cache and batch of ``args``; ``save(rows, profiles, prefills)`` after each
    measurement, so a run stopped on the way keeps what it measured."""
    rows, profiles, prefills = [], [], []
    if 8 in args.kv_bits:
        error = check_int8_kv_attention()
        if error > 0.01:
            sys.exit(f"decode attention over the int8 KV cache: CHECK FAILED (error {error:.3g} of the output range)")
        print(f"decode attention over the int8 KV cache: check against the reference ok (error {error:.1e})")
    for model_name in args.models:
        config = architecture(model_name)
        for method in args.methods:
            free_memory()
            start = time.time()
            error = check_method(method)
            if error > 0.02:
                print(f"{model_name} {method}: CHECK FAILED (error {error:.3g} of the output range): not timed")
                continue
            fast = FastLlama.random(config, method, device="cuda", dtype=method_dtype(method),
                                    max_positions=args.input_len + args.output_len, seed=args.seed)
            weight_gb = fast.weight_bytes() / 1e9
            print(f"{model_name} {method}: check against the reference ok (error {error:.1e} of the output range); "
                  f"built in {time.time() - start:.1f} s, weights {weight_gb:.2f} GB", flush=True)
            for kv_bits in args.kv_bits:
                fast.kv_bits = kv_bits  # the cache each Generator makes
                for batch in args.batches:
                    if method == "w4a16_tinygemm" and batch > TINYGEMM_MAX_BATCH:
                        continue
                    rows.append(measured_row(fast, model_name, method, kv_bits, batch, weight_gb, args, meta))
                    save(rows, profiles, prefills)
                for batch in args.profile_batches:
                    free_memory()
                    profile = profile_rows(fast, model_name, method, batch, args.input_len)
                    print_profile(profile, fast, batch)
                    key = {"model": model_name, "method": method, "kv_bits": kv_bits, "batch": batch,
                           "input_len": args.input_len}
                    prefill = prefill_rows(key, *profile_prefill(fast, batch, args.input_len))
                    print_prefill(prefill)
                    profiles += profile
                    prefills += prefill
                    save(rows, profiles, prefills)
            del fast


def with_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Each row's decode speedup, TTFT and weights over FP16's with the 16-bit KV cache, same model and batch."""
    fp16 = table[(table["method"] == "fp16") & (table["kv_bits"] == 16)].set_index(["model", "batch"])
    for column, ratio in (("decode_tok_s", "speedup_vs_fp16"), ("ttft_ms", "ttft_vs_fp16"),
                          ("weight_gb", "weight_vs_fp16")):
        base = [fp16[column].get((m, b), float("nan")) for m, b in zip(table["model"], table["batch"])]
        table[ratio] = table[column] / pd.Series(base, index=table.index)
    return table


def write_reports(table: pd.DataFrame, results: ResultsTable, out: Path, merged_by: str | None = None) -> None:
    lines = ["# End-to-end generation speed (random weights of the real shapes)", "",
             "Decode speedup = decode tokens/s over FP16's (with the 16-bit KV cache) at the same model and batch "
             "(same run); TTFT = time to first token (prefill of the whole batch); KV = the KV cache's bits.", ""]
    for model_name, rows in table.groupby("model", sort=False):
        lengths = ", ".join(f"input {i} / output {o}" for i, o in
                            dict.fromkeys(zip(rows["input_len"].astype(int), rows["output_len"].astype(int))))
        lines += [f"## {model_name} ({lengths} tokens per sequence)", "",
                  "| method | KV | batch | decode tok/s | ms/step | speedup vs FP16 | TTFT ms | TTFT vs FP16 | "
                  "weights GB | peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in rows.sort_values(["batch", "method", "kv_bits"], key=_method_order).iterrows():
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r['kv_bits']} | {r['batch']} | {r['status']} | | | | | "
                             f"{r['weight_gb']:.2f} | {r['peak_mem_gb']:.1f} |")
                continue
            lines.append(f"| {r['method']} | {r['kv_bits']} | {r['batch']} | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_ms_per_step']:.2f} | {_ratio(r['speedup_vs_fp16'])} | {r['ttft_ms']:.1f} | "
                         f"{_ratio(r['ttft_vs_fp16'])} | {r['weight_gb']:.2f} | {r['peak_mem_gb']:.1f} |")
        lines.append("")
    lines += ["## Methods", ""] + [f"- {m}: {METHOD_NOTES[m]}" for m in METHODS] + [
        f"- w4a16_tinygemm runs only at batch <= {TINYGEMM_MAX_BATCH} (where it is the faster W4A16 GEMM)",
        "- every method: fused q/k/v and gate/up linears, fused add+RMSNorm producers, RoPE written "
        "into a static KV cache, SDPA prefill attention, split-KV decode attention, one CUDA graph per decode step, "
        "fp16 (bf16 for tinygemm) embeddings and lm_head",
        "- SiLU*up: in the gate/up GEMM's epilogue for w8a8 and the w4a8 methods (gate and up rows interleaved; then "
        "the per-token quantization for down; since commit 4ac3b04), a fused SiLU*up producer for the others",
        "- KV 16: the cache in the model's dtype; KV 8: int8 codes with an fp32 scale per token and head, written by "
        "the RoPE producer and read by the decode attention kernel (checked against its reference before timing)",
        "- names measured before the rename (qqq, qqq_g128) are the same round-to-nearest W4A8 formats as w4a8_rtn, "
        "w4a8_rtn_g128",
        "- random weights (normal, std 0.02), round-to-nearest quantized: speed does not depend on the values; "
        "each method's projection (and its gate/up projection ending in SiLU*up) is checked against "
        "qqq.fast.projections.reference_linear on the GPU before timing",
        "- timing: a warm-up generation (compilation, graph capture), then the median of the repeats; peak GB = "
        "torch.cuda.max_memory_allocated over the measurement (weights + KV cache + activations + graph pool)", "",
        "## How it was made", ""] + (
        [f"Runs merged into this table by `{merged_by}`. {SCRATCH_FOLDERS_NOTE}", ""] if merged_by else []) + [
        results.markdown(table, lambda rows: ", ".join(dict.fromkeys(rows["model"]))), ""]
    with atomic_write(out / "e2e_speed.md") as f:
        f.write("\n".join(lines))
    from qqq.plots import plot_e2e_speedup

    plot_e2e_speedup(table, out / "e2e_speed.png")


def write_profiles(profiles: pd.DataFrame, path: Path, meta: dict, earlier: str | None) -> None:
    """The per-step profiles under a "# key: value" provenance header; ``earlier``: the file's text before this run
    (with --append), whose profiles of other (model, method, KV, batch) stay, each under the header of the run that
    measured it."""
    key = ["model", "method", "kv_bits", "batch"]
    header = "".join(f"# {name}: {value}\n" for name, value in meta.items())
    profiles = profiles.assign(measured=meta["date"])
    if earlier is not None:
        kept = pd.read_csv(io.StringIO(earlier), comment="#")
        measured = set(map(tuple, profiles[key].astype(str).values))
        kept = kept[[tuple(r) not in measured for r in kept[key].astype(str).values]]
        previous = [line for line in earlier.splitlines(True) if line.startswith("# ")]
        header = "".join(previous) + "# appended:\n" + header
        profiles = pd.concat([kept, profiles], ignore_index=True)
    with atomic_write(path) as f:
        f.write(header + profiles.to_csv(index=False, float_format="%.4g"))


def results_part(path: Path, folder: Path) -> Path:
    """``path`` (an e2e_speed.csv of another ``--out``) as a part that ``ResultsTable.absorb`` takes in: as it is
    when its runs.json lies beside it, else read from its "# key: value" provenance header lines (the format
    this script wrote before it kept runs.json)."""
    stem = results_stem(path)
    if results_file(stem, ".runs.json").exists():
        return stem
    meta = read_provenance_header(path)
    if "command" not in meta or "device" not in meta:
        raise ValueError(f"{path} does not start with its provenance (# command: ..., # device: ...)")
    part = folder / f"{path.parent.name}_{stem.name}"
    try:
        rows = pd.read_csv(path, comment="#")
    except ValueError as error:  # pandas' ParserError and EmptyDataError
        raise ValueError(f"{path} is not a results table: {error}") from None
    rows.assign(run=0).to_csv(results_file(part, ".csv"), index=False)
    results_file(part, ".runs.json").write_text(json.dumps([{"run": 0, **meta}]))
    return part


def output_length(text: str) -> int:
    """--output-len: the first token and at least one decode step, the time the decode speed is taken from."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (the first token, then the decode steps timed), "
                                         f"got {value}")
    return value


def _method_order(column: pd.Series) -> pd.Series:
    if column.name == "kv_bits":
        return -column  # 16 before 8
    if column.name != "method":
        return column
    order = {m: i for i, m in enumerate(METHODS)}
    return column.map(lambda m: order.get(RENAMED_METHODS.get(m, m), len(order)))


def _ratio(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.2f}x"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results")
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--input-len", type=positive_int, default=1024)
    parser.add_argument("--output-len", type=output_length, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile-batches", nargs="*", type=int, default=[],
                        help="profile one decode step and one prefill of every method at these batches: printed, "
                             "and written to <out>/e2e_speed_profile.csv (kernel, calls, us; bytes and TB/s of the "
                             "linears and the attention) and <out>/e2e_speed_prefill_profile.csv (kernel, calls, ms)")
    parser.add_argument("--kv-bits", nargs="+", type=int, default=[16], choices=KV_BITS,
                        help="measure each method with these KV caches: 16 (the model's dtype) and/or 8 (int8)")
    parser.add_argument("--append", action="store_true",
                        help="add this run's rows to <out>/e2e_speed.csv (rows of the same model/method/KV/batch are "
                             "replaced; e2e_speed.runs.json keeps each run's provenance)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], metavar="CSV",
                        help="no measurement: add the runs of e2e_speed.csv files written elsewhere (another --out)")
    args = parser.parse_args()
    for path in args.merge:
        if not path.is_file():
            parser.error(f"--merge: {path} not found")
    if not args.merge and not torch.cuda.is_available():
        sys.exit("e2e_speed.py measures GPU speed: no GPU here")
    out = Path(args.out)
    meta = provenance()
    results = script_results_table(out / "e2e_speed", KEY_COLUMNS, meta, append=args.append or bool(args.merge),
                                   defaults={"kv_bits": KV_BITS_BEFORE_THE_COLUMN}, value_columns=REPORTED_COLUMNS)
    if args.merge:
        with tempfile.TemporaryDirectory() as folder:
            for path in args.merge:
                try:
                    results.absorb(results_part(path, Path(folder)))
                except ValueError as error:
                    parser.error(f"--merge: {error}")
        out.mkdir(parents=True, exist_ok=True)
        write_reports(results.write([]), results, out, merged_by=meta["command"])
        return
    out.mkdir(parents=True, exist_ok=True)
    print(meta, flush=True)
    profile_paths = [out / "e2e_speed_profile.csv", out / "e2e_speed_prefill_profile.csv"]
    earlier = [path.read_text() if args.append and path.exists() else None for path in profile_paths]

    def save(rows: list[dict], *profile_parts: list[dict]) -> None:
        if rows:
            write_reports(results.write(with_ratios(pd.DataFrame(rows)).to_dict("records")), results, out)
        for part, path, before in zip(profile_parts, profile_paths, earlier):
            if part:
                write_profiles(pd.DataFrame(part), path, meta, before)

    run(args, meta, save)
    print((out / "e2e_speed.md").read_text().split("## Methods")[0])


if __name__ == "__main__":
    main()
