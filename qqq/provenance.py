"""How a result was made: the command, device, library versions and date, for every results file."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance() -> dict[str, str]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown_provenance(meta: dict[str, str]) -> str:
    return "\n".join(f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in meta.items())
