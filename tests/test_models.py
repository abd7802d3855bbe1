"""qqq.models: the chunked embedded model is assembled and checked, and says how to install it when missing.
(Fake chunks only: CI never downloads the real ones.)"""

import dataclasses
import hashlib
import importlib

import pytest

import qqq.models
from qqq.cli import main
from qqq.models import QWEN_INSTALL, QWEN_MODEL, assemble_gguf, four_bit_layers, load_model


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """Three installed fake chunk packages and the embedded-model spec that names them."""
    parts = [b"GGUF" + bytes(range(7)), b"", bytes(range(200, 256)) * 3]
    for i, data in enumerate(parts):
        package = tmp_path / "site" / f"qqq_fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('never imported')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    whole = b"".join(parts)
    spec = dataclasses.replace(qqq.models.EMBEDDED_MODELS[QWEN_MODEL],
                               modules=tuple(f"qqq_fake_part{i}" for i in range(3)),
                               parts=tuple(f"data/part{i:02d}.bin" for i in range(3)), size=len(whole),
                               sha256=hashlib.sha256(whole).hexdigest())
    return spec, whole


def test_chunks_are_concatenated_in_order_and_checked(fake_chunks, tmp_path):
    spec, whole = fake_chunks
    target = tmp_path / "out" / "model.gguf"
    assert assemble_gguf(spec, target).read_bytes() == whole
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]


@pytest.mark.parametrize("field,value", [("sha256", "0" * 64), ("size", 1)])
def test_a_wrong_checksum_or_size_leaves_nothing_behind(fake_chunks, tmp_path, field, value):
    spec, _ = fake_chunks
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ValueError, match="expected .* reinstall them with `bash scripts/install.sh --with-qwen`"):
        assemble_gguf(dataclasses.replace(spec, **{field: value}), target)
    assert list(target.parent.iterdir()) == []


def test_missing_chunk_wheels_say_how_to_install_them(fake_chunks, tmp_path, monkeypatch, capsys):
    spec, _ = fake_chunks
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path / "cache"))
    missing = dataclasses.replace(spec, modules=spec.modules[:2] + ("qqq_no_such_chunk",))
    monkeypatch.setitem(qqq.models.EMBEDDED_MODELS, QWEN_MODEL, missing)
    with pytest.raises(FileNotFoundError, match=f"qqq_no_such_chunk missing.*`{QWEN_INSTALL}`"):
        load_model(QWEN_MODEL)
    with pytest.raises(SystemExit, match=f"^qqq: error: {QWEN_MODEL} is not installed .*--with-qwen"):
        main(["eval", "ppl", QWEN_MODEL])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-made


def test_four_bit_layers_names_the_tensors_and_layers():
    types = {"token_embd.weight": "Q6_K", "blk.0.ffn_down.weight": "Q4_K", "blk.3.ffn_down.weight": "Q4_K",
             "blk.1.ffn_down.weight": "Q6_K", "blk.2.attn_q.weight": "Q5_0", "blk.2.attn_q.bias": "F32",
             "blk.10.attn_v.weight": "Q4_1"}
    assert four_bit_layers(types) == "attn_v of layers 10 (Q4_1); ffn_down of layers 0, 3 (Q4_K)"
    assert four_bit_layers({"blk.0.attn_q.weight": "Q5_0"}) == "none"
