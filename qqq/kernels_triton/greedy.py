"""One greedy decode step's bookkeeping as one launch: the argmax of each row of logits, written as the next input
token and into the generated history at the step's column, and the row's position advanced.

In PyTorch that is an argmax, a scatter, a copy and an add: four launches, and the argmax alone ran as a single
512-thread block that took 10-11 us per Llama-2-7B step on the H200 (``results/e2e_speed_h200_profile.csv``).
Here each row is one program whose loads of a ``BLOCK``-wide slice are all in flight at once.

Ties go to the first index, as ``torch.argmax``; a NaN counts as +inf (``torch.argmax`` ranks NaN above +inf, the
two differ only for a row that holds both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qqq.kernels_triton import branches

MAX_BLOCK = 32768  # 32 values per thread at 32 warps
LAUNCH_BRANCHES = {"greedy_step": ("greedy_step",)}


@triton.jit
def _greedy_step_kernel(logits_ptr, token_ptr, position_ptr, history_ptr, column_ptr, vocab, stride_logits,
                        stride_history, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    top = float("-inf")
    index = 0
    for start in range(0, vocab, BLOCK):  # one slice for vocabularies up to BLOCK
        x = tl.load(logits_ptr + row * stride_logits + start + offs, mask=start + offs < vocab, other=float("-inf"))
        x = tl.where(x != x, float("inf"), x)
        slice_top = tl.max(x, axis=0).to(tl.float32)
        slice_index = tl.min(tl.where(x == slice_top, start + offs, vocab), axis=0)
        index = tl.where(slice_top > top, slice_index, index)  # an equal maximum in a later slice comes later
        top = tl.maximum(top, slice_top)
    index = index.to(tl.int64)
    tl.store(history_ptr + row * stride_history + tl.load(column_ptr), index)
    tl.store(token_ptr + row, index)
    tl.store(position_ptr + row, tl.load(position_ptr + row) + 1)


def greedy_step(logits: torch.Tensor, token: torch.Tensor, position: torch.Tensor, history: torch.Tensor,
                column: torch.Tensor) -> None:
    """For each row b of ``logits`` [B, vocab]: ``t = argmax(logits[b])``, ``history[b, column] = t``,
    ``token[b] = t``, ``position[b] += 1`` (``token``, ``position``: int64 [B, 1]; ``history``: int64 [B, C];
    ``column``: int64 [1], the step, which the caller advances). The column must lie in ``[0, C)``: that is the
    caller's check, made once per decode, not per step."""
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    if token.shape != (batch, 1) or position.shape != (batch, 1) or history.shape[0] != batch or column.numel() != 1:
        raise ValueError(f"token and position must be [{batch}, 1], history [{batch}, C] and column one value, got "
                         f"{tuple(token.shape)}, {tuple(position.shape)}, {tuple(history.shape)}, {tuple(column.shape)}")
    if any(t.dtype != torch.long for t in (token, position, history, column)) or not token.is_contiguous() \
            or not position.is_contiguous() or history.stride(1) != 1:
        raise ValueError("token, position and history must be contiguous int64 tensors")
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK)
    branches.record("greedy_step", "greedy_step")
    _greedy_step_kernel[(batch,)](logits, token, position, history, column, vocab, logits.stride(0),
                                  history.stride(0), BLOCK=block, num_warps=max(1, min(32, block // 1024)))
