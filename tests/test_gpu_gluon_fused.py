"""GPU checks of the prototype Gluon fused W4A8 kernel (``w4a8_gemm_ws.py``, branch ``gluon-fused``; no launcher runs
it yet): the exact int32 sums and the epilogue of the spec at odd shapes (rows past M and N, up to several tiles per
program), per-channel and per-group, a program per tile and per SM. Not part of the GPU suite command until the
kernel is wired in."""

import pytest
import torch

from qqq import numerics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the Gluon kernel runs on Hopper or later")
CONFIGS = (dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=4, WS=1),
           dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=128, GROUP_N=8, num_warps=8, num_stages=3, WS=2),
           dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=256, GROUP_N=8, num_warps=4, num_stages=4, WS=2))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['BLOCK_N']}x{c['BLOCK_M']}x{c['BLOCK_K']}/WS{c['WS']}")
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_fused_gluon_w4a8_is_the_spec(config, group_size):
    from qqq.kernels_triton.activation_quant import quantize_per_token
    from qqq.kernels_triton.packing import pack_int4
    from qqq.kernels_triton.w4a8_gemm_ws import launch_w4a8_gemm_ws

    generator = torch.Generator(device="cuda").manual_seed(11)
    n, k = 1000, 2048
    codes, scale, ratio = numerics.random_quantized_weight(n, k, group_size, generator, "cuda")
    weight8 = numerics.int8_weight(codes, ratio)
    bias = torch.randn(n, device="cuda", generator=generator).half()
    for m in (1, 33, 300, 2100):
        x = torch.randn(m, k, device="cuda", generator=generator).half()
        a_codes, a_scale = quantize_per_token(x)
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        acc = torch.zeros((m, n), dtype=torch.int32, device="cuda")
        launch_w4a8_gemm_ws(a_codes, a_scale, pack_int4(codes), scale, ratio, bias, group_size, out, acc, config,
                            write_acc=True, clamp=False, silu_mul=False)
        expected_acc = numerics.int8_matmul_exact(a_codes, weight8)
        assert torch.equal(acc.double(), expected_acc), f"M={m}: {(acc.double() != expected_acc).sum()} sums differ"
        expected = numerics.int8_linear_reference(a_codes, a_scale, weight8, scale, bias, torch.float16)
        tolerance = numerics.output_tolerance(expected, expected_acc, a_scale[:, None], scale)
        assert bool(((out.float() - expected.float()).abs() <= tolerance).all()), f"M={m}"
