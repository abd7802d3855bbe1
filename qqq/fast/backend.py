"""Which implementation runs an op: its Triton kernel or its plain PyTorch reference. One rule for every op
of the fast path and for ``qqq.linear.QQQLinear``."""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch


def use_triton(x: torch.Tensor) -> bool:
    """Use the Triton kernels on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1``.

    ``QQQ_BACKEND=reference`` forces the PyTorch reference everywhere (for debugging and fast CPU tests).
    """
    if os.environ.get("QQQ_BACKEND", "auto") == "reference":
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_or_reference(x: torch.Tensor, kernel: str, reference: Callable) -> Callable:
    """The Triton function ``kernel`` (``"module.function"`` of ``qqq.kernels_triton``) if the kernels run for
    ``x`` (see :func:`use_triton`), else ``reference``, which takes the same arguments. The kernel's module is
    imported only when chosen, so a machine without Triton never imports it."""
    if not use_triton(x):
        return reference
    module, _, function = kernel.rpartition(".")
    return getattr(importlib.import_module(f"qqq.kernels_triton.{module}"), function)
