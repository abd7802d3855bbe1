import pytest
import torch
from conftest import tiny_model, token_batch

from qqq import numerics
from qqq.layerwise import recorded_inputs
from qqq.model_families import family_of
from qqq import smoothing
from qqq.smoothing import KVHeadTying, SmoothingConfig, fold_scale, search_scale, smooth_model


@torch.no_grad()
def straightforward_search(x, weights, biases, block, config, tie=None):
    """QQQ's threshold search as a plain loop over the candidates, fake-quantized tensors in fp32: the
    reference the batched search must agree with."""
    x, weights = x.float(), [w.float() for w in weights]
    biases = [None if b is None else b.float() for b in biases]
    channel_max = x.abs().flatten(0, -2).amax(dim=0)
    if tie is not None:
        channel_max = tie(channel_max)
    target = block(x, [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases)])
    t_max = float(channel_max.max())
    best = (float("inf"), torch.ones_like(channel_max), t_max)
    for t in torch.linspace(t_max, 0.1, config.threshold_count(t_max)).tolist() if t_max > 0.1 else [t_max]:
        scale = (channel_max / t).clamp(min=1.0)
        x_q = numerics.fake_quantize_per_token(x / scale)
        w_q = [numerics.fake_quantize_weight(w * scale, config.group_size, config.weight_bits) for w in weights]
        loss = float((block(x, [torch.nn.functional.linear(x_q, w, b) for w, b in zip(w_q, biases)]) - target)
                     .pow(2).sum(dim=-1).mean())
        if loss < best[0]:
            best = (loss, scale, t)
    return best[1], best[2]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_folding_random_scales_leaves_fp_output_unchanged(model_type):
    model = tiny_model(model_type)
    ids = token_batch(2, 24)
    before = logits(model, ids)
    family = family_of(model)
    tying = KVHeadTying(*family.head_layout(model))
    generator = torch.Generator().manual_seed(3)
    for layer in family.decoder_layers(model):
        for point in family.smoothing_points:
            width = layer.get_submodule(point.consumers[0]).in_features
            scale = torch.rand(width, generator=generator) * 4 + 0.25
            if point.producer.endswith("v_proj"):
                scale = tying.tie(scale)  # GQA: one scale per key/value channel
            fold_scale(layer, point, scale, tying)
    assert torch.allclose(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_kv_head_tying_shares_scales_across_query_heads():
    tying = KVHeadTying(heads=6, kv_heads=2, head_dim=4)
    stat = torch.rand(24)
    tied = tying.tie(stat).view(2, 3, 4)
    assert torch.equal(tied[:, 0], tied[:, 1]) and torch.equal(tied[:, 0], tied[:, 2])
    assert torch.equal(tied[:, 0], stat.view(2, 3, 4).amax(dim=1))
    assert torch.equal(tying.to_value_rows(tying.tie(stat)), tied[:, 0].reshape(-1))


@pytest.mark.parametrize("model_type,rule", [("llama", "search"), ("qwen2", "search"), ("llama", "smoothquant")])
def test_smooth_model_keeps_the_fp_function(model_type, rule):
    model = tiny_model(model_type)
    ids = token_batch(2, 24, seed=5)
    before = logits(model, ids)
    config = SmoothingConfig(rule=rule, group_size=64, min_thresholds=20)
    scales = smooth_model(model, family_of(model), token_batch(2, 32), config, torch.device("cpu"))
    assert len(scales) == 2 and set(scales[0]) == {"qkv", "o", "gate_up", "down"}
    assert any((s.scale != 1).any() for layer in scales for s in layer.values())
    thresholds = [s.threshold for layer in scales for s in layer.values()]
    assert all(t is None for t in thresholds) if rule == "smoothquant" else all(t > 0 for t in thresholds)
    assert torch.allclose(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_search_is_never_worse_than_no_smoothing_on_calibration():
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    x[:, :3] *= 40  # outlier channels
    weight = torch.randn(96, 128) * 0.05
    config = SmoothingConfig(group_size=-1, min_thresholds=50)

    def block(_x, projections):
        return projections[0]

    def loss(scale):
        w_q = numerics.fake_quantize_weight(weight * scale, -1)
        return float((numerics.fake_quantize_per_token(x / scale) @ w_q.T - x @ weight.T).pow(2).sum(-1).mean())

    scale, threshold = search_scale(x, [weight], [None], block, config)
    assert (scale >= 1).all() and threshold < x.abs().max()
    assert loss(scale) < 0.5 * loss(torch.ones(128))


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="rule"):
        SmoothingConfig(rule="awq")


def test_point_scales_report_the_activation_maxima_before_and_after_smoothing():
    model = tiny_model("llama")
    config = SmoothingConfig(group_size=64, min_thresholds=10)
    calibration = token_batch(2, 32)
    scales = smooth_model(model, family_of(model), calibration, config, torch.device("cpu"))
    family = family_of(model)
    layer = family.decoder_layers(model)[0]
    point = scales[0]["qkv"]
    with torch.no_grad(), recorded_inputs(layer.self_attn.q_proj) as seen:  # the smoothed model, FP weights
        for row in calibration:
            model(row[None])
    smoothed = torch.cat(seen).abs().flatten(0, -2).amax(dim=0)
    assert point.channel_max.shape == (256,) and point.channel_max.max() > 4 * point.channel_max.median()
    assert torch.allclose(point.smoothed_channel_max, smoothed, rtol=1e-4)
    assert point.smoothed_channel_max.max() < point.channel_max.max()


def test_max_thresholds_caps_the_search():
    config = SmoothingConfig(min_thresholds=100, max_thresholds=12)
    assert config.threshold_count(400.0) == 12
    assert SmoothingConfig(min_thresholds=100).threshold_count(400.0) == 800
    with pytest.raises(ValueError, match="max_thresholds"):
        SmoothingConfig(max_thresholds=0)


@pytest.mark.parametrize("model_type,group_size", [("llama", -1), ("llama", 64), ("qwen2", 64)])
def test_batched_search_chooses_what_the_straightforward_loop_chooses(model_type, group_size, monkeypatch):
    config = SmoothingConfig(group_size=group_size, min_thresholds=40)
    calibration = token_batch(2, 32)
    fast = smooth_model(tiny_model(model_type), family_of(tiny_model(model_type)), calibration, config,
                        torch.device("cpu"))
    monkeypatch.setattr(smoothing, "search_scale", straightforward_search)
    model = tiny_model(model_type)
    reference = smooth_model(model, family_of(model), calibration, config, torch.device("cpu"))
    for fast_layer, reference_layer in zip(fast, reference):
        for name, point in reference_layer.items():
            assert fast_layer[name].threshold == point.threshold, name
            assert torch.equal(fast_layer[name].scale, point.scale), name
    thresholds = [(p.threshold, float(p.channel_max.max())) for layer in reference for p in layer.values()]
    assert any(t < t_max for t, t_max in thresholds)  # the search chose real smoothing somewhere


@pytest.mark.parametrize("group_size", [32, 64])
def test_scaled_group_weights_are_each_scaled_copy_quantized(group_size):
    """Only the groups with a scale != 1 are requantized; the rest reuse the unscaled weight's codes."""
    torch.manual_seed(2)
    weight = torch.randn(40, 256) * 0.05
    weight[:, 3] *= 20
    weight[5] = 0  # an all-zero row: channel scale 0
    channel_max = torch.rand(256) * 2
    channel_max[[1, 100, 200]] *= 50
    config = SmoothingConfig(group_size=group_size)
    quantized = smoothing.ScaledGroupWeights(weight, group_size)
    for thresholds in ([200.0], [90.0, 80.0, 30.0], [5.0, 1.5], [0.3, 0.1]):  # no group .. every group scaled
        scales = (channel_max / torch.tensor(thresholds)[:, None]).clamp(min=1.0)
        codes, channel_scale = quantized(scales)
        expected_codes, expected_scale = smoothing._int8_weights(weight, scales, config)
        assert torch.equal(codes, expected_codes) and torch.equal(channel_scale, expected_scale)
        for s, c, cs in zip(scales, codes, channel_scale):  # numerics' fake-quantized weight, row by row
            fake = numerics.fake_quantize_weight(weight * s, group_size)
            assert torch.equal(c.float() * cs[:, None], fake)


def test_candidate_batches_do_not_change_the_choice(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(2, 16, 64)
    x[..., :2] *= 30
    weights = [torch.randn(48, 64) * 0.1, torch.randn(32, 64) * 0.1]
    biases = [torch.randn(48), None]
    config = SmoothingConfig(group_size=32, min_thresholds=30)

    def block(_x, projections):
        return torch.cat(projections, dim=-1)

    chosen = search_scale(x, weights, biases, block, config)
    monkeypatch.setattr(smoothing, "CANDIDATE_BATCH_BYTES", 1)  # one candidate per batch
    one_by_one = search_scale(x, weights, biases, block, config)
    assert chosen[1] == one_by_one[1] and torch.equal(chosen[0], one_by_one[0])
    assert chosen[1] == straightforward_search(x, weights, biases, block, config)[1]
