"""experiments/ppl_table.py and zeroshot_table.py refuse what would spoil their tables before anything is scored."""
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import experiment_module

from qqq.provenance import ResultsTable

RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.fixture(scope="module")
def ppl_table():
    return experiment_module("ppl_table")


@pytest.mark.parametrize("argv,message", [
    (["--methods", "fp16", "w4a8_rtm"], "unknown method 'w4a8_rtm'"),  # a later row's typo, before the first row
    (["--group-sizes", "-1", "100"], "invalid choice: 100"),
    (["--kv-smooth", "nan"], "must be in [0, 1]"),
])
def test_bad_rows_are_refused_when_the_flags_are_read(ppl_table, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["ppl_table.py", *argv])
    with pytest.raises(SystemExit):
        ppl_table.parse_args()
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--seqlen", "256"), ("--dataset", "exllamav2-c4")])
def test_append_refuses_another_window_length_or_text(ppl_table, monkeypatch, tmp_path, flag, value):
    """Its cells would average perplexities measured two ways; refused before the model loads."""
    for suffix in (".csv", ".runs.json"):
        shutil.copy(RESULTS / f"ppl{suffix}", tmp_path / f"ppl{suffix}")
    monkeypatch.setattr(ppl_table, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    monkeypatch.setattr(sys, "argv", ["ppl_table.py", "--methods", "fp16", "--append", "--out", str(tmp_path / "ppl"),
                                      flag, value])
    with pytest.raises(ValueError, match="one table cannot mix them"):
        ppl_table.main()
    assert (tmp_path / "ppl.csv").read_text() == (RESULTS / "ppl.csv").read_text()


MALFORMED_TABLES = {  # an --out table that --append cannot take in: the end of its error line
    "cut short": (lambda text: text[:-3], "its last line ends mid-row (a copy cut short?)"),
    "unparsable": (lambda text: text.split("\n")[0] + '\n"fp16,-1\n', "is not a results table: Error tokenizing"),
}


@pytest.mark.parametrize("script,table", [("ppl_table", "ppl"), ("zeroshot_table", "zeroshot")])
@pytest.mark.parametrize("damage", list(MALFORMED_TABLES))
def test_append_to_a_malformed_table_stops_in_one_line_writing_nothing(monkeypatch, tmp_path, script, table, damage):
    module = experiment_module(script)
    cut, message = MALFORMED_TABLES[damage]
    (tmp_path / f"{table}.csv").write_text(cut((RESULTS / f"{table}.csv").read_text()))
    shutil.copy(RESULTS / f"{table}.runs.json", tmp_path / f"{table}.runs.json")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--methods", "fp16", "--append", "--out", str(tmp_path / table),
                                      "--device", "cpu"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    error = str(stop.value.code)
    assert error.startswith(f"{script}.py: error: --out: {tmp_path / table}.csv is not a results table")
    assert message in error and "\n" not in error
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_zeroshot_table_out_with_a_dot_names_its_files_stem(monkeypatch, tmp_path):
    """``--out zeroshot.v2`` writes zeroshot.v2.csv, .md and .runs.json (``Path.with_suffix`` made them zeroshot.*),
    and ``--merge`` reads the part it names, dots and all."""
    zeroshot_table = experiment_module("zeroshot_table")
    ResultsTable(tmp_path / "part.v1", zeroshot_table.KEY_COLUMNS, {"command": "part", "limit": "None"}).write(
        [dict(model="m", method="fp16", group_size=-1, task="piqa", metric="acc", value=0.6, stderr=0.01, docs=10,
              split="validation")])
    monkeypatch.setattr(sys, "argv", ["zeroshot_table.py", "--merge", str(tmp_path / "part.v1"), "--tasks", "piqa",
                                      "--out", str(tmp_path / "zeroshot.v2")])
    zeroshot_table.main()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("zeroshot")) == [
        "zeroshot.v2.csv", "zeroshot.v2.md", "zeroshot.v2.runs.json"]
    assert list(pd.read_csv(tmp_path / "zeroshot.v2.csv")["value"]) == [0.6]


@pytest.mark.parametrize("files", [(), (".csv",)])
def test_zeroshot_table_merge_of_a_missing_part_stops_in_one_line(monkeypatch, capsys, tmp_path, files):
    zeroshot_table = experiment_module("zeroshot_table")
    for suffix in files:
        (tmp_path / f"part{suffix}").write_text("")
    monkeypatch.setattr(sys, "argv", ["zeroshot_table.py", "--merge", str(tmp_path / "part")])
    with pytest.raises(SystemExit) as stop:
        zeroshot_table.parse_args()
    missing = tmp_path / ("part.runs.json" if files else "part.csv")
    assert stop.value.code == 2 and f"--merge: {missing} not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--methods", "fp16", "nosuch"], "unknown method 'nosuch'"),
    (["--tasks", "nosuch"], "invalid choice: 'nosuch'"),
    (["--limit", "0"], "must be at least 1"),
    (["--batch-size", "0"], "must be at least 1"),
])
def test_zeroshot_table_refuses_bad_rows_when_the_flags_are_read(monkeypatch, capsys, argv, message):
    zeroshot_table = experiment_module("zeroshot_table")
    monkeypatch.setattr(sys, "argv", ["zeroshot_table.py", *argv])
    with pytest.raises(SystemExit):
        zeroshot_table.parse_args()
    assert message in capsys.readouterr().err
