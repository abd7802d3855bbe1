"""experiments/e2e_speed.py's command line and what it saves (CPU: no measurement here)."""
import sys

import pytest
from conftest import experiment_module


@pytest.fixture(scope="module")
def e2e_speed():
    return experiment_module("e2e_speed")


def test_without_a_gpu_it_stops_in_one_line_before_writing_anything(e2e_speed, monkeypatch, tmp_path):
    monkeypatch.setattr(e2e_speed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["e2e_speed.py", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="^e2e_speed.py measures GPU speed: no GPU here$"):
        e2e_speed.main()
    assert not (tmp_path / "out").exists()
