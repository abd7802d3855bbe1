"""Which launch branch each kernel launcher took, so the GPU suite can prove it compiled and checked every one.

Each launcher module lists its branches in ``LAUNCH_BRANCHES`` (launcher name -> branch names) beside the
launcher and calls ``record(launcher, branch)`` where it picks one. Recording costs one ``None`` check unless a
``recording()`` block is active. ``tests/test_gpu_kernels.py`` runs every listed branch on the GPU, and a CPU test
fails when a listed branch has no GPU case there.
"""

from __future__ import annotations

from contextlib import contextmanager

_taken: set[tuple[str, str]] | None = None


def record(launcher: str, branch: str) -> None:
    if _taken is not None:
        _taken.add((launcher, branch))


@contextmanager
def recording():
    """Collect the ``(launcher, branch)`` pairs taken inside the block into the yielded set."""
    global _taken
    outer, _taken = _taken, set()
    try:
        yield _taken
    finally:
        if outer is not None:
            outer.update(_taken)
        _taken = outer

