import json

import pytest
import torch
from conftest import tiny_model, token_batch

from qqq.checkpoint import load_quantized, save_quantized
from qqq.linear import QQQLinear
from qqq.models import is_qqq_checkpoint
from qqq.pipeline import QuantizeSettings, quantize_model


@pytest.mark.parametrize("group_size", [-1, 32, 64, 128, 256])
def test_round_trip_gives_identical_logits(group_size, tmp_path, reference_backend):
    model = tiny_model("qwen2")
    quantize_model(model, "rtn", None, QuantizeSettings(group_size=group_size))
    ids = token_batch(2, 20, seed=4)
    with torch.no_grad():
        before = model(ids).logits
    save_quantized(model, tmp_path, extra={"method": "w4a8_rtn"})
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qqq" and config["group_size"] == group_size and config["wbits"] == 4
    assert is_qqq_checkpoint(tmp_path)

    loaded = load_quantized(tmp_path, dtype=torch.float32)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QQQLinear) and q_proj.group_size == group_size and q_proj.bias is not None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_gptq_checkpoint_round_trip(tmp_path, reference_backend):
    model = tiny_model("llama")
    quantize_model(model, "w4a8_gptq", token_batch(4, 32), QuantizeSettings(group_size=128))
    ids = token_batch(1, 16, seed=6)
    with torch.no_grad():
        before = model(ids).logits
    save_quantized(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path, dtype=torch.float32)(ids).logits, before)


@pytest.mark.parametrize("tied", [False, True])
def test_rotated_checkpoint_round_trip(tied, tmp_path, reference_backend):
    """Rotation is folded into the weights (nothing online) and unties a tied lm_head: the saved checkpoint must say
    so, or loading would tie them again."""
    model = tiny_model("llama", hidden=192, heads=6, kv_heads=2)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    quantize_model(model, "rot_gptq", token_batch(4, 32), QuantizeSettings(group_size=64))
    ids = token_batch(1, 16, seed=6)
    with torch.no_grad():
        before = model(ids).logits
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_saving_an_unquantized_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no QQQLinear"):
        save_quantized(tiny_model("llama"), tmp_path)


def test_loading_a_plain_model_folder_as_qqq_is_an_error(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    assert not is_qqq_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not a QQQ checkpoint"):
        load_quantized(tmp_path)


def test_tied_embeddings_stay_tied_through_a_round_trip(tmp_path, reference_backend):
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config

    config = tiny_config()
    config.tie_word_embeddings = True  # as the embedded SmolLM2 has
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    quantize_model(model, "rtn", None, QuantizeSettings(group_size=64))
    ids = token_batch(1, 16)
    with torch.no_grad():
        before = model(ids).logits
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_a_model_quantized_in_fp32_is_saved_in_its_source_dtype(tmp_path, reference_backend):
    from safetensors import safe_open

    from qqq.models import default_dtype, source_dtype

    source = tmp_path / "fp16-model"
    tiny_model("llama").half().save_pretrained(source)
    assert source_dtype(str(source)) == torch.float16 and default_dtype("cpu") == torch.float32
    model = tiny_model("llama").half().float()  # what loading an fp16 model for the CPU gives
    quantize_model(model, "rtn", None, QuantizeSettings(group_size=64))
    save_quantized(model, tmp_path / "ckpt", dtype=source_dtype(str(source)))
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as tensors:
        assert tensors.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert tensors.get_tensor("model.layers.0.self_attn.q_proj.channel_scale").dtype == torch.float32
        assert tensors.get_tensor("model.layers.0.self_attn.q_proj.group_ratio").dtype == torch.float16
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.float32)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.qweight, model.model.layers[0].self_attn.q_proj.qweight)


def _rtn_model():
    model = tiny_model("llama")
    quantize_model(model, "rtn", None, QuantizeSettings(group_size=64))
    return model


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import qqq.checkpoint

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(qqq.checkpoint, "save_safetensors_from", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_quantized(_rtn_model(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_files_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    out = save_quantized(_rtn_model(), tmp_path / "out")
    assert {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]} == {
        "out": 0o777 & ~umask, "config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


def test_a_folder_holding_files_is_replaced_only_when_asked(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds files"):
        save_quantized(_rtn_model(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    save_quantized(_rtn_model(), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
