"""What the launchers and the tuner need to know about the GPU they run on, read from the device.

On a machine without CUDA (the interpreter in the CPU tests) the figures of an H100 SXM stand in, so the
CPU tests see the same launch shapes as the GPU we first tuned on.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


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
