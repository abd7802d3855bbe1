"""GEMM speed of the W4A8 kernels against FP16 cuBLAS, W8A8 and W4A16 on one GPU.

Writes ``<out>/gemm_speed.csv`` (one row per shape x M x kernel), ``gemm_speed.md`` (tables) and
``gemm_speed.png`` (speedup curves), each saying how it was made; optionally checks correctness on the GPU
against ``qqq.numerics`` first (``--check``), measures the activation quantization against copy bandwidth
(``--act-quant`` -> ``gemm_speed_act_quant.csv``) and autotunes the kernels (``--tune``, ``--tune-baselines``
-> the JSON config cache and ``gemm_speed_tune_timings.csv``).

Timing: every kernel call is captured R times in a CUDA graph, each call on its own weight buffer (R chosen so
the buffers total 3x the L2), and the graph replay is timed with CUDA events; median of the replays, per call.
Activation quantization is included in the W8A8 and W4A8 times (they take fp16 input like FP16 and W4A16).

    python experiments/gemm_speed.py --check --act-quant --tune --out results
    python experiments/gemm_speed.py --plot-only --out results   # redraw gemm_speed.png from the csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qqq import numerics  # noqa: E402
from qqq.kernels_triton import autotune, baselines, config_table  # noqa: E402
from qqq.kernels_triton.activation_quant import quantize_per_token  # noqa: E402
from qqq.kernels_triton.packing import pack_int4  # noqa: E402
from qqq.kernels_triton.w4a8_gemm import w4a8_linear  # noqa: E402
from qqq.plots import plot_gemm_speedup, read_results_csv  # noqa: E402
from qqq.provenance import atomic_write, provenance  # noqa: E402

SHAPES = config_table.LLAMA_GEMM_SHAPES
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
REPORT_M = [1, 16, 64, 256, 1024, 4096]


# ------------------------------------------------------------------------------------------- correctness

CHECK_M = (1, 16, 33, 256, 1024, 4096)
CHECK_GROUP_SIZES = (-1, 32, 64, 128, 256)


def shapes_named(names: str) -> list[tuple[str, int, int]]:
    """The shapes of a comma-separated list of names, in its order (the tuner saves after each, so a run cut
    short keeps the first ones); an unknown name is an error, not a silently smaller run."""
    by_name = {shape[0]: shape for shape in SHAPES}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown or not wanted:
        raise ValueError(f"unknown shape name(s) {unknown or names!r}; known: {', '.join(by_name)}")
    return [by_name[name] for name in dict.fromkeys(wanted)]


def check_correctness(shapes, m_values=CHECK_M) -> bool:
    """The W4A8 kernels on the GPU against ``qqq.numerics`` at every shape, M and group size that divides K, with
    the configs a user gets: int32 sums exact, outputs within ``numerics.output_tolerance``, the activation
    codes and scales exact (the spec divides correctly rounded on every device, so the reference runs here)."""
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k in shapes:
        for group_size in CHECK_GROUP_SIZES:
            if group_size != -1 and k % group_size:
                continue
            codes, scale, ratio = numerics.random_quantized_weight(n, k, group_size, gen, "cuda")
            qweight, weight8 = pack_int4(codes), numerics.int8_weight(codes, ratio)
            fits = group_size != -1 and numerics.group_products_fit_int8(codes, ratio)  # as a QQQLinear runs
            bias = torch.randn(n, device="cuda", generator=gen).half()
            for m in m_values:
                x = torch.randn(m, k, device="cuda", generator=gen).half() * 3
                x[0] = 0
                out, acc = w4a8_linear(x, qweight, scale, ratio, bias, group_size, return_acc=True,
                                       ratios_fit_int8=fits)
                q_codes, q_scale = quantize_per_token(x)
                x_codes, token_scale = numerics.quantize_per_token(x)
                ref_acc = numerics.int8_matmul_exact(x_codes, weight8)
                ref = numerics.int8_linear_reference(x_codes, token_scale[:, 0], weight8, scale, bias, x.dtype)
                acc_exact = torch.equal(acc.double(), ref_acc)
                quant_exact = torch.equal(q_codes, x_codes) and torch.equal(q_scale, token_scale[:, 0])
                err = (out.float() - ref.float()).abs()
                within = bool((err <= numerics.output_tolerance(ref, ref_acc, token_scale, scale)).all())
                cfg = config_table.get_config("w4a8" if group_size == -1 else "w4a8_group", m, n, k, group_size)
                good = acc_exact and quant_exact and within and not torch.isnan(out).any()
                ok &= good
                print(f"check {name} M={m} g={group_size}: quant_exact={quant_exact} acc_exact={acc_exact} "
                      f"max_err={err.max().item():.3g} within_fp16={within} split_k={cfg['SPLIT_K']} "
                      f"dequant={cfg.get('DEQUANT', 0)} {'PASS' if good else 'FAIL'}", flush=True)
            del codes, qweight, weight8
            torch.cuda.empty_cache()
    return ok


# ------------------------------------------------------------------------------------------- timing

def copy_ceiling_gbs() -> float:
    """Device-to-device copy of 1 GiB of fp32, bytes read + written per second (GB/s): the memory ceiling of this
    run. Timed with ``triton.testing.do_bench`` (median, after 100 ms of warm-up: a copy timed right after an
    idle spell ran at about 2.7 TB/s on the H200, against about 4.3 TB/s once the clocks are up)."""
    import triton

    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    del src, dst
    return 2 * 2**28 * 4 / ms / 1e6


# bytes of weight per weight element each kernel reads (per-group also reads one fp16 ratio per 128 weights)
WEIGHT_BYTES = {"fp16": 2.0, "w8a8_triton": 1.0, "w8a8_cublas": 1.0, "w8a8": 1.0, "w4a16_triton": 0.5,
                "w4a16_tinygemm": 0.5 + 4 / 128, "w4a16": 0.5, "w4a8": 0.5, "w4a8_g128": 0.5 + 2 / 128}
BANDWIDTH_MAX_M = 16  # the tables show the weight bandwidth next to the ratio up to this M (weight-bound there)


def activation_quant_speed(meta, out_dir: Path) -> list[dict]:
    copy_gbs = copy_ceiling_gbs()
    rows = []
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    for m, k in ((1, 4096), (16, 21760), (256, 4096), (1024, 8192), (4096, 4096), (4096, 21760), (8192, 8192)):
        copies = autotune.rotation_count(m * k * 2)
        xs = [torch.randn(m, k, device="cuda").half() for _ in range(copies)]
        us = autotune.time_cuda_graph([lambda x=x: quantize_per_token(x) for x in xs], repeats=20)
        moved = m * k * 3 + m * 4
        gbs = moved / us / 1e3
        rows.append(dict(M=m, K=k, time_us=round(us, 2), GB_per_s=round(gbs, 1),
                         fraction_of_copy=round(gbs / copy_gbs, 3), copy_GB_per_s=round(copy_gbs, 1)))
        print(f"act quant M={m} K={k}: {us:.1f} us, {gbs:.0f} GB/s = {gbs / copy_gbs:.0%} of copy", flush=True)
    with atomic_write(out_dir / "gemm_speed_act_quant.csv") as f:
        f.write("".join(f"# {key}: {value}\n" for key, value in meta.items()))
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


class ShapeKernels:
    """Weights of one shape in every format, R buffers each, and one call per kernel and M."""

    def __init__(self, n: int, k: int):
        self.n, self.k = n, k
        dev = "cuda"
        r16 = autotune.rotation_count(n * k * 2)
        r8 = autotune.rotation_count(n * k)
        r4 = autotune.rotation_count(n * k // 2)
        self.w16 = [torch.randn(n, k, device=dev).half() * 0.02 for _ in range(r16)]
        self.w8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev) for _ in range(r8)]
        self.w8_t = [w.t() for w in self.w8]  # [K, N] column-major, what cuBLAS int8 wants
        self.w4 = [pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8, device=dev)) for _ in range(r4)]
        self.w4g = [pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)) for _ in range(r4)]
        self.scale = torch.rand(n, device=dev) * 1e-3
        # ratios whose products with every code fit int8, as ``numerics.two_level_scales`` makes them: the kernel
        # runs without the int8 clamp, as for a QQQLinear
        self.ratio = (torch.rand(n, k // 128, device=dev) * (127 / 8 - 8) + 8).half()
        self.tinygemm = None
        try:  # torch's int4 weight-only (tinygemm) kernel, bf16 activations, group size 128
            packed = [torch._convert_weight_to_int4pack(
                torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev), 8) for _ in range(r4)]
            scales_zeros = torch.rand(k // 128, n, 2, device=dev).to(torch.bfloat16)
            self.tinygemm = (packed, scales_zeros)
        except Exception as err:  # not available in this build
            print(f"tinygemm unavailable: {type(err).__name__}: {str(err)[:100]}")

    def calls(self, kernel: str, m: int):
        x = torch.randn(m, self.k, device="cuda").half()
        if kernel == "fp16":
            return [lambda w=w: torch.nn.functional.linear(x, w) for w in self.w16]
        if kernel == "w8a8_triton":
            return [lambda w=w: baselines.w8a8_linear(x, w, self.scale) for w in self.w8]
        if kernel == "w8a8_cublas":
            if m <= 16:
                return None
            return [lambda w=w: baselines.w8a8_linear_cublas(x, w, self.scale) for w in self.w8_t]
        if kernel == "w4a16_triton":
            return [lambda w=w: baselines.w4a16_linear(x, w, self.scale) for w in self.w4]
        if kernel == "w4a16_tinygemm":
            if self.tinygemm is None:
                return None
            packed, sz = self.tinygemm
            xb = x.to(torch.bfloat16)
            return [lambda w=w: torch._weight_int4pack_mm(xb, w, 128, sz) for w in packed]
        if kernel == "w4a8":
            return [lambda w=w: w4a8_linear(x, w, self.scale, None, None, -1) for w in self.w4]
        if kernel == "w4a8_g128":
            return [lambda w=w: w4a8_linear(x, w, self.scale, self.ratio, None, 128, ratios_fit_int8=True)
                    for w in self.w4g]
        raise ValueError(kernel)

    def free(self):
        self.w16 = self.w8 = self.w8_t = self.w4 = self.w4g = self.tinygemm = None


MEASURED = ["fp16", "w8a8_triton", "w8a8_cublas", "w4a16_triton", "w4a16_tinygemm", "w4a8", "w4a8_g128"]
BEST_OF = {"w8a8": ("w8a8_triton", "w8a8_cublas"), "w4a16": ("w4a16_triton", "w4a16_tinygemm")}


def bench(shapes, m_values, meta) -> list[dict]:
    copy_gbs = copy_ceiling_gbs()
    print(f"copy ceiling: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows = []
    for name, n, k in shapes:
        kernels = ShapeKernels(n, k)
        for m in m_values:
            times = {}
            for kernel in MEASURED:
                calls = kernels.calls(kernel, m)
                if calls is None:
                    continue
                try:
                    times[kernel] = autotune.time_cuda_graph(calls, repeats=10 if m >= 1024 else 20)
                except Exception as err:
                    print(f"{name} M={m} {kernel} failed: {type(err).__name__}: {str(err)[:160]}", flush=True)
            for best, parts in BEST_OF.items():
                got = [times[p] for p in parts if p in times]
                if got:
                    times[best] = min(got)
            for kernel, us in times.items():
                weight_gbs = n * k * WEIGHT_BYTES[kernel] / us / 1e3
                rows.append(dict(shape=name, M=m, N=n, K=k, kernel=kernel, time_us=round(us, 2),
                                 speedup_vs_fp16=round(times["fp16"] / us, 3), weight_GB_per_s=round(weight_gbs, 1),
                                 copy_GB_per_s=round(copy_gbs, 1), device=meta["device"]))
            print(f"{name} M={m}: " + " ".join(f"{kk}={times[kk]:.1f}" for kk in times), flush=True)
        kernels.free()
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------- reports

REPORT_KERNELS = ["w4a8", "w4a8_g128", "w8a8", "w4a16"]


def write_reports(rows, meta, out_dir: Path, m_values):
    header = "".join(f"# {key}: {value}\n" for key, value in meta.items())
    with atomic_write(out_dir / "gemm_speed.csv") as f:
        f.write(header)
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by = {(r["shape"], r["M"], r["kernel"]): r for r in rows}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    lines = ["# GEMM speed: speedup over FP16 cuBLAS (torch.matmul)", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["- timing: CUDA-graph replays of R calls on R rotated weight buffers (3x L2), median of the "
              "replays, per call; W4A8 and W8A8 include the per-token activation quantization",
              "- w8a8 = faster of our Triton int8 GEMM and cuBLAS torch._int_mm (M > 16 only); "
              "w4a16 = faster of our Triton W4A16 (per-channel) and torch's tinygemm int4 (bf16, g128)",
              f"- memory ceiling of this run: {rows[0]['copy_GB_per_s'] / 1e3:.2f} TB/s (1 GiB fp32 device copy, "
              f"bytes read + written); 'TB/s' rows: the weight bytes over the measured time (which includes the "
              f"activation quantization for W4A8), up to M = {BANDWIDTH_MAX_M}", ""]
    shown_m = [m for m in m_values if m in REPORT_M] or m_values
    for shape in shapes:
        lines += [f"## {shape}", "", "| kernel | " + " | ".join(f"M={m}" for m in shown_m) + " |",
                  "|---|" + "---|" * len(shown_m)]
        fp16 = [by.get((shape, m, "fp16")) for m in shown_m]
        lines.append("| fp16 time (us) | " + " | ".join(f"{r['time_us']:.1f}" if r else "-" for r in fp16) + " |")
        for kernel in REPORT_KERNELS:
            cells = []
            for m in shown_m:
                r = by.get((shape, m, kernel))
                cells.append(f"{r['speedup_vs_fp16']:.2f}x" if r else "-")
            lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
        for kernel in ("fp16", "w4a8", "w4a8_g128"):
            cells = []
            for m in shown_m:
                r = by.get((shape, m, kernel))
                cells.append(f"{r['weight_GB_per_s'] / 1e3:.2f}" if r and m <= BANDWIDTH_MAX_M else "")
            lines.append(f"| {kernel} TB/s | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## All M, speedup over FP16", ""]
    for shape in shapes:
        lines += [f"### {shape}", "", "| kernel | " + " | ".join(f"{m}" for m in m_values) + " |",
                  "|---|" + "---|" * len(m_values)]
        for kernel in ["fp16"] + REPORT_KERNELS + ["w8a8_triton", "w8a8_cublas", "w4a16_triton", "w4a16_tinygemm"]:
            cells = []
            for m in m_values:
                r = by.get((shape, m, kernel))
                cells.append("-" if r is None else (f"{r['time_us']:.0f}us" if kernel == "fp16"
                                                    else f"{r['speedup_vs_fp16']:.2f}"))
            lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
        lines.append("")
    with atomic_write(out_dir / "gemm_speed.md") as f:
        f.write("\n".join(lines))
    table = pd.DataFrame(rows)
    table.attrs["provenance"] = meta
    plot_gemm_speedup(table, out_dir / "gemm_speed.png", kernels=REPORT_KERNELS)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results")
    parser.add_argument("--check", action="store_true", help="correctness on the GPU first, every shape of --shapes")
    parser.add_argument("--act-quant", action="store_true", help="activation quantization vs copy bandwidth")
    parser.add_argument("--tune", action="store_true", help="autotune W4A8 (per-channel and g128) first")
    parser.add_argument("--tune-baselines", action="store_true", help="also autotune the Triton baselines")
    parser.add_argument("--tune-ms", default=",".join(map(str, config_table.M_BUCKETS)))
    parser.add_argument("--tune-baseline-ms", default=None, help="M buckets for --tune-baselines (default --tune-ms)")
    parser.add_argument("--tune-shapes", default="", help="comma-separated shape names (default: --shapes)")
    parser.add_argument("--tune-shipped", action="store_true",
                        help="time only the configs this chip's files hold for each problem (this and the "
                             "neighbouring M buckets; every candidate where none): a quick tune for a new GPU")
    parser.add_argument("--tune-paths", default=None,
                        help="with --tune-shipped: also every W4A8 candidate of these comma-separated launch paths "
                             "(w4a8_gemm.launch_path; default: the paths newer than some shipped files, as `qqq tune "
                             "--quick`; '' for none)")
    parser.add_argument("--config-json", default=None, help="config cache to write (default: the package's)")
    parser.add_argument("--shapes", default="all", help="comma-separated shape names, or all")
    parser.add_argument("--ms", default=",".join(map(str, M_VALUES)))
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw <out>/gemm_speed.png from the csv")
    args = parser.parse_args()
    if args.tune_paths is not None and not args.tune_shipped:
        parser.error("--tune-paths adds candidates to --tune-shipped (a full tune times every path already)")
    new_paths = () if not args.tune_shipped else config_table.QUICK_TUNE_NEW_PATHS if args.tune_paths is None \
        else tuple(filter(None, args.tune_paths.split(",")))
    try:
        autotune.check_launch_paths(new_paths)
    except ValueError as err:
        parser.error(f"--tune-paths: {err}")
    try:
        shapes = SHAPES if args.shapes == "all" else shapes_named(args.shapes)
        tune_shapes = shapes_named(args.tune_shapes) if args.tune_shapes else shapes
    except ValueError as err:
        parser.error(str(err))
    if not args.plot_only and not torch.cuda.is_available():
        sys.exit("gemm_speed.py times CUDA kernels: no GPU here")
    out_dir = Path(args.out)
    if args.plot_only:
        if not (out_dir / "gemm_speed.csv").is_file():
            parser.error(f"--plot-only: {out_dir / 'gemm_speed.csv'} not found")
        plot_gemm_speedup(read_results_csv(out_dir / "gemm_speed.csv"), out_dir / "gemm_speed.png",
                          kernels=REPORT_KERNELS)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = provenance()
    print(meta, flush=True)
    t0 = time.time()
    if args.check and not check_correctness(shapes):
        print("CORRECTNESS FAILED: no timing of wrong kernels")
        sys.exit(1)
    if args.check:
        print(f"correctness: all PASS ({len(shapes)} shapes, M in {CHECK_M}, group sizes {CHECK_GROUP_SIZES})",
              flush=True)
    if args.act_quant:
        activation_quant_speed(meta, out_dir)
    if args.tune:
        ms = [int(v) for v in args.tune_ms.split(",")]
        timings = []
        # a fused gate/up shape is timed with the SiLU*up epilogue the W4A8 and W8A8 MLPs run it with
        problems = [autotune.Shape(n, k, g, silu_mul=name.endswith("_gate_up"))
                    for name, n, k in tune_shapes for g in (-1, 128)]
        autotune.tune(problems, ms, path=args.config_json, timings=timings, shipped_only=args.tune_shipped,
                      new_paths=new_paths)
        if args.tune_baselines:
            base_ms = [int(v) for v in args.tune_baseline_ms.split(",")] if args.tune_baseline_ms else ms
            autotune.tune([shape for shape in problems if shape.group_size == -1], base_ms,
                          kernels=("w8a8", "w4a16"), path=args.config_json, timings=timings,
                          shipped_only=args.tune_shipped)
        with atomic_write(out_dir / "gemm_speed_tune_timings.csv") as f:
            f.write("".join(f"# {key}: {value}\n" for key, value in meta.items()))
            writer = csv.writer(f)
            keys = config_table.CONFIG_KEYS
            writer.writerow(["kernel", "N", "K", "group_size", "M_bucket"] + list(keys) + ["time_us"])
            for kernel, n, k, g, b, cfg, us in timings:
                writer.writerow([kernel, n, k, g, b] + [cfg.get(c, 0) for c in keys] + [round(us, 2)])
        print(f"tuning done at {time.time() - t0:.0f} s", flush=True)
    if not args.no_bench:
        m_values = [int(v) for v in args.ms.split(",")]
        rows = bench(shapes, m_values, meta)
        write_reports(rows, meta, out_dir, m_values)
        print(f"\nbench done at {time.time() - t0:.0f} s\n")
        print((out_dir / "gemm_speed.md").read_text().split("## All M")[0])


if __name__ == "__main__":
    main()
