"""Compile every launch branch of every kernel for a Hopper GPU (sm_90) on a machine without one.

The interpreter never compiles a kernel, so a kernel that does not compile (a name bound only inside a loop, a
type mismatch) passes the whole CPU suite. Here each launcher runs on CPU tensors with the GPU code paths chosen
(inline PTX on), the same branch cases as ``test_gpu_kernels.py``, but every kernel launch is turned into a
compilation for sm_90 through Triton's own compiler (its bundled ptxas) instead of a run, with the arguments
specialized as a launch specializes them. Prints one JSON object: the branches taken and the kernels compiled, or
the first compilation error. Run by ``test_kernels_compile.py`` in a fresh process, since Triton decides
interpreter or compiler when a kernel is defined.

``--gemv-loop N K GROUP`` instead prints the SASS opcode counts of the streaming kernel's K loop at M = 1 with a
shipped config (instructions per weight word, without a GPU: ``kernels_triton/NOTES.md``).
``--split-k-fences`` prints the memory fences and atomics in the SASS of the split-K kernels (how their partial
sums meet).
``--registers N K M`` prints the registers per thread and local (spill) bytes (``cuobjdump -res-usage``) of the W4A8
kernels a shipped per-channel config runs at (N, K, M), plain and with the SiLU*up epilogue (occupancy without a
GPU).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
compiled: list[str] = []
last_compiled: dict = {}  # kernel name -> its latest compiled kernel (for the SASS counts)


def _compile_instead_of_launching(self, *args, grid, warmup, **kwargs):
    """Compile as a launch on the GPU would: Triton's own binder specializes the arguments (16-byte aligned
    pointers, integers divisible by 16, as on a device), so the checked code is the code a GPU runs (vectorized
    copies included)."""
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound_args, specialization, options)
    source = ASTSource
    if getattr(self, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    last_compiled[self.fn.__name__] = triton.compile(source(self, signature, constexprs, attrs), target=TARGET,
                                                     options=options.__dict__)
    compiled.append(self.fn.__name__)


def drive_every_branch() -> None:
    """The launchers with the GPU suite's branch cases, on CPU tensors (small where the shape does not matter)."""
    import test_gpu_kernels as cases

    from qqq import numerics
    from qqq.kernels_triton import (activation_quant, baselines, decode_attention, fused_producers, greedy, int8_gemm,
                                    w4a8_gemm, w4a8_gemv)
    from qqq.kernels_triton.activation_quant import quantize_per_token
    from qqq.kernels_triton.packing import pack_int4

    w4a8_gemm.use_inline_asm = lambda t: True  # the PTX paths are what a GPU runs
    for module in (activation_quant, decode_attention, fused_producers, w4a8_gemv):
        module.programmatic_launch = lambda t: True  # as on Hopper
    int8_gemm.compiled_for_hopper = lambda t: True  # the Gluon kernels run there
    for _, m, k in cases.QUANT_CASES:
        quantize_per_token(torch.randn(m, k).half())
    for path, g, clamp in cases.GEMM_CASES:
        codes, scale, ratio = numerics.random_quantized_weight(128, 1024, g)
        config = cases.GEMM_PATH_CONFIGS[path](g)
        for dtype in (torch.float16, torch.bfloat16):
            w4a8_gemm.w4a8_linear(torch.randn(3, 1024).to(dtype), pack_int4(codes), scale, ratio, None, g,
                                  config=config, ratios_fit_int8=g != -1 and not clamp)
    for path, g in cases.SILU_MUL_CASES:  # the SiLU*up epilogue, at one token (BLOCK_M 1 for streaming) and three
        codes, scale, ratio = numerics.random_quantized_weight(128, 1024, g)
        for m in (1, 3):
            a_codes, a_scale = quantize_per_token(torch.randn(m, 1024).half())
            w4a8_gemm.w4a8_gemm(a_codes, a_scale, pack_int4(codes), scale, ratio, None, g, torch.float16,
                                config=cases.GEMM_PATH_CONFIGS[path](g), ratios_fit_int8=g != -1, silu_mul=True)
    for launcher, rows, residual, out in cases.PRODUCER_CASES:
        m, quantize = (1 if rows == "chunked" else 300), out == "int8"
        width = cases.PRODUCER_WIDTHS[launcher][0]
        if launcher == "rmsnorm_quantize":
            x = torch.randn(m, width).half()
            fused_producers.rmsnorm_quantize(x, torch.ones(width).half(), 1e-5, x.clone() if residual else None,
                                             quantize=quantize)
        else:
            fused_producers.silu_mul_quantize(torch.randn(m, 2 * width).half(), quantize=quantize)
    heads, kv_heads, head_dim = 8, 2, 128
    qkv = torch.randn(2, 3, (heads + 2 * kv_heads) * head_dim).half()
    cache = torch.zeros(2, kv_heads, 64, head_dim).half()
    angles = torch.rand(64, head_dim // 2)
    fused_producers.rope_into_cache(qkv, angles.cos(), angles.sin(), torch.zeros(2, 3, dtype=torch.long), cache,
                                    cache.clone(), heads)
    q = torch.randn(2, heads, 1, head_dim).half()
    codes, scales = torch.zeros(2, kv_heads, 64, head_dim, dtype=torch.int8), torch.zeros(2, kv_heads, 64)
    fused_producers.rope_into_cache(qkv, angles.cos(), angles.sin(), torch.zeros(2, 3, dtype=torch.long), codes,
                                    codes.clone(), heads, scales, scales.clone())
    for step_cache, step_scales in ((cache, (None, None)), (codes, (scales, scales.clone()))):  # a decode step's launch
        fused_producers.rope_into_cache(qkv[:, :1], angles.cos(), angles.sin(), torch.zeros(2, 1, dtype=torch.long),
                                        step_cache, step_cache.clone(), heads, *step_scales)
    for dtype in (torch.float16, torch.bfloat16):
        fused_producers.dequantize_cache(codes[:, :, :3], scales[:, :, :3], dtype)
    decode_attention.use_inline_asm = lambda t: True
    decode_attention.decode_attention(q, cache, cache.clone(), torch.tensor([5, 63]))
    decode_attention.decode_attention(q, codes, codes.clone(), torch.tensor([5, 63]), scales, scales.clone())
    decode_attention.decode_attention(q, codes, codes.clone(), torch.tensor([5, 63]), scales, scales.clone(),
                                      query_on_grid=True)
    slots = {**decode_attention.default_config(True), "BLOCK_N": 32, "slots": True}
    decode_attention.decode_attention(q, cache, cache.clone(), torch.tensor([5, 63]), config=slots)
    decode_attention.decode_attention(q, codes, codes.clone(), torch.tensor([5, 63]), scales, scales.clone(),
                                      config=slots)
    decode_attention.decode_attention(q, codes, codes.clone(), torch.tensor([5, 63]), scales, scales.clone(),
                                      config=slots, query_on_grid=True)
    decode_attention.decode_attention(q, codes, codes.clone(), torch.tensor([5, 63]), scales, scales.clone(),
                                      config={**slots, "int8_scores": True})
    codes, scale, _ = numerics.random_quantized_weight(128, 1024, -1)
    x = torch.randn(3, 1024).half()
    baselines.w8a8_linear(x, codes.to(torch.int8), scale)
    baselines.w8a8_gemm(*quantize_per_token(x), codes.to(torch.int8), scale, None, torch.float16, silu_mul=True)
    for dtype in (torch.float16, torch.bfloat16):
        baselines.w8a8_linear(x.to(dtype), codes.to(torch.int8), scale, config=cases.TMA_INT8_CONFIG)
    for config in (cases.TMA_INT8_CONFIG,) + cases.WS_INT8_CONFIGS:
        baselines.w8a8_gemm(*quantize_per_token(x), codes.to(torch.int8), scale, None, torch.float16, config=config,
                            silu_mul=True)
    for config in cases.WS_INT8_CONFIGS:
        for dtype in (torch.float16, torch.bfloat16):
            baselines.w8a8_linear(x.to(dtype), codes.to(torch.int8), scale, torch.randn(128).to(dtype), config=config)
    baselines.w4a16_linear(x, pack_int4(codes), scale)
    for vocab in (77, 32000, 128256):
        greedy.greedy_step(torch.randn(2, vocab).half(), *(torch.zeros(2, n, dtype=torch.long) for n in (1, 1, 8)),
                          torch.zeros(1, dtype=torch.long))


def _cuobjdump(kernel, flag: str) -> str:
    """What the cuobjdump bundled with Triton prints for a compiled kernel's cubin with ``flag``."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([cuobjdump, flag, cubin.name], capture_output=True, text=True, check=True).stdout


def _disassemble(kernel) -> list[tuple[int, str]]:
    """(offset, instruction) of a compiled kernel's SASS."""
    text = _cuobjdump(kernel, "-sass")
    return [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def _opcode(instruction: str) -> str:
    """The opcode of a SASS instruction, without its predicate (``@P0``, ``@!UP1``)."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def gemv_loop(n: int, k: int, group_size: int, device: str) -> dict:
    """The SASS of the streaming kernel's K loop for M = 1 with ``device``'s shipped config for (N, K, group):
    opcode counts, and the weight words each thread converts per iteration."""
    from qqq import numerics
    from qqq.kernels_triton import config_table, w4a8_gemm, w4a8_gemv
    from qqq.kernels_triton.packing import pack_int4

    kernel_name = "w4a8" if group_size == -1 else "w4a8_group"
    config = config_table.load_cache(device).get(config_table.config_key(kernel_name, n, k, group_size, 1))
    if config is None or not config.get("GEMV"):
        raise SystemExit(f"{device} has no streaming-kernel config for N={n} K={k} group {group_size} at M = 1")
    w4a8_gemm.use_inline_asm = lambda t: True
    w4a8_gemv.programmatic_launch = lambda t: True
    codes, scale, ratio = numerics.random_quantized_weight(n, k, group_size)
    w4a8_gemm.w4a8_linear(torch.randn(1, k).half(), pack_int4(codes), scale, ratio, None, group_size, config=config,
                          ratios_fit_int8=group_size != -1)
    sass = _disassemble(last_compiled["_w4a8_gemv_kernel" if group_size == -1 else "_w4a8_gemv_group_kernel"])
    loops = [(int(m.group(1), 16), offset) for offset, text in sass
             if (m := re.search(r"BRA\s+0x([0-9a-f]+)", text)) and int(m.group(1), 16) < offset]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    body = [_opcode(text) for offset, text in sass if start <= offset <= end]
    words = config["BLOCK_N"] * config["BLOCK_K"] // 8 // (32 * config["num_warps"])
    return {"config": config, "words_per_thread": words, "instructions": len(body),
            "per_word": round(len(body) / words, 2), "opcodes": dict(collections.Counter(body).most_common())}


def split_k_fences() -> dict:
    """Per split-K launch branch of the GPU suite (tensor-core and streaming, per-channel and g128): the GPU-wide
    fences (``MEMBAR``) and global atomics (``RED`` without a result, ``ATOM`` with one) in its kernel's SASS."""
    import test_gpu_kernels as cases

    from qqq import numerics
    from qqq.kernels_triton import w4a8_gemm
    from qqq.kernels_triton.packing import pack_int4

    w4a8_gemm.use_inline_asm = lambda t: True
    report = {}
    for path in ("split_k", "streaming_split_k"):
        for group_size in (-1, 128):
            codes, scale, ratio = numerics.random_quantized_weight(128, 1024, group_size)
            last_compiled.clear()
            w4a8_gemm.w4a8_linear(torch.randn(1, 1024).half(), pack_int4(codes), scale, ratio, None, group_size,
                                  config=cases.GEMM_PATH_CONFIGS[path](group_size), ratios_fit_int8=group_size != -1)
            name, kernel = next((name, kernel) for name, kernel in last_compiled.items() if "w4a8" in name)
            opcodes = [_opcode(text) for _, text in _disassemble(kernel)]
            report[f"{path}/g{group_size}"] = {
                "kernel": name, "gpu_fences": sum(op.startswith("MEMBAR") and op.endswith((".GPU", ".SYS"))
                                                  for op in opcodes),
                **{kind: sum(op.startswith(kind) for op in opcodes) for kind in ("REDG", "ATOMG")}}
    return report


def _registers(kernel) -> dict:
    text = _cuobjdump(kernel, "-res-usage")
    return {"registers": int(re.search(r"REG:(\d+)", text).group(1)),
            "local_bytes": int(re.search(r"LOCAL:(\d+)", text).group(1)),  # > 0: spills
            "maxnreg": getattr(kernel.metadata, "maxnreg", None)}  # the launch's register cap, if any


def registers(n: int, k: int, m: int, device: str) -> dict:
    """Registers per thread and local bytes of each kernel that ``device``'s shipped per-channel W4A8 config for
    (N, K, M) runs, without and with the SiLU*up epilogue (the fused gate/up linear's)."""
    from qqq import numerics
    from qqq.kernels_triton import config_table, w4a8_gemm
    from qqq.kernels_triton.activation_quant import quantize_per_token
    from qqq.kernels_triton.packing import pack_int4

    config = config_table.load_cache(device).get(config_table.config_key("w4a8", n, k, -1, m))
    if config is None:
        raise SystemExit(f"{device} has no per-channel W4A8 config for N={n} K={k} M={m}")
    w4a8_gemm.use_inline_asm = lambda t: True
    codes, scale, _ = numerics.random_quantized_weight(256, k, -1)  # the kernels do not specialize on N or M
    a_codes, a_scale = quantize_per_token(torch.randn(min(m, 64), k).half())
    report = {"config": config}
    for silu_mul in (False, True):
        last_compiled.clear()
        w4a8_gemm.w4a8_gemm(a_codes, a_scale, pack_int4(codes), scale, None, None, -1, torch.float16, config=config,
                            silu_mul=silu_mul)
        report["silu_mul" if silu_mul else "plain"] = {name: _registers(kernel) for name, kernel in last_compiled.items()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gemv-loop", nargs=3, type=int, metavar=("N", "K", "GROUP"),
                        help="print the SASS opcode counts of the streaming kernel's K loop instead")
    parser.add_argument("--registers", nargs=3, type=int, metavar=("N", "K", "M"),
                        help="print the registers per thread of the W4A8 kernels of that per-channel config instead")
    parser.add_argument("--split-k-fences", action="store_true",
                        help="print the fences and atomics of the split-K kernels' SASS instead")
    parser.add_argument("--configs", default="NVIDIA_H200",
                        help="the shipped config file (GPU name) for --gemv-loop and --registers")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    JITFunction.run = _compile_instead_of_launching
    if args.gemv_loop:
        print(json.dumps(gemv_loop(*args.gemv_loop, args.configs)))
        return
    if args.registers:
        print(json.dumps(registers(*args.registers, args.configs)))
        return
    if args.split_k_fences:
        print(json.dumps(split_k_fences()))
        return
    from qqq.kernels_triton import branches

    try:
        with branches.recording() as taken:
            drive_every_branch()
        report = {"branches": sorted(f"{launcher}:{branch}" for launcher, branch in taken), "compiled": compiled}
    except Exception:  # the report names the failing kernel; the test prints it
        report = {"error": traceback.format_exc(limit=8), "compiled": compiled}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
