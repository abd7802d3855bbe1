"""The straight pipeline: (load) -> calibrate -> rotate -> smooth -> GPTQ or round-to-nearest -> pack.

Each step is a function a notebook can call on its own; :func:`quantize_model` chains them for a method.
(The table scripts' sweep over methods and group sizes, with its disk cache, is :mod:`qqq.sweep`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from qqq import numerics
from qqq.gptq import GPTQ, GPTQConfig, GPTQLoss
from qqq.kernels_triton.packing import check_packable
from qqq.layerwise import capture_layer0_inputs, feed_layer, moved_to, run_layer
from qqq.linear import FakeQuantLinear, QQQLinear
from qqq.model_families import family_of
from qqq.rotation import rotate_model
from qqq.smoothing import SmoothingConfig, smooth_model


@dataclass(frozen=True)
class Method:
    """A quantization recipe. ``weight_bits`` 16 means no weight quantization."""

    name: str
    description: str
    smoothing: str | None  # None, "search" (QQQ) or "smoothquant"
    rounding: str | None  # None, "rtn" or "gptq"
    weight_bits: int
    quantize_activations: bool
    rotation: bool = False  # rotate the model first (qqq.rotation), then smooth and round the rotated model

    @property
    def packs_w4a8(self) -> bool:
        return self.weight_bits == 4 and self.quantize_activations

    @property
    def calibrates(self) -> bool:
        """Whether the method needs calibration data (the smoothing search, SmoothQuant and GPTQ do)."""
        return bool(self.smoothing) or self.rounding == "gptq"


METHODS = {m.name: m for m in (
    Method("fp16", "no quantization (the model's own dtype)", None, None, 16, False),
    Method("w8a8_smoothquant", "SmoothQuant W8A8: int8 per-channel weights, int8 per-token activations",
           "smoothquant", "rtn", 8, True),
    Method("w4a16_rtn", "round-to-nearest 4-bit weights, 16-bit activations", None, "rtn", 4, False),
    Method("w4a16_gptq", "GPTQ 4-bit weights, 16-bit activations", None, "gptq", 4, False),
    Method("w4a8_rtn", "round-to-nearest W4A8", None, "rtn", 4, True),
    Method("w4a8_smooth", "QQQ ablation: adaptive smoothing + round-to-nearest", "search", "rtn", 4, True),
    Method("w4a8_gptq", "QQQ ablation: GPTQ without smoothing", None, "gptq", 4, True),
    Method("qqq", "QQQ: adaptive smoothing + GPTQ, W4A8", "search", "gptq", 4, True),
    Method("rot_gptq", "rotation (folded norms, random orthogonal residual, Hadamard per head) + GPTQ, W4A8",
           None, "gptq", 4, True, rotation=True),
    Method("rot_qqq", "rotation + adaptive smoothing searched on the rotated model + GPTQ, W4A8", "search", "gptq",
           4, True, rotation=True),
)}
METHOD_ALIASES = {"fp": "fp16", "rtn": "w4a8_rtn", "gptq": "w4a8_gptq", "smooth": "w4a8_smooth",
                  "smoothquant": "w8a8_smoothquant"}


# Calibration presets. The demo's shrinks calibration so that the embedded model quantizes on a 2-core CPU:
# 32 windows of 512 tokens for GPTQ and 2 of them for smoothing; the paper's: 128 x 2048 and 8.
DEMO_CALIBRATION = dict(nsamples=32, seqlen=512, smooth_samples=2)
PAPER_CALIBRATION = dict(nsamples=128, seqlen=2048, smooth_samples=8)


def calibration_settings(paper: bool = False, **overrides: int | None) -> dict:
    """The demo calibration (or the paper's), with each override that is not None in place of its value."""
    chosen = dict(PAPER_CALIBRATION if paper else DEMO_CALIBRATION)
    unknown = set(overrides) - set(chosen)
    if unknown:
        raise ValueError(f"unknown calibration settings {sorted(unknown)}; expected {sorted(chosen)}")
    chosen.update({key: value for key, value in overrides.items() if value is not None})
    return chosen


def get_method(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    key = METHOD_ALIASES.get(name, name)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)} (aliases: {METHOD_ALIASES})")
    return METHODS[key]


@dataclass
class QuantizeSettings:
    """Everything but the method. The defaults are the paper's settings. ``group_size`` is the one group size
    of the 4-bit methods: GPTQ and the smoothing search both take theirs from it."""

    group_size: int = -1
    smoothing_samples: int = 8
    smoothquant_alpha: float = 0.5
    min_thresholds: int = 100
    max_thresholds: int | None = None  # caps the smoothing search's candidates (None: the paper's count)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    batch_size: int = 8


def quantized_linear(linear: nn.Linear, method: Method, group_size: int, codes=None, scale=None) -> nn.Module:
    """Replace ``linear`` by its quantized form: ``QQQLinear`` for W4A8, a fake-quant linear otherwise.

    ``codes``/``scale`` come from GPTQ; without them the weight is rounded to nearest.
    """
    weight = linear.weight.detach()
    if method.weight_bits == 8:
        effective = numerics.fake_quantize_weight(weight, -1, bits=8)
    else:
        if codes is None:
            codes, scale = numerics.quantize_weight_rtn(weight, group_size)
        if method.packs_w4a8:
            return QQQLinear.from_quantized(codes, scale, linear.bias, group_size, weight.dtype)
        if group_size == -1:
            effective = numerics.dequantize_per_channel(codes, scale)
        else:
            effective = numerics.dequantize_per_group(codes, scale)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return FakeQuantLinear(effective.to(weight.dtype), bias, method.quantize_activations)


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, child, module)


@torch.no_grad()
def round_to_nearest(model: nn.Module, method: Method, group_size: int) -> None:
    family = family_of(model)
    for layer in family.decoder_layers(model):
        for name, linear in family.linears(layer).items():
            _replace(layer, name, quantized_linear(linear, method, group_size))


@torch.no_grad()
def gptq_model(model: nn.Module, method: Method, calibration_ids: torch.Tensor, group_size: int, config: GPTQConfig,
               device: torch.device, batch_size: int = 8) -> list[dict[str, GPTQLoss]]:
    """GPTQ every linear of every decoder layer, layer by layer; returns, per layer and linear, GPTQ's
    objective for its weight and for round-to-nearest onto the same grid (:class:`qqq.gptq.GPTQLoss`).

    The Hessians of all seven linears of a layer come from one forward of the not yet quantized layer
    (as in QQQ; the linears that read one input, q/k/v and gate/up, share theirs), then the layer is run again,
    quantized, to produce the next layer's inputs.
    """
    family = family_of(model)
    inputs = capture_layer0_inputs(model, family, calibration_ids, device)
    losses = []
    progress = tqdm(family.decoder_layers(model), desc="GPTQ", unit="layer")
    for layer in progress:
        with moved_to([layer], device):
            groups = family.linear_groups(layer)
            if sorted(name for group in groups for name in group) != sorted(family.linears(layer)):
                raise ValueError(f"{family.name}: the linear groups do not hold each decoder linear once")
            solvers = [GPTQ(*group.values()) for group in groups]
            hooks = [linear.register_forward_pre_hook(lambda _m, args, s=solver: s.add_input(args[0]))
                     for solver in solvers for linear in solver.linears]
            try:  # the layer's FP output is not needed: it runs up to the input of its last linear
                feed_layer(layer, inputs, batch_size, last=list(family.linears(layer).values())[-1])
            finally:
                for h in hooks:
                    h.remove()
            layer_losses = {}
            for group, solver in zip(groups, solvers):
                solver.check_inputs_shared()
                if solver.rows_seen != inputs.hidden.shape[0] * inputs.hidden.shape[1]:
                    raise ValueError(f"GPTQ: {', '.join(group)} saw {solver.rows_seen} of the "
                                     f"{inputs.hidden.shape[0] * inputs.hidden.shape[1]} calibration tokens")
                for (name, linear), result in zip(group.items(), solver.quantize_each(group_size, config)):
                    layer_losses[name] = GPTQLoss(result.loss, result.rtn_loss)
                    _replace(layer, name, quantized_linear(linear, method, group_size, result.codes, result.scale))
                del solver.hessian
            layer_losses = {name: layer_losses[name] for name in family.linears(layer)}
            losses.append(layer_losses)
            progress.set_postfix(loss=f"{sum(loss.gptq for loss in layer_losses.values()):.3g}")
            inputs.hidden = run_layer(layer, inputs, batch_size)
    return losses


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` chose: per decoder layer, the smoothing scales by point
    (:class:`qqq.smoothing.PointScale`) and GPTQ's losses by linear (:class:`qqq.gptq.GPTQLoss`)."""

    method: str
    group_size: int
    smoothing_scales: list | None = None
    gptq_losses: list | None = None


def _checked(method: Method | str, model: nn.Module, settings: QuantizeSettings, calibration_ids, needed: bool):
    method = get_method(method)
    group_size = settings.group_size if method.weight_bits == 4 else -1
    family = family_of(model)
    for layer in family.decoder_layers(model):
        for linear in family.linears(layer).values():
            numerics.check_group_size(group_size, linear.in_features)
            if method.packs_w4a8:
                check_packable(linear.in_features)
    if needed and calibration_ids is None:
        raise ValueError(f"method {method.name!r} needs calibration data (calibration_ids)")
    return method, group_size, family


def rotate(model: nn.Module, method: Method | str) -> None:
    """Step 0: rotate ``model`` in place if ``method`` asks for it (the FP function is unchanged)."""
    if get_method(method).rotation:
        rotate_model(model, family_of(model))


def smooth(model: nn.Module, method: Method | str, calibration_ids: torch.Tensor | None,
           settings: QuantizeSettings, device: torch.device) -> list | None:
    """Step 1: fold the method's smoothing scales into ``model`` (FP weights stay FP). Returns the scales."""
    method, group_size, family = _checked(method, model, settings, calibration_ids, bool(get_method(method).smoothing))
    if not method.smoothing:
        return None
    config = SmoothingConfig(rule=method.smoothing, weight_bits=method.weight_bits, group_size=group_size,
                             min_thresholds=settings.min_thresholds,
                             max_thresholds=settings.max_thresholds, alpha=settings.smoothquant_alpha,
                             batch_size=settings.batch_size)
    return smooth_model(model.eval(), family, calibration_ids[:settings.smoothing_samples], config, device)


def round_weights(model: nn.Module, method: Method | str, calibration_ids: torch.Tensor | None,
                  settings: QuantizeSettings, device: torch.device) -> list | None:
    """Step 2: replace every decoder linear by its quantized form, by GPTQ or round-to-nearest.
    Returns GPTQ's losses per layer and linear, against round-to-nearest's (None for round-to-nearest)."""
    method, group_size, _ = _checked(method, model, settings, calibration_ids, get_method(method).rounding == "gptq")
    if method.rounding == "gptq":
        return gptq_model(model.eval(), method, calibration_ids, group_size, settings.gptq, device, settings.batch_size)
    if method.rounding == "rtn":
        round_to_nearest(model, method, group_size)
    return None


def quantize_model(model: nn.Module, method: Method | str, calibration_ids: torch.Tensor | None,
                   settings: QuantizeSettings | None = None, device: torch.device | None = None) -> QuantizationReport:
    """Quantize ``model`` in place with ``method``: :func:`rotate`, :func:`smooth`, then :func:`round_weights`.

    ``calibration_ids`` [n, seq_len] token windows are needed by smoothing (the first
    ``settings.smoothing_samples`` rows) and GPTQ (all rows)."""
    method = get_method(method)
    settings = settings or QuantizeSettings()
    device = device or default_device()
    _, group_size, _ = _checked(method, model, settings, calibration_ids, method.calibrates)
    report = QuantizationReport(method.name, group_size)
    rotate(model, method)
    report.smoothing_scales = smooth(model, method, calibration_ids, settings, device)
    report.gptq_losses = round_weights(model, method, calibration_ids, settings, device)
    return report
