"""qqq.cache: a stored quantized model reloads to the same logits; a different key misses."""

import pytest
import torch
from conftest import token_batch, tiny_model

from qqq.cache import cache_key, entry_path, load_cached, save_cached
from qqq.linear import FakeQuantLinear, QQQLinear
from qqq.pipeline import QuantizeSettings, get_method, quantize_model

CALIBRATION = {"dataset": "toy", "nsamples": 4, "seqlen": 32, "smooth_samples": 2, "seed": 0}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QQQ_CACHE_DIR", str(tmp_path / "quantized"))
    return tmp_path / "quantized"


def _key(method: str, group_size: int = -1, **calibration):
    return cache_key("tiny", get_method(method), QuantizeSettings(group_size=group_size, smoothing_samples=2),
                     CALIBRATION | calibration, torch.float32)


@pytest.mark.parametrize("method, group_size, layer_type", [
    ("qqq", 64, QQQLinear), ("w4a8_rtn", -1, QQQLinear),
    ("w8a8_smoothquant", -1, FakeQuantLinear), ("w4a16_gptq", 64, FakeQuantLinear)])
def test_cached_model_reloads_with_equal_logits(reference_backend, cache_dir, method, group_size, layer_type):
    model = tiny_model("llama", hidden=128, intermediate=256)
    settings = QuantizeSettings(group_size=group_size, smoothing_samples=2, min_thresholds=10)
    quantize_model(model, method, token_batch(4, 32), settings, torch.device("cpu"))
    key = cache_key("tiny", get_method(method), settings, CALIBRATION, torch.float32)
    assert load_cached(key) is None
    path = save_cached(model, key)
    assert path == entry_path(key) and path.parent == cache_dir
    loaded = load_cached(key)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, layer_type)
    ids = token_batch(2, 24)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_the_key_holds_what_decides_the_model_and_nothing_else():
    assert _key("qqq", 64) != _key("qqq", -1) != _key("w4a8_rtn", -1)
    assert _key("qqq", 64) != _key("qqq", 64, seed=1) != _key("qqq", 64, dataset="other")
    assert _key("qqq", 64) != _key("qqq", 64, smooth_samples=4)
    assert _key("w4a8_gptq", 64) == _key("w4a8_gptq", 64, smooth_samples=4)  # no smoothing: not in its key
    assert _key("w4a8_rtn", 64) == _key("w4a8_rtn", 64, seed=1, nsamples=8)  # no calibration at all
    assert _key("w8a8_smoothquant", 64) == _key("w8a8_smoothquant", -1)  # 8-bit: per-channel whatever is asked
    other_model = cache_key("other", get_method("qqq"), QuantizeSettings(group_size=64, smoothing_samples=2),
                            CALIBRATION, torch.float32)
    assert len({str(entry_path(k)) for k in (_key("qqq", 64), _key("qqq", -1), other_model)}) == 3
