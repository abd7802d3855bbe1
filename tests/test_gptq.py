import pytest
import torch

from qqq import numerics
from qqq.gptq import GPTQ, GPTQConfig


def correlated_inputs(n=512, k=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) / k ** 0.5
    x = torch.randn(n, k, generator=generator) @ (torch.eye(k) + 2 * mixing)
    x[:, :4] *= 10
    return x


def output_error(x, weight, approx):
    return float((x @ weight.T - x @ approx.T).pow(2).mean().detach())


@pytest.mark.parametrize("group_size", [-1, 32, 64, 128, 256])
@pytest.mark.parametrize("mse_clip,hessian_clip,gptq_clip",
                         [(False, False, False), (True, False, False), (False, True, False), (False, False, True)])
def test_gptq_beats_round_to_nearest_on_the_layer(group_size, mse_clip, hessian_clip, gptq_clip):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    x = correlated_inputs()
    solver = GPTQ(linear)
    for chunk in x.split(128):
        solver.add_batch(chunk)
    result = solver.quantize(group_size, GPTQConfig(mse_clip=mse_clip, hessian_clip=hessian_clip, gptq_clip=gptq_clip))
    if group_size == -1:
        assert result.codes.dtype == torch.int8 and result.codes.abs().max() <= 7
    else:
        assert result.codes.dtype == torch.uint8 and result.codes.max() <= 15
        assert result.scale.shape == (96, 256 // group_size)
    rtn = numerics.quantize_weight_rtn(linear.weight, group_size)
    rtn_weight = (numerics.dequantize_per_channel(*rtn) if group_size == -1 else numerics.dequantize_per_group(*rtn))
    gptq_error = output_error(x, linear.weight.detach(), result.dequantized())
    assert gptq_error < 0.8 * output_error(x, linear.weight.detach(), rtn_weight)


def test_static_groups_keep_original_group_scales_under_act_order():
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 16, bias=False)
    solver = GPTQ(linear)
    solver.add_batch(correlated_inputs(256, 128))
    result = solver.quantize(32, GPTQConfig(act_order=True))
    assert torch.equal(result.scale, numerics.group_scales(linear.weight.detach(), 32))


@pytest.mark.parametrize("group_size", [-1, 32])
def test_dead_input_columns_quantize_to_zero(group_size):
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 8, bias=False)
    x = torch.randn(100, 64)
    x[:, 5] = 0
    solver = GPTQ(linear)
    solver.add_batch(x)
    result = solver.quantize(group_size)
    assert (result.dequantized()[:, 5] == 0).all()
    assert torch.isfinite(result.dequantized()).all()


def test_group_size_must_divide_the_layer():
    solver = GPTQ(torch.nn.Linear(96, 8))
    solver.add_batch(torch.randn(10, 96))
    with pytest.raises(ValueError, match="divisible"):
        solver.quantize(64)


@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_reported_losses_are_the_output_errors_of_gptq_and_round_to_nearest(group_size, act_order):
    torch.manual_seed(3)
    linear = torch.nn.Linear(256, 48, bias=False)
    x = correlated_inputs()
    solver = GPTQ(linear)
    solver.add_batch(x)
    result = solver.quantize(group_size, GPTQConfig(act_order=act_order, damping=0.01))
    weight = linear.weight.detach()
    rtn = numerics.quantize_weight_rtn(weight, group_size)
    rtn_weight = (numerics.dequantize_per_channel(*rtn) if group_size == -1 else numerics.dequantize_per_group(*rtn))
    # 1/2 tr(D H D^T) with H = 2/n X^T X + damping * mean(diag) * I: the mean over tokens of |D x|^2 plus the
    # damping term
    damping = 0.01 * float(2 * x.pow(2).sum(0).mean() / x.shape[0])

    def expected(delta):
        return float((x @ delta.T).pow(2).sum(1).mean() + damping / 2 * delta.pow(2).sum())

    assert result.loss == pytest.approx(expected(weight - result.dequantized()), rel=1e-3)
    assert result.rtn_loss == pytest.approx(expected(weight - rtn_weight), rel=1e-3)
    assert result.loss < 0.8 * result.rtn_loss


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order,mse_clip", [(True, False), (False, False), (True, True)])
def test_one_solver_for_linears_that_read_one_input_gives_each_linear_its_own_result(group_size, act_order, mse_clip):
    torch.manual_seed(4)
    linears = [torch.nn.Linear(256, n, bias=False) for n in (96, 32, 40)]
    x = correlated_inputs()
    x[:, 9] = 0  # a dead input column
    config = GPTQConfig(act_order=act_order, mse_clip=mse_clip, block_size=64)
    shared = GPTQ(*linears)
    for chunk in x.split(100):
        for _ in linears:  # what the forward hooks do: each linear brings the same tensor
            shared.add_input(chunk)
    shared.check_inputs_shared()
    for linear, result in zip(linears, shared.quantize_each(group_size, config)):
        alone = GPTQ(linear)
        for chunk in x.split(100):
            alone.add_batch(chunk)
        expected = alone.quantize(group_size, config)
        assert torch.equal(result.codes, expected.codes) and torch.equal(result.scale, expected.scale)
        assert result.loss == expected.loss and result.rtn_loss == expected.rtn_loss


def test_linears_that_read_different_inputs_cannot_share_a_solver():
    linears = [torch.nn.Linear(64, 8) for _ in range(2)]
    solver = GPTQ(*linears)
    solver.add_input(torch.randn(10, 64))
    solver.add_input(torch.randn(10, 64))
    with pytest.raises(ValueError, match="read one input"):
        solver.check_inputs_shared()
    with pytest.raises(ValueError, match="quantize_each"):
        solver.quantize()
    with pytest.raises(ValueError, match="input size"):
        GPTQ(torch.nn.Linear(64, 8), torch.nn.Linear(32, 8))


def test_hessian_clip_keeps_the_columns_that_meet_large_inputs():
    """Rows whose largest weight sits in the column with by far the largest input energy: the plain clipping
    search clips it (the other weights round better), the Hessian-weighted one keeps the full range, and its
    choice has the smaller weighted error."""
    from qqq.gptq import _clipped_scale, _quantize_rows_per_channel

    torch.manual_seed(1)
    weight = torch.randn(8, 64) * 0.1
    weight[:, 0] = 1.0
    energy = torch.ones(64)
    energy[0] = 1e4
    weighted = _clipped_scale(weight, -1, _quantize_rows_per_channel, energy)
    plain = _clipped_scale(weight, -1, _quantize_rows_per_channel)
    maximum = weight.abs().amax(dim=1) / numerics.INT4_SIGNED_MAX
    assert torch.equal(weighted, maximum) and (plain < maximum).all()

    def weighted_error(scale):
        return ((weight - _quantize_rows_per_channel(weight, scale)).square() * energy).sum()
    assert weighted_error(weighted) < weighted_error(plain)


@pytest.mark.parametrize("group_size", [-1, 64])
def test_gptq_clip_gives_each_row_its_best_candidate(group_size):
    """GPTQ treats rows on their own, so the search's per-row choice is the best of its candidates for the whole
    layer: its objective is at most that of GPTQ with the absolute maximum, with the Hessian-weighted clipping, and
    with any one shrink factor, per linear when two linears share the solver; every chosen scale is one of them."""
    from qqq.gptq import GPTQ_CLIP_FACTORS

    torch.manual_seed(3)
    linears = [torch.nn.Linear(128, 48, bias=False), torch.nn.Linear(128, 24, bias=False)]
    with torch.no_grad():
        linears[0].weight[:5, 0] *= 25  # rows with an outlier, where clipping pays off differently
    solver = GPTQ(*linears)
    solver.add_batch(correlated_inputs(384, 128, seed=3))
    config = GPTQConfig(block_size=32)
    searched = solver.quantize_each(group_size, GPTQConfig(block_size=32, gptq_clip=True))
    rivals = [solver.quantize_each(group_size, config), solver.quantize_each(group_size, GPTQConfig(block_size=32,
                                                                                                   hessian_clip=True))]
    for result, *others in zip(searched, *rivals):
        assert all(result.loss <= other.loss * (1 + 1e-5) for other in others)
    for linear, result, plain, hessian in zip(linears, searched, *rivals):
        candidates = [plain.scale * factor for factor in GPTQ_CLIP_FACTORS] + [hessian.scale]
        matches = torch.stack([torch.isclose(result.scale, c, rtol=1e-6, atol=0) for c in candidates]).any(dim=0)
        assert matches.all()
        assert result.scale.untyped_storage().nbytes() == result.scale.numel() * 4  # not a view: safetensors saves it
        assert len({round(float(s), 6) for s in (result.scale / plain.scale).flatten()}) > 1  # rows differ
