"""The KV cache (16-bit and int8) and attention over it, on the reference ops."""

import pytest
import torch

from qqq import numerics
from qqq.fast.attention import KVCache, attention, dequantized
from qqq.fast.model import Architecture


ARCH = Architecture(hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2, head_dim=16, vocab=10, eps=1e-6)


def test_cache_layouts():
    plain, int8 = KVCache(ARCH, 2, 11, torch.float16, "cpu"), KVCache(ARCH, 2, 11, torch.float16, "cpu", bits=8)
    assert plain.k.shape == int8.k.shape == (3, 2, 2, 11, 16) and plain.k.dtype == torch.float16
    assert plain.k_scale is None and plain.layer(1).k_scale is None
    assert int8.k.dtype == int8.v.dtype == torch.int8 and int8.k_scale.shape == int8.v_scale.shape == (3, 2, 2, 11)
    layer = int8.layer(2)
    assert layer.k.data_ptr() == int8.k[2].data_ptr() and layer.v_scale.data_ptr() == int8.v_scale[2].data_ptr()
    with pytest.raises(ValueError, match="16 or 8-bit"):
        KVCache(ARCH, 1, 4, torch.float16, "cpu", bits=4)


def test_prefill_attention_reads_the_dequantized_cache(reference_backend):
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(ARCH, 2, 9, torch.float32, "cpu", bits=8).layer(0)
    k, v = (torch.randn(2, 2, 6, 16, generator=gen) for _ in range(2))
    for target, scale, values in ((cache.k, cache.k_scale, k), (cache.v, cache.v_scale, v)):
        codes, token_scale = numerics.quantize_per_token(values)
        target[:, :, :6], scale[:, :, :6] = codes, token_scale[..., 0]
    q = torch.randn(2, 4, 6, 16, generator=gen)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, *(numerics.fake_quantize_per_token(t).repeat_interleave(2, 1) for t in (k, v)), is_causal=True)
    torch.testing.assert_close(attention(q, cache, torch.arange(6).expand(2, 6)), expected)
    assert torch.equal(dequantized(cache.k, cache.k_scale, torch.float32)[:, :, :6],
                       numerics.fake_quantize_per_token(k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantized_is_the_fp32_product_rounded_to_the_dtype(dtype):
    """A strided slice of an int8 cache (what a prefill reads) as ``dtype``: each code times its scale, rounded to
    fp32 as an fp32 product is, then to ``dtype``."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(-127, 128, (2, 3, 40, 16), dtype=torch.int8, generator=gen)
    scale = torch.rand(2, 3, 40, generator=gen) / 100
    got = dequantized(codes[:, :, :25], scale[:, :, :25], dtype)
    assert got.dtype == dtype and got.shape == (2, 3, 25, 16)
    assert torch.equal(got, (codes[:, :, :25].double() * scale[:, :, :25, None].double()).float().to(dtype))
