"""experiments/gemm_speed.py's shape selection (CPU: no kernel runs)."""
import subprocess
import sys

import pytest
from conftest import EXPERIMENTS, assert_stops_without_a_gpu, experiment_module


@pytest.fixture(scope="module")
def gemm_speed():
    return experiment_module("gemm_speed")


def test_shapes_named_keeps_the_order_given_and_drops_repeats(gemm_speed):
    picked = gemm_speed.shapes_named("llama2-7b_down, paper_8192x21760,llama2-7b_down")
    assert [name for name, _, _ in picked] == ["llama2-7b_down", "paper_8192x21760"]
    assert picked[1][1:] == (8192, 21760)


@pytest.mark.parametrize("names", ["llama2-7b-qkv", "paper_8192x21760,nope", ","])
def test_shapes_named_refuses_an_unknown_or_empty_list(gemm_speed, names):
    with pytest.raises(ValueError, match="known: paper_8192x21760"):
        gemm_speed.shapes_named(names)


def test_without_a_gpu_it_stops_in_one_line_before_writing_anything(gemm_speed, monkeypatch, tmp_path):
    assert_stops_without_a_gpu(gemm_speed, ["gemm_speed.py", "--act-quant", "--out", str(tmp_path / "out")],
                               "gemm_speed.py times CUDA kernels: no GPU here", tmp_path / "out", monkeypatch)


def test_the_script_stops_on_a_misspelled_shape_before_writing_anything(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(EXPERIMENTS / "gemm_speed.py"), "--tune-shapes", "llama2-7b-qkv",
                          "--no-bench", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "unknown shape name(s) ['llama2-7b-qkv']" in run.stderr
    assert not out.exists()


def test_plot_only_without_the_csv_stops_in_one_line(gemm_speed, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["gemm_speed.py", "--plot-only", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        gemm_speed.main()
    assert stop.value.code == 2
    assert f"--plot-only: {tmp_path / 'out' / 'gemm_speed.csv'} not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--tune", "--tune-paths", "fused_ws_split_k"], "--tune-paths adds candidates to --tune-shipped"),
    (["--tune", "--tune-shipped", "--tune-paths", "fused_split"], "--tune-paths: W4A8 launch paths are"),
])
def test_the_quick_tunes_extra_paths_are_checked_before_anything_runs(gemm_speed, monkeypatch, capsys, tmp_path,
                                                                      args, message):
    monkeypatch.setattr(sys, "argv", ["gemm_speed.py", *args, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        gemm_speed.main()
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
