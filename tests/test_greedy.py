"""The greedy decode step's kernel under TRITON_INTERPRET=1 (see conftest.py) against its plain PyTorch composition."""

import pytest
import torch
from conftest import interpreted_kernels

from qqq.fast.generation import greedy_step_reference
from qqq.kernels_triton.greedy import MAX_BLOCK, greedy_step

pytestmark = interpreted_kernels


def buffers(batch, capacity, seed):
    gen = torch.Generator().manual_seed(seed)
    token = torch.randint(0, 100, (batch, 1), generator=gen)
    position = torch.randint(0, capacity, (batch, 1), generator=gen)
    history = torch.randint(0, 100, (batch, capacity), generator=gen)
    column = torch.randint(0, capacity, (1,), generator=gen)
    return token, position, history, column


@pytest.mark.parametrize("batch,vocab,dtype", [(1, 320, torch.float16), (3, 1000, torch.bfloat16),
                                               (2, MAX_BLOCK + 7232, torch.float16), (5, 17, torch.float32)])
def test_greedy_step_matches_the_reference(batch, vocab, dtype):
    """Small integer logits, so most rows hold their maximum several times: the first index must win, also when
    the maxima sit in different slices of a row longer than one block."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-20, 6, (batch, vocab), generator=gen).to(dtype)
    if vocab > MAX_BLOCK:
        logits[0, MAX_BLOCK + 3] = logits[0, 5] = 9  # a tie across the two slices
        logits[1, MAX_BLOCK + 11] = 9  # the maximum only in the second slice
    got, expected = buffers(batch, 8, seed=batch), buffers(batch, 8, seed=batch)
    greedy_step(logits, *got)
    greedy_step_reference(logits, *expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    if vocab > MAX_BLOCK:
        assert got[0][0, 0] == 5 and got[0][1, 0] == MAX_BLOCK + 11


def test_greedy_step_of_a_strided_batch_and_of_infinities():
    logits = torch.zeros(3, 2 * 64, dtype=torch.float16)[:, :64]  # rows 128 apart
    logits[0] = float("-inf")  # all -inf: index 0, as torch.argmax
    logits[1, 40], logits[1, 50] = float("inf"), float("inf")
    logits[2, 7] = float("nan")  # counted as +inf
    token, position, history = torch.zeros(3, 1, dtype=torch.long), torch.tensor([[0], [3], [5]]), \
        torch.zeros(3, 6, dtype=torch.long)
    greedy_step(logits, token, position, history, torch.tensor([4]))
    assert token[:, 0].tolist() == [0, 40, 7] == torch.argmax(logits, dim=-1).tolist()
    assert history[:, 4].tolist() == [0, 40, 7] and history.count_nonzero() == 2
    assert position[:, 0].tolist() == [1, 4, 6]


def test_greedy_step_refuses_what_it_cannot_take():
    logits = torch.zeros(2, 64)
    token, position, history, column = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), \
        torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous along the vocabulary"):
        greedy_step(logits.t(), token, position, history, column)
    with pytest.raises(ValueError, match=r"must be \[2, 1\]"):
        greedy_step(logits, token[:1], position, history, column)
    with pytest.raises(ValueError, match="column one value"):
        greedy_step(logits, token, position, history, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        greedy_step(logits, token.int(), position, history, column)
