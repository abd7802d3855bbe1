"""The figures: one function per plot, used by the experiment scripts and the notebooks alike.

Every function returns its matplotlib ``Figure`` and, given ``path``, also writes it there as a png.

Speed (``results/gemm_speed.csv``, ``results/e2e_speed.csv``):
- :func:`plot_gemm_speedup`: speedup over FP16 against M per kernel, one panel per GEMM shape, with each
  kernel's roofline limit (:func:`roofline_speedup`) dashed in the same colour.
- :func:`plot_e2e_speedup`: end-to-end decode speedup over FP16, grouped bars per batch size, one panel per model.

Accuracy, from what :func:`qqq.pipeline.smooth` and :func:`qqq.pipeline.round_weights` report:
:func:`plot_activation_outliers`, :func:`plot_smoothing_thresholds`, :func:`plot_gptq_losses`,
:func:`plot_weight_errors`, :func:`plot_perplexities`.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from qqq import numerics
from qqq.fast.projections import METHODS, RENAMED_METHODS
from qqq.provenance import atomic_write

# ------------------------------------------------------------------------------------------ results files


def read_results_csv(path: str | Path) -> pd.DataFrame:
    """A results csv as the experiment scripts write it: ``# key: value`` provenance lines, then the table.
    The provenance lands in ``df.attrs["provenance"]``."""
    path = Path(path)
    provenance = {}
    with path.open() as f:
        for line in f:
            if not line.startswith("#"):
                break
            key, _, value = line[1:].partition(":")
            provenance[key.strip()] = value.strip()
    df = pd.read_csv(path, comment="#")
    df.attrs["provenance"] = provenance
    return df


def _finish(fig, path: str | Path | None):
    fig.tight_layout()
    if path is not None:
        with atomic_write(path, binary=True) as f:  # an interrupted save keeps the old figure
            fig.savefig(f, dpi=110, format=Path(path).suffix[1:] or None)
    return fig


# ------------------------------------------------------------------------------------------ roofline

# Spec-sheet peaks (dense): memory bandwidth in bytes/s, FP16 and INT8 tensor-core throughput in op/s.
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": dict(bandwidth=3.35e12, fp16=989.4e12, int8=1978.9e12),  # H100 SXM5
    "NVIDIA H200": dict(bandwidth=4.8e12, fp16=989.4e12, int8=1978.9e12),  # H200 SXM: the H100's chip, HBM3e
}

# The kernels (gemm_speed.csv's names) that :func:`gemm_bytes` has a byte model for.
KERNEL_FORMATS = {"fp16", "w8a8", "w4a16", "w4a8", "w4a8_g128"}


def gemm_bytes(kernel: str, m: int, n: int, k: int) -> float:
    """Bytes a GEMM ``[M, K] x [N, K]^T`` must move through memory, at the least, in ``kernel``'s format.

    Every kernel reads the fp16 input (2MK) and writes the fp16 output (2MN). The weights:
    fp16 2NK; w8a8 NK + 4N (fp32 channel scales); w4a16 and w4a8 NK/2 + 4N; w4a8_g128 NK/2 + 4N + 2NK/128
    (fp16 group ratios). The int8-activation kernels (w8a8, w4a8, w4a8_g128) also write and read the
    int8 activations (2MK) and their fp32 token scales (8M)."""
    if kernel not in KERNEL_FORMATS:
        raise ValueError(f"no byte model for kernel {kernel!r}; known: {sorted(KERNEL_FORMATS)}")
    weight = {"fp16": 2 * n * k, "w8a8": n * k + 4 * n, "w4a16": n * k / 2 + 4 * n, "w4a8": n * k / 2 + 4 * n,
              "w4a8_g128": n * k / 2 + 4 * n + 2 * n * k / 128}[kernel]
    activations = 2 * m * k + 2 * m * n
    if kernel in ("w8a8", "w4a8", "w4a8_g128"):
        activations += 2 * m * k + 8 * m
    return weight + activations


def roofline_speedup(kernel: str, m: int, n: int, k: int, device: str | None = None) -> float:
    """The speedup over FP16 of ``kernel`` on a GEMM ``[M, K] x [N, K]^T`` when both run at their roofline
    (a kernel can beat it only where FP16 itself falls short of its own roofline).

    Without the device's peaks this is the bandwidth bound ``gemm_bytes("fp16") / gemm_bytes(kernel)``: the
    limit while both GEMMs are memory bound (small M), e.g. about 4 for W4A8 at M = 1 (4x fewer weight bytes,
    less the scales). With the peaks of ``device`` (:data:`DEVICE_PEAKS`) it is the roofline ratio
    ``t_fp16 / t_kernel`` with ``t = max(bytes / bandwidth, 2MNK / throughput)`` (int8 throughput for the
    int8-activation kernels, FP16 for W4A16), which tends to 2 (int8 over FP16 tensor cores) at large M."""
    fp16_bytes, kernel_bytes = gemm_bytes("fp16", m, n, k), gemm_bytes(kernel, m, n, k)
    peaks = DEVICE_PEAKS.get(device)
    if peaks is None:
        return fp16_bytes / kernel_bytes
    flops = 2 * m * n * k
    throughput = peaks["int8"] if kernel in ("w8a8", "w4a8", "w4a8_g128") else peaks["fp16"]
    t_fp16 = max(fp16_bytes / peaks["bandwidth"], flops / peaks["fp16"])
    return t_fp16 / max(kernel_bytes / peaks["bandwidth"], flops / throughput)


# ------------------------------------------------------------------------------------------ speed figures

GEMM_KERNELS = ("w4a8", "w4a8_g128", "w8a8", "w4a16")


def _provenance_title(df: pd.DataFrame) -> str | None:
    meta = df.attrs.get("provenance") or {}
    if not meta:
        return None
    head = ", ".join(f"{key} {meta[key]}" for key in ("torch", "triton") if key in meta)
    return f"{meta.get('device', '')}, {head}, {meta.get('date', '')}\n{meta.get('command', '')}"


def plot_gemm_speedup(df: pd.DataFrame, path: str | Path | None = None, kernels=GEMM_KERNELS, shapes=None,
                      title: str | None = None, columns: int = 4):
    """Speedup over FP16 against M (log 2) for each kernel, one panel per shape; dashed: each kernel's
    :func:`roofline_speedup` for the panel's N, K on the csv's device (the bandwidth bound where the device's
    peaks are not known). ``df``: the rows of ``gemm_speed.csv`` (shape, M, N, K, kernel, speedup_vs_fp16, device)."""
    shapes = list(dict.fromkeys(df["shape"])) if shapes is None else list(shapes)
    if not shapes:
        raise ValueError("no shapes to plot")
    rows = math.ceil(len(shapes) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colours = dict(zip(kernels, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, shape in zip(axes.flat, shapes):
        part = df[df["shape"] == shape]
        if part.empty:
            raise ValueError(f"shape {shape!r} is not in the table")
        n, k = int(part["N"].iloc[0]), int(part["K"].iloc[0])
        device = part["device"].iloc[0] if "device" in part else None
        for kernel in kernels:
            measured = part[part["kernel"] == kernel].sort_values("M")
            if measured.empty:
                continue
            ax.plot(measured["M"], measured["speedup_vs_fp16"], marker="o", ms=3, color=colours[kernel],
                    label=kernel)
            if kernel in KERNEL_FORMATS:
                ms = sorted(part["M"].unique())
                ax.plot(ms, [roofline_speedup(kernel, int(m), n, k, device) for m in ms], ls="--", lw=0.9,
                        color=colours[kernel])
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} (N={n}, K={k})", fontsize=9)
        ax.set_xlabel("M (tokens)", fontsize=8)
        ax.set_ylabel("speedup over FP16", fontsize=8)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].plot([], [], ls="--", color="gray", label="roofline limit")
    axes.flat[0].legend(fontsize=7)
    title = title or _provenance_title(df)
    if title:
        fig.suptitle(title, fontsize=8)
    return _finish(fig, path)


# the order of qqq.fast.projections.METHODS, each old name (results measured before the rename keep it) beside its
# new one
E2E_METHODS = tuple(name for method in METHODS
                    for name in (method, *(old for old, new in RENAMED_METHODS.items() if new == method)))


def e2e_labels(df: pd.DataFrame) -> pd.Series:
    """The bar label of each row of an e2e table: its method, plus " kv8" for the 8-bit KV cache (column
    ``kv_bits``; tables measured before it had the 16-bit cache)."""
    if "kv_bits" not in df:
        return df["method"]
    return pd.Series([m if pd.isna(kv) or int(kv) == 16 else f"{m} kv{int(kv)}" for m, kv in
                      zip(df["method"], df["kv_bits"])], index=df.index)


def plot_e2e_speedup(df: pd.DataFrame, path: str | Path | None = None):
    """End-to-end decode speedup over FP16: for each batch size a group of bars, one per method (in the order
    of :data:`E2E_METHODS`, each with its 8-bit KV cache rows next to it, then any others), one panel per model.
    ``df`` has the columns of ``e2e_speed.csv`` (model, batch, method, decode_tok_s, ttft_ms, peak_mem_gb,
    speedup_vs_fp16, device; kv_bits in tables measured since the 8-bit KV cache).
    A row without a finite speedup (e.g. it or FP16 ran out of memory) gets no bar but its ``status`` (when
    the table has one and it is not "ok") or "n/a" written at the bar's place; a method not measured at a batch
    size leaves a gap."""
    missing = {"model", "batch", "method", "speedup_vs_fp16"} - set(df.columns)
    if missing:
        raise ValueError(f"e2e table lacks the columns {sorted(missing)}")
    df = df.assign(method=e2e_labels(df))
    models = list(dict.fromkeys(df["model"]))
    known = [label for m in E2E_METHODS for label in (m, f"{m} kv8")]
    methods = [m for m in known if m in set(df["method"])] + [m for m in dict.fromkeys(df["method"]) if m not in known]
    panel_width = min(12.0, max(5.0, 1.0 + 0.25 * len(methods) * df["batch"].nunique()))
    fig, axes = plt.subplots(1, len(models), figsize=(panel_width * len(models), 4.0), squeeze=False)
    width = 0.8 / len(methods)
    for ax, model in zip(axes.flat, models):
        part = df[df["model"] == model]
        batches = sorted(part["batch"].unique())
        positions = np.arange(len(batches))
        for i, method in enumerate(methods):
            rows = part[part["method"] == method].set_index("batch")
            heights = np.array([float(rows["speedup_vs_fp16"].get(b, np.nan)) for b in batches])
            x = positions - 0.4 + width * (i + 0.5)
            ax.bar(x, np.where(np.isfinite(heights), heights, 0.0), width, label=method, color=f"C{i}")
            for xi, b, h in zip(x, batches, heights):
                if b in rows.index and not np.isfinite(h):
                    status = rows["status"].get(b) if "status" in rows else None
                    mark = status if isinstance(status, str) and status != "ok" else "n/a"
                    ax.text(xi, 0.02, mark, rotation=90, ha="center", va="bottom", fontsize=6, color=f"C{i}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(positions, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode speedup over FP16")
        ax.set_title(str(model), fontsize=9)
    axes.flat[0].legend(fontsize=7)
    if "device" in df:
        fig.suptitle(", ".join(str(d) for d in dict.fromkeys(df["device"])), fontsize=8)
    return _finish(fig, path)


# ------------------------------------------------------------------------------------------ accuracy figures

def _points(scales: list[dict]) -> list[str]:
    return list(scales[0])


def plot_activation_outliers(scales: list[dict], layer: int, path: str | Path | None = None,
                             title: str | None = None):
    """Activation outliers before and after smoothing, from :func:`qqq.pipeline.smooth`'s per-layer
    ``{point: PointScale}``. Top row: ``max |X_j|`` per channel at each smoothing point of decoder layer
    ``layer``. Bottom row: per layer, the outlier ratio ``max_j / median_j`` of those channel maxima (how far the
    largest channel sticks out of a per-token int8 grid)."""
    points = _points(scales)
    fig, axes = plt.subplots(2, len(points), figsize=(4.0 * len(points), 6.0), squeeze=False)
    for column, point in enumerate(points):
        chosen = scales[layer][point]
        ax = axes[0, column]
        channels = np.arange(chosen.channel_max.numel())
        ax.plot(channels, chosen.channel_max.numpy(), lw=0.6, color="gray", label="before smoothing")
        ax.plot(channels, chosen.smoothed_channel_max.numpy(), lw=0.6, color="C1", label="after smoothing")
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}, {point}", fontsize=9)
        ax.set_xlabel("channel", fontsize=8)
        ax.set_ylabel("max |X| over tokens", fontsize=8)
        ax = axes[1, column]
        before = [float(s[point].channel_max.max() / s[point].channel_max.median()) for s in scales]
        after = [float(s[point].smoothed_channel_max.max() / s[point].smoothed_channel_max.median()) for s in scales]
        ax.plot(before, marker="o", ms=3, color="gray", label="before smoothing")
        ax.plot(after, marker="o", ms=3, color="C1", label="after smoothing")
        ax.set_yscale("log")
        ax.set_title(f"{point}: outlier ratio per layer", fontsize=9)
        ax.set_xlabel("decoder layer", fontsize=8)
        ax.set_ylabel("max / median channel max", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)


def plot_smoothing_thresholds(scales: list[dict], path: str | Path | None = None, title: str | None = None):
    """Per layer and smoothing point: the threshold the search chose (left; channels above it are scaled
    down to it) and the largest scale it folded (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for point in _points(scales):
        thresholds = [s[point].threshold for s in scales]
        if any(t is None for t in thresholds):
            raise ValueError("thresholds come from the search rule; SmoothQuant's scales have none")
        left.plot(thresholds, marker="o", ms=3, label=point)
        right.plot([float(s[point].scale.max()) for s in scales], marker="o", ms=3, label=point)
    left.set_ylabel("chosen threshold t")
    right.set_ylabel("largest scale max(1, max|X_j| / t)")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)


def plot_gptq_losses(losses: list[dict], path: str | Path | None = None, title: str | None = None):
    """GPTQ against round-to-nearest, from :func:`qqq.pipeline.round_weights`' per-layer
    ``{linear: GPTQLoss}``: left, the output error summed over the layer's linears; right, GPTQ's error as a
    fraction of round-to-nearest's, per linear."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([sum(loss.rtn for loss in layer.values()) for layer in losses], marker="o", ms=3, color="gray",
              label="round-to-nearest")
    left.plot([sum(loss.gptq for loss in layer.values()) for layer in losses], marker="o", ms=3, color="C0",
              label="GPTQ")
    left.set_yscale("log")
    left.set_ylabel("output error, sum over linears")
    for name in losses[0]:
        right.plot([layer[name].gptq / layer[name].rtn for layer in losses], marker="o", ms=3,
                   label=name.rpartition(".")[2])
    right.axhline(1.0, color="gray", lw=0.8)
    right.set_ylabel("GPTQ error / round-to-nearest error")
    for ax in (left, right):
        ax.set_xlabel("decoder layer")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)


def plot_weight_errors(weights: list[torch.Tensor], group_sizes=(-1, 64), path: str | Path | None = None,
                       title: str | None = None, bins: int = 200):
    """Histograms of the round-to-nearest error on the W4A8 grid (:func:`qqq.numerics.fake_quantize_weight`)
    of all ``weights``, one per group size (-1 = per-channel), each element's error divided by its row's
    ``max |w|`` so that rows of different ranges are comparable (per-channel errors lie within +-1/14)."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for group_size in group_sizes:
        errors = []
        for weight in weights:
            w = weight.detach().float()
            row_max = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
            errors.append(((w - numerics.fake_quantize_weight(w, group_size)) / row_max).flatten())
        errors = torch.cat(errors)
        label = "per-channel" if group_size == -1 else f"group {group_size}"
        rms = float(errors.pow(2).mean().sqrt())
        ax.hist(errors.numpy(), bins=bins, histtype="step", label=f"{label} (rms {rms:.4f})")
    ax.set_yscale("log")
    ax.set_xlabel("weight error / row max |w|")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)


def plot_perplexities(perplexities: dict[str, float], path: str | Path | None = None, title: str | None = None):
    """One horizontal bar per stage or method, its perplexity written beside it."""
    names = list(perplexities)
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(names) + 1.2))
    bars = ax.barh(names, [perplexities[n] for n in names], color="C0")
    ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity")
    ax.margins(x=0.15)
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)
