"""qqq.sweep: every method x group size from one base model, smoothing shared, the disk cache used."""

import pytest
import torch
from conftest import tiny_model, token_batch

import qqq.pipeline
import qqq.sweep
from qqq.gptq import GPTQConfig
from qqq.sweep import sweep

CALIBRATION = {"dataset": "toy", "nsamples": 4, "seqlen": 32, "smooth_samples": 2, "seed": 0}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QQQ_CACHE_DIR", str(tmp_path / "quantized"))


def test_sweep_shares_one_smoothing_between_methods(reference_backend, monkeypatch):
    searches = []
    original = qqq.pipeline.smooth_model
    monkeypatch.setattr(qqq.pipeline, "smooth_model", lambda *a, **k: searches.append(a[3]) or original(*a, **k))
    base = tiny_model("llama")
    norm_before = base.model.layers[0].input_layernorm.weight.clone()
    runs = list(sweep(base, ["w8a8_smoothquant", "w4a8_smooth", "qqq"], [-1, 64], token_batch(4, 32), 2,
                      torch.device("cpu")))
    assert [(m.name, g) for m, g, *_ in runs] == [("w8a8_smoothquant", -1), ("w4a8_smooth", -1),
                                                    ("w4a8_smooth", 64), ("qqq", -1), ("qqq", 64)]
    norms = {(m.name, g): model.model.layers[0].input_layernorm.weight for m, g, model, *_ in runs}
    assert [(c.rule, c.group_size) for c in searches] == [("smoothquant", -1), ("search", -1), ("search", 64)]
    assert torch.equal(norms[("w4a8_smooth", 64)], norms[("qqq", 64)])
    assert not torch.equal(norms[("w4a8_smooth", 64)], norms[("w4a8_smooth", -1)])
    assert torch.equal(base.model.layers[0].input_layernorm.weight, norm_before)  # base left untouched


def test_sweep_stores_then_reuses(reference_backend, monkeypatch):
    base = tiny_model("llama")
    ids = token_batch(4, 32)
    cache_as = {"model": "tiny", "calibration": CALIBRATION}
    first = list(sweep(base, ["w4a8_gptq", "w4a16_rtn"], [64], ids, 2, torch.device("cpu"), cache_as))
    assert [r.cached for r in first] == [None, None]
    def quantized_again(*args, **kwargs):
        raise RuntimeError("quantized again")

    monkeypatch.setattr(qqq.sweep, "round_weights", quantized_again)
    second = list(sweep(base, ["w4a8_gptq", "w4a16_rtn"], [64], ids, 2, torch.device("cpu"), cache_as))
    assert all(r.cached is not None for r in second)
    with torch.no_grad():
        for a, b in zip(first, second):
            assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    with pytest.raises(RuntimeError, match="quantized again"):  # another calibration seed misses
        list(sweep(base, ["w4a8_gptq"], [64], ids, 2, torch.device("cpu"),
                   {"model": "tiny", "calibration": CALIBRATION | {"seed": 1}}))


def test_sweep_hands_its_gptq_options_to_the_gptq_methods_and_caches_them_apart(reference_backend, monkeypatch):
    seen = []
    original = qqq.sweep.round_weights
    monkeypatch.setattr(qqq.sweep, "round_weights",
                        lambda model, method, ids, settings, device: seen.append((method.name, settings.gptq.mse_clip))
                        or original(model, method, ids, settings, device))
    base, ids = tiny_model("llama"), token_batch(4, 32)
    cache_as = {"model": "tiny", "calibration": CALIBRATION}
    plain = list(sweep(base, ["w4a8_gptq"], [-1], ids, 2, torch.device("cpu"), cache_as))
    clipped = list(sweep(base, ["w4a8_gptq"], [-1], ids, 2, torch.device("cpu"), cache_as, GPTQConfig(mse_clip=True)))
    assert seen == [("w4a8_gptq", False), ("w4a8_gptq", True)]  # the clipped model was not taken from the cache
    assert clipped[0].cached is None and plain[0].cached is None
    with torch.no_grad():
        assert not torch.equal(plain[0].model(ids).logits, clipped[0].model(ids).logits)


def test_clip_columns_name_only_the_searches_a_method_used():
    from qqq.pipeline import get_method
    from qqq.sweep import clip_columns, clip_label

    searches = GPTQConfig(hessian_clip=True, gptq_clip=True)
    assert clip_columns(get_method("rot_qqq"), searches) == {"mse_clip": False, "hessian_clip": True, "gptq_clip": True}
    assert not any(clip_columns(get_method("w4a8_rtn"), searches).values())  # no GPTQ: no search
    assert clip_label(clip_columns(get_method("qqq"), searches)) == " hessian-clip gptq-clip"
