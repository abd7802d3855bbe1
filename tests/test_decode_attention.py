"""Split-KV decode attention under TRITON_INTERPRET=1 (see conftest.py) against masked SDPA, with 16-bit and int8
caches (the int8 one against the plain reference of the same math: SDPA over the dequantized cache)."""

import pytest
import torch
from conftest import interpreted_kernels

from qqq import numerics
from qqq.fast.attention import (ROPE_IN_ATTENTION_MIN_BATCH, KVCache, decode_attention_reference,
                                decode_step_attention, decode_step_reference)
from qqq.fast.model import Architecture
from qqq.fast.producers import rope_into_cache_reference
from qqq.kernels_triton import branches
from qqq.kernels_triton.decode_attention import BLOCK_KEYS, decode_attention, decode_attention_with_rope
from qqq.kernels_triton.fused_producers import rope_into_cache

pytestmark = interpreted_kernels


@pytest.mark.parametrize("batch,heads,kv_heads,capacity", [(2, 4, 2, 200), (1, 2, 2, 40), (3, 8, 1, 70)])
def test_decode_attention_matches_masked_sdpa(batch, heads, kv_heads, capacity):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(batch, heads, 1, 32, generator=gen)
    k, v = (torch.randn(batch, kv_heads, capacity, 32, generator=gen) for _ in range(2))
    positions = torch.tensor([0, capacity - 1, capacity // 2][:batch])
    visible = torch.arange(capacity)[None, :] <= positions[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1),
        attn_mask=visible[:, None, None, :])
    got = decode_attention(q, k, v, positions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    k[0, :, positions[0] + 1:] = float("nan")  # keys past a sequence's position are never read
    assert torch.isfinite(decode_attention(q, k, v, positions)).all()


def int8_cache(batch, kv_heads, capacity, head_dim, gen):
    """K and V with outlier channels (as real keys have), quantized per token and head as the cache holds them."""
    k, v = (torch.randn(batch, kv_heads, capacity, head_dim, generator=gen) for _ in range(2))
    k[..., :: head_dim // 4] *= 10
    (k_codes, k_scale), (v_codes, v_scale) = numerics.quantize_per_token(k), numerics.quantize_per_token(v)
    return k_codes, v_codes, k_scale[..., 0], v_scale[..., 0]


@pytest.mark.parametrize("batch,heads,kv_heads,capacity,dtype", [
    (2, 4, 2, 200, torch.float32),   # GQA, context not a multiple of the split or of the key block
    (3, 6, 1, 70, torch.float16),    # one kv head for all, fp16 queries
    (1, 2, 2, 131, torch.float32),   # no GQA, odd context
])
def test_decode_attention_reads_an_int8_cache(batch, heads, kv_heads, capacity, dtype):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, heads, 1, 32, generator=gen).to(dtype)
    k_codes, v_codes, k_scale, v_scale = int8_cache(batch, kv_heads, capacity, 32, gen)
    positions = torch.tensor([capacity - 1, 0, capacity // 2 + 3][:batch])
    assert ((positions + 1) % BLOCK_KEYS).all()  # contexts end inside a key block, so inside a split
    expected = decode_attention_reference(q, k_codes, v_codes, positions, k_scale, v_scale)
    got = decode_attention(q, k_codes, v_codes, positions, k_scale, v_scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-3 if dtype == torch.float16 else 1e-4,
                               atol=1e-3 if dtype == torch.float16 else 1e-5)
    # the scales are applied: the same codes with doubled value scales give doubled outputs
    torch.testing.assert_close(decode_attention(q, k_codes, v_codes, positions, k_scale, 2 * v_scale).float(),
                               2 * got.float(), rtol=2e-3, atol=1e-4)
    k_scale[0, :, positions[0] + 1:] = float("nan")  # scales past a sequence's position are never read
    assert torch.isfinite(decode_attention(q, k_codes, v_codes, positions, k_scale, v_scale)).all()


def test_decode_attention_rejects_bad_caches():
    q = torch.randn(1, 2, 1, 32)
    codes = torch.zeros(1, 2, 16, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs its k_scale"):
        decode_attention(q, codes, codes.clone(), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        decode_attention(q, codes, codes.clone(), torch.zeros(1, dtype=torch.long), torch.ones(1, 2, 16))
    with pytest.raises(ValueError, match="must be alike"):
        decode_attention(q, codes, codes.clone(), torch.zeros(1, dtype=torch.long), torch.ones(1, 2, 16),
                         torch.ones(1, 2, 16, dtype=torch.float16))


def rope_tables(capacity, head_dim):
    angles = torch.arange(capacity)[:, None] * 10000.0 ** (-torch.arange(head_dim // 2)[None, :] / (head_dim // 2))
    return angles.cos().contiguous(), angles.sin().contiguous()


@pytest.mark.parametrize("batch,heads,kv_heads,capacity,dtype", [
    (3, 4, 2, 200, torch.float32),  # GQA; positions at the end, at 0 and on a split's first key
    (3, 6, 1, 70, torch.float16),   # one kv head for all
    (1, 2, 2, 131, torch.float32),  # no GQA, odd capacity
    (2, 8, 8, 130, torch.float16),
])
def test_decode_attention_with_rope_is_rope_into_cache_then_attention(batch, heads, kv_heads, capacity, dtype):
    gen = torch.Generator().manual_seed(11)
    head_dim = 32
    qkv = (3 * torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim, generator=gen)).to(dtype)
    cos, sin = rope_tables(capacity, head_dim)
    positions = torch.tensor([capacity - 1, 0, BLOCK_KEYS][:batch])
    cache = [torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).to(dtype) for _ in range(2)]
    two_launches, fused, plain = ([part.clone() for part in cache] for _ in range(3))
    q = rope_into_cache(qkv, cos, sin, positions[:, None], *two_launches, heads)
    expected = decode_attention(q, *two_launches, positions)
    got = decode_attention_with_rope(qkv, cos, sin, positions, *fused, heads)
    for written, wanted in zip(fused, two_launches):  # the new keys and values bit for bit
        assert torch.equal(written, wanted)
    assert got.dtype == dtype and got.shape == (batch, heads, 1, head_dim)
    # only the order of the new key's score sum differs from the two launches
    tolerance = 1e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    reference = decode_step_reference(qkv, cos, sin, positions, *plain, heads)
    torch.testing.assert_close(got.float(), reference.float(), rtol=1e-2 if dtype == torch.float16 else 1e-4,
                               atol=1e-2 if dtype == torch.float16 else 1e-5)


def test_decode_attention_with_rope_rejects_bad_input():
    heads, kv_heads, head_dim, capacity = 4, 2, 32, 16
    cache = torch.zeros(1, kv_heads, capacity, head_dim)
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim)
    cos, sin = rope_tables(capacity, head_dim)
    position = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="one token per sequence"):
        decode_attention_with_rope(qkv.expand(1, 2, -1), cos, sin, position, cache, cache.clone(), heads)
    with pytest.raises(ValueError, match="does not hold"):
        decode_attention_with_rope(qkv, cos, sin, position, cache, cache.clone(), heads + 1)
    with pytest.raises(ValueError, match="16-bit cache in qkv's dtype"):
        decode_attention_with_rope(qkv.half(), cos, sin, position, cache, cache.clone(), heads)
    codes = torch.zeros(1, kv_heads, capacity, head_dim, dtype=torch.int8)
    with pytest.raises(ValueError, match="16-bit cache"):
        decode_attention_with_rope(qkv, cos, sin, position, codes, codes.clone(), heads)
    with pytest.raises(ValueError, match="cos/sin"):
        decode_attention_with_rope(qkv, cos.double(), sin, position, cache, cache.clone(), heads)
    with pytest.raises(ValueError, match="positions must be"):
        decode_attention_with_rope(qkv, cos, sin, position[:, None], cache, cache.clone(), heads)


@pytest.mark.parametrize("batch,bits,fused", [(ROPE_IN_ATTENTION_MIN_BATCH, 16, True), (2, 16, False),
                                              (ROPE_IN_ATTENTION_MIN_BATCH, 8, False)])
def test_a_decode_step_fuses_rope_into_attention_only_where_it_pays(batch, bits, fused):
    gen = torch.Generator().manual_seed(12)
    arch = Architecture(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=10, eps=1e-6)
    capacity = 70
    qkv = torch.randn(batch, 1, (arch.heads + 2 * arch.kv_heads) * arch.head_dim, generator=gen)
    cos, sin = rope_tables(capacity, arch.head_dim)
    positions = torch.randint(0, capacity, (batch, 1), generator=gen)
    cache, plain = (KVCache(arch, batch, capacity, torch.float32, "cpu", bits=bits).layer(0) for _ in range(2))
    with branches.recording() as taken:
        got = decode_step_attention(qkv, cos, sin, positions, cache, arch.heads)
    assert (("decode_attention", "split_kv+rope") in taken) == fused
    assert (("rope_into_cache", "rope_int8" if bits == 8 else "rope") in taken) == (not fused)
    q = rope_into_cache_reference(qkv, cos, sin, positions, plain.k, plain.v, arch.heads, plain.k_scale, plain.v_scale)
    expected = decode_attention_reference(q, plain.k, plain.v, positions[:, 0], plain.k_scale, plain.v_scale)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for written, wanted in zip(cache, plain):
        if wanted is not None:
            torch.testing.assert_close(written, wanted, rtol=1e-5, atol=1e-6)
