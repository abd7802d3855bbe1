"""Layer-by-layer execution: capture the inputs of decoder layer 0 once, then run one layer at a time on
the calibration device while the rest of the model stays where it is (on the CPU for big models)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from qqq.model_families import ModelFamily


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer for every calibration sequence, plus the keyword arguments
    the model passes to each layer (rotary embeddings, mask, positions), shared by all sequences."""

    hidden: torch.Tensor  # [num_sequences, seq_len, hidden_size]
    layer_kwargs: dict

    def batches(self, batch_size: int):
        for start in range(0, self.hidden.shape[0], batch_size):
            yield self.hidden[start:start + batch_size]


@contextmanager
def moved_to(modules: list[nn.Module], device: torch.device):
    """Temporarily move ``modules`` to ``device`` and back to where they were."""
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, family: ModelFamily, input_ids: torch.Tensor,
                          device: torch.device) -> LayerInputs:
    """Run the model up to decoder layer 0 for each row of ``input_ids`` [n, seq_len] and keep its inputs."""
    layer0 = family.decoder_layers(model)[0]
    captured, kwargs_seen = [], {}

    def catch(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with moved_to(family.modules_before_layers(model), device):
            for row in input_ids:
                try:
                    model(row[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen["use_cache"] = False
    return LayerInputs(torch.cat(captured), kwargs_seen)


def layer_output(out) -> torch.Tensor:
    """Decoder layers return a tensor (transformers >= 5) or a tuple whose first item is the output."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, batch_size: int) -> torch.Tensor:
    return torch.cat([layer_output(layer(batch, **inputs.layer_kwargs)) for batch in inputs.batches(batch_size)])


@torch.no_grad()
def feed_layer(layer: nn.Module, inputs: LayerInputs, batch_size: int, last: nn.Module) -> None:
    """Run ``layer`` on every batch of ``inputs`` only until ``last`` (a submodule) is called, for forward hooks
    that collect inputs: ``last`` and whatever follows it are not computed, and nothing is returned."""
    def stop(_module, _args):
        raise _StopForward

    handle = last.register_forward_pre_hook(stop)  # after the caller's hooks on ``last``, which still run
    try:
        for batch in inputs.batches(batch_size):
            try:
                layer(batch, **inputs.layer_kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()


@contextmanager
def recorded_inputs(module: nn.Module):
    """Collect the first positional input of every call of ``module`` into a list."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()
