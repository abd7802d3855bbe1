"""Greedy generation with ``FastLlama``: on CUDA each decode step is one CUDA-graph replay, and so is a short
prefill (padded to a power-of-two length, one graph per length), where an eager prefill would be bound by the
host's kernel launches rather than by the GPU."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qqq.fast.backend import triton_or_reference
from qqq.fast.model import FastLlama

# a prefill of at most this many tokens (batch x padded length) replays a CUDA graph: at batch 1 and 1024 tokens
# the eager prefill of the W4A8 model took about twice FP16's time on the H200 (results/e2e_speed_h200.md), launch
# after launch from Python; longer prefills keep the GPU busy on their own (and a graph would hold their activations)
PREFILL_GRAPH_MAX_TOKENS = 4096
SHORTEST_PREFILL_BUCKET = 16


def prefill_bucket(tokens: int, capacity: int) -> int:
    """The length a prompt of ``tokens`` tokens is padded to for a graphed prefill: the next power of two (at
    least 16), or the prompt's own length where that would pass the cache's ``capacity``."""
    bucket = max(SHORTEST_PREFILL_BUCKET, 1 << (tokens - 1).bit_length())
    return bucket if bucket <= capacity else tokens


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, new_tokens], greedy
    ttft_s: float  # prefill of the prompt and the first token
    decode_s: float  # the remaining new_tokens - 1 steps

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens.shape[1] - 1
        return self.tokens.shape[0] * steps / self.decode_s if steps and self.decode_s > 0 else float("nan")


class Generator:
    """Greedy generation for a batch of equal-length prompts with a static KV cache; on CUDA each decode step
    is one CUDA-graph replay (its argmax, token and position updates included, nothing comes back to the host)."""

    def __init__(self, model: FastLlama, batch: int, capacity: int, use_graph: bool | None = None):
        if capacity > model.max_positions:
            raise ValueError(f"capacity {capacity} exceeds the model's {model.max_positions} positions")
        self.model, self.batch, self.capacity = model, batch, capacity
        device = model.embed.device
        self.cache = model.new_cache(batch, capacity)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.history = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.graph = None
        self.first = torch.zeros(batch, dtype=torch.long, device=device)  # a graphed prefill's output
        self.last = torch.zeros((), dtype=torch.long, device=device)  # the index of its last real token
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> graph, tokens

    @torch.no_grad()
    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """Run the prompts [B, T] (positions 0..T-1) and return the first generated token [B]."""
        batch, t = prompts.shape
        if batch != self.batch or t < 1 or t >= self.capacity:
            raise ValueError(f"prompts must be [{self.batch}, T] with 1 <= T < {self.capacity}, got {tuple(prompts.shape)}")
        if self.use_graph and batch * prefill_bucket(t, self.capacity) <= PREFILL_GRAPH_MAX_TOKENS:
            return self._graphed_prefill(prompts)
        positions = torch.arange(t, device=prompts.device).expand(batch, t)
        return self.model(prompts, positions, self.cache).argmax(-1)

    def _graphed_prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        t = prompts.shape[1]
        bucket = prefill_bucket(t, self.capacity)
        graph, tokens = self.prefill_graphs.get(bucket, (None, None))
        if tokens is None:
            tokens = torch.zeros(self.batch, bucket, dtype=torch.long, device=prompts.device)
        tokens[:, :t].copy_(prompts)  # past t: whatever an earlier prompt left there, never attended to
        self.last.fill_(t - 1)  # before a capture too: its warm-up runs index the rows with it
        if graph is None:
            graph = self._graph_of(lambda: self.padded_prefill(tokens))
            self.prefill_graphs[bucket] = (graph, tokens)
        graph.replay()
        return self.first.clone()

    @torch.no_grad()
    def padded_prefill(self, tokens: torch.Tensor) -> None:
        """The prefill of ``tokens`` [B, bucket] whose real prompt ends at index ``self.last``: writes the first
        generated token to ``self.first`` (what a prefill graph replays). The padding's keys and values land in
        the cache past the prompt, where each decode step overwrites its own position before it attends to it."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        self.first.copy_(self.model(tokens, positions, self.cache, self.last).argmax(-1))

    @torch.no_grad()
    def _decode_step(self) -> None:
        logits = self.model(self.token, self.position, self.cache)
        step = triton_or_reference(logits, "greedy.greedy_step", greedy_step_reference)
        step(logits, self.token, self.position, self.history, self.step)
        # the counter's own launch: without a counter (the history indexed by position) 7B batch 16 ran 2.5-3% slower
        # in processes that ran FP16 first, with every kernel in the graph as fast as here (kernels_triton/NOTES.md)
        self.step.add_(1)

    def _capture(self) -> None:
        saved = [t.clone() for t in (self.token, self.position, self.step)]
        self.graph = self._graph_of(self._decode_step)
        for target, value in zip((self.token, self.position, self.step), saved):
            target.copy_(value)

    @staticmethod
    def _graph_of(step) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and pick kernel configs outside the capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph

    def decode(self, first: torch.Tensor, start: int, steps: int) -> torch.Tensor:
        """``steps`` greedy steps after token ``first`` [B] at position ``start``; returns them [B, steps]."""
        if start < 0 or steps < 0 or start + steps > self.capacity:  # step i writes position start + i
            raise ValueError(f"a decode of {steps} steps from position {start} would write past the KV cache "
                             f"(capacity {self.capacity} positions)")
        self.token.copy_(first[:, None])
        self.position.fill_(start)
        self.step.zero_()
        if self.use_graph and self.graph is None and steps:
            self._capture()  # leaves the buffers as they are here
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._decode_step()
        return self.history[:, :steps].clone()

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> GenerationResult:
        if new_tokens < 1 or prompts.shape[1] + new_tokens > self.capacity:
            raise ValueError(f"new_tokens must be >= 1 and fit the cache: {prompts.shape[1]} + {new_tokens} > "
                             f"{self.capacity}")
        if self.use_graph and self.graph is None and new_tokens > 1:
            # warm-up outside the timed region: compiles the prefill's kernels and captures the decode graph
            self.decode(self.prefill(prompts), prompts.shape[1], 1)
        start = _now(prompts)
        first = self.prefill(prompts)
        middle = _now(prompts)
        rest = self.decode(first, prompts.shape[1], new_tokens - 1)
        end = _now(prompts)
        return GenerationResult(torch.cat((first[:, None], rest), dim=1), middle - start, end - middle)


def greedy_step_reference(logits: torch.Tensor, token: torch.Tensor, position: torch.Tensor, history: torch.Tensor,
                          column: torch.Tensor) -> None:
    """Plain composition of ``kernels_triton.greedy.greedy_step``: the argmax of each row of ``logits`` becomes the
    row's next token and is recorded in ``history`` at ``column``; each position advances by one."""
    following = logits.argmax(-1, keepdim=True)
    history.scatter_(1, column.expand(len(history), 1), following)
    token.copy_(following)
    position.add_(1)


def _now(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()
