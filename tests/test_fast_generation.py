"""Generator: greedy generation with a static KV cache, against Hugging Face and against full prefills."""

import pytest
import torch

from conftest import interpreted_kernels, tiny_model, token_batch
from qqq.fast.generation import Generator, prefill_bucket
from qqq.fast.model import FastLlama


def last_logits(fast: FastLlama, tokens: torch.Tensor) -> torch.Tensor:
    batch, t = tokens.shape
    return fast(tokens, torch.arange(t).expand(batch, t), fast.new_cache(batch, t))


def test_generator_greedy_tokens_match_hugging_face(reference_backend):
    model = tiny_model()
    prompts = token_batch(2, 7)
    with torch.no_grad():
        expected = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6,
                                  do_sample=False, min_new_tokens=6, pad_token_id=0)[:, 7:]
    result = Generator(FastLlama.from_hf(model), batch=2, capacity=16).generate(prompts, 6)
    assert torch.equal(result.tokens, expected)
    assert result.ttft_s > 0 and result.decode_s > 0 and result.decode_tokens_per_s > 0


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_decode_step_matches_a_full_prefill(reference_backend, kv_bits):
    fast = FastLlama.from_hf(tiny_model(), "w4a8_rtn", kv_bits=kv_bits)
    prompts = token_batch(2, 9)
    generated = Generator(fast, batch=2, capacity=12).generate(prompts[:, :5], 3).tokens
    # each decoded token is the argmax of a prefill over the prompt and the tokens before it
    sequence = prompts[:, :5]
    for step in range(3):
        assert torch.equal(last_logits(fast, sequence).argmax(-1), generated[:, step])
        sequence = torch.cat((sequence, generated[:, step:step + 1]), dim=1)


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_a_padded_prefill_gives_the_prompts_tokens_and_cache(reference_backend, kv_bits):
    """What a prefill graph replays (the prompt padded to its bucket with leftovers of a longer prompt), run eagerly:
    the same first token, the same cache up to the prompt (up to float rounding: attention over 16 positions
    instead of 7 sums in another order), and the same tokens after it."""
    fast = FastLlama.from_hf(tiny_model(), "w4a8_rtn", kv_bits=kv_bits)
    prompts, leftovers = token_batch(2, 7), token_batch(2, 16) + 1
    assert prefill_bucket(7, 32) == 16 and prefill_bucket(100, 32) == 100 and prefill_bucket(17, 40) == 32
    eager = Generator(fast, batch=2, capacity=32, use_graph=False)
    padded = Generator(fast, batch=2, capacity=32, use_graph=False)
    tokens = leftovers.clone()
    tokens[:, :7] = prompts
    padded.last.fill_(6)
    padded.padded_prefill(tokens)
    assert torch.equal(padded.first, eager.prefill(prompts))
    for name, prompt_part in (("k", (..., slice(7), slice(None))), ("v", (..., slice(7), slice(None))),
                              ("k_scale", (..., slice(7))), ("v_scale", (..., slice(7)))):
        if getattr(eager.cache, name) is not None:
            got, expected = (getattr(c.cache, name)[prompt_part].float() for c in (padded, eager))
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    assert torch.equal(padded.decode(padded.first, 7, 5), eager.decode(eager.prefill(prompts), 7, 5))


@interpreted_kernels
def test_the_kernels_decode_gives_the_references_tokens(monkeypatch):
    """The greedy step's kernel (and the model's, under the interpreter) against the reference backend, decoding from
    a position past 0: the same tokens, recorded in the history from its first column."""
    fast = FastLlama.from_hf(tiny_model(), "w4a8_rtn")
    prompts = token_batch(2, 6)
    kernels = Generator(fast, 2, 12, use_graph=False)
    tokens = kernels.generate(prompts, 4).tokens
    assert kernels.position[:, 0].tolist() == [9, 9]
    assert torch.equal(kernels.history[:, :3], tokens[:, 1:]) and kernels.step.item() == 3
    monkeypatch.setenv("QQQ_BACKEND", "reference")
    assert torch.equal(Generator(fast, 2, 12, use_graph=False).generate(prompts, 4).tokens, tokens)


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: the warm-up runs, then each replay runs the captured step again."""

    def __init__(self, step):
        step()
        step()
        self.replay = step


def test_prefill_buckets_reuse_their_graph_and_see_only_their_prompt(reference_backend, monkeypatch):
    """The graphed prefill's bookkeeping (buckets, padding buffers, the last-token index set before a capture's
    warm-up runs) with graphs replaced by eager replays: a 7-token prompt after a 20-token one captures bucket 16
    (its warm-up must not index the rows with the longer prompt's last token), 17 tokens replay bucket 32."""
    monkeypatch.setattr(Generator, "_graph_of", staticmethod(EagerGraph))
    fast = FastLlama.from_hf(tiny_model(), "w4a8_rtn")
    graphed, eager = Generator(fast, 2, 40, use_graph=True), Generator(fast, 2, 40, use_graph=False)
    for length in (20, 7, 17):
        prompts = token_batch(2, length, seed=length)
        first = graphed.prefill(prompts)
        assert torch.equal(first, eager.prefill(prompts))
        assert torch.equal(graphed.decode(first, length, 3), eager.decode(first, length, 3))
    assert sorted(graphed.prefill_graphs) == [16, 32]


def test_a_decode_past_the_cache_is_refused_and_writes_nothing(reference_backend):
    runner = Generator(FastLlama.from_hf(tiny_model()), batch=2, capacity=8, use_graph=False)
    first = runner.prefill(token_batch(2, 4))
    written = runner.cache.k.clone()
    for start, steps in ((5, 4), (8, 1), (-1, 2)):  # would write positions 5..8, 8, and -1
        with pytest.raises(ValueError, match="would write past the KV cache"):
            runner.decode(first, start, steps)
        assert torch.equal(runner.cache.k, written)
    assert runner.decode(first, 4, 4).shape == (2, 4)  # positions 4..7: the last ones the cache holds
    assert (runner.cache.k[:, :, :, 7] != 0).any()


def test_bad_input_gives_clear_errors():
    fast = FastLlama.from_hf(tiny_model())
    with pytest.raises(ValueError, match="capacity"):
        Generator(fast, batch=1, capacity=10_000)
    with pytest.raises(ValueError, match="prompts must be"):
        Generator(fast, batch=2, capacity=8).prefill(token_batch(1, 4))
    with pytest.raises(ValueError, match="fit the cache"):
        Generator(fast, batch=2, capacity=8).generate(token_batch(2, 4), 5)
