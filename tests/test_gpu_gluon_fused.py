"""GPU checks of the fused Gluon W4A8 kernel (``w4a8_gemm_ws.py``, path ``fused_ws``) called directly: the exact int32
sums and the epilogue of the spec at odd shapes (rows past M and N, K not a multiple of the K step, several K steps
and up to several tiles per program), per-channel and per-group, a program per tile and per SM, whole tiles and in
split-K work units, plain and with the SiLU*up epilogue. ``test_gpu_kernels.py`` checks it through ``w4a8_gemm``'s
launcher."""

import pytest
import torch

from qqq import numerics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the Gluon kernel runs on Hopper or later")
CONFIGS = (dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, GROUP_N=8, num_warps=4, num_stages=4, WS=1),
           dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=3, WS=2),
           dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=256, GROUP_N=8, num_warps=4, num_stages=4, WS=2),
           dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=4, WS=2, CONVERT_WARPS=8))


# work units (SPLIT_K): parts of different lengths; a program per unit and per SM (whose units cross tiles)
SPLIT_CONFIGS = (dict(CONFIGS[0], SPLIT_K=3), dict(CONFIGS[1], SPLIT_K=2), dict(CONFIGS[3], SPLIT_K=5))


def _launch(m, n, k, group_size, config, generator, silu_mul=False):
    from qqq.kernels_triton.activation_quant import quantize_per_token
    from qqq.kernels_triton.packing import pack_int4
    from qqq.kernels_triton.w4a8_gemm import split_k_workspace
    from qqq.kernels_triton.w4a8_gemm_ws import launch_w4a8_gemm_ws

    codes, scale, ratio = numerics.random_quantized_weight(n, k, group_size, generator, "cuda")
    bias = torch.randn(n, device="cuda", generator=generator).half()
    x = torch.randn(m, k, device="cuda", generator=generator).half()
    a_codes, a_scale = quantize_per_token(x)
    out = torch.full((m, n // 2 if silu_mul else n), float("nan"), dtype=torch.float16, device="cuda")
    acc = torch.zeros((m, n), dtype=torch.int32, device="cuda")
    tiles = -(-n // config["BLOCK_N"]) * -(-m // config["BLOCK_M"])
    buffers = split_k_workspace(x.device, m * n, tiles) if config.get("SPLIT_K", 1) > 1 else None
    launch_w4a8_gemm_ws(a_codes, a_scale, pack_int4(codes), scale, ratio, bias, group_size, out, acc, config,
                        write_acc=True, clamp=False, silu_mul=silu_mul, split_k_buffers=buffers)
    return a_codes, a_scale, numerics.int8_weight(codes, ratio), scale, bias, out, acc


def _assert_is_the_spec(m, k, group_size, config, generator):
    """One launch of 1000 output channels against the spec: the exact int32 sums, and the outputs within the fp16
    epilogue's tolerance."""
    a_codes, a_scale, weight8, scale, bias, out, acc = _launch(m, 1000, k, group_size, config, generator)
    expected_acc = numerics.int8_matmul_exact(a_codes, weight8)
    assert torch.equal(acc.double(), expected_acc), f"M={m}: {(acc.double() != expected_acc).sum()} sums differ"
    expected = numerics.int8_linear_reference(a_codes, a_scale, weight8, scale, bias, torch.float16)
    tolerance = numerics.output_tolerance(expected, expected_acc, a_scale[:, None], scale)
    assert bool(((out.float() - expected.float()).abs() <= tolerance).all()), f"M={m}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['BLOCK_N']}x{c['BLOCK_M']}x{c['BLOCK_K']}/WS{c['WS']}"
                                                          f"/c{c.get('CONVERT_WARPS', 4)}")
@pytest.mark.parametrize("group_size,k", [(-1, 2048), (32, 2048), (64, 2048), (128, 2048), (-1, 2112), (32, 2112)])
def test_fused_gluon_w4a8_is_the_spec(config, group_size, k):
    generator = torch.Generator(device="cuda").manual_seed(11)
    for m in (1, 33, 300, 2100):
        _assert_is_the_spec(m, k, group_size, config, generator)


@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=lambda c: f"{c['BLOCK_N']}x{c['BLOCK_M']}/WS{c['WS']}"
                                                                f"/split{c['SPLIT_K']}")
@pytest.mark.parametrize("group_size,k", [(-1, 2048), (128, 2048), (32, 2112)])
def test_fused_gluon_w4a8_work_units_sum_exactly(config, group_size, k):
    """Split-K: the units' sums meet exactly in the workspace, the last unit's epilogue is the spec's, and the
    workspace and tickets are left zeroed for the next call (the same buffers serve every call)."""
    from qqq.kernels_triton.w4a8_gemm import split_k_workspace

    generator = torch.Generator(device="cuda").manual_seed(5)
    for m in (1, 33, 300, 2100):
        _assert_is_the_spec(m, k, group_size, config, generator)
        # the launch's device as a tensor names it (with its index), the key of the workspace cache
        workspace, tickets = split_k_workspace(torch.device("cuda", torch.cuda.current_device()), 0, 0)
        assert not workspace.any() and not tickets.any(), f"M={m}: the workspace was left dirty"


@pytest.mark.parametrize("group_size", [-1, 128])
def test_fused_gluon_w4a8_silu_mul_epilogue(group_size):
    """Gate/up rows alternating: the epilogue's SiLU(gate) * up equals the SiLU*up producer on the kernel's plain
    outputs (which the test above checks against the spec)."""
    from qqq.fast.projections import halves_of_alternating_channels
    from qqq.kernels_triton.fused_producers import silu_mul_quantize

    for m in (1, 300):
        outputs = _launch(m, 1000, 2048, group_size, CONFIGS[1], torch.Generator(device="cuda").manual_seed(m))[5]
        gated = _launch(m, 1000, 2048, group_size, CONFIGS[1], torch.Generator(device="cuda").manual_seed(m),
                        silu_mul=True)[5]
        expected = silu_mul_quantize(halves_of_alternating_channels(outputs), quantize=False)
        assert torch.equal(gated, expected), f"M={m}: {(gated != expected).sum().item()} of {expected.numel()} differ"
