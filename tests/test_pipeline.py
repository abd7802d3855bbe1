import pytest
import torch
from conftest import tiny_model, token_batch

from qqq.linear import FakeQuantLinear, QQQLinear
from qqq.model_families import family_of
from qqq.pipeline import METHODS, QuantizeSettings, get_method, quantize_model


def fast_settings(group_size=-1):
    return QuantizeSettings(group_size=group_size, smoothing_samples=2, min_thresholds=10, batch_size=4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_quantizes_every_decoder_linear(method, reference_backend):
    model = tiny_model("qwen2")
    ids = token_batch(2, 24, seed=9)
    report = quantize_model(model, method, token_batch(4, 32), fast_settings(64), torch.device("cpu"))
    linears = [m for layer in family_of(model).decoder_layers(model) for m in family_of(model).linears(layer).values()]
    expected = {"fp16": torch.nn.Linear}.get(method, QQQLinear if METHODS[method].packs_w4a8 else FakeQuantLinear)
    assert all(type(m) is expected for m in linears)
    assert report.method == method
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_qqq_is_closer_to_fp_than_round_to_nearest(reference_backend):
    ids = token_batch(4, 48, seed=11)
    reference = tiny_model("llama")
    with torch.no_grad():
        target = reference(ids).logits
    errors = {}
    for method in ("w4a8_rtn", "qqq"):
        model = tiny_model("llama")
        quantize_model(model, method, token_batch(8, 48), fast_settings(), torch.device("cpu"))
        with torch.no_grad():
            errors[method] = float((model(ids).logits - target).pow(2).mean())
    assert errors["qqq"] < errors["w4a8_rtn"]


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="llama.*mistral.*qwen2"):
        quantize_model(model, "rtn", None)


def test_group_size_that_does_not_divide_the_layers_is_rejected():
    model = tiny_model("llama", hidden=96, intermediate=192, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="not divisible by group_size=64"):
        quantize_model(model, "rtn", None, QuantizeSettings(group_size=64))


def test_calibrated_methods_need_calibration_data():
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_model("llama"), "qqq", None)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="w4a8_rtn"):
        get_method("awq")
    assert get_method("rtn").name == "w4a8_rtn"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_quantize(dtype, reference_backend):
    model = tiny_model("llama").to(dtype)
    quantize_model(model, "qqq", token_batch(2, 32), fast_settings(128), torch.device("cpu"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QQQLinear)
    with torch.no_grad():
        out = model(token_batch(1, 16, seed=2)).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_w4a8_layers_must_fit_the_kernel_layout_before_any_work():
    model = tiny_model("llama", hidden=96, intermediate=192, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_model(model, "qqq", token_batch(2, 16), QuantizeSettings(group_size=32))


def test_report_has_gptq_and_round_to_nearest_losses_and_the_smoothing_thresholds(reference_backend):
    model = tiny_model("llama")
    settings = QuantizeSettings(group_size=64, smoothing_samples=2, min_thresholds=10, max_thresholds=10, batch_size=4)
    report = quantize_model(model, "qqq", token_batch(8, 48), settings, torch.device("cpu"))
    assert len(report.gptq_losses) == len(report.smoothing_scales) == 2
    losses = [loss for layer in report.gptq_losses for loss in layer.values()]
    assert len(losses) == 14 and all(0 < loss.gptq < loss.rtn for loss in losses)
    assert all(point.threshold > 0 for layer in report.smoothing_scales for point in layer.values())


def test_calibration_settings_take_overrides_on_either_preset():
    from qqq.pipeline import DEMO_CALIBRATION, PAPER_CALIBRATION, calibration_settings

    assert calibration_settings() == DEMO_CALIBRATION and calibration_settings(True) == PAPER_CALIBRATION
    assert calibration_settings(True, smooth_samples=3, nsamples=None) == dict(PAPER_CALIBRATION, smooth_samples=3)
    with pytest.raises(ValueError, match="unknown calibration settings"):
        calibration_settings(windows=4)


def test_rotated_methods_rotate_and_beat_round_to_nearest(reference_backend):
    ids = token_batch(4, 48, seed=11)
    with torch.no_grad():
        target = tiny_model("qwen2")(ids).logits
    errors = {}
    for method in ("w4a8_rtn", "rot_gptq", "rot_qqq"):
        model = tiny_model("qwen2")
        quantize_model(model, method, token_batch(8, 48), fast_settings(64), torch.device("cpu"))
        with torch.no_grad():
            errors[method] = float((model(ids).logits - target).pow(2).mean())
        rotated = not torch.equal(model.model.embed_tokens.weight, tiny_model("qwen2").model.embed_tokens.weight)
        assert rotated == method.startswith("rot_")
    assert errors["rot_gptq"] < errors["w4a8_rtn"] and errors["rot_qqq"] < errors["w4a8_rtn"]
