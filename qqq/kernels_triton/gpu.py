"""What the launchers and the tuner need to know about the GPU they run on, read from the device.

On a machine without CUDA (the interpreter in the CPU tests) the figures of an H100 SXM stand in, so the
CPU tests see the same launch shapes as the GPU we first tuned on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import dataclass

import triton
import triton.language as tl


@dataclass(frozen=True)
class GpuInfo:
    name: str  # as CUDA reports it, e.g. "NVIDIA H200"
    compute_capability: str  # "9.0"
    sm_count: int
    shared_memory_per_block: int  # bytes a block may use once opted in
    l2_bytes: int

    @property
    def file_name(self) -> str:
        """The name as a file name: ``NVIDIA_H100_80GB_HBM3``."""
        return re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_")


STAND_IN = GpuInfo("cpu", "9.0", 132, 227 * 1024, 50 * 2**20)


@functools.cache
def current_gpu() -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        return STAND_IN
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    shared = getattr(props, "shared_memory_per_block_optin", 0) or STAND_IN.shared_memory_per_block
    return GpuInfo(props.name, f"{props.major}.{props.minor}", props.multi_processor_count, shared,
                   getattr(props, "L2_cache_size", 0) or STAND_IN.l2_bytes)


_sequential = False


def compiled_for_hopper(t) -> bool:
    """Whether kernels on ``t``'s device are compiled (not run by the interpreter) for Hopper or a later GPU."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" \
        and int(current_gpu().compute_capability.split(".")[0]) >= 9


def programmatic_launch(t) -> bool:
    """Whether kernels on ``t``'s device are launched as programmatic dependents (:func:`compiled_for_hopper`, not
    inside :func:`sequential_launches`): such a kernel may start while the kernel before it finishes, and waits
    for it with :func:`wait_for_previous_then_let_next_start` before it touches anything that kernel wrote."""
    return not _sequential and compiled_for_hopper(t)


@contextlib.contextmanager
def sequential_launches():
    """Launch every kernel plainly inside this block, so that a profiler's time per kernel is its own work (an
    early-started dependent's time would include its wait for the kernel before it)."""
    global _sequential
    previous, _sequential = _sequential, True
    try:
        yield
    finally:
        _sequential = previous


@triton.jit
def wait_for_previous_then_let_next_start(PDL: tl.constexpr):
    """Under programmatic launch: wait until the kernel before this one has finished and its writes are visible,
    then allow the next kernel to start (it waits for this one before it reads anything), so its launch overlaps
    this kernel's work. Every kernel calls this first. Triggering only after its own wait keeps at most one kernel
    waiting ahead: triggered at the start, a whole chain of waiting dependents piled up on the SMs (Llama-2-13B
    decode step 3.04 -> 4.07 ms, NOTES.md). It also means that when a kernel starts, every kernel but the one just
    before it has finished, so what that one does not write (weights, tables, positions, older cache entries) may
    be read before this call."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
