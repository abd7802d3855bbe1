"""Smoothing: divide an activation by a per-channel scale ``s`` and multiply the consuming weights' input
columns by ``s`` (exact in floating point), so that outlier channels hurt the int8 activations less.

Two rules for ``s`` at each smoothing point of a decoder layer:
- ``search`` (QQQ's adaptive smoothing): for thresholds ``t`` from ``max|X|`` down to 0.1,
  ``s_j = max(1, max|X_j| / t)``; keep the ``t`` whose block output under fake W4/A8 is closest to the FP
  output (the q/k/v point compares attention outputs). Layers are searched in order on the calibration
  model, which is itself fake-quantized, so each layer sees the quantized outputs of the ones before.
- ``smoothquant``: ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` (SmoothQuant).

For the o_proj point the scale is folded into the rows of v_proj. With grouped-query attention one v_proj
row feeds several query heads, so the scale is constrained to be equal across the query heads that share a
key/value head (the original QQQ silently dropped this scale for GQA models).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qqq import numerics
from qqq.layerwise import LayerInputs, capture_layer0_inputs, feed_layer, moved_to, recorded_inputs, run_layer
from qqq.model_families import ModelFamily, SmoothingPoint, attention_output


@dataclass(frozen=True)
class SmoothingConfig:
    rule: str = "search"  # "search" (QQQ) or "smoothquant"
    weight_bits: int = 4  # the weight grid the search (and the calibration forward) fake-quantizes to
    group_size: int = -1
    min_thresholds: int = 100
    # None: the paper's count of candidate thresholds, max(min_thresholds, max|X| / 0.5); a number caps that
    # count (a coarser, faster search, e.g. for a notebook on a CPU)
    max_thresholds: int | None = None
    alpha: float = 0.5  # smoothquant only
    batch_size: int = 8

    def __post_init__(self):
        if self.rule not in ("search", "smoothquant"):
            raise ValueError(f"smoothing rule must be 'search' or 'smoothquant', got {self.rule!r}")
        if self.min_thresholds < 1:
            raise ValueError("min_thresholds must be positive")
        if self.max_thresholds is not None and self.max_thresholds < 1:
            raise ValueError(f"max_thresholds must be positive or None, got {self.max_thresholds}")

    def threshold_count(self, t_max: float) -> int:
        """How many thresholds the search tries between ``t_max`` and 0.1."""
        count = max(self.min_thresholds, int(t_max / 0.5))
        return count if self.max_thresholds is None else min(count, self.max_thresholds)


@contextmanager
def fake_quantized(linears: list[nn.Module], group_size: int, weight_bits: int):
    """Run ``linears`` with round-to-nearest weights and per-token int8 inputs; restore them on exit."""
    with ExitStack() as stack:
        for linear in linears:
            original = linear.weight.data
            linear.weight.data = numerics.fake_quantize_weight(original, group_size, weight_bits)
            handle = linear.register_forward_pre_hook(lambda _m, args: (numerics.fake_quantize_per_token(args[0]),))
            stack.callback(handle.remove)
            stack.callback(setattr, linear.weight, "data", original)
        yield


class KVHeadTying:
    """Maps a per-channel statistic of the attention output ([heads * head_dim]) to one shared by the query
    heads of each key/value head, and a scale of that shape to the v_proj rows ([kv_heads * head_dim])."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        self.kv_heads, self.group, self.head_dim = kv_heads, heads // kv_heads, head_dim

    def tie(self, per_channel: torch.Tensor) -> torch.Tensor:
        grouped = per_channel.view(self.kv_heads, self.group, self.head_dim).amax(dim=1, keepdim=True)
        return grouped.expand(-1, self.group, -1).reshape(-1)

    def to_value_rows(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.view(self.kv_heads, self.group, self.head_dim)[:, 0].reshape(-1)


def _block_output(point: SmoothingPoint, layer: nn.Module, inputs: LayerInputs):
    """The function ``(x, projections) -> output`` whose error the search minimizes at ``point``: it takes the
    point's input ``x`` [B, T, C] and the outputs of its consumer linears (the q/k/v point compares attention
    outputs, the gate/up point act(gate) * up, the others the linear's own output)."""
    if point.loss == "attention":
        attention = layer.self_attn
        position_embeddings = inputs.layer_kwargs["position_embeddings"]
        return lambda x, projections: attention_output(attention, x, position_embeddings,
                                                       *(lambda _h, p=p: p for p in projections))
    if point.loss == "swiglu":
        act = layer.mlp.act_fn
        return lambda x, projections: act(projections[0]) * projections[1]
    return lambda x, projections: projections[0]


def _int8_weights(weight: torch.Tensor, scales: torch.Tensor, config: SmoothingConfig):
    """``numerics.fake_quantize_weight(weight * s)`` for every row ``s`` of ``scales`` [S, C], as the int8 weight
    the W4A8 GEMM multiplies [S, N, C] and its per-channel fp32 scale [S, N] (the same numbers: every weight grid
    quantizes each output row on its own, so the S scaled copies are quantized as one [S * N, C] matrix)."""
    n, c = weight.shape
    scaled = (weight[None] * scales[:, None, :]).reshape(-1, c)
    if config.weight_bits == 8:
        codes, channel_scale = numerics.quantize_weight_int8_per_channel(scaled)
    elif config.group_size == -1:
        codes, channel_scale = numerics.quantize_weight_per_channel(scaled)
    else:
        codes, group_scale = numerics.quantize_weight_per_group(scaled, config.group_size)
        channel_scale, ratio = numerics.two_level_scales(codes, group_scale)
        codes = numerics.int8_weight_from_groups(codes, ratio)
    return codes.view(-1, n, c), channel_scale.view(-1, n)


def _centered_codes(quotient: torch.Tensor) -> torch.Tensor:
    """``code - 8`` of per-group codes from ``w / group_scale`` (in place): round(w / scale) + 8 clamped to [0, 15],
    minus 8 again, are the same integers as round(w / scale) clamped to [-8, 7]."""
    return quotient.round_().clamp_(-numerics.INT4_ZERO_POINT, numerics.INT4_UNSIGNED_MAX - numerics.INT4_ZERO_POINT)


class ScaledGroupWeights:
    """:func:`_int8_weights` of a 4-bit per-group ``weight`` [N, C] for many candidate scales, the same numbers
    computed with less work. A group of ``weight * s`` whose channels all have ``s_j == 1`` (most groups, for all
    but the lowest thresholds) has the codes and group scale of ``weight`` itself: those are computed once here,
    and each candidate batch quantizes only the groups where some ``s_j != 1``. The two-level step then needs
    only per-group maxima: ``max |(code - 8) * group_scale|`` over a group is ``max |code - 8| * group_scale``
    (rounding is monotonic), so the channel scale comes from [N, C / g] numbers, not from a dequantized copy."""

    def __init__(self, weight: torch.Tensor, group_size: int):
        n, c = weight.shape
        self.group_size, self.groups = group_size, c // group_size
        self.weight = weight.float().view(n, self.groups, group_size)
        codes, self.group_scale = numerics.quantize_weight_per_group(weight, group_size)
        self.centered = (codes.float() - numerics.INT4_ZERO_POINT).view(n, self.groups, group_size)
        self.group_max = numerics.abs_max(self.centered) * self.group_scale
        self._scratch = {}  # fp32 work space by shape, reused from call to call (nothing returned lives in it)

    def _scratch_for(self, shape: tuple[int, ...]) -> torch.Tensor:
        if shape not in self._scratch:
            self._scratch[shape] = torch.empty(shape, dtype=torch.float32, device=self.weight.device)
        return self._scratch[shape]

    def _quantize_groups(self, scales: torch.Tensor, index: torch.Tensor):
        """Centered codes [S, N, k, g], group scales and group maxima [S, N, k] of groups ``index`` of
        ``weight * s`` for every row ``s`` of ``scales`` (numerics.quantize_weight_per_group's arithmetic)."""
        s = scales.view(scales.shape[0], self.groups, self.group_size)
        if len(index) == self.groups:  # every group: no gather needed
            scaled = torch.mul(self.weight[None], s[:, None], out=self._scratch_for((len(s), *self.weight.shape)))
        else:
            scaled = self.weight[None, :, index] * s[:, index][:, None]
        high, low = scaled.amax(dim=-1), scaled.amin(dim=-1)
        group_scale = numerics.divide_exactly(torch.maximum(high, -low).abs() * 2, numerics.INT4_UNSIGNED_MAX)
        divisor = numerics.safe_divisor(group_scale)

        centered = _centered_codes(scaled.div_(divisor[..., None]))
        # the codes of a group's largest and smallest weights are its largest and smallest codes (w -> code is
        # monotonic), so max |code| needs no pass over the codes
        code_max = torch.maximum(_centered_codes(high / divisor).abs(), _centered_codes(low / divisor).abs())
        return centered, group_scale, code_max * group_scale

    def __call__(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weights [S, N, C] and channel scales [S, N] of ``weight * s`` for the rows ``s`` of ``scales``."""
        count, (n, groups, size) = scales.shape[0], self.weight.shape
        index = (scales != 1).view(count, groups, size).any(dim=2).any(dim=0).nonzero()[:, 0]
        group_scale = self.group_scale.expand(count, n, groups).clone()
        group_max = self.group_max.expand(count, n, groups).clone()
        if len(index):
            centered, group_scale[:, :, index], group_max[:, :, index] = self._quantize_groups(scales, index)
        channel_scale = numerics.divide_exactly(group_max.amax(dim=2), numerics.INT8_MAX)
        divisor = numerics.safe_divisor(channel_scale)
        ratio = (group_scale / divisor[..., None]).to(torch.float16).float()[..., None]
        if len(index) == groups:
            product = centered.mul_(ratio)
        else:
            product = torch.mul(self.centered, ratio, out=self._scratch_for((count, n, groups, size)))
            if len(index):
                product[:, :, index] = centered.mul_(ratio[:, :, index])
        codes = product.round_().clamp_(-numerics.INT8_MAX, numerics.INT8_MAX).to(torch.int8)
        return codes.view(count, n, groups * size), channel_scale


def _int8_weight_maker(weight: torch.Tensor, config: SmoothingConfig):
    """A function ``scales [S, C] -> (int8 weights [S, N, C], channel scales [S, N])`` for ``weight``."""
    if config.weight_bits == 4 and config.group_size != -1:
        return ScaledGroupWeights(weight, config.group_size)
    return lambda scales: _int8_weights(weight, scales, config)


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [N, K]^T`` of int8 matrices, exact: int32 from the CPU's int8 GEMM where it pays (3-4x
    fp32's speed with VNNI; ``numerics.cpu_int8_gemm_pays``), fp32 holding the exact sums elsewhere. Either
    becomes the same fp32 numbers in a product with fp32."""
    if numerics.takes_cpu_int8_gemm(a):
        return torch._int_mm(a, b.T)
    return numerics.int8_matmul_exact(a, b, torch.float32)


def _candidate_bytes(x: torch.Tensor, weights: list[torch.Tensor]) -> int:
    """Rough memory one candidate threshold takes in a batch (fp32 and int8 copies of x and the weights)."""
    return 12 * (x.numel() + sum(w.numel() for w in weights))


# Small on purpose: on a CPU, candidates quantized one by one in cache-sized tensors were measured faster than
# big batches (which leave the cache); batches still spare the small layers a Python loop per candidate.
CANDIDATE_BATCH_BYTES = 16 * 2**20


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], biases: list, block, config: SmoothingConfig,
                 tie=None) -> tuple[torch.Tensor, float]:
    """QQQ's threshold search. Returns the best scale [C] and its threshold.

    For each candidate ``t`` the scale is ``max(1, max|X_j| / t)``, ``x / s`` is rounded onto its per-token int8
    grid and ``w * s`` onto the weight grid, and the loss is ``block``'s squared error against FP. The candidates
    are quantized in batches, and the consumers' quantized weights, stacked, are one exact int8 GEMM scaled back
    to fp32: the product of the fake-quantized tensors, without fp32's rounding of the sum (as the W4A8 kernel
    computes it). (Every weight grid quantizes each output row on its own, so stacking the consumers' rows
    changes no number.)"""
    x, weights = x.float(), [w.float() for w in weights]
    biases = [None if b is None else b.float() for b in biases]
    channel_max = x.abs().flatten(0, -2).amax(dim=0)
    if tie is not None:
        channel_max = tie(channel_max)
    rows = x.flatten(0, -2)
    ends = torch.tensor([w.shape[0] for w in weights]).cumsum(0).tolist()
    with torch.no_grad():
        target = block(x, [nn.functional.linear(x, w, b) for w, b in zip(weights, biases)])
        t_max = float(channel_max.max())
        thresholds = torch.linspace(t_max, 0.1, config.threshold_count(t_max)).tolist() if t_max > 0.1 else [t_max]
        per_batch = max(1, CANDIDATE_BATCH_BYTES // _candidate_bytes(x, weights))
        int8_weights = _int8_weight_maker(torch.cat(weights), config)
        best = (float("inf"), torch.ones_like(channel_max), t_max)
        for start in range(0, len(thresholds), per_batch):
            batch = thresholds[start:start + per_batch]
            scales = (channel_max / torch.tensor(batch, device=x.device)[:, None]).clamp(min=1.0)
            x_codes, token_scale = numerics.quantize_per_token(rows / scales[:, None, :], overwrite=True)
            w_codes, w_scale = int8_weights(scales)
            for i, t in enumerate(batch):
                accumulated = _int8_matmul(x_codes[i], w_codes[i])
                projections = []
                for begin, end, b in zip([0] + ends[:-1], ends, biases):
                    # int32 * fp32 is computed as float(int32) * fp32
                    projection = (accumulated[:, begin:end] * token_scale[i]).mul_(w_scale[i, begin:end])
                    # (no bias: nothing added; adding 0 would only turn -0.0 into 0.0, which no loss can see)
                    projections.append((projection if b is None else projection + b).view(*x.shape[:-1], -1))
                loss = float((block(x, projections) - target).pow_(2).sum(dim=-1).mean())
                if loss < best[0]:
                    best = (loss, scales[i].clone(), t)
    return best[1], best[2]


def smoothquant_scale(x: torch.Tensor, weights: list[torch.Tensor], alpha: float, tie=None) -> torch.Tensor:
    act_max = x.float().abs().flatten(0, -2).amax(dim=0)
    if tie is not None:
        act_max = tie(act_max)
    weight_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    if tie is not None:
        weight_max = tie(weight_max)
    scale = act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    return scale.clamp(min=1e-5)


@torch.no_grad()
def fold_scale(layer: nn.Module, point: SmoothingPoint, scale: torch.Tensor, tying: KVHeadTying | None) -> None:
    """Divide the producer by ``scale`` and multiply the consumers' input columns by it (exact in FP)."""
    producer = layer.get_submodule(point.producer)
    if isinstance(producer, nn.Linear):
        rows = tying.to_value_rows(scale) if tying is not None and producer.out_features != scale.numel() else scale
        producer.weight.data = (producer.weight.float() / rows[:, None].to(producer.weight.device)).to(producer.weight.dtype)
        if producer.bias is not None:
            producer.bias.data = (producer.bias.float() / rows.to(producer.bias.device)).to(producer.bias.dtype)
    else:
        producer.weight.data = (producer.weight.float() / scale.to(producer.weight.device)).to(producer.weight.dtype)
    for name in point.consumers:
        consumer = layer.get_submodule(name)
        consumer.weight.data = (consumer.weight.float() * scale.to(consumer.weight.device)).to(consumer.weight.dtype)


@dataclass
class PointScale:
    """The scale folded at one smoothing point, the threshold the search chose (None for SmoothQuant), and
    ``max |X_j|`` per channel of the activation there over the calibration tokens, as the search saw it (before
    this point's smoothing; after it, the activation's channel maxima are ``channel_max / scale``)."""

    scale: torch.Tensor
    threshold: float | None
    channel_max: torch.Tensor

    @property
    def smoothed_channel_max(self) -> torch.Tensor:
        return self.channel_max / self.scale


def smooth_layer(layer: nn.Module, family: ModelFamily, inputs: LayerInputs, config: SmoothingConfig,
                 tying: KVHeadTying) -> dict[str, PointScale]:
    """Find and fold the scale of every smoothing point of ``layer``, in order; returns them by point name."""
    scales, quantized = {}, []
    for point in family.smoothing_points:
        consumers = [layer.get_submodule(name) for name in point.consumers]
        with fake_quantized(quantized, config.group_size, config.weight_bits), recorded_inputs(consumers[0]) as seen:
            feed_layer(layer, inputs, config.batch_size, last=consumers[0])  # the rest of the layer is not needed
        x = torch.cat(seen)
        tie = tying.tie if point.producer.endswith("v_proj") else None
        weights = [c.weight for c in consumers]
        if config.rule == "search":
            block = _block_output(point, layer, inputs)
            scale, threshold = search_scale(x, weights, [c.bias for c in consumers], block, config, tie)
        else:
            scale, threshold = smoothquant_scale(x, weights, config.alpha, tie), None
        fold_scale(layer, point, scale, tying if tie is not None else None)
        channel_max = x.float().abs().flatten(0, -2).amax(dim=0)
        scales[point.name] = PointScale(scale.cpu(), threshold, channel_max.cpu())
        quantized += consumers
    return scales


@torch.no_grad()
def smooth_model(model: nn.Module, family: ModelFamily, calibration_ids: torch.Tensor, config: SmoothingConfig,
                 device: torch.device) -> list[dict[str, PointScale]]:
    """Smooth every decoder layer in place, sequentially on the fake-quantized calibration model."""
    inputs = capture_layer0_inputs(model, family, calibration_ids, device)
    tying = KVHeadTying(*family.head_layout(model))
    all_scales = []
    layers = family.decoder_layers(model)
    for layer in tqdm(layers, desc=f"smoothing ({config.rule})", unit="layer"):
        with moved_to([layer], device):
            all_scales.append(smooth_layer(layer, family, inputs, config, tying))
            with fake_quantized(list(family.linears(layer).values()), config.group_size, config.weight_bits):
                inputs.hidden = run_layer(layer, inputs, config.batch_size)
    return all_scales
