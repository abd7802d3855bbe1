"""GPTQ (Hessian-based error compensation) onto QQQ's 4-bit grids.

Columns are quantized one at a time (in blocks of 128, in order of decreasing Hessian diagonal when
``act_order``) and the rounding error of each is spread over the columns not yet quantized through the
inverse Hessian of the layer's inputs. Group scales are static: computed from the original weights before
any update, per contiguous group, so act-order needs no reordering at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from qqq import numerics


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's options; the group size is the caller's (``QuantizeSettings.group_size``), given to ``quantize``."""

    damping: float = 0.01
    block_size: int = 128
    act_order: bool = True
    mse_clip: bool = False  # search a clipping factor per channel/group (QQQ's --gptq_mse)
    # the same search, its error weighted by each column's input energy (the Hessian's diagonal) instead of
    # |w - q(w)|^2.4: the diagonal part of GPTQ's own objective, so columns that meet large inputs are not clipped
    hessian_clip: bool = False
    # each row's clipping factor chosen by GPTQ's objective itself (rows are independent in GPTQ): the column loop
    # runs once per candidate (the absolute maximum times GPTQ_CLIP_FACTORS, and the Hessian-weighted search's
    # scale) and every row keeps its best; costs about len(GPTQ_CLIP_FACTORS) + 2 GPTQ runs
    gptq_clip: bool = False


GPTQ_CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
CLIP_SEARCHES = {  # GPTQConfig's scale searches: field (command-line flag --mse-clip etc.) -> what it does
    "mse_clip": "search a clipping factor per channel/group minimizing sum |w - q(w)|^2.4",
    "hessian_clip": "that search with its error weighted by each column's input energy (the Hessian's diagonal)",
    "gptq_clip": "each row's clipping chosen by GPTQ's own objective (its column loop run for 8 candidate scales)",
}


def add_clip_arguments(parser, scope: str = "GPTQ") -> None:
    """``--mse-clip`` / ``--hessian-clip`` / ``--gptq-clip`` (:data:`CLIP_SEARCHES`) on an argparse parser."""
    for field, text in CLIP_SEARCHES.items():
        parser.add_argument("--" + field.replace("_", "-"), action="store_true", help=f"{scope}: {text}")


def clip_searches(args) -> dict[str, bool]:
    """The scale searches that parsed arguments (:func:`add_clip_arguments`) ask for, as GPTQConfig fields."""
    return {field: getattr(args, field) for field in CLIP_SEARCHES}


@dataclass
class GPTQResult:
    """4-bit codes ([-7, 7] per-channel, [0, 15] per-group) with their scales (fp32 [N] or [N, K / g])."""

    codes: torch.Tensor
    scale: torch.Tensor
    loss: float  # GPTQ's objective, 1/2 tr((W - Q) H (W - Q)^T) with the damped Hessian H
    rtn_loss: float  # the same objective for round-to-nearest onto the same grid (same scales, no compensation)

    def dequantized(self) -> torch.Tensor:
        if self.scale.dim() == 1:
            return numerics.dequantize_per_channel(self.codes, self.scale)
        return numerics.dequantize_per_group(self.codes, self.scale)


class GPTQLoss(NamedTuple):
    """:func:`output_error` of one linear on its calibration inputs: GPTQ's weight and round-to-nearest's."""

    gptq: float
    rtn: float


def _clipped_scale(weight: torch.Tensor, group_size: int, quantize_fn,
                   column_energy: torch.Tensor | None = None) -> torch.Tensor:
    """Scale per row (or per group) that minimizes sum |w - q(w)|^2.4 over shrink factors 1.00 .. 0.21; with
    ``column_energy`` [K] (the Hessian's diagonal), sum energy * (w - q(w))^2 instead."""
    rows = weight if group_size == -1 else weight.reshape(-1, group_size)
    energy = None if column_energy is None else column_energy.expand_as(weight).reshape(rows.shape)
    full = rows.abs().amax(dim=1) / (numerics.INT4_SIGNED_MAX if group_size == -1 else numerics.INT4_UNSIGNED_MAX / 2)
    best_err = torch.full_like(full, float("inf"))
    best = full.clone()
    for i in range(80):
        candidate = full * (1 - i / 100)
        difference = rows - quantize_fn(rows, candidate)
        err = difference.abs().pow(2.4).sum(dim=1) if energy is None else (difference.square() * energy).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, candidate, best)
    return best if group_size == -1 else best.reshape(weight.shape[0], -1)


def _round_to_grid(w: torch.Tensor, s: torch.Tensor, group_size: int,
                   safe_s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``w`` on the 4-bit grid with (elementwise) scale ``s``, and their values: signed codes in
    [-7, 7] per-channel, unsigned codes in [0, 15] with zero point 8 per group. ``safe_s`` (``s`` with 1 where it
    is 0) may be given, computed once for many calls."""
    if safe_s is None:
        safe_s = numerics.safe_divisor(s)
    if group_size == -1:
        code = torch.div(w, safe_s).round_().clamp_(-numerics.INT4_SIGNED_MAX, numerics.INT4_SIGNED_MAX)
        return code, code * s
    code = torch.div(w, safe_s).round_().add_(numerics.INT4_ZERO_POINT).clamp_(0, numerics.INT4_UNSIGNED_MAX)
    return code, (code - numerics.INT4_ZERO_POINT).mul_(s)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """GPTQ's objective for a weight error ``delta`` [N, K]: ``1/2 tr(delta H delta^T)``; with
    ``H = 2/n sum x x^T`` this is the squared output error ``|delta x|^2`` summed over channels, mean over tokens."""
    return float(((delta @ hessian) * delta).sum() / 2)


def _quantize_rows_per_channel(w, scale):
    return numerics.dequantize_per_channel(*numerics.quantize_weight_per_channel(w, scale))


def _quantize_rows_per_group(w, scale):
    return numerics.dequantize_per_group(*numerics.quantize_weight_per_group(w, w.shape[1], scale[:, None]))


class GPTQ:
    """Accumulates the Hessian ``H = 2/n * sum x x^T`` of the inputs of one linear, or of several linears that read
    the same input (q/k/v, gate/up: one Hessian serves them all), then quantizes their weights."""

    def __init__(self, *linears: nn.Module):
        if not linears or len({linear.weight.shape[1] for linear in linears}) != 1:
            raise ValueError("GPTQ needs one linear, or several with the same input size")
        self.linears = linears
        columns = linears[0].weight.shape[1]
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=linears[0].weight.device)
        self.rows_seen = 0
        self._last_input, self._inputs_seen, self._calls = None, 0, 0

    @property
    def linear(self) -> nn.Module:
        return self.linears[0]

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        n = x.shape[0]
        self.hessian *= self.rows_seen / (self.rows_seen + n)
        self.rows_seen += n
        x = x * (2 / self.rows_seen) ** 0.5
        self.hessian += x.T @ x

    def add_input(self, inputs: torch.Tensor) -> None:
        """What a forward hook on each of the linears calls with the linear's input: every linear of the solver
        reads the same tensor, which is added once (:meth:`check_inputs_shared` checks that it was)."""
        self._calls += 1
        if inputs is not self._last_input:
            self.add_batch(inputs)
            self._last_input, self._inputs_seen = inputs, self._inputs_seen + 1

    def check_inputs_shared(self) -> None:
        """Raise unless every :meth:`add_input` tensor was read by each linear (else one Hessian cannot serve them)."""
        self._last_input = None
        if self._calls != self._inputs_seen * len(self.linears):
            raise ValueError(f"GPTQ: {len(self.linears)} linears were to read one input, but {self._calls} calls "
                             f"brought {self._inputs_seen} different tensors")

    def initial_scale(self, weight: torch.Tensor, group_size: int, mse_clip: bool,
                      column_energy: torch.Tensor | None = None) -> torch.Tensor:
        """The static scales: the absolute maximum, or with ``mse_clip`` (or ``column_energy``, which weights the
        search's error) the best clipping of it."""
        if mse_clip or column_energy is not None:
            quantize = _quantize_rows_per_channel if group_size == -1 else _quantize_rows_per_group
            return _clipped_scale(weight, group_size, quantize, column_energy)
        if group_size == -1:
            return numerics.divide_exactly(weight.abs().amax(dim=1), numerics.INT4_SIGNED_MAX)
        return numerics.group_scales(weight, group_size)

    def quantize(self, group_size: int = -1, config: GPTQConfig = GPTQConfig()) -> GPTQResult:
        """The weight's 4-bit codes per-channel (``group_size`` -1) or per group, with their scales."""
        if len(self.linears) != 1:
            raise ValueError(f"this solver quantizes {len(self.linears)} linears: call quantize_each")
        return self.quantize_each(group_size, config)[0]

    @torch.no_grad()
    def quantize_each(self, group_size: int = -1, config: GPTQConfig = GPTQConfig()) -> list[GPTQResult]:
        """:meth:`quantize` of each linear, in order: the same numbers as a solver per linear with this Hessian.
        GPTQ treats every output row on its own, so the linears' rows go through the column loop together; only the
        block updates (matmuls) and the losses are computed linear by linear, as for one linear."""
        weights = [linear.weight.detach().float().clone() for linear in self.linears]
        columns = weights[0].shape[1]
        numerics.check_group_size(group_size, columns)
        hessian = self.hessian.clone()
        dead = torch.diag(hessian) == 0
        hessian[dead, dead] = 1
        for weight in weights:
            weight[:, dead] = 0

        # static: from the original weights
        energy = torch.diag(hessian) if config.hessian_clip or config.gptq_clip else None
        scales = [self.initial_scale(weight, group_size, config.mse_clip, energy) for weight in weights]
        hessian.diagonal().add_(config.damping * torch.mean(torch.diag(hessian)))

        order = torch.argsort(torch.diag(hessian), descending=True) if config.act_order else torch.arange(columns)
        ends = torch.tensor([w.shape[0] for w in weights]).cumsum(0).tolist()
        row_slices = [slice(begin, end) for begin, end in zip([0] + ends[:-1], ends)]
        h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian[order][:, order])),
                                      upper=True)
        if config.gptq_clip:
            maxima = [self.initial_scale(weight, group_size, False) for weight in weights]
            candidates = [[maximum * factor for maximum in maxima] for factor in GPTQ_CLIP_FACTORS] + [scales]
            stacked = torch.stack([torch.cat(candidate) for candidate in candidates])  # [C, rows(, groups)]
            _, losses = _column_loop(torch.cat(weights * len(candidates))[:, order],
                                     _by_column(stacked.flatten(0, 1), group_size, columns)[:, order], h_inv,
                                     group_size, config.block_size, [slice(None)])
            best = losses.view(len(candidates), -1).argmin(dim=0)
            chosen = stacked.gather(0, best.view(1, -1, *([1] * (stacked.dim() - 2))).expand_as(stacked[:1]))[0]
            scales = [chosen[rows].clone() for rows in row_slices]  # own storage: checkpoints save each

        column_scales = [_by_column(scale, group_size, columns) for scale in scales]
        rtn_losses = [output_error(weight - _round_to_grid(weight, column_scale, group_size)[1], hessian)
                      for weight, column_scale in zip(weights, column_scales)]
        codes_by_column, losses = _column_loop(torch.cat(weights)[:, order], torch.cat(column_scales)[:, order],
                                               h_inv, group_size, config.block_size, row_slices)
        codes = codes_by_column[torch.argsort(order)].T.contiguous()
        dtype = torch.int8 if group_size == -1 else torch.uint8
        return [GPTQResult(codes[rows].to(dtype), scale.float(), float(losses[rows].sum()), rtn_loss)
                for rows, scale, rtn_loss in zip(row_slices, scales, rtn_losses)]


def _by_column(scale: torch.Tensor, group_size: int, columns: int) -> torch.Tensor:
    """Scales per row [rows] or per group [rows, K / g] as one scale per weight [rows, K]."""
    if group_size == -1:
        return scale[:, None].expand(-1, columns)
    return scale.repeat_interleave(group_size, dim=1)


def _column_loop(weight: torch.Tensor, column_scale: torch.Tensor, h_inv: torch.Tensor, group_size: int,
                 block_size: int, row_slices: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop on ``weight`` [rows, K] (updated in place: pass a copy; columns in processing order,
    ``h_inv`` the upper Cholesky factor of the inverse Hessian in that order): the codes by column [K, rows] and each
    row's objective. The block updates (matmuls) run per ``row_slices`` (one per linear), so that a solver for
    several linears gives each the numbers of a solver for it alone."""
    columns = weight.shape[1]
    # The loop works on transposed copies, so that each column is a contiguous row (the same elementwise
    # arithmetic, on faster memory). Per column, computed once: the scale with 1 where it is 0, and the squared
    # diagonal of h_inv.
    scale_by_column = column_scale.T.contiguous()
    safe_scale_by_column = numerics.safe_divisor(scale_by_column)
    squared_diagonal = torch.diag(h_inv) ** 2

    codes_by_column = torch.zeros_like(weight.T)
    losses = torch.zeros(weight.shape[0], device=weight.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weight[:, start:end].T.contiguous()
        errors = torch.zeros_like(block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            w, d, j = block[i], h_inv_block[i, i], start + i
            codes_by_column[j], q = _round_to_grid(w, scale_by_column[j], group_size, safe_scale_by_column[j])
            difference = w - q
            losses += difference.square().div_(squared_diagonal[j]).div_(2)
            err = torch.div(difference, d, out=errors[i])
            block[i:] -= h_inv_block[i, i:][:, None] * err[None, :]
        errors = errors.T.contiguous()
        for rows in row_slices:
            weight[rows, end:] -= errors[rows] @ h_inv[start:end, end:]
    return codes_by_column, losses
