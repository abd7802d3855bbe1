"""The fused producers under TRITON_INTERPRET=1 (see conftest.py) against their plain PyTorch compositions."""

import pytest
import torch
from conftest import interpreted_kernels

from qqq import numerics
from qqq.fast.attention import dequantized
from qqq.fast.producers import rmsnorm_reference, rope_into_cache_reference, silu_mul_reference
from qqq.kernels_triton.fused_producers import (dequantize_cache, rmsnorm_quantize, rope_into_cache,
                                                silu_mul_quantize)

pytestmark = interpreted_kernels


def rows(m, k, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * scale
    x[:, :: max(1, k // 7)] *= 20  # outlier channels
    return x.to(dtype)


# The interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest), so bf16 results may sit up to two
# bf16 steps (2**-7 relative) from PyTorch's; fp16 and fp32 differ at most in the last ulp of the normalization.
RTOL = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_codes_close(codes, scale, expected, dtype):
    """Exact in nearly every code: a last-ulp difference in the normalization may move a value across a rounding
    boundary, by one code at most (bf16: see RTOL)."""
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == expected.scale.shape and codes.shape == expected.codes.shape
    torch.testing.assert_close(scale, expected.scale, rtol=RTOL[dtype], atol=0)
    difference = (codes.int() - expected.codes.int()).abs()
    if dtype == torch.bfloat16:
        assert difference.max() <= 3
        return
    assert difference.max() <= 1
    assert (difference == 0).float().mean() > 0.99


@pytest.mark.parametrize("m,k,dtype", [(1, 64, torch.float16), (3, 1536, torch.float16), (5, 200, torch.bfloat16),
                                       (130, 96, torch.float32)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_quantize_matches_composition(m, k, dtype, with_residual):
    x = rows(m, k, dtype)
    weight = (torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    residual = rows(m, k, dtype, seed=2) if with_residual else None
    expected = rmsnorm_reference(x, weight, 1e-5, residual, quantize=True)
    expected_plain = rmsnorm_reference(x, weight, 1e-5, residual, quantize=False)
    got = rmsnorm_quantize(x, weight, 1e-5, residual, quantize=True)
    got_plain = rmsnorm_quantize(x, weight, 1e-5, residual, quantize=False)
    if with_residual:
        (expected, h), (expected_plain, _) = expected, expected_plain
        got, got_h = got
        got_plain, _ = got_plain
        if dtype == torch.bfloat16:
            torch.testing.assert_close(got_h, h, rtol=RTOL[dtype], atol=0)
        else:
            assert torch.equal(got_h, h)  # the updated residual is one rounded add, exactly
    assert_codes_close(*got, expected, dtype)
    torch.testing.assert_close(got_plain, expected_plain, rtol=RTOL[dtype], atol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy under the interpreter: exp(-x) = inf
@pytest.mark.parametrize("m,width,dtype", [(1, 64, torch.float16), (2, 1100, torch.float16),
                                           (129, 160, torch.bfloat16), (4, 96, torch.float32)])
def test_silu_mul_quantize_matches_composition(m, width, dtype):
    gate_up = rows(m, 2 * width, dtype, seed=3, scale=2.0)
    assert_codes_close(*silu_mul_quantize(gate_up), silu_mul_reference(gate_up), dtype)
    torch.testing.assert_close(silu_mul_quantize(gate_up, quantize=False), silu_mul_reference(gate_up, False),
                               rtol=RTOL[dtype], atol=1e-5)


def test_zero_row_gives_zero_scale_not_nan():
    x = torch.zeros(2, 64)
    codes, scale = rmsnorm_quantize(x, torch.ones(64), 1e-6)
    assert torch.equal(scale, torch.zeros(2)) and torch.equal(codes, torch.zeros(2, 64, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("t,start", [(5, 0), (1, 9), (19, 2)])  # a prefill's programs span sequences and blocks
def test_rope_into_cache_matches_composition(dtype, t, start):
    batch, heads, kv_heads, head_dim, capacity = 2, 4, 2, 32, 24
    qkv = rows(batch * t, (heads + 2 * kv_heads) * head_dim, dtype, seed=4).reshape(batch, t, -1)
    angles = torch.arange(capacity)[:, None] * 0.37 ** torch.arange(head_dim // 2)[None, :].float()
    cos, sin = angles.cos(), angles.sin()
    positions = (torch.arange(t) + start).expand(batch, t)
    caches = [torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype) for _ in range(4)]
    q = rope_into_cache(qkv, cos, sin, positions, caches[0], caches[1], heads)
    q_ref = rope_into_cache_reference(qkv, cos, sin, positions, caches[2], caches[3], heads)
    assert q.shape == (batch, heads, t, head_dim) and q.is_contiguous()
    torch.testing.assert_close(q, q_ref, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(caches[0], caches[2], rtol=1e-3, atol=1e-5)
    assert torch.equal(caches[1], caches[3])  # v is copied
    written = caches[1].abs().sum(dim=(0, 1, 3)) > 0
    assert written.tolist() == [start <= p < start + t for p in range(capacity)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("t,start,heads,kv_heads", [(5, 0, 4, 2), (1, 9, 6, 1), (3, 4, 2, 2), (13, 1, 2, 1)])
def test_rope_into_int8_cache_matches_composition(dtype, t, start, heads, kv_heads):
    batch, head_dim, capacity = 2, 32, 16
    qkv = rows(batch * t, (heads + 2 * kv_heads) * head_dim, dtype, seed=6).reshape(batch, t, -1)
    angles = torch.arange(capacity)[:, None] * 0.37 ** torch.arange(head_dim // 2)[None, :].float()
    cos, sin = angles.cos(), angles.sin()
    positions = (torch.arange(t) + start).expand(batch, t)
    caches = [torch.zeros(batch, kv_heads, capacity, head_dim, dtype=torch.int8) for _ in range(4)]
    scales = [torch.zeros(batch, kv_heads, capacity) for _ in range(4)]
    q = rope_into_cache(qkv, cos, sin, positions, caches[0], caches[1], heads, scales[0], scales[1])
    q_ref = rope_into_cache_reference(qkv, cos, sin, positions, caches[2], caches[3], heads, scales[2], scales[3])
    torch.testing.assert_close(q, q_ref, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(scales[0], scales[2], rtol=1e-3, atol=0)
    assert torch.equal(scales[1], scales[3])  # v is copied, then quantized: the same values, the same scale
    assert torch.equal(caches[1], caches[3])
    assert (caches[0].int() - caches[2].int()).abs().max() <= 1  # k: RoPE may differ in the last ulp
    written = scales[0].sum(dim=(0, 1)) > 0
    assert written.tolist() == [start <= p < start + t for p in range(capacity)]
    # the codes use the whole int8 range of each (token, head) and dequantize to the rotated k they hold
    assert caches[0][:, :, start:start + t].abs().amax(dim=-1).eq(127).all()
    k16 = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype)
    q16 = rope_into_cache_reference(qkv, cos, sin, positions, k16, k16.clone(), heads)
    dequantized = caches[0].float() * scales[0][..., None]
    assert (dequantized - k16.float()).abs().max() <= 0.51 * scales[0].max()
    # q comes back on its own int8 grid per token and head (the 16-bit cache's q, rounded), not as rotated
    torch.testing.assert_close(q, numerics.fake_quantize_per_token(q16), rtol=1e-3, atol=1e-5)
    assert not torch.allclose(q, q16, rtol=1e-3, atol=1e-5)
    codes = q.float() / (q.float().abs().amax(dim=-1, keepdim=True) / 127)
    # off an integer only by the rounding of q and of its largest value to ``dtype``: each 1/2 ulp, relative
    assert ((codes - codes.round()).abs() <= codes.abs() * torch.finfo(dtype).eps + 1e-3).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])  # bf16: on the GPU (the interpreter truncates)
@pytest.mark.parametrize("t", [25, 1])
def test_dequantize_cache_is_the_reference_exactly(dtype, t):
    """The first ``t`` positions of an int8 cache (a strided slice; rows not a multiple of a program's) as
    ``dequantized`` computes them, bit for bit."""
    gen = torch.Generator().manual_seed(9)
    codes = torch.randint(-127, 128, (2, 3, 40, 16), dtype=torch.int8, generator=gen)
    scale = torch.rand(2, 3, 40, generator=gen) / 100
    got = dequantize_cache(codes[:, :, :t], scale[:, :, :t], dtype)
    assert got.dtype == dtype and got.shape == (2, 3, t, 16) and got.is_contiguous()
    assert torch.equal(got, dequantized(codes[:, :, :t], scale[:, :, :t], dtype))


def test_dequantize_cache_rejects_bad_input():
    codes, scale = torch.zeros(1, 2, 4, 16, dtype=torch.int8), torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="int8 codes"):
        dequantize_cache(codes.float(), scale, torch.float16)
    with pytest.raises(ValueError, match="fp32 scales"):
        dequantize_cache(codes, scale[:, :, :3], torch.float16)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        dequantize_cache(codes, scale, torch.float64)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        dequantize_cache(torch.zeros(1, 2, 4, 24, dtype=torch.int8), scale, torch.float16)


def test_producers_reject_bad_input():
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm_quantize(torch.randn(2, 64), torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="even last dimension"):
        silu_mul_quantize(torch.randn(2, 65))
    with pytest.raises(ValueError, match="fp16 or bf16"):
        silu_mul_quantize(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual"):
        rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), 1e-6, residual=torch.randn(3, 64))
    cache = torch.zeros(1, 1, 8, 24)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        rope_into_cache(torch.randn(1, 1, 72), torch.ones(8, 12), torch.ones(8, 12), torch.zeros(1, 1, dtype=torch.long),
                        cache, cache.clone(), 1)

    int8_cache = torch.zeros(1, 1, 8, 32, dtype=torch.int8)
    qkv, trig, position = torch.randn(1, 1, 96), torch.ones(8, 16), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="must be alike"):
        rope_into_cache(qkv, trig, trig, position, int8_cache, int8_cache.clone(), 1)  # int8 without scales
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        rope_into_cache(qkv, trig, trig, position, int8_cache, int8_cache.clone(), 1, torch.zeros(1, 1, 8),
                        torch.zeros(1, 1, 7))
    cache16 = torch.zeros(1, 1, 8, 32)
    with pytest.raises(ValueError, match="cos/sin must be contiguous fp32"):
        rope_into_cache(qkv, trig, trig.double(), position, cache16, cache16.clone(), 1)  # sin not fp32
    with pytest.raises(ValueError, match="positions must be int32 or int64"):
        rope_into_cache(qkv, trig, trig, position.float(), cache16, cache16.clone(), 1)
