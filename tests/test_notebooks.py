"""The notebooks run top to bottom with their small settings, so a broken notebook fails CI.

Each is executed in memory (working directory: notebooks/, as Jupyter would) and written, executed, into the
test's temporary folder; the committed files (stored with the outputs of one full run) are never touched. Test-only settings go into a cell inserted
right after the notebook's cell tagged ``parameters``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, out_dir: Path, settings: dict | None = None, append: str | None = None, timeout: int = 600):
    """Run notebook ``name`` with ``settings`` overriding its parameters and the code ``append`` as a last
    cell; returns it executed, and its time in seconds."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    if append:
        notebook.cells.append(nbformat.v4.new_code_cell(append))
    if settings:
        tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
        overrides = "\n".join(f"{key} = {value!r}" for key, value in settings.items())
        notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(overrides))
    # the test session sets TRITON_INTERPRET=1 for the kernel tests; the notebooks run as a user would. One
    # thread unless told otherwise: their many small ops are no faster on two, and far slower on shared cores.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.time()
    client.execute(env=env)
    seconds = time.time() - start
    nbformat.write(notebook, out_dir / name)
    print(f"{name}: {seconds:.0f} s")
    return notebook, seconds


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("name") == "stdout")


def images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.get("outputs", []))


def test_committed_notebooks_carry_the_outputs_of_one_full_run():
    """Stored executed, so a reader browsing them sees the figures: every code cell ran once, in order, without
    an error (``python scripts/execute_notebooks.py`` stores them so)."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), \
            f"{path.name} is not stored as one top-to-bottom run: python scripts/execute_notebooks.py {path.name}"
        assert not [o for cell in code for o in cell.outputs if o.output_type == "error"], f"{path.name} failed"
        assert images(notebook) >= 1, f"{path.name} is stored without its figures"


def test_quantize_and_inspect_runs_and_reports_every_stage(tmp_path):
    notebook, _ = execute("01_quantize_and_inspect.ipynb", tmp_path, {"SAVE_FIGURES_TO": str(tmp_path)},
                          append="import json\nprint(json.dumps(perplexities))")
    figures = ["outliers", "thresholds", "weight_errors", "gptq_vs_rtn", "perplexity"]
    assert [name for name in figures if not (tmp_path / f"quantize_inspect_{name}.png").exists()] == []
    assert images(notebook) >= len(figures)
    perplexities = json.loads(printed(notebook).strip().splitlines()[-1])
    assert list(perplexities) == ["FP", "W4A8 round-to-nearest", "smoothed (still FP)",
                                  "smoothing + round-to-nearest", "QQQ: smoothing + GPTQ"]
    assert perplexities["smoothed (still FP)"] == pytest.approx(perplexities["FP"], rel=1e-3)  # smoothing is exact
    assert all(perplexities["FP"] < value < 3 * perplexities["FP"] for key, value in perplexities.items()
               if key not in ("FP", "smoothed (still FP)"))
    assert perplexities["QQQ: smoothing + GPTQ"] < perplexities["W4A8 round-to-nearest"]
    assert perplexities["smoothing + round-to-nearest"] < perplexities["W4A8 round-to-nearest"]


def test_speedup_curves_without_the_e2e_results(tmp_path):
    notebook, _ = execute("02_speedup_curves.ipynb", tmp_path,
                          {"E2E_CSV": str(tmp_path / "missing.csv"), "SAVE_FIGURES_TO": str(tmp_path)})
    assert "does not exist yet" in printed(notebook) and "Skipping the end-to-end figure" in printed(notebook)
    assert (tmp_path / "speedup_gemm.png").exists() and (tmp_path / "speedup_gemm_paper_shape.png").exists()
    assert not (tmp_path / "speedup_e2e.png").exists()


def test_speedup_curves_with_e2e_results(tmp_path):
    rows = [dict(model="llama-2-7b", batch=batch, method=method, decode_tok_s=100.0, ttft_ms=10.0, peak_mem_gb=1.0,
                 speedup_vs_fp16=speedup, device="some GPU")
            for batch in (1, 16) for method, speedup in (("fp16", 1.0), ("qqq", 2.2), ("w4a16", 1.9))]
    csv = tmp_path / "e2e_speed.csv"
    with csv.open("w") as f:
        f.write("# command: synthetic, for the test\n")
        pd.DataFrame(rows).to_csv(f, index=False)
    notebook, _ = execute("02_speedup_curves.ipynb", tmp_path, {"E2E_CSV": str(csv), "SAVE_FIGURES_TO": str(tmp_path)})
    assert "command: synthetic, for the test" in printed(notebook)
    assert (tmp_path / "speedup_e2e.png").exists()
