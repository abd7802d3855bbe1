"""Every launch branch of every Triton kernel, compiled on the GPU and checked against the plain references.

The CPU suite runs the kernels under the interpreter, which never compiles them; this file is where a kernel
that does not compile, or computes something else once compiled, shows. Each kernel module lists its launch
branches in ``LAUNCH_BRANCHES``; every case below records the branch it took (``branches.recording``) and
asserts it, and ``test_every_launch_branch_has_a_gpu_case`` (which runs on the CPU too) fails when a listed
branch has no case here. Also: every config shipped in ``configs/*.json`` compiled and checked once, and the
W4A8 linear at every Llama-2-7B / 13B / Llama-3-70B width and the paper's, M from 1 to 4096, fp16 and bf16.

    python3 -m pytest -q tests/test_gpu_kernels.py      # on a CUDA GPU; the whole GPU suite: tests/test_gpu*.py
"""

import importlib
import json
import pkgutil

import pytest
import torch
import triton
import triton.language as tl
from conftest import compiled_kernels
from filelock import FileLock

import qqq.kernels_triton as kernel_package
from qqq import numerics
from qqq.kernels_triton import autotune, branches, config_table
from qqq.kernels_triton.packing import pack_int4
from qqq.kernels_triton.unpack import byte_permute, group_tables

# ------------------------------------------------------------------------------------- the cases per branch

# quantize_per_token: (branch, M, K)
QUANT_CASES = [("single_pass", 1, 2048), ("single_pass", 17, 4096), ("single_pass", 300, 8192),
               ("two_pass", 128, 11008), ("two_pass", 2048, 21760), ("two_pass", 300, 28672), ("chunked", 1, 4096),
               ("chunked", 16, 5120), ("chunked", 1, 8192), ("chunked", 1, 13824), ("chunked", 127, 28672)]


def _w4a8_config(block_k, split_k=1, prefetch=0, dequant=0):
    return dict(BLOCK_N=128 if dequant else 64, BLOCK_M=64 if dequant else 16, BLOCK_K=block_k, SPLIT_K=split_k,
                GROUP_N=8, num_warps=4, num_stages=3 if dequant else 4, PREFETCH=prefetch, DEQUANT=dequant)


def _narrow_block_k(group_size):
    """A K tile whose halves lie in one group each (the fused per-group layout), 256 per-channel."""
    return 256 if group_size == -1 else max(64, min(group_size, 256))


def _streaming_config(split_k=1):
    return dict(BLOCK_N=32, BLOCK_M=16, BLOCK_K=256, SPLIT_K=split_k, GROUP_N=1, num_warps=4, num_stages=2, GEMV=1)


# w4a8_gemm: launch path -> the config that forces it for a group size
GEMM_PATH_CONFIGS = {
    "streaming": lambda g: _streaming_config(),
    "streaming_split_k": lambda g: _streaming_config(split_k=4),
    "fused": lambda g: _w4a8_config(_narrow_block_k(g)),
    "split_k": lambda g: _w4a8_config(_narrow_block_k(g), split_k=4),
    "prefetch": lambda g: _w4a8_config(_narrow_block_k(g), prefetch=1),
    "wide_groups": lambda g: _w4a8_config(2 * g),
    "dequant": lambda g: _w4a8_config(128, dequant=1),
    "dequant_tma": lambda g: dict(_w4a8_config(128, dequant=1), TMA=1),
    "dequant_ws": lambda g: dict(_w4a8_config(128, dequant=1), WS=2),
    # the fused Gluon kernel: 128-column K steps (64 for groups of 32, as the fallback's tiles need), per SM
    "fused_ws": lambda g: dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=min(128, _narrow_block_k(g)), SPLIT_K=1, GROUP_N=8,
                               num_warps=4, num_stages=4, WS=2),
    # its work units: 3 parts, so that they differ in length and a program's units cross tiles
    "fused_ws_split_k": lambda g: dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=min(128, _narrow_block_k(g)), SPLIT_K=3,
                                       GROUP_N=8, num_warps=4, num_stages=4, WS=2),
}
# the persistent TMA-fed int8 GEMM (W8A8 and W4A8's dequant_tma), and the token counts that make it loop: at 2100
# tokens a 1000-row weight is 8 x 33 tiles of 128 x 64, twice the 132 programs of an H200
TMA_INT8_CONFIG = dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, SPLIT_K=1, GROUP_N=8, num_warps=4, num_stages=3,
                       TMA=1)
TMA_MS = (1, 33, 300, 2100)
# the warp-specialized Gluon int8 GEMM (W8A8 and W4A8's dequant_ws): a program per tile, and per SM (at 2100 tokens,
# two tiles per program, as for TMA_INT8_CONFIG)
WS_INT8_CONFIGS = (dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=128, SPLIT_K=1, GROUP_N=8, num_warps=8, num_stages=3, WS=1),
                   dict(TMA_INT8_CONFIG, TMA=0, WS=2))
W8A8_KERNEL_CONFIGS = {"int8_gemm": None, "int8_gemm_tma": TMA_INT8_CONFIG, "int8_gemm_ws": WS_INT8_CONFIGS[0],
                       "int8_gemm_ws/persistent": WS_INT8_CONFIGS[1]}
GEMM_GROUP_SIZES = (-1, 32, 64, 128, 256)


def _gemm_branch(path, group_size, clamp):
    from qqq.kernels_triton.w4a8_gemm import _branch

    return _branch(path, group_size, clamp)


def _gemm_cases():
    """(path, group size, clamp): per-group weights run both with the int8 clamp and without it (their products
    fit int8, ``ratios_fit_int8``)."""
    from qqq.kernels_triton.w4a8_gemm import LAUNCH_BRANCHES

    listed = set(LAUNCH_BRANCHES["w4a8_gemm"])
    return [(path, g, clamp) for g in GEMM_GROUP_SIZES for path in GEMM_PATH_CONFIGS for clamp in (True, False)
            if _gemm_branch(path, g, clamp) in listed and (clamp or g != -1)]


GEMM_CASES = _gemm_cases()


def _gemm_path_ms(path):
    """Token counts a path is checked at: decode to prefill, the streaming kernel up to its 16 tokens."""
    return (1, 2, 16) if path.startswith("streaming") else TMA_MS if "_tma" in path or "_ws" in path else (1, 33, 300)

# the SiLU*up epilogue: each path's kernel, per-channel and g128 (unclamped, as a layer runs it)
SILU_MUL_CASES = sorted({(path, g) for path, g, clamp in GEMM_CASES if g in (-1, 128) and (g == -1 or not clamp)})
PRODUCER_WIDTHS = {"rmsnorm_quantize": (4096, 5120, 8192), "silu_mul_quantize": (11008, 13824, 28672)}
PRODUCER_CASES = [(launcher, rows, residual, out) for launcher in PRODUCER_WIDTHS for rows in ("row", "chunked")
                  for residual in ((False, True) if launcher == "rmsnorm_quantize" else (False,))
                  for out in ("int8", "fp16")]


def covered_branches() -> set[tuple[str, str]]:
    covered = {("quantize_per_token", branch) for branch, _, _ in QUANT_CASES}
    covered |= {("w4a8_gemm", _gemm_branch(path, g, clamp)) for path, g, clamp in GEMM_CASES}
    covered |= {("w4a8_gemm", f"silu_mul/{path}") for path, _ in SILU_MUL_CASES}
    covered |= {(launcher, f"{rows}{'+residual' if residual else ''}+{out}") for launcher, rows, residual, out
                in PRODUCER_CASES}
    covered |= {("rope_into_cache", "rope"), ("rope_into_cache", "rope_int8"), ("dequantize_cache", "int8"),
                ("decode_attention", "split_kv"),
                ("decode_attention", "split_kv_int8"), ("decode_attention", "slots"), ("decode_attention", "slots_int8"),
                ("decode_attention", "slots_int8_scores"),
                ("w8a8_gemm", "int8_gemm"), ("w8a8_gemm", "int8_gemm+silu_mul"), ("w8a8_gemm", "int8_gemm_tma"),
                ("w8a8_gemm", "int8_gemm_tma+silu_mul"), ("w8a8_gemm", "int8_gemm_ws"),
                ("w8a8_gemm", "int8_gemm_ws+silu_mul"),
                ("w4a16_linear", "w4a16"), ("greedy_step", "greedy_step")}
    return covered


def all_launch_branches() -> set[tuple[str, str]]:
    listed = set()
    for info in pkgutil.iter_modules(kernel_package.__path__):
        module = importlib.import_module(f"{kernel_package.__name__}.{info.name}")
        for launcher, names in getattr(module, "LAUNCH_BRANCHES", {}).items():
            listed |= {(launcher, name) for name in names}
    return listed


def test_every_launch_branch_has_a_gpu_case():
    """Runs everywhere: a branch added to a launcher without a case in this file fails here, on the CPU too."""
    from qqq.kernels_triton.w4a8_gemm import launch_path

    assert all_launch_branches() - covered_branches() == set()
    assert covered_branches() - all_launch_branches() == set()
    for path, g, _ in GEMM_CASES:  # each forcing config takes the path it is meant to, and is a valid config
        config = GEMM_PATH_CONFIGS[path](g)
        assert launch_path(config, g) == path
        config_table.check_config("w4a8" if g == -1 else "w4a8_group", config, _gemm_path_ms(path)[-1], 1000, 8192,
                                  g)


# ------------------------------------------------------------------------------------- helpers


def _assert_branch(taken, launcher, branch):
    assert (launcher, branch) in taken, f"expected {launcher} to take {branch!r}, took {sorted(taken)}"


def _random_rows(m, k, dtype, generator, scale=3.0):
    x = torch.randn(m, k, device="cuda", generator=generator) * scale
    x[:, :: max(1, k // 7)] *= 20  # outlier channels, as real activations have
    if m > 1:
        x[m // 2] = 0  # an all-zero row: scale 0, codes 0, never NaN
    return x.to(dtype)


_WEIGHTS: dict = {}


def _weights(n, k, group_size):
    """Random spec-quantized weights, kept for the module (real widths are large to make)."""
    key = (n, k, group_size)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        generator = torch.Generator(device="cuda").manual_seed(n * 7 + k + group_size)
        codes, scale, ratio = numerics.random_quantized_weight(n, k, group_size, generator, "cuda")
        bias = torch.randn(n, device="cuda", generator=generator)
        _WEIGHTS[key] = (pack_int4(codes), numerics.int8_weight(codes, ratio), scale, ratio, bias)
    return _WEIGHTS[key]


def _check_w4a8(x, n, group_size, config=None, clamp=False):
    """Run ``w4a8_linear`` on ``x``; the int32 sums must equal the spec's exactly, the output its rounding.
    The weights' products fit int8: by default the kernels skip the clamp, as for a ``QQQLinear``."""
    from qqq.kernels_triton.w4a8_gemm import w4a8_linear

    qweight, weight8, scale, ratio, bias = _weights(n, x.shape[1], group_size)
    bias = bias.to(x.dtype)
    out, acc = w4a8_linear(x, qweight, scale, ratio, bias, group_size, config=config, return_acc=True,
                           ratios_fit_int8=group_size != -1 and not clamp)
    x_codes, token_scale = numerics.quantize_per_token(x)
    expected_acc = numerics.int8_matmul_exact(x_codes, weight8)
    expected = numerics.int8_linear_reference(x_codes, token_scale[:, 0], weight8, scale, bias, x.dtype)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], n)
    assert torch.equal(acc.double(), expected_acc), f"int32 sums differ in {(acc.double() != expected_acc).sum()}"
    error = (out.float() - expected.float()).abs()
    tolerance = numerics.output_tolerance(expected, expected_acc, token_scale, scale)
    assert not out.isnan().any() and bool((error <= tolerance).all()), f"max error {error.max().item():.3g}"


# ------------------------------------------------------------------------------------- activation quantization


@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("branch,m,k", QUANT_CASES)
def test_quantize_per_token_branch(branch, m, k, dtype):
    from qqq.kernels_triton.activation_quant import quantize_per_token

    x = _random_rows(m, k, dtype, torch.Generator(device="cuda").manual_seed(m + k))
    with branches.recording() as taken:
        codes, scale = quantize_per_token(x)
    _assert_branch(taken, "quantize_per_token", branch)
    expected_codes, expected_scale = numerics.quantize_per_token(x)
    assert torch.equal(scale, expected_scale[:, 0]) and torch.equal(codes, expected_codes)


# ------------------------------------------------------------------------------------- W4A8 GEMM


@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path,group_size,clamp", GEMM_CASES)
def test_w4a8_gemm_branch(path, group_size, clamp, dtype, precompiled):
    config = GEMM_PATH_CONFIGS[path](group_size)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for m in _gemm_path_ms(path):
        with branches.recording() as taken:
            _check_w4a8(_random_rows(m, 8192, dtype, generator), 1000, group_size, config, clamp)
        _assert_branch(taken, "w4a8_gemm", _gemm_branch(path, group_size, clamp))


@compiled_kernels
@pytest.mark.parametrize("path,group_size", SILU_MUL_CASES)
def test_w4a8_silu_mul_epilogue_branch(path, group_size):
    """Gate/up rows alternating: the epilogue's SiLU(gate) * up equals the SiLU*up producer on the same path's
    plain outputs (which ``test_w4a8_gemm_branch`` checks against the spec)."""
    from qqq.fast.projections import halves_of_alternating_channels
    from qqq.kernels_triton.activation_quant import quantize_per_token
    from qqq.kernels_triton.fused_producers import silu_mul_quantize
    from qqq.kernels_triton.w4a8_gemm import w4a8_gemm

    qweight, _, scale, ratio, bias = _weights(1000, 8192, group_size)
    config = GEMM_PATH_CONFIGS[path](group_size)
    generator = torch.Generator(device="cuda").manual_seed(5)
    for m in _gemm_path_ms(path):
        a_codes, a_scale = quantize_per_token(_random_rows(m, 8192, torch.float16, generator))
        args = (a_codes, a_scale, qweight, scale, ratio, bias.half(), group_size, torch.float16)
        outputs = w4a8_gemm(*args, config=config, ratios_fit_int8=group_size != -1)
        with branches.recording() as taken:
            gated = w4a8_gemm(*args, config=config, ratios_fit_int8=group_size != -1, silu_mul=True)
        _assert_branch(taken, "w4a8_gemm", f"silu_mul/{path}")
        expected = silu_mul_quantize(halves_of_alternating_channels(outputs), quantize=False)
        assert gated.shape == (m, 500) and torch.equal(gated, expected), \
            f"M={m}: {(gated != expected).sum().item()} of {expected.numel()} differ"


@compiled_kernels
@pytest.mark.parametrize("group_size", [-1, 128])
def test_streaming_split_k_with_an_empty_split(group_size):
    """K = 1280 is 5 tiles of 256: 4 splits of 2 tiles leave the last split none (it must read nothing past K)."""
    generator = torch.Generator(device="cuda").manual_seed(4)
    for m in (1, 2):
        _check_w4a8(_random_rows(m, 1280, torch.float16, generator), 1000, group_size, _streaming_config(split_k=4))


@compiled_kernels
def test_streaming_per_group_with_an_odd_number_of_groups():
    """K = 1280 in groups of 256: 5 ratios per row, so the streaming kernel reads them 16 bits each, not as words."""
    generator = torch.Generator(device="cuda").manual_seed(13)
    for m in (1, 2):
        _check_w4a8(_random_rows(m, 1280, torch.float16, generator), 1000, 256, _streaming_config())


@compiled_kernels
@pytest.mark.parametrize("group_size", [-1, 128])
def test_w4a8_linear_takes_fp32_input_on_the_gpu(group_size):
    generator = torch.Generator(device="cuda").manual_seed(2)
    for m in (1, 300):
        _check_w4a8(_random_rows(m, 4096, torch.float32, generator), 640, group_size)


@triton.jit
def _lookup_formulations(words_ptr, ratio_ptr, out_ptr, N: tl.constexpr, USE_ASM: tl.constexpr):
    """``byte_permute`` of random words and selectors and ``group_tables`` of the ratios, in one formulation."""
    offs = tl.arange(0, N)
    words = tl.load(words_ptr + offs)
    tables = group_tables(tl.load(ratio_ptr + offs), USE_ASM)
    tl.store(out_ptr + offs, byte_permute(words, words * 7 + 1, words >> 9, USE_ASM))
    for i in tl.static_range(4):
        tl.store(out_ptr + (i + 1) * N + offs, tables[i])


@compiled_kernels
def test_prmt_lookup_ptx_matches_its_plain_formulation():
    """The PTX of the per-group lookup (``prmt``, the f16x2 tables) against the plain Triton ops the CPU suite
    checks, bit for bit, compiled on the GPU: random words and selectors (the sign-replicating fields and the
    ignored high half included), and ratios from 0 past the int8 edge to fp16's largest."""
    n = 4096
    generator = torch.Generator(device="cuda").manual_seed(11)
    words = torch.randint(-2**31, 2**31 - 1, (n,), device="cuda", generator=generator, dtype=torch.int64)
    edges = torch.tensor([0.0, 2.0**-24, 1 / 64, 1 / 3, 15.875, 15.9, 17.0, 18.0, 1000.0, 65504.0], device="cuda")
    ratios = torch.cat([edges, torch.rand(n - len(edges), device="cuda", generator=generator) * 20]).half()
    outputs = []
    for use_asm in (True, False):
        out = torch.empty(5 * n, dtype=torch.int32, device="cuda")
        _lookup_formulations[(1,)](words.to(torch.int32), ratios, out, N=n, USE_ASM=use_asm)
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])


def _int8_edge_weights(n, k, group_size, generator):
    """Codes and fp16 ratios at the int8 edge, row by row: ratios past it (clamped by the spec), ratios rounding
    every weight to 0, and codes without 0 under a ratio only their own products fit."""
    codes = torch.randint(0, 16, (n, k), device="cuda", generator=generator).to(torch.uint8)
    ratio = torch.tensor([[127 / 8], [15.9], [17.0], [1 / 3], [1 / 64], [0.0], [2.5], [18.0]], device="cuda")
    ratio = ratio.repeat(n // 8, k // group_size).half()
    codes[7::8] = codes[7::8].clamp(min=1)  # the rows of ratio 18: 7 * 18 fits int8, 8 * 18 does not
    return codes, ratio


@compiled_kernels
@pytest.mark.parametrize("path", ["fused", "split_k", "prefetch", "fused_ws", "fused_ws_split_k"])
@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_tensor_core_per_group_lookup_at_the_int8_edge(path, group_size):
    """The tensor-core paths with groups of 64 or more (the Gluon converter looks the codes up in group tables, the
    fused Triton kernel converts by FusedDequantQuant), on the weights of ``_int8_edge_weights``, clamped as the spec
    clamps: the int32 sums exactly."""
    from qqq.kernels_triton.w4a8_gemm import w4a8_linear

    generator = torch.Generator(device="cuda").manual_seed(13)
    n, k = 1024, 2048
    codes, ratio = _int8_edge_weights(n, k, group_size, generator)
    weight8 = numerics.int8_weight(codes, ratio)
    for m in _gemm_path_ms(path):
        x = _random_rows(m, k, torch.float16, generator)
        with branches.recording() as taken:
            _, acc = w4a8_linear(x, pack_int4(codes), torch.rand(n, device="cuda") + 0.5, ratio, None, group_size,
                                 config=GEMM_PATH_CONFIGS[path](group_size), return_acc=True)
        _assert_branch(taken, "w4a8_gemm", _gemm_branch(path, group_size, True))
        expected = numerics.int8_matmul_exact(numerics.quantize_per_token(x)[0], weight8)
        assert torch.equal(acc.double(), expected), f"M={m}: {(acc.double() != expected).sum()} sums differ"


@compiled_kernels
@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_streaming_per_group_lookup_at_the_int8_edge_on_the_gpu(group_size):
    """As the CPU test of that name, at a real width: ratios past the int8 edge (clamped by the spec), ratios
    rounding every weight to 0, and codes without 0 under a ratio only their own products fit."""
    from qqq.kernels_triton.w4a8_gemm import w4a8_linear

    generator = torch.Generator(device="cuda").manual_seed(12)
    n, k = 4096, 4096
    codes, ratio = _int8_edge_weights(n, k, group_size, generator)
    x = _random_rows(2, k, torch.float16, generator)
    x_codes, _ = numerics.quantize_per_token(x)
    expected = numerics.int8_matmul_exact(x_codes, numerics.int8_weight(codes, ratio))
    for split_k in (1, 4):
        for m in (1, 2):
            _, acc = w4a8_linear(x[:m], pack_int4(codes), torch.rand(n, device="cuda") + 0.5, ratio, None,
                                 group_size, config=_streaming_config(split_k), return_acc=True)
            assert torch.equal(acc.double(), expected[:m])
    products = (codes.float() - 8) * ratio.float().repeat_interleave(group_size, dim=1)
    fits = products.abs().amax(dim=1) < 127.5  # the rows without the clamped ratio 17
    assert 0 < fits.sum() < n
    _, acc = w4a8_linear(x[:1], pack_int4(codes[fits]), torch.rand(int(fits.sum()), device="cuda") + 0.5,
                         ratio[fits], None, group_size, config=_streaming_config(), return_acc=True,
                         ratios_fit_int8=True)
    assert torch.equal(acc.double(), expected[:1, fits])


REAL_WIDTH_M = (1, 2, 16, 128, 1024, 4096)


@compiled_kernels
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("name,n,k", config_table.LLAMA_GEMM_SHAPES)
def test_w4a8_linear_at_real_widths(name, n, k, group_size, precompiled):
    """The configs users run (this GPU's tuned file, a same-chip GPU's, or the heuristic) at every real width:
    fp16 at every M, bf16 at the decode and prefill ends."""
    generator = torch.Generator(device="cuda").manual_seed(3)
    for m in REAL_WIDTH_M:
        for dtype in (torch.float16, torch.bfloat16) if m in (1, 4096) else (torch.float16,):
            _check_w4a8(_random_rows(m, k, dtype, generator), n, group_size)


def _shipped_configs():
    """Every distinct (kernel, group size, config) of the shipped config files, with one shape it was tuned for."""
    seen = {}
    for path in sorted(config_table.CONFIG_DIR.glob("*.json")):
        for key, config in json.loads(path.read_text())["configs"].items():
            kernel, n, k, g, bucket = (part.split("=")[-1] for part in key.split("|"))
            config = {c: config.get(c, config_table.OPTIONAL_KEYS.get(c)) for c in config_table.CONFIG_KEYS}
            signature = (kernel, int(g)) + tuple(config.values())
            seen.setdefault(signature, (kernel, int(n), int(k), int(g), int(bucket), config))
    return list(seen.values())


@pytest.fixture(scope="module")
def precompiled(tmp_path_factory):
    """Compile the GEMM configs of this file (fp16) in parallel processes into Triton's disk cache first, so the
    suite takes minutes, not a serial compile of each. Under pytest-xdist one worker compiles while the others
    wait for it (a file lock), then find every kernel in the cache instead of compiling them all again."""
    jobs = [(kernel, n, k, g, min(bucket, 64), config) for kernel, n, k, g, bucket, config in _shipped_configs()]
    for _, n, k in config_table.LLAMA_GEMM_SHAPES:
        for g in (-1, 128):
            kernel = "w4a8" if g == -1 else "w4a8_group"
            jobs += [(kernel, n, k, g, m, config_table.get_config(kernel, m, n, k, g)) for m in REAL_WIDTH_M]
    jobs += [("w4a8" if g == -1 else "w4a8_group", 1000, 8192, g, 33, GEMM_PATH_CONFIGS[path](g))
             for path, g, _ in GEMM_CASES]
    with FileLock(str(tmp_path_factory.getbasetemp().parent / "qqq_precompile.lock")):
        autotune.precompile(jobs)


@compiled_kernels
def test_every_shipped_config_compiles_and_matches(precompiled):
    from qqq.kernels_triton.baselines import w4a16_linear, w8a8_gemm

    generator = torch.Generator(device="cuda").manual_seed(4)
    for kernel, n, k, g, bucket, config in _shipped_configs():
        m = min(bucket, 64)
        x = _random_rows(m, k, torch.float16, generator)
        if kernel in ("w4a8", "w4a8_group"):
            _check_w4a8(x, n, g, config)
            continue
        qweight, weight8, scale, _, bias = _weights(n, k, -1)
        if kernel == "w8a8":
            x_codes, token_scale = numerics.quantize_per_token(x)
            got = w8a8_gemm(x_codes, token_scale[:, 0], weight8, scale, None, torch.float16, config=config)
            expected = numerics.int8_linear_reference(x_codes, token_scale[:, 0], weight8, scale, None, x.dtype)
            torch.testing.assert_close(got, expected, rtol=2.0**-10, atol=1e-6)
        else:
            got = w4a16_linear(x, qweight, scale, config=config)
            expected = torch.nn.functional.linear(x.float(), weight8.float() * scale[:, None])
            torch.testing.assert_close(got.float(), expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


# ------------------------------------------------------------------------------------- baselines


@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_baseline_branches(dtype):
    from qqq.kernels_triton.baselines import w4a16_linear, w8a8_linear

    generator = torch.Generator(device="cuda").manual_seed(5)
    qweight, weight8, scale, _, bias = _weights(1000, 4096, -1)
    for m in (1, 33, 300):
        x = _random_rows(m, 4096, dtype, generator)
        with branches.recording() as taken:
            got8 = w8a8_linear(x, weight8, scale, bias.to(dtype))
            got4 = w4a16_linear(x, qweight, scale, bias.to(dtype))
        _assert_branch(taken, "w8a8_gemm", "int8_gemm")
        _assert_branch(taken, "w4a16_linear", "w4a16")
        x_codes, token_scale = numerics.quantize_per_token(x)
        expected8 = numerics.int8_linear_reference(x_codes, token_scale[:, 0], weight8, scale, bias.to(dtype), dtype)
        ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
        torch.testing.assert_close(got8.float(), expected8.float(), rtol=ulp, atol=1e-6)
        expected4 = torch.nn.functional.linear(x.float(), weight8.float() * scale[:, None], bias.float())
        torch.testing.assert_close(got4.float(), expected4, rtol=0, atol=1e-2 * float(expected4.abs().max()))


@compiled_kernels
@pytest.mark.parametrize("kernel", list(W8A8_KERNEL_CONFIGS))
def test_w8a8_silu_mul_epilogue_branch(kernel):
    """As for W4A8: the epilogue's SiLU(gate) * up is the SiLU*up producer on the GEMM's plain outputs (pointer-fed
    with the default config, the persistent TMA kernel, the warp-specialized one per tile and per SM)."""
    from qqq.fast.projections import halves_of_alternating_channels
    from qqq.kernels_triton.activation_quant import quantize_per_token
    from qqq.kernels_triton.baselines import w8a8_gemm
    from qqq.kernels_triton.fused_producers import silu_mul_quantize

    generator = torch.Generator(device="cuda").manual_seed(6)
    _, weight8, scale, _, bias = _weights(1000, 4096, -1)
    config = W8A8_KERNEL_CONFIGS[kernel]
    for m in TMA_MS if config else (1, 33, 300):
        a_codes, a_scale = quantize_per_token(_random_rows(m, 4096, torch.float16, generator))
        outputs = w8a8_gemm(a_codes, a_scale, weight8, scale, bias.half(), torch.float16, config=config)
        with branches.recording() as taken:
            gated = w8a8_gemm(a_codes, a_scale, weight8, scale, bias.half(), torch.float16, config=config,
                              silu_mul=True)
        _assert_branch(taken, "w8a8_gemm", kernel.split("/")[0] + "+silu_mul")
        expected = silu_mul_quantize(halves_of_alternating_channels(outputs), quantize=False)
        assert gated.shape == (m, 500) and torch.equal(gated, expected)


@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["int8_gemm_tma", "int8_gemm_ws", "int8_gemm_ws/persistent"])
def test_w8a8_tma_branch(kernel, dtype):
    """The TMA-fed int8 GEMMs (persistent; warp-specialized, per tile and per SM) against the reference, from one
    tile to two per program, rows past M and N read as zeros by the copies."""
    from qqq.kernels_triton.baselines import w8a8_gemm

    generator = torch.Generator(device="cuda").manual_seed(7)
    _, weight8, scale, _, bias = _weights(1000, 4096, -1)
    for m in TMA_MS:
        x_codes, token_scale = numerics.quantize_per_token(_random_rows(m, 4096, dtype, generator))
        with branches.recording() as taken:
            got = w8a8_gemm(x_codes, token_scale[:, 0], weight8, scale, bias.to(dtype), dtype,
                            config=W8A8_KERNEL_CONFIGS[kernel])
        _assert_branch(taken, "w8a8_gemm", kernel.split("/")[0])
        expected = numerics.int8_linear_reference(x_codes, token_scale[:, 0], weight8, scale, bias.to(dtype), dtype)
        ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
        torch.testing.assert_close(got.float(), expected.float(), rtol=ulp, atol=1e-6)


# ------------------------------------------------------------------------------------- fused producers, attention


@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("launcher,rows,residual,out", PRODUCER_CASES)
def test_fused_producer_branch(launcher, rows, residual, out, dtype):
    from qqq.fast.producers import rmsnorm_reference, silu_mul_reference
    from qqq.kernels_triton.fused_producers import rmsnorm_quantize, silu_mul_quantize

    m = 1 if rows == "chunked" else 300
    quantize = out == "int8"
    generator = torch.Generator(device="cuda").manual_seed(6)
    for width in PRODUCER_WIDTHS[launcher]:
        if launcher == "rmsnorm_quantize":
            x = _random_rows(m, width, dtype, generator)
            weight = (torch.rand(width, device="cuda", generator=generator) + 0.5).to(dtype)
            extra = _random_rows(m, width, dtype, generator) if residual else None
            with branches.recording() as taken:
                got = rmsnorm_quantize(x, weight, 1e-5, extra, quantize=quantize)
            expected = rmsnorm_reference(x, weight, 1e-5, extra, quantize=quantize)
            if residual:
                (got, got_h), (expected, expected_h) = got, expected
                assert torch.equal(got_h, expected_h)  # one rounded add
        else:
            x = _random_rows(m, 2 * width, dtype, generator, scale=2.0)
            with branches.recording() as taken:
                got = silu_mul_quantize(x, quantize=quantize)
            expected = silu_mul_reference(x, quantize)
        _assert_branch(taken, launcher, f"{rows}{'+residual' if residual else ''}+{out}")
        if quantize:  # a last-ulp difference in the normalization may move a code by one
            codes, scale = got
            torch.testing.assert_close(scale, expected.scale, rtol=1e-2, atol=0)
            difference = (codes.int() - expected.codes.int()).abs()
            assert difference.max() <= 2 and (difference == 0).float().mean() > 0.98
        else:
            rtol = 2e-3 if dtype == torch.float16 else 2e-2
            torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-3)


@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 37])
def test_rope_into_cache_at_llama_sizes(t, dtype):
    from qqq.fast.producers import rope_into_cache_reference
    from qqq.kernels_triton.fused_producers import rope_into_cache

    batch, heads, kv_heads, head_dim, capacity = 3, 32, 8, 128, 64
    generator = torch.Generator(device="cuda").manual_seed(7)
    qkv = _random_rows(batch * t, (heads + 2 * kv_heads) * head_dim, dtype, generator).reshape(batch, t, -1)
    angles = torch.arange(capacity, device="cuda")[:, None] * 10000.0 ** (
        -torch.arange(head_dim // 2, device="cuda")[None, :] / (head_dim // 2))
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    positions = (torch.arange(t, device="cuda") + 5).expand(batch, t)
    caches = [torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device="cuda") for _ in range(4)]
    with branches.recording() as taken:
        q = rope_into_cache(qkv, cos, sin, positions, caches[0], caches[1], heads)
    _assert_branch(taken, "rope_into_cache", "rope")
    q_ref = rope_into_cache_reference(qkv, cos, sin, positions, caches[2], caches[3], heads)
    rtol = 1e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(q, q_ref, rtol=rtol, atol=1e-3)
    torch.testing.assert_close(caches[0], caches[2], rtol=rtol, atol=1e-3)
    assert torch.equal(caches[1], caches[3])  # v is copied


@compiled_kernels
@pytest.mark.parametrize("batch,heads,kv_heads,dtype", [(1, 32, 32, torch.float16), (5, 8, 2, torch.float16),
                                                         (64, 32, 8, torch.float16), (3, 28, 4, torch.bfloat16)])
def test_decode_attention_matches_masked_sdpa(batch, heads, kv_heads, dtype):
    from qqq.kernels_triton.decode_attention import decode_attention

    generator = torch.Generator(device="cuda").manual_seed(8)
    capacity = 1152
    q = torch.randn(batch, heads, 1, 128, device="cuda", generator=generator).to(dtype)
    k, v = (torch.randn(batch, kv_heads, capacity, 128, device="cuda", generator=generator).to(dtype)
            for _ in range(2))
    positions = torch.randint(0, capacity, (batch,), device="cuda", generator=generator)
    positions[0] = capacity - 1
    visible = torch.arange(capacity, device="cuda")[None, :] <= positions[:, None]
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(repeat, 1), v.float().repeat_interleave(repeat, 1),
        attn_mask=visible[:, None, None, :])
    with branches.recording() as taken:
        got = decode_attention(q, k, v, positions)
    _assert_branch(taken, "decode_attention", "split_kv")
    tolerance = 2e-3 if dtype == torch.float16 else 1e-2  # bf16: the output's own rounding is 2**-9
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,start", [(37, 0), (1, 1500)])
def test_rope_into_int8_cache_matches_the_reference_on_cuda(dtype, t, start):
    from qqq.fast.producers import rope_into_cache_reference
    from qqq.kernels_triton.fused_producers import rope_into_cache

    batch, heads, kv_heads, head_dim, capacity = 3, 32, 8, 128, 2048
    torch.manual_seed(0)
    qkv = (torch.randn(batch, t, (heads + 2 * kv_heads) * head_dim, device="cuda") * 3).to(dtype)
    angles = torch.arange(capacity, device="cuda")[:, None] * 10000.0 ** (-torch.arange(head_dim // 2, device="cuda")
                                                                          / (head_dim // 2))
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    positions = (torch.arange(t, device="cuda") + start).expand(batch, t)
    caches = [torch.zeros(batch, kv_heads, capacity, head_dim, dtype=torch.int8, device="cuda") for _ in range(4)]
    scales = [torch.zeros(batch, kv_heads, capacity, device="cuda") for _ in range(4)]
    with branches.recording() as taken:
        q = rope_into_cache(qkv, cos, sin, positions, caches[0], caches[1], heads, scales[0], scales[1])
    _assert_branch(taken, "rope_into_cache", "rope_int8")
    q_ref = rope_into_cache_reference(qkv, cos, sin, positions, caches[2], caches[3], heads, scales[2], scales[3])
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(caches[1], caches[3]) and torch.equal(scales[1], scales[3])  # v: copied, then quantized
    torch.testing.assert_close(scales[0], scales[2], rtol=1e-2, atol=0)
    assert (caches[0].int() - caches[2].int()).abs().max() <= 2
    assert (caches[0] == caches[2]).float().mean() > 0.98


@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_cache_is_the_reference_exactly_on_cuda(dtype):
    """A prefill's read of an 8-bit cache at Llama-2 sizes (the first 1000 of 1030 positions, 3 x 32 heads of
    128): bit for bit what ``dequantized`` (torch's fp32 product, rounded once) gives."""
    from qqq.fast.attention import dequantized
    from qqq.kernels_triton.fused_producers import dequantize_cache

    generator = torch.Generator(device="cuda").manual_seed(11)
    codes = torch.randint(-127, 128, (3, 32, 1030, 128), dtype=torch.int8, device="cuda", generator=generator)
    scale = torch.rand(3, 32, 1030, device="cuda", generator=generator) / 50
    with branches.recording() as taken:
        got = dequantize_cache(codes[:, :, :1000], scale[:, :, :1000], dtype)
    _assert_branch(taken, "dequantize_cache", "int8")
    assert torch.equal(got, dequantized(codes[:, :, :1000], scale[:, :, :1000], dtype))


@compiled_kernels
@pytest.mark.parametrize("int8_ptx", [True, False])
@pytest.mark.parametrize("batch,heads,kv_heads,capacity", [(1, 32, 32, 4096), (5, 32, 8, 1153), (16, 8, 2, 1030),
                                                            (3, 28, 4, 777)])
def test_decode_attention_over_an_int8_cache_matches_the_reference_on_cuda(batch, heads, kv_heads, capacity,
                                                                            int8_ptx):
    from qqq.fast.attention import decode_attention_reference
    from qqq.kernels_triton.decode_attention import decode_attention, default_config

    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, 128, device="cuda").half()
    k, v = (torch.randn(batch, kv_heads, capacity, 128, device="cuda") for _ in range(2))
    (k_codes, k_scale), (v_codes, v_scale) = numerics.quantize_per_token(k), numerics.quantize_per_token(v)
    positions = torch.randint(0, capacity, (batch,), device="cuda")
    positions[0] = capacity - 1
    cache = (k_codes, v_codes, positions, k_scale[..., 0], v_scale[..., 0])
    expected = decode_attention_reference(q, *cache).float()
    with branches.recording() as taken:
        got = decode_attention(q, *cache, config={**default_config(True), "int8_ptx": int8_ptx})
    _assert_branch(taken, "decode_attention", "split_kv_int8")
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


@compiled_kernels
@pytest.mark.parametrize("batch,heads,kv_heads,capacity,branch", [
    (16, 32, 32, 1030, "slots_int8_scores"), (1, 32, 32, 4096, "slots_int8_scores"), (1, 32, 32, 1024, "split_kv_int8"),
    (16, 32, 8, 1030, "split_kv_int8")])
def test_the_default_decode_launch_over_an_int8_cache_on_cuda(batch, heads, kv_heads, capacity, branch):
    """No config: the launch chosen for the cache's size and GQA group, against the reference (which, as every
    kernel over an 8-bit cache, rounds the query per head)."""
    from qqq.fast.attention import decode_attention_reference
    from qqq.kernels_triton.decode_attention import decode_attention

    generator = torch.Generator(device="cuda").manual_seed(capacity)
    q = torch.randn(batch, heads, 1, 128, device="cuda", generator=generator).half()
    k, v = (torch.randn(batch, kv_heads, capacity, 128, device="cuda", generator=generator) for _ in range(2))
    (k_codes, k_scale), (v_codes, v_scale) = numerics.quantize_per_token(k), numerics.quantize_per_token(v)
    positions = torch.randint(0, capacity, (batch,), device="cuda", generator=generator)
    positions[0] = capacity - 1
    cache = (k_codes, v_codes, positions, k_scale[..., 0], v_scale[..., 0])
    with branches.recording() as taken:
        got = decode_attention(q, *cache)
    _assert_branch(taken, "decode_attention", branch)
    torch.testing.assert_close(got.float(), decode_attention_reference(q, *cache).float(), rtol=2e-3, atol=2e-3)
    on_grid = numerics.fake_quantize_per_token(q)  # the fast path's query, as rope_into_cache writes it
    got = decode_attention(on_grid, *cache, query_on_grid=True)
    torch.testing.assert_close(got.float(), decode_attention_reference(on_grid, *cache).float(), rtol=2e-3, atol=2e-3)


@compiled_kernels
@pytest.mark.parametrize("kv_bits", [16, 8])
@pytest.mark.parametrize("block_n,num_warps,num_stages", [(16, 4, 2), (32, 4, 3), (64, 8, 4)])
@pytest.mark.parametrize("batch,heads,kv_heads,capacity", [(1, 32, 32, 4096), (64, 32, 32, 1030), (3, 28, 4, 777)])
def test_decode_attention_on_cuda_cores_matches_the_reference(batch, heads, kv_heads, capacity, block_n, num_warps,
                                                              num_stages, kv_bits):
    """The CUDA-core kernel (one query head per program, a softmax per key slot), both caches, MHA and GQA."""
    from qqq.fast.attention import decode_attention_reference
    from qqq.kernels_triton.decode_attention import decode_attention, default_config

    generator = torch.Generator(device="cuda").manual_seed(block_n)
    q = torch.randn(batch, heads, 1, 128, device="cuda", generator=generator).half()
    k, v = (torch.randn(batch, kv_heads, capacity, 128, device="cuda", generator=generator) for _ in range(2))
    positions = torch.randint(0, capacity, (batch,), device="cuda", generator=generator)
    positions[0] = capacity - 1
    if kv_bits == 8:
        (k_codes, k_scale), (v_codes, v_scale) = numerics.quantize_per_token(k), numerics.quantize_per_token(v)
        cache = (k_codes, v_codes, positions, k_scale[..., 0], v_scale[..., 0])
    else:
        cache = (k.half(), v.half(), positions)
    expected = decode_attention_reference(q, *cache).float()
    config = {**default_config(kv_bits == 8), "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages,
              "slots": True}
    with branches.recording() as taken:
        got = decode_attention(q, *cache, config=config)
    _assert_branch(taken, "decode_attention", "slots_int8" if kv_bits == 8 else "slots")
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)
    if kv_bits == 8:  # the scores as int32 sums of the query rounded per head
        with branches.recording() as taken:
            got = decode_attention(q, *cache, config={**config, "int8_scores": True})
        _assert_branch(taken, "decode_attention", "slots_int8_scores")
        expected = decode_attention_reference(numerics.fake_quantize_per_token(q.float()), *cache).float()
        torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=2e-3)


@compiled_kernels
@pytest.mark.parametrize("batch,vocab,dtype", [(1, 32000, torch.float16), (64, 32000, torch.float16),
                                               (3, 128256, torch.bfloat16), (2, 77, torch.float32)])
def test_greedy_step_matches_argmax_on_cuda(batch, vocab, dtype):
    """Logits from a small integer range, so each row holds its maximum many times: the first index must win."""
    from qqq.fast.generation import greedy_step_reference
    from qqq.kernels_triton.greedy import greedy_step

    generator = torch.Generator(device="cuda").manual_seed(vocab)
    logits = torch.randint(-50, 8, (batch, vocab), device="cuda", generator=generator).to(dtype)
    capacity = 40
    position = torch.randint(0, capacity, (batch, 1), device="cuda", generator=generator)
    got = (torch.zeros(batch, 1, dtype=torch.long, device="cuda"), position,
           torch.zeros(batch, capacity, dtype=torch.long, device="cuda"), torch.tensor([capacity - 1], device="cuda"))
    expected = tuple(t.clone() for t in got)
    with branches.recording() as taken:
        greedy_step(logits, *got)
    _assert_branch(taken, "greedy_step", "greedy_step")
    greedy_step_reference(logits, *expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
