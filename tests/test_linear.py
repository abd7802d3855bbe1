import pytest
import torch

from qqq import numerics
from qqq.kernels_triton.packing import pack_int4, unpack_int4
from qqq.linear import QQQLinear


@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_from_linear_matches_the_numeric_spec(group_size, reference_backend):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48)
    layer = QQQLinear.from_linear(linear, group_size)
    x = torch.randn(3, 5, 256)
    codes, scale = numerics.quantize_weight_rtn(linear.weight.detach(), group_size)
    assert torch.equal(layer.codes(), codes)
    ratio = None if group_size == -1 else numerics.two_level_scales(codes, scale)[1]
    channel_scale = scale if group_size == -1 else numerics.two_level_scales(codes, scale)[0]
    expected = numerics.w4a8_linear_reference(x.reshape(15, 256), codes, channel_scale, ratio, linear.bias)
    assert torch.equal(layer(x), expected.reshape(3, 5, 48))
    # close to the float layer: a 4-bit weight error, not garbage
    error = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert error < 0.2


@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip(signed):
    generator = torch.Generator().manual_seed(1)
    if signed:
        codes = torch.randint(-7, 8, (24, 256), generator=generator, dtype=torch.int8)
    else:
        codes = torch.randint(0, 16, (24, 256), generator=generator, dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes), 256, signed=signed), codes)


def test_wrong_input_width_is_a_clear_error(reference_backend):
    layer = QQQLinear.from_linear(torch.nn.Linear(64, 8), -1)
    with pytest.raises(ValueError, match="last dim 64"):
        layer(torch.randn(2, 65))


def test_the_cached_int8_weight_follows_new_weights(reference_backend):
    torch.manual_seed(0)
    layer = QQQLinear.from_linear(torch.nn.Linear(128, 16), 64)
    x = torch.randn(4, 128)
    layer(x)  # fills the cache
    other = QQQLinear.from_linear(torch.nn.Linear(128, 16), 64)
    layer.load_state_dict(other.state_dict())  # writes the buffers in place
    assert torch.equal(layer(x), other(x))
    layer.group_ratio = other.group_ratio * 2  # a new tensor
    expected = numerics.w4a8_linear_reference(x, other.codes(), other.channel_scale, other.group_ratio * 2, other.bias)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("group_size", [-1, 64])
def test_fast_cpu_path_equals_the_fp32_chunk_reference_bit_for_bit(group_size, reference_backend, monkeypatch):
    """The CPU path (int8 GEMM, cached weights) against the reference as it was: weights unpacked at the call,
    fp32 matmuls over K-chunks (K = 1536 spans two chunks)."""
    from qqq.fast.producers import quantize_rows
    from qqq.fast.projections import W4A8Projection

    torch.manual_seed(0)
    linears = [QQQLinear.from_linear(torch.nn.Linear(1536, 40), group_size) for _ in range(2)]
    projection = W4A8Projection(linears, torch.float32)
    x = torch.randn(7, 1536) * 3
    fast_layer, fast_projection = linears[0](x), projection(quantize_rows(x))
    monkeypatch.setattr(numerics, "cpu_int8_gemm_pays", lambda: False)
    expected = [numerics.w4a8_linear_reference(x, layer.codes(), layer.channel_scale,
                                               layer.group_ratio if group_size != -1 else None, layer.bias)
                for layer in linears]
    assert torch.equal(fast_layer, expected[0])
    assert torch.equal(fast_projection, torch.cat(expected, dim=1))
