"""The Triton W4A8 kernels under TRITON_INTERPRET=1 (see conftest.py) against qqq.numerics."""

import pytest
import torch
from conftest import interpreted_kernels

from qqq import numerics
from qqq.fast.projections import halves_of_alternating_channels
from qqq.kernels_triton import autotune, branches, config_table
from qqq.kernels_triton.activation_quant import quantize_per_token
from qqq.kernels_triton.baselines import w4a16_linear, w8a8_gemm, w8a8_linear
from qqq.kernels_triton.packing import pack_int4, unpack_int4
from qqq.kernels_triton.fused_producers import silu_mul_quantize
from qqq.kernels_triton.w4a8_gemm import launch_path, w4a8_gemm, w4a8_linear
from qqq.linear import QQQLinear

pytestmark = interpreted_kernels


def make_layer(n, k, group_size, seed=0):
    return numerics.random_quantized_weight(n, k, group_size, torch.Generator().manual_seed(seed))


def config(block_n=32, block_m=16, block_k=64, split_k=1, stages=2, dequant=0):
    return dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=split_k, GROUP_N=2, num_warps=4,
                num_stages=stages, DEQUANT=dequant)


def fp16_tolerance(ref):
    """One fp16 rounding step of the reference (relative 2**-10) plus a tiny absolute floor."""
    return ref.abs() * 2.0**-10 + 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_pack_roundtrip(signed):
    gen = torch.Generator().manual_seed(1)
    if signed:
        codes = torch.randint(-8, 8, (5, 192), generator=gen).to(torch.int8)
    else:
        codes = torch.randint(0, 16, (5, 192), generator=gen).to(torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 96)
    assert torch.equal(unpack_int4(packed, 192, signed), codes)
    # byte j of chunk c holds column 64c + j (low nibble) and 64c + 32 + j (high nibble)
    assert int(packed[0, 33]) == (int(codes[0, 65]) & 0xF) | ((int(codes[0, 97]) & 0xF) << 4)


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_int4(torch.zeros(4, 96, dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(4, 64, dtype=torch.int32))


@pytest.mark.parametrize("m,k,dtype", [(1, 64, torch.float16), (3, 200, torch.bfloat16), (17, 96, torch.float32)])
def test_quantize_per_token_matches_numerics(m, k, dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    x[0, :] = 0  # an all-zero row: scale 0, codes 0, no NaN
    codes, scales = quantize_per_token(x)
    ref_codes, ref_scales = numerics.quantize_per_token(x)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales[:, 0])
    assert scales[0] == 0 and not torch.isnan(scales).any()


def test_quantize_per_token_cuts_decode_rows_into_chunks():
    """A few rows of 4096 to MAX_SINGLE_PASS_K (a decode step's o_proj input) are cut into chunks too."""
    x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(4)).half()
    x[0, 17] = 40.0  # the row's maximum lies in one chunk; every chunk must use it
    with branches.recording() as taken:
        codes, scales = quantize_per_token(x)
    assert taken == {("quantize_per_token", "chunked")}
    ref_codes, ref_scales = numerics.quantize_per_token(x)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales[:, 0])


@pytest.mark.parametrize("few_rows", [0, 128])  # 0: two passes per row; 128: rows cut into chunks (decode)
def test_quantize_per_token_long_rows(monkeypatch, few_rows):
    from qqq.kernels_triton import activation_quant

    monkeypatch.setattr(activation_quant, "MAX_SINGLE_PASS_K", 64)
    monkeypatch.setattr(activation_quant, "TWO_PASS_BLOCK_K", 64)
    monkeypatch.setattr(activation_quant, "FEW_ROWS", few_rows)
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(3)).half()
    x[1] = 0
    codes, scales = quantize_per_token(x)
    ref_codes, ref_scales = numerics.quantize_per_token(x)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales[:, 0])


CASES = [  # (M, N, K, group_size, config)
    (1, 48, 128, -1, config()),
    (3, 64, 192, -1, config(block_k=64, split_k=3)),
    (17, 80, 256, -1, config(block_n=64, block_m=16, block_k=128, split_k=2)),
    (64, 32, 128, -1, config(block_n=32, block_m=32, block_k=128)),
    (3, 40, 128, 32, config(block_k=64, split_k=2)),
    (17, 64, 256, 64, config(block_k=64)),
    (17, 64, 256, 64, dict(config(block_k=64, split_k=2), PREFETCH=1)),
    (5, 32, 256, 32, dict(config(block_k=64), PREFETCH=1)),
    (1, 64, 256, 128, config(block_k=128, split_k=2)),
    (64, 48, 256, 128, config(block_m=64, block_k=128)),
    (3, 32, 512, 256, config(block_k=256, split_k=2)),
    (17, 32, 512, 256, None),
    # wide tiles: 2 or 4 groups per K tile
    (3, 48, 512, 128, config(block_k=256)),
    (17, 32, 512, 64, config(block_k=256, split_k=2)),
    (5, 32, 1024, 256, config(block_k=512)),
    # the streaming decode kernel (CUDA-core dp4a), with and without split-K, every group size
    (1, 40, 128, -1, dict(config(block_k=64), GEMV=1)),
    (3, 33, 256, -1, dict(config(block_n=16, block_k=64, split_k=2), GEMV=1)),
    (1, 24, 256, 32, dict(config(block_n=16, block_k=64), GEMV=1)),
    (5, 24, 256, 64, dict(config(block_n=16, block_k=128, split_k=2), GEMV=1)),
    (2, 20, 512, 128, dict(config(block_n=16, block_k=128), GEMV=1)),
    (1, 20, 512, 128, dict(config(block_n=16, block_k=256, split_k=2), GEMV=1)),
    (1, 24, 256, 64, dict(config(block_n=16, block_k=128), GEMV=1)),
    (1, 20, 384, 128, dict(config(block_n=16, block_k=128), GEMV=1)),  # 3 groups: the ratios read 16 bits each
    (16, 20, 512, 256, dict(config(block_n=16, block_k=64, split_k=4), GEMV=1)),
    (2, 24, 320, 64, dict(config(block_n=16, block_k=64, split_k=4), GEMV=1)),  # 5 tiles: the 4th split is empty
    (1, 24, 320, -1, dict(config(block_n=16, block_k=64, split_k=4), GEMV=1)),  # its first tile is read before the wait
    # the prefill path: dequantize to int8 once, then the plain int8 GEMM (any BLOCK_K, any group size)
    (64, 48, 256, -1, config(block_m=32, block_k=128, dequant=1)),
    (17, 40, 256, 32, config(block_k=128, dequant=1)),
    (3, 64, 512, 256, config(block_k=256, dequant=1)),
    # ... with the persistent TMA-fed int8 GEMM
    (64, 48, 256, -1, dict(config(block_m=32, block_k=128, dequant=1), TMA=1)),
    (17, 40, 256, 32, dict(config(block_k=128, dequant=1), TMA=1)),
    # ... asking for the warp-specialized Gluon kernel, which the interpreter cannot run: the TMA kernel's tiles
    (33, 80, 256, 64, dict(config(block_n=64, block_k=128, dequant=1), WS=2)),
]


@pytest.mark.parametrize("m,n,k,group_size,cfg", CASES)
def test_w4a8_matches_reference(m, n, k, group_size, cfg):
    codes, channel_scale, ratio = make_layer(n, k, group_size, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
    bias = torch.randn(n) if m % 2 else None
    x_codes, _ = numerics.quantize_per_token(x)
    ref_acc = numerics.int8_matmul_exact(x_codes, numerics.int8_weight(codes, ratio))
    ref = numerics.w4a8_linear_reference(x, codes, channel_scale, ratio, bias)
    # per-group: with the int8 clamp and without it (these weights' products fit int8, so both are exact)
    for fits in (False, True) if group_size != -1 else (False,):
        out, acc = w4a8_linear(x, pack_int4(codes), channel_scale, ratio, bias, group_size, config=cfg,
                               return_acc=True, ratios_fit_int8=fits)
        assert torch.equal(acc.double(), ref_acc)  # the int32 accumulation is exact
        assert torch.all((out - ref).abs() <= fp16_tolerance(ref))


SILU_MUL_CASES = [  # one per launch path and kernel
    (1, 48, 128, -1, config()),
    (3, 64, 192, -1, config(block_k=64, split_k=3)),
    (17, 64, 256, 64, dict(config(block_k=64, split_k=2), PREFETCH=1)),
    (3, 48, 512, 128, config(block_k=256)),
    (1, 40, 128, -1, dict(config(block_k=64), GEMV=1)),
    (5, 24, 256, 64, dict(config(block_n=16, block_k=128, split_k=2), GEMV=1)),
    (1, 20, 512, 128, dict(config(block_n=16, block_k=256, split_k=2), GEMV=1)),  # the lookup
    (64, 48, 256, -1, config(block_m=32, block_k=128, dequant=1)),
    (17, 40, 256, 32, config(block_k=128, dequant=1)),
    (17, 40, 256, 32, dict(config(block_k=128, dequant=1), TMA=1)),
]


@pytest.mark.parametrize("m,n,k,group_size,cfg", SILU_MUL_CASES)
def test_w4a8_silu_mul_epilogue_is_the_producer_on_the_outputs(m, n, k, group_size, cfg):
    """Gate/up rows alternating: the epilogue's SiLU(gate) * up is the SiLU*up producer run on the same kernel's
    plain outputs (each path: tensor cores, split-K, prefill, streaming, lookup)."""
    codes, channel_scale, ratio = make_layer(n, k, group_size, seed=m + n + k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).half()
    bias = torch.randn(n).half() if m % 2 else None
    a_codes, a_scale = quantize_per_token(x)
    args = (a_codes, a_scale, pack_int4(codes), channel_scale, ratio, bias, group_size, torch.float16)
    outputs = w4a8_gemm(*args, config=cfg, ratios_fit_int8=group_size != -1)
    with branches.recording() as taken:
        gated = w4a8_gemm(*args, config=cfg, ratios_fit_int8=group_size != -1, silu_mul=True)
    expected = silu_mul_quantize(halves_of_alternating_channels(outputs), quantize=False)
    assert gated.shape == (m, n // 2) and torch.equal(gated, expected)
    assert ("w4a8_gemm", f"silu_mul/{launch_path(cfg, group_size)}") in taken


@pytest.mark.parametrize("kernel,group_size,cfg", [
    ("w4a8", -1, config(block_k=64)), ("w4a8", -1, config(block_m=32, block_k=128, dequant=1)),
    ("w4a8_group", 64, config(block_k=128)), ("w8a8", -1, config(block_k=128)), ("w4a16", -1, config(block_k=128))])
def test_the_tuner_times_a_gate_up_shape_with_its_silu_mul_epilogue(kernel, group_size, cfg):
    """``autotune``'s problem for a fused gate/up shape runs the GEMM the W4A8 / W8A8 MLPs run: the SiLU*up epilogue
    on the same inputs' plain outputs ([M, N / 2]); W4A16 (FP16-activation MLPs keep the producer) ignores it."""
    problems = {}
    for silu_mul in (False, True):
        torch.manual_seed(5)
        problems[silu_mul] = autotune._problem(kernel, 33, 48, 256, group_size, 1, silu_mul=silu_mul, device="cpu")
    plain = problems[False](cfg, 0)
    with branches.recording() as taken:
        gated = problems[True](cfg, 0)
    if kernel == "w4a16":
        assert torch.equal(gated, plain)
        return
    assert gated.shape == (33, 24)
    assert torch.equal(gated, silu_mul_quantize(halves_of_alternating_channels(plain), quantize=False))
    if kernel != "w8a8":
        assert ("w4a8_gemm", f"silu_mul/{launch_path(cfg, group_size)}") in taken


def test_the_compile_worker_builds_each_problem_once_with_its_epilogue_flag(monkeypatch):
    """``autotune.precompile``'s worker, on jobs in its order (6 fields, or 7 with ``silu_mul``): one problem per
    (kernel, N, K, group, M, epilogue), built once with that epilogue, and every config run on it."""
    built, ran = [], []

    def problem(kernel, m, n, k, group_size, buffers, silu_mul=False):
        built.append((kernel, n, k, group_size, m, silu_mul))
        return lambda cfg, i: ran.append((built[-1], cfg["BLOCK_N"]))

    monkeypatch.setattr(autotune, "_problem", problem)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    jobs = [("w4a8", 64, 128, -1, 16, {"BLOCK_N": 32}, True), ("w4a8", 64, 128, -1, 16, {"BLOCK_N": 64}),
            ("w4a8", 64, 128, -1, 16, {"BLOCK_N": 64}, True), ("w8a8", 64, 128, -1, 16, {"BLOCK_N": 32}, False)]
    jobs = sorted((autotune.CompileJob(*job) for job in jobs), key=autotune._problem_first)
    assert autotune._compile_worker(jobs) == 0
    assert built == [("w4a8", 64, 128, -1, 16, False), ("w4a8", 64, 128, -1, 16, True),
                     ("w8a8", 64, 128, -1, 16, False)]
    assert ran == [(built[0], 64), (built[1], 32), (built[1], 64), (built[2], 32)]


def test_w4a8_silu_mul_needs_channel_pairs():
    codes, channel_scale, _ = make_layer(33, 128, -1)
    a_codes, a_scale = quantize_per_token(torch.randn(1, 128))
    with pytest.raises(ValueError, match="pairs"):
        w4a8_gemm(a_codes, a_scale, pack_int4(codes), channel_scale, None, None, -1, torch.float16, silu_mul=True)


def test_w4a8_half_precision_and_batched_input():
    codes, channel_scale, ratio = make_layer(64, 128, 64, seed=5)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(6)).half()
    out = w4a8_linear(x, pack_int4(codes), channel_scale, ratio, None, 64, config=config(block_k=64))
    assert out.shape == (2, 3, 64) and out.dtype == torch.float16
    ref = numerics.w4a8_linear_reference(x.reshape(6, 128), codes, channel_scale, ratio).reshape(2, 3, 64)
    assert torch.all((out.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-10 + 1e-3)


def test_w4a8_per_group_extreme_ratios_clamp_like_reference():
    # ratios that push |(q - 8) * r| to the int8 edge (and past it, where the reference clamps to +-127)
    codes = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(7)).to(torch.uint8)
    ratio = torch.tensor([[127 / 8], [15.9], [17.0], [1 / 3]]).repeat(8, 2).half()
    channel_scale = torch.rand(32) + 0.5
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    _, acc = w4a8_linear(x, pack_int4(codes), channel_scale, ratio, None, 32, config=config(), return_acc=True)
    x_codes, _ = numerics.quantize_per_token(x)
    assert torch.equal(acc.double(), numerics.int8_matmul_exact(x_codes, numerics.int8_weight(codes, ratio)))


@pytest.mark.parametrize("group_size", [64, 128])
def test_streaming_per_group_lookup_at_the_int8_edge(group_size):
    """The streaming kernel's per-group lookup tables: ratios whose products reach and pass the int8 edge (the
    reference clamps them), ratios small enough to round every weight to 0, and groups that lack the code 0,
    whose ratio makes 7 * r fit int8 but not 8 * r (``ratios_fit_int8`` holds, yet the table still has a byte
    for the absent code)."""
    gen = torch.Generator().manual_seed(9)
    n, k = 24, 512
    codes = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
    ratio = torch.tensor([[127 / 8], [15.9], [17.0], [1 / 3], [1 / 64], [0.0]]).repeat(n // 6, k // group_size).half()
    x = torch.randn(2, k, generator=gen)
    x_codes, _ = numerics.quantize_per_token(x)
    cfg = dict(config(block_n=16, block_k=256), GEMV=1)
    for m in (1, 2):
        _, acc = w4a8_linear(x[:m], pack_int4(codes), torch.rand(n) + 0.5, ratio, None, group_size, config=cfg,
                             return_acc=True)
        expected = numerics.int8_matmul_exact(x_codes[:m], numerics.int8_weight(codes, ratio))
        assert torch.equal(acc.double(), expected)
    without_zero = codes.clamp(min=1)
    fitting = torch.full_like(ratio, 18.0)  # 7 * 18 = 126, 8 * 18 = 144
    assert numerics.group_products_fit_int8(without_zero, fitting)
    _, acc = w4a8_linear(x[:1], pack_int4(without_zero), torch.rand(n) + 0.5, fitting, None, group_size,
                         config=cfg, return_acc=True, ratios_fit_int8=True)
    expected = numerics.int8_matmul_exact(x_codes[:1], numerics.int8_weight(without_zero, fitting))
    assert torch.equal(acc.double(), expected)


def test_qqq_linear_skips_the_clamp_only_when_its_ratios_allow_it():
    from qqq.linear import cached_ratios_fit_int8

    codes = torch.randint(0, 16, (32, 128), generator=torch.Generator().manual_seed(7)).to(torch.uint8)
    codes[:, 0] = 0  # q - 8 = -8 in every first group
    layer = QQQLinear(128, 32, group_size=64)
    layer.qweight = pack_int4(codes)
    layer.channel_scale = torch.rand(32) + 0.5
    layer.group_ratio = torch.full((32, 2), 17.0).half()  # 8 * 17 = 136: clamped to 127 by the spec
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(8))
    assert not cached_ratios_fit_int8(layer, layer.qweight, 128, 64, layer.group_ratio)
    ref = numerics.w4a8_linear_reference(x, codes, layer.channel_scale, layer.group_ratio)
    assert torch.all((layer(x) - ref).abs() <= fp16_tolerance(ref))
    layer.group_ratio.fill_(15.0)  # written in place: checked again
    assert cached_ratios_fit_int8(layer, layer.qweight, 128, 64, layer.group_ratio)
    ref = numerics.w4a8_linear_reference(x, codes, layer.channel_scale, layer.group_ratio)
    assert torch.all((layer(x) - ref).abs() <= fp16_tolerance(ref))


def test_w4a8_rejects_bad_inputs():
    codes, channel_scale, ratio = make_layer(32, 128, 64)
    packed = pack_int4(codes)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32 input, got torch.float64"):
        w4a8_linear(x.double(), packed, channel_scale, ratio, None, 64)
    with pytest.raises(ValueError, match="does not match"):
        w4a8_linear(torch.randn(2, 192), packed, channel_scale, ratio, None, 64)
    with pytest.raises(ValueError, match="group_ratio"):
        w4a8_linear(x, packed, channel_scale, None, None, 64)
    with pytest.raises(ValueError, match="group_ratio"):
        w4a8_linear(x, packed, channel_scale, ratio.float(), None, 64)
    with pytest.raises(ValueError, match="group_size"):
        w4a8_linear(x, packed, channel_scale, ratio, None, 48)
    with pytest.raises(ValueError, match="channel_scale"):
        w4a8_linear(x, packed, channel_scale.half(), ratio, None, 64)
    with pytest.raises(ValueError, match="contiguous"):
        w4a8_linear(x, packed.t().contiguous().t(), channel_scale, ratio, None, 64)
    with pytest.raises(ValueError, match="bias"):
        w4a8_linear(x, packed, channel_scale, ratio, torch.zeros(31), 64)
    with pytest.raises(ValueError, match="BLOCK_K"):
        w4a8_linear(x, packed, channel_scale, ratio, None, 64, config=config(block_k=192))
    codes, channel_scale, ratio = make_layer(32, 384, 64)  # 192 divides K, but no kernel tiles 192 columns
    with pytest.raises(ValueError, match="BLOCK_K=192 must be a power of two"):
        w4a8_linear(torch.randn(2, 384), pack_int4(codes), channel_scale, ratio, None, 64, config=config(block_k=192))


def test_qqq_linear_forward_runs_the_kernels():
    torch.manual_seed(9)
    linear = torch.nn.Linear(128, 48, bias=True)
    for group_size in (-1, 128):
        layer = QQQLinear.from_linear(linear, group_size)
        x = torch.randn(3, 128)
        ref = numerics.w4a8_linear_reference(x, layer.codes(), layer.channel_scale,
                                             layer.group_ratio if group_size != -1 else None, layer.bias)
        assert torch.all((layer(x) - ref).abs() <= fp16_tolerance(ref))


def test_baselines_match_reference():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(5, 128, generator=gen)
    w8, s8 = numerics.quantize_weight_int8_per_channel(torch.randn(48, 128, generator=gen))
    out = w8a8_linear(x, w8, s8, None, config=config(block_k=128))
    x_codes, ts = numerics.quantize_per_token(x)
    ref = numerics.int8_matmul_exact(x_codes, w8).float() * ts * s8
    assert torch.all((out - ref).abs() <= fp16_tolerance(ref))
    x_codes, x_scale = quantize_per_token(x.half())
    plain = w8a8_gemm(x_codes, x_scale, w8, s8, None, torch.float16, config=config(block_k=128))
    gated = w8a8_gemm(x_codes, x_scale, w8, s8, None, torch.float16, config=config(block_k=128), silu_mul=True)
    assert torch.equal(gated, silu_mul_quantize(halves_of_alternating_channels(plain), quantize=False))
    codes, scale, _ = make_layer(48, 128, -1)
    out = w4a16_linear(x, pack_int4(codes), scale, None, config=config(block_k=128))
    ref = x @ numerics.dequantize_per_channel(codes, scale).T
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_the_tma_gemm_walks_every_tile_with_fewer_programs_and_falls_back_for_unaligned_rows(monkeypatch):
    """Three programs for 9 output tiles: each computes every third tile, exactly. Activation rows that the TMA unit
    cannot copy (not 16-byte aligned) run the same config on the pointer-fed kernel."""
    from qqq.kernels_triton import gpu, int8_gemm

    monkeypatch.setattr(int8_gemm, "current_gpu", lambda: gpu.GpuInfo("three SMs", "9.0", 3, 227 * 1024, 2**20))
    codes, channel_scale, ratio = make_layer(80, 256, 64, seed=3)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(3)) * 2
    x_codes, x_scale = numerics.quantize_per_token(x)
    expected = numerics.int8_matmul_exact(x_codes, numerics.int8_weight(codes, ratio))
    cfg = dict(config(block_k=128, dequant=1), TMA=1)
    shifted = torch.zeros(37, 258, dtype=torch.int8)[:, 1:257]
    shifted.copy_(x_codes)
    for a_codes, branch in ((x_codes, "dequant_tma/g64"), (shifted, "dequant/g64")):
        with branches.recording() as taken:
            _, acc = w4a8_gemm(a_codes, x_scale[:, 0], pack_int4(codes), channel_scale, ratio, None, 64,
                               torch.float32, config=cfg, return_acc=True)
        assert torch.equal(acc.double(), expected)
        assert ("w4a8_gemm", branch + "/unclamped") not in taken and ("w4a8_gemm", branch) in taken


def test_a_warp_specialized_config_runs_the_tma_kernel_under_the_interpreter():
    """The Gluon kernels are compiled only (the GPU suite runs them): here a WS config takes the TMA kernel (the fused
    W4A8 one, without DEQUANT, this module's fused kernel), same tiles, same sums, and the branch record says which
    kernel ran."""
    codes, channel_scale, ratio = make_layer(80, 256, 64, seed=4)
    x_codes, x_scale = numerics.quantize_per_token(torch.randn(37, 256, generator=torch.Generator().manual_seed(4)))
    weight8 = numerics.int8_weight(codes, ratio)
    ws = dict(config(block_n=64, block_k=128), WS=1)
    for call, branch in ((lambda: w8a8_gemm(x_codes, x_scale[:, 0], weight8, channel_scale, None, torch.float32,
                                            config=ws), ("w8a8_gemm", "int8_gemm_tma")),
                         (lambda: w4a8_gemm(x_codes, x_scale[:, 0], pack_int4(codes), channel_scale, ratio, None, 64,
                                            torch.float32, config=dict(ws, DEQUANT=1)),
                          ("w4a8_gemm", "dequant_tma/g64")),
                         (lambda: w4a8_gemm(x_codes, x_scale[:, 0], pack_int4(codes), channel_scale, ratio, None, 64,
                                            torch.float32, config=ws),
                          ("w4a8_gemm", "wide_groups/g64"))):
        with branches.recording() as taken:
            out = call()
        assert branch in taken and not any("_ws" in name for _, name in taken)
        expected = numerics.int8_linear_reference(x_codes, x_scale[:, 0], weight8, channel_scale, None, torch.float32)
        assert torch.equal(out, expected)


def test_tma_configs_are_int8_gemms_of_copyable_tiles():
    w8a8_tma = dict(config(block_n=128, block_m=128, block_k=128), TMA=1)
    config_table.check_config("w8a8", w8a8_tma, 1024, 4096, 4096, -1)
    config_table.check_config("w4a8", dict(w8a8_tma, DEQUANT=1), 1024, 4096, 4096, -1)
    for kernel, bad, reason in [("w4a8", w8a8_tma, "without DEQUANT"), ("w4a16", w8a8_tma, "not an int8 GEMM"),
                                ("w8a8", dict(w8a8_tma, BLOCK_K=256), "256 columns"),
                                ("w8a8", dict(w8a8_tma, BLOCK_N=512), "512 rows")]:
        with pytest.raises(ValueError, match="TMA=1"):
            config_table.check_config(kernel, bad, 1024, 4096, 4096, -1)
    ws = dict(w8a8_tma, TMA=0, WS=2)
    config_table.check_config("w8a8", ws, 1024, 4096, 4096, -1)
    config_table.check_config("w4a8_group", dict(ws, DEQUANT=1, WS=1), 1024, 4096, 4096, 128)
    config_table.check_config("w4a8", ws, 1024, 4096, 4096, -1)  # without DEQUANT: the fused Gluon kernel
    config_table.check_config("w4a8", dict(ws, SPLIT_K=2), 1024, 4096, 4096, -1)  # which has split-K work units
    for kernel, bad, reason in [("w4a16", ws, "not a W4A8 or int8 GEMM"), ("w8a8", dict(ws, SPLIT_K=2), "split-K"),
                                ("w8a8", dict(ws, WS=3), "no such kernel"),
                                ("w8a8", dict(ws, BLOCK_N=64, num_warps=8), "16 rows a warp"),
                                ("w8a8", dict(ws, BLOCK_K=256), "256 columns")]:
        with pytest.raises(ValueError, match="WS"):
            config_table.check_config(kernel, bad, 1024, 4096, 4096, -1)
    # the fused Gluon kernel's converter: 4 or 8 warps; no other kernel has one
    config_table.check_config("w4a8_group", dict(ws, CONVERT_WARPS=8), 1024, 4096, 4096, 128)
    for kernel, bad in [("w8a8", dict(ws, CONVERT_WARPS=8)), ("w4a8_group", dict(ws, DEQUANT=1, CONVERT_WARPS=8)),
                        ("w4a8", dict(ws, CONVERT_WARPS=6)), ("w4a8", dict(ws, WS=0, CONVERT_WARPS=8))]:
        with pytest.raises(ValueError, match="CONVERT_WARPS"):
            config_table.check_config(kernel, bad, 1024, 4096, 4096, 128 if kernel == "w4a8_group" else -1)
    for kernel in ("w8a8", "w4a8", "w4a8_group"):
        eight = [c for c in config_table.candidate_configs(kernel, 256, 4096, 4096, 128) if c["CONVERT_WARPS"] != 4]
        assert bool(eight) == (kernel == "w4a8_group")
        assert all(c["CONVERT_WARPS"] == 8 and c["WS"] == 2 and not c["DEQUANT"] for c in eight)
    for kernel in ("w8a8", "w4a8", "w4a8_group"):
        for option in ("TMA", "WS"):
            tma = [c for c in config_table.candidate_configs(kernel, 1024, 4096, 4096, 128) if c[option]]
            assert tma and all(c["BLOCK_K"] <= 128 and c["SPLIT_K"] == 1 for c in tma)
            assert all(kernel == "w8a8" or c["DEQUANT"] for c in tma if option == "TMA")
            # below M = 256 only the fused Gluon W4A8 kernel (no DEQUANT), from M = 64
            small = [(m, c) for m in (16, 64, 128) for c in config_table.candidate_configs(kernel, m, 4096, 4096, 128)
                     if c[option]]
            assert all(option == "WS" and kernel != "w8a8" and not c["DEQUANT"] and m >= 64 and c["BLOCK_M"] <= m
                       for m, c in small)
            assert bool(small) == (option == "WS" and kernel != "w8a8")
        assert {c["WS"] for c in config_table.candidate_configs(kernel, 1024, 4096, 4096, 128)} == {0, 1, 2}
    assert not any(c["TMA"] or c["WS"] for c in config_table.candidate_configs("w4a16", 1024, 4096, 4096, -1))


def test_tuning_candidates_are_valid():
    for kernel, gs in (("w4a8", -1), ("w4a8_group", 32), ("w4a8_group", 128), ("w8a8", -1)):
        for bucket in config_table.M_BUCKETS:
            cands = config_table.candidate_configs(kernel, bucket, 8192, 21760, gs)
            assert cands, (kernel, bucket)
            for cfg in cands:
                config_table.check_config(kernel, cfg, bucket, 8192, 21760, gs)
    assert config_table.m_bucket(1) == 1 and config_table.m_bucket(3) == 16
    assert config_table.m_bucket(100) == 128 and config_table.m_bucket(10**5) == 4096
    cfg = config_table.heuristic_config("w4a8_group", 1, 4096, 4096, 32)
    assert cfg["BLOCK_K"] <= 64
    assert config_table.max_block_k("w4a8_group", 128) == 512 and config_table.max_block_k("w4a8_group", 32) == 64
