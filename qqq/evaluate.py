"""Perplexity: exp of the mean next-token negative log-likelihood over non-overlapping windows."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device | str | None = None,
               desc: str = "perplexity", estimate: bool = False) -> float:
    """Perplexity of ``model`` on ``windows`` [n, seq_len]: each window is scored on its own, every token
    but the first predicted from the ones before it, and the NLL averaged over all predicted tokens.
    ``estimate`` prints, after the first window, how long the others should take."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    for index, window in enumerate(tqdm(windows, desc=desc, unit="window")):
        ids = window[None].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll = nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += ids.shape[1] - 1
        if estimate and index == 0 and len(windows) > 1:
            first = time.perf_counter() - start
            tqdm.write(f"{desc}: the first window took {first:.1f} s, so the other {len(windows) - 1} should take "
                       f"about {first * (len(windows) - 1) / 60:.1f} min")
    return math.exp(total_nll / total_tokens)
