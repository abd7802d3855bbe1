"""The summary of experiments/ncu_profile.py, read from Nsight Compute text reports (CPU: no profiling here)."""
import sys

import pytest
from conftest import assert_stops_without_a_gpu, experiment_module


@pytest.fixture(scope="module")
def ncu_profile():
    return experiment_module("ncu_profile")


def _header(kernel, grid):
    return f"  {kernel} ({grid}, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0\n"


def _sections(duration, registers):
    return ("    Section: GPU Speed Of Light Throughput\n"
            f"    Duration                         {duration[0]}        {duration[1]}\n"
            "    DRAM Throughput                   %        62.62\n"
            f"    Registers Per Thread             register/thread             {registers}\n"
            "    Grid Size                                                  1,024\n")


def _stalls(ns, megabytes, long_scoreboard, wait):
    lines = [f"    gpu__time_duration.sum          ns        {ns}", f"    dram__bytes_read.sum   Mbyte   {megabytes}"]
    for reason, value in (("long_scoreboard", long_scoreboard), ("wait", wait), ("barrier", 0.5)):
        lines.append(f"    smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio   inst   {value}")
    others = [r for r in ("mio_throttle", "lg_throttle", "math_pipe_throttle", "not_selected", "short_scoreboard",
                          "no_instruction", "dispatch_stall", "membar", "branch_resolving", "drain", "imc_miss",
                          "tex_throttle", "sleeping")]
    lines += [f"    smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio   inst   0" for r in others]
    return "\n".join(lines) + "\n"


def _write(folder, stall_kernels=("_decode_split_kernel", "_decode_merge_kernel", "_w4a8_gemv_kernel")):
    (folder / "ncu_sections.txt").write_text(
        "==PROF== Connected\n" + _header("_decode_split_kernel", 1024) + _sections(("ms", "1.50"), 95)
        + _header("_decode_merge_kernel", 32) + _sections(("us", "2.72"), 151)
        + _header("_w4a8_gemv_kernel", 512) + _sections(("us", "30.46"), 125))
    stalls = (_stalls(1500000, 3000.0, 0.2, 4.0), _stalls(2000, 0.5, 3.0, 1.0), _stalls(30000, 90.0, 10.0, 1.0))
    (folder / "ncu_stalls.txt").write_text("".join(_header(k, 1) + s for k, s in zip(stall_kernels, stalls)))


def test_kernels_are_assigned_to_their_cases_with_units_and_stalls_read(ncu_profile, tmp_path):
    _write(tmp_path)
    table = ncu_profile.summary(tmp_path, ["attn_b1_fp16", "gemv_paper_pc"])
    assert list(table.case) == ["attn_b1_fp16", "attn_b1_fp16", "gemv_paper_pc"]
    assert list(table.duration_us) == [1500.0, 2.72, 30.46]
    assert list(table.registers) == [95, 151, 125] and list(table.grid) == [1024, 1024, 1024]
    # bytes over the stall pass's own time: 3000 MB in 1.5 ms = 2 TB/s, 90 MB in 30 us = 3 TB/s
    assert list(table.dram_read_tb_s) == [2.0, 0.25, 3.0]
    assert table.top_stalls[0].startswith("wait 4.00, barrier 0.50, long_scoreboard 0.20")
    assert table.top_stalls[2].startswith("long_scoreboard 10.00, wait 1.00")


@pytest.mark.parametrize("cases", [
    None,  # the script's default: all its cases, the reports hold two (attention, then a GEMV)
    ["attn_b64_int8"],  # fewer: the GEMV kernel would be labelled as attention
    ["gemv_paper_pc", "attn_b1_fp16"],  # the kinds in another order
])
def test_reports_of_other_cases_are_refused_not_mislabelled(ncu_profile, tmp_path, cases):
    _write(tmp_path)
    with pytest.raises(SystemExit, match="the reports hold 2 cases starting with .'_decode_split_kernel', "
                                         "'_w4a8_gemv_kernel'., not the"):
        ncu_profile.summary(tmp_path, cases or list(ncu_profile.CASES))


def test_a_run_stopped_early_is_told_which_cases_to_parse_it_with(ncu_profile, tmp_path):
    _write(tmp_path)
    with pytest.raises(SystemExit, match="a run stopped early[?] its first 2: --cases attn_b64_int8 gemv_7b_qkv_pc$"):
        ncu_profile.summary(tmp_path, ["attn_b64_int8", "gemv_7b_qkv_pc", "gemv_paper_pc"])
    table = ncu_profile.summary(tmp_path, ["attn_b64_int8", "gemv_7b_qkv_pc"])
    assert list(table.case) == ["attn_b64_int8", "attn_b64_int8", "gemv_7b_qkv_pc"]


def test_without_a_gpu_profiling_stops_in_one_line_and_parsing_works(ncu_profile, monkeypatch, tmp_path):
    assert_stops_without_a_gpu(ncu_profile, ["ncu_profile.py", "--out", str(tmp_path / "out")],
                               "ncu_profile.py profiles CUDA kernels: no GPU here", tmp_path / "out", monkeypatch)
    _write(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ncu_profile.py", "--parse", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--cases", "attn_b1_fp16", "gemv_paper_pc"])
    ncu_profile.main()
    assert "_w4a8_gemv_kernel" in (tmp_path / "out" / "ncu_profile.md").read_text()


def test_without_ncu_profiling_stops_in_one_line_before_writing_anything(ncu_profile, monkeypatch, tmp_path):
    monkeypatch.setattr(ncu_profile.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ncu_profile.shutil, "which", lambda name: None)
    monkeypatch.setattr(ncu_profile, "NSIGHT_COMPUTE_FOLDER", tmp_path / "no-nsight-compute")
    monkeypatch.setattr(sys, "argv", ["ncu_profile.py", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="^ncu [(]Nsight Compute[)] not found: this script needs it and a GPU$"):
        ncu_profile.main()
    assert not (tmp_path / "out").exists()


def test_passes_that_profiled_different_kernels_are_refused(ncu_profile, tmp_path):
    _write(tmp_path, stall_kernels=("_decode_split_kernel", "_decode_merge_kernel", "_decode_split_kernel"))
    with pytest.raises(SystemExit, match="different kernels"):
        ncu_profile.summary(tmp_path, ["attn_b1_fp16", "gemv_paper_pc"])


def test_parse_of_a_folder_without_the_reports_stops_in_one_line(ncu_profile, monkeypatch, capsys, tmp_path):
    (tmp_path / "ncu_sections.txt").write_text(_header("_w4a8_gemv_kernel", 512) + _sections(("us", "30.46"), 125))
    monkeypatch.setattr(sys, "argv", ["ncu_profile.py", "--parse", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        ncu_profile.main()
    assert stop.value.code == 2 and f"--parse: {tmp_path / 'ncu_stalls.txt'} not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_summary_that_fails_to_write_leaves_the_old_csv_and_md(ncu_profile, monkeypatch, tmp_path):
    """The csv and the md are one unit: the md failing (here its provenance block) replaces neither, and leaves no
    partial file."""
    _write(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for suffix in (".csv", ".md"):
        (out / f"ncu_profile{suffix}").write_text(f"old {suffix}\n")

    def fails(meta):
        raise RuntimeError("stopped while writing the md")

    monkeypatch.setattr(ncu_profile, "markdown_provenance", fails)
    monkeypatch.setattr(sys, "argv", ["ncu_profile.py", "--parse", str(tmp_path), "--out", str(out),
                                      "--cases", "attn_b1_fp16", "gemv_paper_pc"])
    with pytest.raises(RuntimeError, match="stopped while writing the md"):
        ncu_profile.main()
    assert sorted(path.name for path in out.iterdir()) == ["ncu_profile.csv", "ncu_profile.md"]
    assert [(out / f"ncu_profile{suffix}").read_text() for suffix in (".csv", ".md")] == ["old .csv\n", "old .md\n"]
