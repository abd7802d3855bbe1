"""The table scripts' sweep: quantize one base model with every method x group size, sharing each smoothing
search between the methods that use it, with the disk cache of quantized models (:mod:`qqq.cache`) and the
calibration data loaded from a named data set."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from qqq.cache import cache_key, entry_path, load_cached, save_cached
from qqq.data import calibration_windows, load_text, tokenize
from qqq.gptq import CLIP_SEARCHES, GPTQConfig
from qqq.pipeline import Method, QuantizeSettings, get_method, rotate, round_weights, smooth


CLIP_COLUMNS = tuple(CLIP_SEARCHES)  # the tables' columns for GPTQ's scale searches


def clip_columns(method: Method, gptq: GPTQConfig) -> dict[str, bool]:
    """The GPTQ scale searches that made a method's model, as the tables' columns (all False for a method without
    GPTQ, whatever ``gptq`` says)."""
    return {column: method.rounding == "gptq" and getattr(gptq, column) for column in CLIP_COLUMNS}


def clip_label(columns) -> str:
    """`` mse-clip`` / `` hessian-clip`` / `` gptq-clip`` (or several, or nothing) for a row's clip columns."""
    return "".join(f" {column.replace('_', '-')}" for column in CLIP_COLUMNS if columns[column])


class SweepResult(NamedTuple):
    method: Method
    group_size: int
    model: nn.Module
    seconds: float  # quantizing, or loading from the cache
    cached: Path | None  # the cache entry the model was loaded from (None: quantized here)


def sweep(base: nn.Module, methods: list[str], group_sizes: list[int], calibration_ids: torch.Tensor | None,
          smoothing_samples: int, device: torch.device, cache_as: dict | None = None, gptq: GPTQConfig | None = None):
    """Quantize a copy of ``base`` for every method x group size (group sizes only for 4-bit methods),
    rotating and searching each smoothing once, shared by the methods that use it. Yields ``SweepResult``s.

    ``cache_as`` = ``{"model": name or path, "calibration": {dataset, nsamples, seqlen, smooth_samples, seed}}``
    (describing ``base`` and ``calibration_ids``) turns on the disk cache (``qqq.cache``): a model stored by
    an earlier run is loaded instead of quantized, and a newly quantized one is stored. ``gptq``: the GPTQ
    options of the methods that use it (default ``GPTQConfig()``)."""
    prepared = {}  # rotated and/or smoothed copies of base, shared by the methods that need the same
    for name in methods:
        method = get_method(name)
        for group_size in (group_sizes if method.weight_bits == 4 else [-1]):
            settings = QuantizeSettings(group_size=group_size, smoothing_samples=smoothing_samples,
                                        gptq=gptq or GPTQConfig())
            start = time.time()
            key = None
            if cache_as is not None and method.rounding:
                key = cache_key(cache_as["model"], method, settings, cache_as["calibration"], base.dtype)
                model = load_cached(key)
                if model is not None:
                    yield SweepResult(method, group_size, model, time.time() - start, entry_path(key))
                    continue
            transformed = method.rotation or method.smoothing  # FP weights that differ from base's
            kind = (method.rotation, method.smoothing, method.weight_bits, group_size if method.smoothing else None)
            if transformed and kind not in prepared:
                prepared[kind] = copy.deepcopy(base)
                rotate(prepared[kind], method)
                smooth(prepared[kind], method, calibration_ids, settings, device)
            model = copy.deepcopy(prepared[kind] if transformed else base)
            round_weights(model, method, calibration_ids, settings, device)
            if key is not None:
                save_cached(model, key)
            yield SweepResult(method, group_size, model, time.time() - start, None)


def calibrated_sweep(model_name: str, base: nn.Module, tokenizer, methods: list[str], group_sizes: list[int],
                     calibration: dict, calib_dataset: str, seed: int, device: torch.device, use_cache: bool = True,
                     gptq: GPTQConfig | None = None):
    """``sweep`` of ``base`` (loaded as ``model_name``) calibrated on ``calib_dataset`` with ``calibration``
    (``nsamples``, ``seqlen``, ``smooth_samples``): the table scripts' loop. Reads and writes the quantized-model
    cache unless ``use_cache`` is off, and says when a model came from it."""
    ids = calibration_windows(tokenize(tokenizer, load_text(calib_dataset, "train")), calibration["nsamples"],
                              calibration["seqlen"], seed)
    cache_as = {"model": model_name, "calibration": dict(calibration, dataset=calib_dataset, seed=seed)} \
        if use_cache else None
    for result in sweep(base, methods, group_sizes, ids, calibration["smooth_samples"], device, cache_as, gptq):
        if result.cached:
            print(f"{result.method.name} g{result.group_size}: loaded from the cache ({result.cached})", flush=True)
        yield result
