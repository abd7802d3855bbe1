"""Hardware-counter profiles (Nsight Compute) of the decode kernels whose speed targets are missed.

Each case builds one problem, runs it once (compile, warm-up) and once more inside an NVTX range ``prof``; ncu
profiles only the kernels of that range, twice: the sections (speed of light, memory, scheduler, warp state,
occupancy, launch) and the stall breakdown (average warps stalled per issued instruction, by reason). The
summary table gives per kernel its time, DRAM bytes and throughput, occupancy, issue rate and the three largest
stall reasons: whether a kernel waits on memory (``long_scoreboard``), on its own instruction issue, or on too few
warps. Clocks are left alone (``--clock-control none``). Needs a GPU and ``ncu`` (Firecracker machines).

    python experiments/ncu_profile.py --out $OUT            # profile every case, then write the summary
    python experiments/ncu_profile.py --parse DIR --out DIR # the summary of the text reports already in DIR
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qqq.provenance import atomic_writes, markdown_provenance, provenance  # noqa: E402

STALL_REASONS = ("long_scoreboard", "barrier", "mio_throttle", "lg_throttle", "wait", "math_pipe_throttle",
                 "not_selected", "short_scoreboard", "no_instruction", "dispatch_stall", "membar",
                 "branch_resolving", "drain", "imc_miss", "tex_throttle", "sleeping")
NSIGHT_COMPUTE_FOLDER = Path("/opt/nvidia/nsight-compute")  # where ncu is when it is not on the PATH
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "WarpStateStats", "Occupancy", "LaunchStats", "SchedulerStats")
CASES = {  # name: (description, problem kind, its arguments)
    "gemv_paper_pc": ("streaming W4A8, paper shape 8192x21760, per-channel, M = 1", "gemv", (8192, 21760, -1)),
    "gemv_paper_g128": ("streaming W4A8, paper shape 8192x21760, g128, M = 1", "gemv", (8192, 21760, 128)),
    "gemv_7b_gate_up_pc": ("streaming W4A8, Llama-2-7B gate/up 22016x4096, per-channel, M = 1", "gemv",
                           (22016, 4096, -1)),
    "gemv_7b_qkv_g128": ("W4A8 as tuned, Llama-2-7B q/k/v 12288x4096, g128, M = 1", "gemv", (12288, 4096, 128)),
    "gemv_7b_qkv_pc": ("W4A8 as tuned, Llama-2-7B q/k/v 12288x4096, per-channel, M = 1", "gemv", (12288, 4096, -1)),
    "attn_b64_int8": ("decode attention, Llama-2-7B heads, batch 64, context 1024, int8 cache", "attention",
                      (64, 32, 32, 1024, 8)),
    "attn_b64_fp16": ("decode attention, Llama-2-7B heads, batch 64, context 1024, 16-bit cache", "attention",
                      (64, 32, 32, 1024, 16)),
    "attn_b1_fp16": ("decode attention, Llama-2-7B heads, batch 1, context 1024, 16-bit cache", "attention",
                     (1, 32, 32, 1024, 16)),
}
# where a case's kernels start: the W4A8 linear runs the streaming kernel (per-channel or per-group) or, where the
# tuner chose it, the tensor-core one
FIRST_KERNELS = {"gemv": ("_w4a8_gemv_kernel", "_w4a8_gemv_group_kernel", "_w4a8_gemm_kernel"),
                 "attention": ("_decode_split_kernel",)}
TIME_UNITS = {"ns": 1e-3, "us": 1.0, "ms": 1e3}  # in microseconds
SECTION_METRICS = {  # summary column: the metric's name in the section report
    "grid": "Grid Size", "registers": "Registers Per Thread", "waves_per_sm": "Waves Per SM",
    "duration_us": "Duration", "dram_pct": "DRAM Throughput", "theoretical_occupancy_pct": "Theoretical Occupancy",
    "achieved_occupancy_pct": "Achieved Occupancy", "issued_per_scheduler_cycle": "Issued Warp Per Scheduler",
    "no_eligible_pct": "No Eligible", "cycles_per_issue": "Warp Cycles Per Issued Instruction",
    "sm_throughput_pct": "Compute (SM) Throughput",
}


def workload(cases: list[str]) -> None:
    from qqq.kernels_triton import gpu
    from qqq.kernels_triton.decode_attention import decode_attention
    from qqq.kernels_triton.packing import pack_int4
    from qqq.kernels_triton.w4a8_gemm import w4a8_gemm

    def gemv(n, k, group_size):
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        weight = pack_int4(codes if group_size != -1 else codes.to(torch.int8) - 8)
        scale = torch.rand(n, device="cuda") * 1e-3
        ratio = None if group_size == -1 else (torch.rand(n, k // 128, device="cuda") * (127 / 8 - 8) + 8).half()
        a_codes = torch.randint(-127, 128, (1, k), dtype=torch.int8, device="cuda")
        a_scale = torch.rand(1, device="cuda")
        return lambda: w4a8_gemm(a_codes, a_scale, weight, scale, ratio, None, group_size, torch.float16,
                                 ratios_fit_int8=True)

    def attention(batch, heads, kv_heads, context, bits):
        capacity = context + 128
        shape = (batch, kv_heads, capacity, 128)
        q = torch.randn(batch, heads, 1, 128, device="cuda").half()
        if bits == 8:
            k, v = (torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda") for _ in range(2))
            k_scale, v_scale = (torch.rand(shape[:-1], device="cuda") * 0.01 for _ in range(2))
        else:
            k, v = (torch.randn(shape, device="cuda").half() for _ in range(2))
            k_scale = v_scale = None
        positions = torch.full((batch,), context - 1, dtype=torch.int32, device="cuda")
        return lambda: decode_attention(q, k, v, positions, k_scale, v_scale)

    builders = {"gemv": gemv, "attention": attention}
    torch.manual_seed(0)
    with gpu.sequential_launches():  # each kernel's own time, as the end-to-end profiles take them
        for case in cases:
            _, kind, arguments = CASES[case]
            call = builders[kind](*arguments)
            call()
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push("prof")
            call()
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            del call
            torch.cuda.empty_cache()


def find_ncu() -> Path:
    ncu = shutil.which("ncu") or next(iter(sorted(NSIGHT_COMPUTE_FOLDER.glob("*/ncu"))), None)
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) not found: this script needs it and a GPU")
    return Path(ncu)


def run_ncu(ncu: Path, cases: list[str], out: Path) -> None:
    common = [str(ncu), "--clock-control", "none", "--nvtx", "--nvtx-include", "prof/"]
    target = [sys.executable, __file__, "--workload", *cases]
    sections = [arg for name in SECTIONS for arg in ("--section", name)]
    stalls = ",".join(["gpu__time_duration.sum", "dram__bytes_read.sum"]
                      + [f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio" for r in STALL_REASONS])
    for name, flags in (("ncu_sections.txt", sections), ("ncu_stalls.txt", ["--metrics", stalls])):
        with open(out / name, "w") as report:
            subprocess.run(common + flags + target, stdout=report, stderr=subprocess.STDOUT, check=True)


def _kernel_blocks(text: str) -> list[tuple[str, dict[str, tuple[str, float]]]]:
    """(kernel name, {metric: (unit, value)}) per profiled kernel, in launch order."""
    blocks = []
    for line in text.splitlines():
        header = re.match(r"^  (\S+) \([\d, ]+\)x\([\d, ]+\), Context", line)
        if header:
            blocks.append((header.group(1), {}))
            continue
        metric = re.match(r"^    (\S.*?\S)\s{2,}(\S+)?\s+([\d,.]+)$", line)
        if metric and blocks:
            blocks[-1][1][metric.group(1)] = (metric.group(2) or "", float(metric.group(3).replace(",", "")))
    return blocks


def _case_names(kernels: list[str], cases: list[str]) -> list[str]:
    """The case each profiled kernel belongs to: the cases ran in order, each starting at one of its first kernels'
    names. The reports name no case, so kernels that do not fall into exactly ``cases`` so (another --cases, a run
    stopped early) are refused: they would be labelled with cases they do not belong to."""
    starts = [i for i, kernel in enumerate(kernels) if any(kernel in names for names in FIRST_KERNELS.values())]

    def fits(names: list[str]) -> bool:
        return (starts[:1] == [0] and len(names) == len(starts)
                and all(kernels[i] in FIRST_KERNELS[CASES[name][1]] for i, name in zip(starts, names)))

    if not fits(cases):
        early = cases[:len(starts)]
        hint = f"; a run stopped early? its first {len(early)}: --cases {' '.join(early)}" if fits(early) else ""
        raise SystemExit(f"the reports hold {len(starts)} cases starting with {[kernels[i] for i in starts]}, not the "
                         f"{len(cases)} of --cases {' '.join(cases)} in order: parse with the --cases they were "
                         f"profiled with{hint}")
    ends = starts[1:] + [len(kernels)]
    return [name for name, start, end in zip(cases, starts, ends) for _ in range(start, end)]


def summary(folder: Path, cases: list[str]) -> pd.DataFrame:
    sections = _kernel_blocks((folder / "ncu_sections.txt").read_text())
    stalls = _kernel_blocks((folder / "ncu_stalls.txt").read_text())
    if [k for k, _ in sections] != [k for k, _ in stalls]:
        raise SystemExit("the two ncu passes profiled different kernels")
    rows = []
    for case, (kernel, metrics), (_, counters) in zip(_case_names([k for k, _ in sections], cases), sections, stalls):
        row = {"case": case, "kernel": kernel}
        for column, name in SECTION_METRICS.items():
            unit, value = metrics.get(name, ("", float("nan")))
            row[column] = value * TIME_UNITS[unit] if column == "duration_us" else value
        row["grid"] = int(row["grid"])
        dram = counters["dram__bytes_read.sum"]
        scale = {"Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(dram[0], 1.0)
        row["dram_read_mb"] = round(dram[1] * scale / 1e6, 2)
        unit, value = counters["gpu__time_duration.sum"]  # the bytes over the time of the same (second) pass
        row["dram_read_tb_s"] = round(dram[1] * scale / (value * TIME_UNITS[unit]) / 1e6, 2)
        stalled = sorted(((counters[f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio"][1], r)
                          for r in STALL_REASONS), reverse=True)
        row["top_stalls"] = ", ".join(f"{r} {v:.2f}" for v, r in stalled[:3])
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for the reports and the summary")
    parser.add_argument("--parse", type=Path, help="summarise the ncu_*.txt reports in this folder (no profiling)")
    parser.add_argument("--note", help="a line on how the reports were made, for the summary (with --parse)")
    parser.add_argument("--workload", nargs="+", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        workload(args.workload)
        return
    if args.parse is None and not torch.cuda.is_available():
        sys.exit("ncu_profile.py profiles CUDA kernels: no GPU here")
    for report in ("ncu_sections.txt", "ncu_stalls.txt"):
        if args.parse and not (args.parse / report).is_file():
            parser.error(f"--parse: {args.parse / report} not found")
    ncu = None if args.parse else find_ncu()  # before the folder is made: a run that cannot profile makes nothing
    args.out.mkdir(parents=True, exist_ok=True)
    if args.parse is None:
        run_ncu(ncu, args.cases, args.out)
    table = summary(args.parse or args.out, args.cases)
    meta = provenance()
    if args.note:
        meta["note"] = args.note
    stem = args.out / "ncu_profile"
    cases = "\n".join(f"- `{name}`: {CASES[name][0]}" for name in args.cases)
    # one unit: a summary that fails to write leaves the old csv and md, not a new csv beside an old md
    with atomic_writes(stem.with_suffix(".csv"), stem.with_suffix(".md")) as (csv, md):
        csv.writelines(f"# {key}: {value}\n" for key, value in meta.items())
        table.to_csv(csv, index=False)
        md.write("# Nsight Compute profiles of the decode kernels\n\n" + cases + "\n\n" + table.to_markdown(index=False)
                 + "\n\n" + "stall columns: average warps stalled per issued instruction, by reason (ncu "
                 "`smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio`); `selected` (1 by definition) "
                 "left out\n\n" + markdown_provenance(meta) + "\n")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
