import math
from types import SimpleNamespace

import pytest
import torch

from qqq.data import perplexity_windows
from qqq.evaluate import perplexity


class Uniform(torch.nn.Module):
    """Predicts every one of ``vocab`` tokens with equal probability."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab))


class Oracle(Uniform):
    """Puts almost all probability on the true next token (which it is told)."""

    def forward(self, ids, use_cache=False):
        logits = torch.full((*ids.shape, self.vocab), -30.0)
        logits[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 30.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("vocab", [7, 1000])
def test_uniform_model_has_perplexity_vocab(vocab):
    windows = torch.randint(0, vocab, (3, 50))
    assert math.isclose(perplexity(Uniform(vocab), windows), vocab, rel_tol=1e-5)


def test_perfect_model_has_perplexity_one():
    assert math.isclose(perplexity(Oracle(11), torch.randint(0, 11, (2, 20))), 1.0, rel_tol=1e-5)


def test_c4_uses_256_seeded_random_windows_and_wiki_contiguous_ones():
    ids = torch.arange(600_000)[None]
    c4 = perplexity_windows(ids, "c4", 2048)
    assert c4.shape == (256, 2048) and torch.equal(c4, perplexity_windows(ids, "exllamav2-c4", 2048))
    wiki = perplexity_windows(ids, "exllamav2-wiki", 2048)
    assert wiki.shape == (292, 2048) and wiki[1, 0] == 2048
