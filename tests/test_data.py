import json

import pytest
import torch

from qqq import data


def test_evaluation_windows_drop_the_tail():
    ids = torch.arange(1000)[None]
    windows = data.evaluation_windows(ids, 300)
    assert windows.shape == (3, 300) and windows[2, -1] == 899
    assert data.evaluation_windows(ids, 300, max_windows=2).shape == (2, 300)
    with pytest.raises(ValueError, match="fewer than one window"):
        data.evaluation_windows(ids, 2000)


def test_calibration_windows_are_seeded():
    ids = torch.arange(5000)[None]
    a, b = data.calibration_windows(ids, 4, 64, seed=0), data.calibration_windows(ids, 4, 64, seed=0)
    assert torch.equal(a, b) and a.shape == (4, 64)
    assert not torch.equal(a, data.calibration_windows(ids, 4, 64, seed=1))
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous spans of the text


def test_offline_wikipedia_text_without_markup():
    text = data.load_text("exllamav2-wiki")
    assert len(text) > 1_000_000 and "<doc" not in text and "</doc>" not in text
    assert len(data.load_text("exllamav2-c4")) > 100_000


def test_local_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert data.load_text(str(tmp_path / "a.txt")) == "hello world"
    assert data.load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"


def test_missing_dataset_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="unknown dataset"):
        data.load_text("no-such-dataset")


def test_unreachable_hub_names_the_offline_alternative(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="exllamav2-wiki"):
        data.load_text("wikitext2")
