"""Run the notebooks top to bottom with their own (small) settings and store them with their outputs, so a
reader browsing them sees the figures. Progress bars and warnings (stderr) are not stored.

    OMP_NUM_THREADS=1 python scripts/execute_notebooks.py [NAME.ipynb ...]   # default: every notebook
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute_in_place(path: Path) -> float:
    notebook = nbformat.read(path, as_version=4)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), env.get("PYTHONPATH")]))  # this qqq
    start = time.time()
    NotebookClient(notebook, timeout=3600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(env=env)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [output for output in cell.outputs if output.get("name") != "stderr"]
    nbformat.write(notebook, path)
    return time.time() - start


if __name__ == "__main__":
    for name in sys.argv[1:] or sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")):
        print(f"{name}: {execute_in_place(NOTEBOOKS / name):.0f} s", flush=True)
