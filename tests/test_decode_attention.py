"""Split-KV decode attention under TRITON_INTERPRET=1 (see conftest.py) against masked SDPA."""

import pytest
import torch
from conftest import interpreted_kernels

from qqq.kernels_triton.decode_attention import decode_attention

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
