"""Split-KV decode attention under TRITON_INTERPRET=1 (see conftest.py) against masked SDPA, with 16-bit and int8
caches (the int8 one against the plain reference of the same math: SDPA over the dequantized cache)."""

import pytest
import torch
from conftest import interpreted_kernels

from qqq import numerics
from qqq.fast.attention import decode_attention_reference
from qqq.kernels_triton import branches
from qqq.kernels_triton.decode_attention import (BLOCK_KEYS, SLOTS_FROM_KEYS, decode_attention,
                                                 default_config)

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


@pytest.mark.parametrize("batch,heads,kv_heads,capacity,kv_bits,block_n", [
    (2, 4, 4, 200, 16, 32),  # MHA, context not a multiple of the split or of the key block
    (2, 4, 2, 200, 8, 32),   # GQA: each query head reads its kv head
    (3, 2, 2, 131, 8, 16),   # fp16 queries, a sequence of one key (position 0)
])
def test_decode_attention_on_cuda_cores_matches_the_reference(batch, heads, kv_heads, capacity, kv_bits, block_n):
    """The CUDA-core kernel (``slots``): its key slots' softmaxes merged at the end give the reference's output,
    and it reads nothing past a sequence's position."""
    gen = torch.Generator().manual_seed(11)
    dtype = torch.float16 if block_n == 16 else torch.float32
    q = torch.randn(batch, heads, 1, 32, generator=gen).to(dtype)
    positions = torch.tensor([capacity - 1, 0, capacity // 2 + 3][:batch])
    if kv_bits == 8:
        k_codes, v_codes, k_scale, v_scale = int8_cache(batch, kv_heads, capacity, 32, gen)
        cache = [k_codes, v_codes, positions, k_scale, v_scale]
    else:
        cache = [torch.randn(batch, kv_heads, capacity, 32, generator=gen).to(dtype) for _ in range(2)] + [positions]
    config = {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4, "slots": True}
    got = decode_attention(q, *cache, config=config)
    expected = decode_attention_reference(q, *cache)
    tolerance = 1e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    past = cache[3] if kv_bits == 8 else cache[0]
    past[0, :, positions[0] + 1:] = float("nan")
    past[1, :, 1:] = float("nan")
    assert torch.isfinite(decode_attention(q, *cache, config=config)).all()


def masked_sdpa(q, k_codes, v_codes, positions, k_scale, v_scale):
    """Plain masked SDPA of ``q`` as given over the dequantized cache (no rounding of the query)."""
    k, v = (codes.float() * scale[..., None] for codes, scale in ((k_codes, k_scale), (v_codes, v_scale)))
    group = q.shape[1] // k.shape[1]
    visible = torch.arange(k.shape[2])[None, :] <= positions[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=visible[:, None, None, :])


@pytest.mark.parametrize("batch,heads,kv_heads,capacity", [(2, 4, 4, 200), (2, 4, 2, 131)])
@pytest.mark.parametrize("kernel", ["tensor_cores", "slots", "slots_int8_scores"])
def test_every_kernel_over_an_int8_cache_attends_with_the_query_on_its_int8_grid(batch, heads, kv_heads, capacity,
                                                                                kernel):
    """Each kernel over an 8-bit cache gives SDPA of the query rounded per head (exactly up to fp32 rounding), and
    measurably not the unrounded query's attention; the reference does the same."""
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(batch, heads, 1, 32, generator=gen)
    cache = [*int8_cache(batch, kv_heads, capacity, 32, gen)]
    cache.insert(2, torch.tensor([capacity - 1, 5]))
    config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4, "slots": kernel != "tensor_cores",
              "int8_scores": kernel == "slots_int8_scores"}
    got = decode_attention(q, *cache, config=config)
    expected = masked_sdpa(numerics.fake_quantize_per_token(q), *cache)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decode_attention_reference(q, *cache), expected, rtol=1e-5, atol=1e-6)
    assert (got - masked_sdpa(q, *cache)).abs().max() > 1e-4


@pytest.mark.parametrize("kernel", ["tensor_cores", "slots", "slots_int8_scores"])
def test_a_query_said_to_be_on_its_grid_is_not_rounded_again(kernel):
    """``query_on_grid=True`` (the fast path's queries, which ``rope_into_cache`` wrote onto their int8 grid): a
    query on its grid gives what the default gives; one off its grid shows the rounding was skipped (but by the
    int8-score kernel, which needs the codes); the reference follows the same flag."""
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(2, 4, 1, 32, generator=gen)
    cache = [*int8_cache(2, 2, 131, 32, gen)]
    cache.insert(2, torch.tensor([130, 5]))
    config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4, "slots": kernel != "tensor_cores",
              "int8_scores": kernel == "slots_int8_scores"}
    on_grid = numerics.fake_quantize_per_token(q)
    torch.testing.assert_close(decode_attention(on_grid, *cache, config=config, query_on_grid=True),
                               decode_attention(on_grid, *cache, config=config), rtol=1e-5, atol=1e-6)
    got = decode_attention(q, *cache, config=config, query_on_grid=True)
    attended = on_grid if kernel == "slots_int8_scores" else q
    torch.testing.assert_close(got, masked_sdpa(attended, *cache), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decode_attention_reference(q, *cache, query_on_grid=True), masked_sdpa(q, *cache),
                               rtol=1e-5, atol=1e-6)
    assert (masked_sdpa(q, *cache) - masked_sdpa(on_grid, *cache)).abs().max() > 1e-4


def test_int8_scores_need_the_slots_kernel_and_a_cache_in_words():
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(2, 4, 1, 32, generator=gen)
    cache = [*int8_cache(2, 4, 40, 32, gen)]
    cache.insert(2, torch.tensor([39, 5]))
    config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4, "slots": True,
              "int8_scores": True}
    with pytest.raises(ValueError, match="int8_scores runs in the slots kernel"):
        decode_attention(q, *cache, config={**config, "slots": False})
    shifted = torch.zeros(cache[0].numel() + 1, dtype=torch.int8)[1:].view(cache[0].shape)  # 1 byte off a word
    with pytest.raises(ValueError, match="int8_scores runs in the slots kernel"):
        decode_attention(q, shifted, shifted.clone(), *cache[2:], config=config)


def test_the_default_launch_takes_the_cuda_core_kernel_for_a_large_8_bit_mha_cache():
    """MHA over an 8-bit cache of batch x capacity >= SLOTS_FROM_KEYS: the CUDA-core kernel with int8 scores;
    GQA, a small cache, a 16-bit cache or one not in whole words: the tensor cores' launch."""
    chosen = default_config(True, 1, SLOTS_FROM_KEYS)
    assert chosen["slots"] and chosen["int8_scores"]
    for quantized, group, keys, aligned in [(True, 1, SLOTS_FROM_KEYS - 1, True), (True, 4, 10 ** 6, True),
                                            (False, 1, 10 ** 6, True), (True, 1, 10 ** 6, False)]:
        assert not default_config(quantized, group, keys, aligned).get("slots")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 1, 32, generator=gen)
    cache = [*int8_cache(2, 2, SLOTS_FROM_KEYS // 2, 32, gen)]
    cache.insert(2, torch.tensor([SLOTS_FROM_KEYS // 2 - 1, 77]))
    with branches.recording() as taken:
        got = decode_attention(q, *cache)
    assert taken == {("decode_attention", "slots_int8_scores")}
    torch.testing.assert_close(got, decode_attention_reference(q, *cache), rtol=1e-5, atol=1e-6)
    with branches.recording() as taken:
        decode_attention(q[:1], *(part[:1] for part in cache))  # 1 x 2048 keys
    assert taken == {("decode_attention", "split_kv_int8")}


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
