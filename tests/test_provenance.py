"""qqq.provenance.ResultsTable: --append keeps the rows a run does not measure again and names each row's run."""

import json
from pathlib import Path

import pandas as pd
import pytest

from qqq.provenance import ResultsTable, atomic_write, read_provenance_header

KEYS = ["method", "group_size"]


def test_append_replaces_same_keys_keeps_others_and_records_runs(tmp_path):
    out = tmp_path / "ppl"
    first = ResultsTable(out, KEYS, {"command": "python a.py"})
    first.write([{"method": "fp16", "group_size": -1, "ppl": 10.0}, {"method": "qqq", "group_size": 64, "ppl": 12.0}])
    second = ResultsTable(out, KEYS, {"command": "python a.py --append"}, append=True)
    table = second.write([{"method": "qqq", "group_size": 64, "ppl": 11.5}, {"method": "rtn", "group_size": -1,
                                                                            "ppl": 20.0}])
    assert table.equals(pd.read_csv(out.with_suffix(".csv")))
    assert {(m, g): (p, r) for m, g, p, r in table[["method", "group_size", "ppl", "run"]].values} == {
        ("fp16", -1): (10.0, 0), ("qqq", 64): (11.5, 1), ("rtn", -1): (20.0, 1)}
    runs = json.loads(out.with_suffix(".runs.json").read_text())
    assert [(r["run"], r["command"]) for r in runs] == [(0, "python a.py"), (1, "python a.py --append")]
    text = second.markdown(table, lambda rows: ", ".join(rows["method"]))
    assert "### Run 0: fp16" in text and "### Run 1: qqq, rtn" in text and "`python a.py --append`" in text


def test_without_append_the_table_starts_over_and_drops_unused_runs(tmp_path):
    out = tmp_path / "ppl"
    ResultsTable(out, KEYS, {"command": "old"}).write([{"method": "fp16", "group_size": -1, "ppl": 10.0}])
    table = ResultsTable(out, KEYS, {"command": "new"}).write([{"method": "qqq", "group_size": -1, "ppl": 9.0}])
    assert list(table["method"]) == ["qqq"] and list(table["run"]) == [0]
    assert [r["command"] for r in json.loads(out.with_suffix(".runs.json").read_text())] == ["new"]


def test_rows_of_unknown_origin_are_refused(tmp_path):
    out = tmp_path / "ppl"
    pd.DataFrame([{"method": "fp16", "group_size": -1, "ppl": 10.0}]).to_csv(out.with_suffix(".csv"), index=False)
    with pytest.raises(ValueError, match="without a run"):
        ResultsTable(out, KEYS, {"command": "x"}, append=True)


@pytest.mark.parametrize("damage", ["runs.json deleted", "runs.json of another table"])
def test_rows_whose_runs_json_does_not_name_their_run_are_refused(tmp_path, damage):
    """The old rows' run numbers would otherwise be taken for this run's, and the table would say this run's
    command made them."""
    out = tmp_path / "ppl"
    ResultsTable(out, KEYS, {"command": "old"}).write([{"method": "fp16", "group_size": -1, "ppl": 10.0}])
    runs = out.with_suffix(".runs.json")
    if damage == "runs.json deleted":
        runs.unlink()
    else:
        runs.write_text(json.dumps([{"run": 5, "command": "another"}]))
    with pytest.raises(ValueError, match=f"{out}.csv has rows without a run in {runs}"):
        ResultsTable(out, KEYS, {"command": "new"}, append=True)


@pytest.mark.parametrize("out,stem", [("ppl.v2", "ppl.v2"), ("ppl.v2.csv", "ppl.v2"), ("ppl.csv", "ppl"),
                                      ("ppl", "ppl")])
def test_out_names_the_stem_of_the_files_dots_and_all_or_the_csv_itself(tmp_path, out, stem):
    ResultsTable(tmp_path / out, KEYS, {"command": "first"}).write([{"method": "fp16", "group_size": -1, "ppl": 10.0}])
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{stem}.csv", f"{stem}.runs.json"]
    for name in (stem, f"{stem}.csv"):  # either name appends to the same table
        assert len(ResultsTable(tmp_path / name, KEYS, {"command": "again"}, append=True).old) == 1


def test_absorb_takes_a_parallel_runs_rows_and_renumbers_its_runs(tmp_path):
    main, part = tmp_path / "zeroshot", tmp_path / "part"
    ResultsTable(main, KEYS, {"command": "main"}).write([{"method": "fp16", "group_size": -1, "acc": 0.5},
                                                         {"method": "qqq", "group_size": 64, "acc": 0.1}])
    ResultsTable(part, KEYS, {"command": "part"}).write([{"method": "qqq", "group_size": 64, "acc": 0.4}])
    merged = ResultsTable(main, KEYS, {"command": "merge"}, append=True)
    merged.absorb(part)
    table = merged.write([])
    assert {(m, g): (a, r) for m, g, a, r in table[["method", "group_size", "acc", "run"]].values} == {
        ("fp16", -1): (0.5, 0), ("qqq", 64): (0.4, 2)}
    runs = json.loads(main.with_suffix(".runs.json").read_text())
    assert [(r["run"], r["command"]) for r in runs] == [(0, "main"), (2, "part")]  # the merge itself made no row


def test_absorb_refuses_a_part_that_is_not_a_table_of_its_kind_before_taking_anything(tmp_path):
    main, part = tmp_path / "speed", tmp_path / "profile"
    ResultsTable(main, KEYS, {"command": "main"}).write([{"method": "fp16", "group_size": -1, "ppl": 10.0}])
    pd.DataFrame([{"method": "fp16", "kernel": "gemv", "us": 3.0, "run": 0}]).to_csv(part.with_suffix(".csv"),
                                                                                    index=False)
    part.with_suffix(".runs.json").write_text(json.dumps([{"run": 0, "command": "profile"}]))
    merged = ResultsTable(main, KEYS, {"command": "merge"}, append=True, value_columns=["ppl"])
    with pytest.raises(ValueError, match=f"^{part}.csv is not a results table of this kind: it lacks the columns "
                                         "group_size, ppl [(]a table of this kind has method, group_size, ppl[)]$"):
        merged.absorb(part)
    part.with_suffix(".csv").write_text('method,group_size,ppl,run\n"fp16,-1\n')
    with pytest.raises(ValueError, match=f"^{part}.csv is not a results table: "):
        merged.absorb(part)
    assert len(merged.old) == 1 and [r["command"] for r in merged.runs] == ["main", "merge"]


def test_a_table_cut_short_mid_row_is_refused_not_read_with_empty_cells(tmp_path):
    """pandas reads a last row cut short (a copy stopped on the way) as one whose missing cells are empty, which the
    defaults would fill in: here its kv_bits 8, a column added after the run column, would become 16."""
    out = tmp_path / "ppl"
    old = ResultsTable(out, KEYS, {"command": "old"}).write([{"method": "fp16", "group_size": -1, "ppl": 10.0}])
    ResultsTable(out, KEYS, {"command": "new"}, append=True, defaults={"kv_bits": 16}).write(
        [{"method": "fp16", "group_size": -1, "ppl": 9.0, "kv_bits": 8}])
    csv = out.with_suffix(".csv")
    assert list(pd.read_csv(csv).columns) == [*old.columns, "kv_bits"] and csv.read_text().endswith(",1,8\n")
    csv.write_bytes(csv.read_bytes()[:-len(b"8\n")])
    with pytest.raises(ValueError, match=f"^{csv} is not a results table: its last line ends mid-row"):
        ResultsTable(out, KEYS, {"command": "again"}, append=True, defaults={"kv_bits": 16})


def test_defaults_complete_the_rows_written_before_a_column_existed(tmp_path):
    out = tmp_path / "ppl"
    ResultsTable(out, KEYS, {"command": "old"}).write([{"method": "fp16", "group_size": -1, "ppl": 10.0},
                                                      {"method": "qqq", "group_size": 64, "ppl": 12.0}])
    table = ResultsTable(out, KEYS + ["kv_bits"], {"command": "new"}, append=True, defaults={"kv_bits": 16}).write(
        [{"method": "qqq", "group_size": 64, "kv_bits": 8, "ppl": 12.5},
         {"method": "fp16", "group_size": -1, "kv_bits": 16, "ppl": 10.5}])
    assert sorted(map(tuple, table[["method", "kv_bits", "ppl", "run"]].values.tolist())) == [
        ("fp16", 16, 10.5, 1), ("qqq", 8, 12.5, 1), ("qqq", 16, 12.0, 0)]


def test_an_interrupted_write_leaves_the_table_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "ppl"
    ResultsTable(out, KEYS, {"command": "first"}).write([{"method": "fp16", "group_size": -1, "ppl": 10.0}])
    before = {path.name: path.read_text() for path in tmp_path.iterdir()}
    original = pd.DataFrame.to_csv

    def stopped_halfway(self, target=None, **kwargs):  # half the table written, then the run is stopped
        text = original(self, None, **kwargs)
        if hasattr(target, "write"):
            target.write(text[:len(text) // 2])
        else:
            Path(target).write_text(text[:len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        ResultsTable(out, KEYS, {"command": "second"}).write([{"method": "qqq", "group_size": 64, "ppl": 12.0},
                                                               {"method": "rtn", "group_size": 64, "ppl": 13.0}])
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == before  # and no partial file left


def test_a_table_whose_runs_json_fails_to_write_keeps_its_old_csv_too(tmp_path, monkeypatch):
    """The csv and its runs.json are one unit: a new csv beside the old runs.json would name runs it lacks."""
    out = tmp_path / "ppl"
    ResultsTable(out, KEYS, {"command": "first"}).write([{"method": "fp16", "group_size": -1, "ppl": 10.0}])
    before = {path.name: path.read_text() for path in tmp_path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", disk_full)  # the csv is written, the runs.json is not
    with pytest.raises(OSError, match="disk full"):
        ResultsTable(out, KEYS, {"command": "second"}).write([{"method": "qqq", "group_size": 64, "ppl": 12.0}])
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == before  # and no partial file left


def test_atomic_write_replaces_the_file_only_once_complete(tmp_path):
    path = tmp_path / "speed.md"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("stopped")
    assert [p.name for p in tmp_path.iterdir()] == ["speed.md"] and path.read_text() == "old"
    with atomic_write(path) as f:
        f.write("new")
    assert [p.name for p in tmp_path.iterdir()] == ["speed.md"] and path.read_text() == "new"


def test_provenance_names_the_code_quietly(capfd):
    from qqq.provenance import provenance

    code = provenance()["code"]
    assert code.startswith("unknown") or len(code.split()[0]) == 12
    assert "fatal" not in capfd.readouterr().err


def test_the_provenance_header_of_a_results_csv_is_read_back(tmp_path):
    path = tmp_path / "speed.csv"
    path.write_text("# command: python x.py --out o\n# device: NVIDIA H200\n# note: a: b\nkernel,us\n# not header\n")
    assert read_provenance_header(path) == {"command": "python x.py --out o", "device": "NVIDIA H200", "note": "a: b"}


def test_source_commit_names_a_copy_inside_a_checkout_by_its_folder(tmp_path):
    """An exported tree inside a checkout (the old side of an A/B run) must not be labelled with the checkout's
    commit: that label once made two runs of the new code look like new against old."""
    import importlib.util
    import shutil
    import subprocess

    import qqq.provenance

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    copy = tmp_path / "oldtree" / "qqq"
    copy.mkdir(parents=True)
    shutil.copy(qqq.provenance.__file__, copy / "provenance.py")
    spec = importlib.util.spec_from_file_location("copied_provenance", copy / "provenance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.source_commit().startswith(f"unknown (qqq in {(tmp_path / 'oldtree').resolve()}")


def test_changed_code_is_named_by_its_package_tree(tmp_path):
    """Uncommitted or untracked files in ``qqq/`` (a branch's files copied over another commit's history, as the GPU
    machine's copy of a checkout is) are named by the package's tree hash, the one ``git`` gives that code once
    committed, so a result can be traced to its commit whatever HEAD said."""
    import importlib.util
    import shutil
    import subprocess

    import qqq.provenance

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    (tmp_path / "qqq" / "fast").mkdir(parents=True)
    shutil.copy(qqq.provenance.__file__, tmp_path / "qqq" / "provenance.py")
    (tmp_path / "qqq" / "fast" / "model.py").write_text("x = 1\n")
    (tmp_path / "qqq" / "fast.py").write_text("y = 2\n")  # sorts between the folder "fast" and "fast/..." in git
    git("add", "-A")
    git("commit", "-qm", "first")
    spec = importlib.util.spec_from_file_location("copied_provenance", tmp_path / "qqq" / "provenance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.package_tree(tmp_path) == git("rev-parse", "HEAD:qqq")
    assert module.source_commit() == git("rev-parse", "--short=12", "HEAD")
    (tmp_path / "qqq" / "fast" / "greedy.py").write_text("z = 3\n")  # untracked: git status alone would not see it
    label = module.source_commit()
    git("add", "-A")
    git("commit", "-qm", "second")
    assert label.endswith(f" + uncommitted changes (qqq/ tree {git('rev-parse', 'HEAD:qqq')[:12]})")
