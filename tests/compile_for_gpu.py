"""Compile every launch branch of every kernel for a Hopper GPU (sm_90) on a machine without one.

The interpreter never compiles a kernel, so a kernel that does not compile (a name bound only inside a loop, a
type mismatch) passes the whole CPU suite. Here each launcher runs on CPU tensors with the GPU code paths chosen
(inline PTX on), the same branch cases as ``test_gpu_kernels.py``, but every kernel launch is turned into a
compilation for sm_90 through Triton's own compiler (its bundled ptxas) instead of a run. Prints one JSON object:
the branches taken and the kernels compiled, or the first compilation error. Run by ``test_kernels_compile.py``
in a fresh process, since Triton decides interpreter or compiler when a kernel is defined.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int8: "*i8",
                 torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}
compiled: list[str] = []


def _compile_instead_of_launching(self, *args, grid, warmup, **kwargs):
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "launch_pdl") if key in kwargs}
    bound = inspect.signature(self.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for param in self.params:
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    triton.compile(ASTSource(self, signature, constexprs), target=TARGET, options=options)
    compiled.append(self.fn.__name__)


def drive_every_branch() -> None:
    """The launchers with the GPU suite's branch cases, on CPU tensors (small where the shape does not matter)."""
    import test_gpu_kernels as cases

    from qqq import numerics
    from qqq.kernels_triton import activation_quant, baselines, decode_attention, fused_producers, w4a8_gemm, w4a8_gemv
    from qqq.kernels_triton.activation_quant import quantize_per_token
    from qqq.kernels_triton.packing import pack_int4

    w4a8_gemm.use_inline_asm = lambda t: True  # the PTX paths are what a GPU runs
    for module in (activation_quant, decode_attention, fused_producers, w4a8_gemv):
        module.programmatic_launch = lambda t: True  # as on Hopper
    for _, m, k in cases.QUANT_CASES:
        quantize_per_token(torch.randn(m, k).half())
    for path, g, clamp in cases.GEMM_CASES:
        codes, scale, ratio = numerics.random_quantized_weight(128, 1024, g)
        config = cases.GEMM_PATH_CONFIGS[path](g)
        for dtype in (torch.float16, torch.bfloat16):
            w4a8_gemm.w4a8_linear(torch.randn(3, 1024).to(dtype), pack_int4(codes), scale, ratio, None, g,
                                  config=config, ratios_fit_int8=g != -1 and not clamp)
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
    decode_attention.use_inline_asm = lambda t: True
    decode_attention.decode_attention(q, cache, cache.clone(), torch.tensor([5, 63]))
    decode_attention.decode_attention(q, codes, codes.clone(), torch.tensor([5, 63]), scales, scales.clone())
    codes, scale, _ = numerics.random_quantized_weight(128, 1024, -1)
    x = torch.randn(3, 1024).half()
    baselines.w8a8_linear(x, codes.to(torch.int8), scale)
    baselines.w4a16_linear(x, pack_int4(codes), scale)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    JITFunction.run = _compile_instead_of_launching
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
