"""experiments/export_ppl.py's command line and the files it writes (CPU; no model is scored here)."""
import json
import sys

import pytest
import torch
from conftest import experiment_module


@pytest.fixture(scope="module")
def export_ppl():
    return experiment_module("export_ppl")


def qqq_checkpoint_config(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "qqq", "method": "w4a8_rtn", "group_size": 64}}))
    return folder


def test_out_with_a_dot_names_its_files_stem(export_ppl, monkeypatch, tmp_path):
    """``--out export_ppl.v2`` writes export_ppl.v2.csv, .md and .runs.json (``Path.with_suffix`` made them
    export_ppl.*)."""
    for name in ("load_tokenizer", "load_text", "tokenize", "load_quantized", "loaded_by_transformers",
                 "with_per_token_int8_inputs"):
        monkeypatch.setattr(export_ppl, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(export_ppl, "perplexity_windows", lambda *args, **kwargs: torch.zeros(2, 8))
    monkeypatch.setattr(export_ppl, "export_compressed_tensors", lambda checkpoint, out: out)
    monkeypatch.setattr(export_ppl, "perplexity", lambda *args, **kwargs: 7.0)
    checkpoint = qqq_checkpoint_config(tmp_path / "checkpoint")
    monkeypatch.setattr(sys, "argv", ["export_ppl.py", str(checkpoint), "--out", str(tmp_path / "export_ppl.v2")])
    export_ppl.main()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("export_ppl")) == [
        "export_ppl.v2.csv", "export_ppl.v2.md", "export_ppl.v2.runs.json"]


@pytest.mark.parametrize("config,found", [
    (None, "found no config.json"),
    ({"model_type": "llama"}, "found no quantization_config in its config.json"),  # a plain model
    ({"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}},
     "found quant_method 'compressed-tensors'"),  # an export, not the checkpoint it came from
])
def test_a_folder_that_is_not_a_qqq_checkpoint_is_refused_when_the_flags_are_read(export_ppl, monkeypatch, capsys,
                                                                                   tmp_path, config, found):
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "argv", ["export_ppl.py", str(folder)])
    with pytest.raises(SystemExit) as stop:
        export_ppl.parse_args()
    error = capsys.readouterr().err
    assert stop.value.code == 2 and f"{folder} is not a QQQ checkpoint" in error and found in error


def test_append_to_a_malformed_table_stops_in_one_line_writing_nothing(export_ppl, monkeypatch, tmp_path):
    checkpoint = qqq_checkpoint_config(tmp_path / "checkpoint")
    out = tmp_path / "results"
    out.mkdir()
    (out / "export_ppl.csv").write_text("checkpoint,method,group_size,path,dataset,seqlen,run\n/ckpt,w4a8_rtn,64,q")
    (out / "export_ppl.runs.json").write_text(json.dumps([{"run": 0, "command": "old"}]))
    monkeypatch.setattr(export_ppl, "load_tokenizer", lambda *args: pytest.fail("scored before the table was read"))
    monkeypatch.setattr(sys, "argv", ["export_ppl.py", str(checkpoint), "--append", "--out", str(out / "export_ppl")])
    with pytest.raises(SystemExit, match=f"^export_ppl.py: error: --out: {out / 'export_ppl.csv'} is not a results "
                                         "table: its last line ends mid-row"):
        export_ppl.main()
    assert sorted(path.name for path in out.iterdir()) == ["export_ppl.csv", "export_ppl.runs.json"]
