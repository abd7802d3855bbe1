"""GPU probe: the fused Gluon W4A8 kernel (``qqq.kernels_triton.w4a8_gemm_ws``, path ``fused_ws``) at each of a list
of configs against the shipped W4A8 kernel with its tuned config, the shipped W8A8 kernel and cuBLAS FP16, at M
16-1024 on the paper and Llama-2-7B shapes, per-channel and g128; ``tests/test_gpu_gluon_fused.py`` checks its
numbers first.

    python experiments/gluon_fused_probe.py OUT_DIR [--shapes NAME ...] [--ms M ...] [--groups G ...]
"""
import argparse
import csv
import os
import time

import torch
import triton

from qqq import numerics
from qqq.kernels_triton import baselines, config_table
from qqq.kernels_triton.activation_quant import quantize_per_token
from qqq.kernels_triton.packing import pack_int4
from qqq.kernels_triton.w4a8_gemm import w4a8_gemm
from qqq.kernels_triton.w4a8_gemm_ws import launch_w4a8_gemm_ws

CONFIGS = [dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, GROUP_N=8, num_warps=4, num_stages=4, WS=2),
           dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=4, WS=2),
           dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=3, WS=2),
           dict(BLOCK_N=256, BLOCK_M=128, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=3, WS=2),
           dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=256, GROUP_N=8, num_warps=4, num_stages=3, WS=2),
           dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=256, GROUP_N=8, num_warps=4, num_stages=4, WS=2),
           dict(BLOCK_N=128, BLOCK_M=16, BLOCK_K=256, GROUP_N=8, num_warps=4, num_stages=4, WS=2),
           # twice the converter warps, at fewer registers each
           dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=4, WS=2, CONVERT_WARPS=8,
                CONVERT_REGS=56),
           dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, GROUP_N=8, num_warps=4, num_stages=4, WS=2, CONVERT_WARPS=8,
                CONVERT_REGS=56)]
SHAPES = [("paper_8192x21760", 21760, 8192), ("llama2-7b_qkv", 12288, 4096), ("llama2-7b_gate_up", 22016, 4096),
          ("llama2-7b_down", 4096, 11008)]


def bench(fn):
    """Median ms of CUDA-graph replays, as ``gemm_speed.py`` times (no launch or Python cost in the figure)."""
    return triton.testing.do_bench_cudagraph(fn, rep=100)


def write_csv(rows, out_dir):
    with open(os.path.join(out_dir, "gluon_fused_probe.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(out_dir, shapes, ms, groups):
    os.makedirs(out_dir, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    torch.manual_seed(0)
    t0 = time.time()
    rows = []
    for name, n, k in [shape for shape in SHAPES if shape[0] in shapes]:
        for group_size in groups:
            codes, scale, ratio = numerics.random_quantized_weight(n, k, group_size, device="cuda")
            qweight = pack_int4(codes)
            weight8 = numerics.int8_weight(codes, ratio)
            kernel = "w4a8" if group_size == -1 else "w4a8_group"
            for m in ms:
                a_codes, a_scale = quantize_per_token(torch.randn(m, k, device="cuda").half())
                x16 = torch.randn(m, k, dtype=torch.float16, device="cuda")
                w16 = torch.randn(n, k, dtype=torch.float16, device="cuda")
                times = {"fp16": bench(lambda: torch.nn.functional.linear(x16, w16)) * 1e3}
                shipped = config_table.get_config(kernel, m, n, k, group_size)
                times["shipped"] = bench(lambda: w4a8_gemm(
                    a_codes, a_scale, qweight, scale, ratio, None, group_size, torch.float16, config=shipped,
                    ratios_fit_int8=group_size != -1, weights_checked=True)) * 1e3
                w8 = config_table.get_config("w8a8", m, n, k, -1)
                times["w8a8"] = bench(lambda: baselines.w8a8_gemm(
                    a_codes, a_scale, weight8, scale, None, torch.float16, config=w8)) * 1e3
                out = torch.empty(m, n, dtype=torch.float16, device="cuda")
                for cfg in CONFIGS:
                    label = (f"{cfg['BLOCK_N']}x{cfg['BLOCK_M']}x{cfg['BLOCK_K']}/{cfg['num_warps']}w/"
                             f"{cfg['num_stages']}s/WS{cfg['WS']}/c{cfg.get('CONVERT_WARPS', 4)}")
                    try:
                        times[label] = bench(lambda: launch_w4a8_gemm_ws(
                            a_codes, a_scale, qweight, scale, ratio, None, group_size, out, out, cfg, False, False,
                            False)) * 1e3
                    except Exception as error:  # a config the compiler rejects
                        print(f"  skip {label}: {type(error).__name__}", flush=True)
                best = min((us, label) for label, us in times.items() if "/WS" in label)
                rows += [dict(shape=name, group=group_size, m=m, kernel=label, us=round(us, 2))
                         for label, us in times.items()]
                print(f"{name:18s} g={group_size:4d} M={m:5d}: fp16 {times['fp16']:8.1f} | shipped "
                      f"{times['shipped']:8.1f} ({times['fp16'] / times['shipped']:.2f}x) | w8a8 {times['w8a8']:8.1f} "
                      f"({times['fp16'] / times['w8a8']:.2f}x) | gluon {best[0]:8.1f} ({times['fp16'] / best[0]:.2f}x, "
                      f"{best[1]})", flush=True)
                write_csv(rows, out_dir)  # what a timeout leaves is kept
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shapes", nargs="+", default=[name for name, _, _ in SHAPES],
                        choices=[name for name, _, _ in SHAPES])
    parser.add_argument("--ms", nargs="+", type=int, default=[16, 64, 128, 256, 1024])
    parser.add_argument("--groups", nargs="+", type=int, default=[-1, 128], choices=[-1, 128])
    args = parser.parse_args()
    main(args.out_dir, args.shapes, args.ms, args.groups)
