"""GPU probe (branch gluon-ws): the Gluon warp-specialized int8 GEMM (`qqq.kernels_triton.int8_gemm_ws`) against the shipped
TMA or pointer) and cuBLAS FP16: exactness first, then times at M 1024 / 4096 on five shapes."""
import csv, os, sys, time
import torch, triton
from qqq import numerics
from qqq.kernels_triton import baselines, config_table
from qqq.kernels_triton.int8_gemm_ws import int8_gemm_ws

out_dir = sys.argv[1]
torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
CONFIGS = [dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=4),
           dict(BLOCK_N=256, BLOCK_M=128, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=4),
           dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=4, PERSISTENT=1),
           dict(BLOCK_N=256, BLOCK_M=128, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=4, PERSISTENT=1),
           dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=6, PERSISTENT=1)]


def operands(m, n, k):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    return a, torch.rand(m, device=dev) / 100, w, torch.rand(n, device=dev) / 100


# exactness: odd M and N, a K tail, every config, against the plain reference of the same formula
t0 = time.time()
bad = 0
for m, n, k in ((1000, 4000, 4160), (64, 384, 4096), (1, 256, 128), (4096, 4096, 4096)):
    a, sa, w, sw = operands(m, n, k)
    acc = numerics.int8_matmul_exact(a, w, torch.float64)
    ref = ((acc.float() * sa[:, None]) * sw[None, :]).half()
    for cfg in CONFIGS:
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device=dev)
        int8_gemm_ws(a, sa, w, sw, out, cfg)
        torch.cuda.synchronize()
        same = torch.equal(out, ref)
        bad += not same
        print(f"check M={m} N={n} K={k} {cfg['BLOCK_N']}x{cfg['BLOCK_M']}x{cfg['BLOCK_K']}/{cfg['num_warps']}w/{cfg['num_stages']}s{'/P' if cfg.get('PERSISTENT') else ''}: "
              f"{'exact' if same else 'MISMATCH max ' + str((out.float() - ref.float()).abs().nan_to_num(1e9).max().item())}",
              flush=True)
print(f"checks done in {time.time() - t0:.0f} s, {bad} mismatches", flush=True)
if bad:
    sys.exit(1)

rows = []
SHAPES = [("paper_8192x21760", 21760, 8192), ("llama2-7b_qkv", 12288, 4096), ("llama2-7b_o", 4096, 4096),
          ("llama2-7b_gate_up", 22016, 4096), ("llama2-7b_down", 4096, 11008)]
for name, n, k in SHAPES:
    for m in (1024, 4096):
        a, sa, w, sw = operands(m, n, k)
        x16 = torch.randn(m, k, dtype=torch.float16, device=dev)
        w16 = torch.randn(n, k, dtype=torch.float16, device=dev)
        fp16 = triton.testing.do_bench(lambda: torch.nn.functional.linear(x16, w16), warmup=25, rep=100)
        shipped = config_table.get_config("w8a8", m, n, k, -1)
        base = triton.testing.do_bench(lambda: baselines.w8a8_gemm(a, sa, w, sw, None, torch.float16, config=shipped),
                                       warmup=25, rep=100)
        out = torch.empty(m, n, dtype=torch.float16, device=dev)
        best = None
        for cfg in CONFIGS:
            us = triton.testing.do_bench(lambda: int8_gemm_ws(a, sa, w, sw, out, cfg), warmup=25, rep=100) * 1e3
            rows.append(dict(shape=name, m=m, kernel="ws", config=f"{cfg['BLOCK_N']}x{cfg['BLOCK_M']}x{cfg['BLOCK_K']}/{cfg['num_warps']}w/{cfg['num_stages']}s{'/P' if cfg.get('PERSISTENT') else ''}", us=round(us, 2)))
            best = us if best is None else min(best, us)
        tops = 2 * m * n * k / (best * 1e-6) / 1e12
        rows += [dict(shape=name, m=m, kernel="fp16_cublas", config="", us=round(fp16 * 1e3, 2)),
                 dict(shape=name, m=m, kernel="w8a8_shipped", config=str({x: shipped.get(x) for x in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "num_warps", "num_stages", "TMA")}), us=round(base * 1e3, 2))]
        print(f"{name:18s} M={m:5d}: fp16 {fp16*1e3:8.1f} us | shipped W8A8 {base*1e3:8.1f} us ({fp16/base:.2f}x) | "
              f"WS best {best:8.1f} us ({fp16*1e3/best:.2f}x FP16, {base*1e3/best:.2f}x shipped, {tops:.0f} TOPS)", flush=True)
with open(os.path.join(out_dir, "ws_bench.csv"), "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader(); wr.writerows(rows)
print(f"done in {time.time() - t0:.0f} s")
