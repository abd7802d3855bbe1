import pytest
import torch

from qqq import numerics


def test_per_token_codes_scales_and_zero_rows():
    x = torch.randn(5, 67) * 3
    x[2] = 0
    codes, scale = numerics.quantize_per_token(x)
    assert codes.dtype == torch.int8 and scale.shape == (5, 1)
    assert codes.abs().max() <= 127 and (codes.abs().amax(dim=1)[[0, 1, 3, 4]] == 127).all()
    assert scale[2] == 0 and (codes[2] == 0).all()
    assert torch.isfinite(numerics.fake_quantize_per_token(x)).all()
    assert ((codes.float() * scale - x).abs() <= scale / 2 + 1e-6).all()


def test_per_token_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5]])
    codes, scale = numerics.quantize_per_token(x)
    assert scale.item() == 1.0
    assert codes.tolist() == [[127, 0, 2, 2, 0]]


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_two_level_int8_weight_stays_in_range_and_matches_groups(group_size):
    torch.manual_seed(0)
    weight = torch.randn(48, 512) * torch.rand(48, 1) * 4
    weight[:, :group_size] *= 50  # one group with a huge range next to small ones
    codes, group_scale = numerics.quantize_weight_per_group(weight, group_size)
    assert codes.dtype == torch.uint8 and 0 <= codes.min() and codes.max() <= 15
    channel_scale, ratio = numerics.two_level_scales(codes, group_scale)
    assert ratio.dtype == torch.float16 and ratio.shape == (48, 512 // group_size)
    w8 = numerics.int8_weight_from_groups(codes, ratio)
    assert w8.abs().max() <= 127 and w8.abs().max() >= 126
    # the int8 step moves each weight by at most half an int8 step plus the fp16 error of the ratio
    group_deq = numerics.dequantize_per_group(codes, group_scale)
    two_level = numerics.dequantize_two_level(codes, channel_scale, ratio)
    bound = channel_scale[:, None] * (0.5 + 8 * 128 * 2 ** -11)
    assert ((two_level - group_deq).abs() <= bound).all()
    assert numerics.group_products_fit_int8(codes, ratio)  # so the kernels may skip the int8 clamp


def test_group_products_fit_int8_at_the_rounding_edge():
    codes = torch.tensor([[0, 8, 15, 8]], dtype=torch.uint8)  # q - 8 = -8, 0, 7, 0
    assert numerics.group_products_fit_int8(codes, torch.tensor([[127 / 8]]).half())  # -127
    assert numerics.group_products_fit_int8(codes, torch.tensor([[15.9375 - 2**-7]]).half())  # -127.4375
    assert not numerics.group_products_fit_int8(codes, torch.tensor([[15.9375]]).half())  # -127.5 rounds to -128
    assert not numerics.group_products_fit_int8(codes[:, 1:], torch.tensor([[18.25]]).half())  # 7 * 18.25 = 127.75
    assert numerics.group_products_fit_int8(codes[:, 1:], torch.tensor([[18.125]]).half())  # 126.875


def test_int8_weight_products_are_exact_in_fp32():
    codes = torch.arange(16, dtype=torch.uint8).repeat(1, 2)
    ratio = torch.tensor([[15.875, 0.3333]], dtype=torch.float16)
    expected = [round((c - 8) * float(r)) for r in ratio[0].float().tolist() for c in range(16)]
    assert numerics.int8_weight_from_groups(codes, ratio)[0].tolist() == expected


def test_per_channel_codes():
    weight = torch.randn(16, 40)
    codes, scale = numerics.quantize_weight_per_channel(weight)
    assert codes.dtype == torch.int8 and codes.abs().max() == 7
    assert torch.allclose(scale, weight.abs().amax(dim=1) / 7)
    assert ((numerics.dequantize_per_channel(codes, scale) - weight).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [-1, 64])
def test_reference_linear_accumulates_exactly(group_size):
    torch.manual_seed(1)
    x, weight, bias = torch.randn(7, 256), torch.randn(33, 256), torch.randn(33)
    codes, scale = numerics.quantize_weight_rtn(weight, group_size)
    if group_size == -1:
        channel_scale, ratio = scale, None
    else:
        channel_scale, ratio = numerics.two_level_scales(codes, scale)
    y = numerics.w4a8_linear_reference(x, codes, channel_scale, ratio, bias)
    x_codes, token_scale = numerics.quantize_per_token(x)
    acc = x_codes.long() @ numerics.int8_weight(codes, ratio).long().T  # exact integer product
    assert torch.equal(y, acc.float() * token_scale * channel_scale + bias)


@pytest.mark.parametrize("group_size,in_features", [(128, 192), (48, 96), (0, 64)])
def test_bad_group_sizes_are_rejected(group_size, in_features):
    with pytest.raises(ValueError, match="group_size"):
        numerics.quantize_weight_rtn(torch.randn(4, in_features), group_size)


def test_weight_bits_other_than_4_or_8_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        numerics.fake_quantize_weight(torch.randn(4, 64), -1, bits=3)


@pytest.mark.parametrize("int_mm_faster", [True, False])
def test_the_cpu_int8_gemm_is_taken_only_where_it_is_faster_than_fp32(int_mm_faster, monkeypatch):
    """The CPU int8 GEMM ran 27x slower than fp32 on an AVX2-only CPU: it is chosen by a timing, not by its
    existence."""
    if not numerics._cpu_int8_gemm():
        pytest.skip("this torch build has no CPU int8 GEMM")
    timed, seconds = [], (1.0, 2.0) if int_mm_faster else (2.0, 1.0)  # the int8 GEMM's, then fp32's

    def best_seconds(call, repeats=3):
        timed.append(call)
        return seconds[len(timed) - 1]

    monkeypatch.setattr(numerics, "_best_seconds", best_seconds)
    assert numerics.cpu_int8_gemm_pays.__wrapped__() == int_mm_faster
    assert torch.equal(timed[0](), timed[1]().to(torch.int32))  # the two timed calls compute the same sums


@pytest.mark.parametrize("int_mm", [True, False], ids=["int8 GEMM", "fp32 chunks"])
def test_int8_matmul_is_exact_beyond_fp32_integers(int_mm, monkeypatch):
    if int_mm and not numerics._cpu_int8_gemm():
        pytest.skip("this torch build has no CPU int8 GEMM")
    monkeypatch.setattr(numerics, "cpu_int8_gemm_pays", lambda: int_mm)
    k = 3 * numerics.EXACT_FP32_CHUNK + 17
    a = torch.full((3, k), 127, dtype=torch.int8)
    a[1] = -127
    a[2, ::3] = -128
    b = torch.randint(-127, 128, (5, k), dtype=torch.int8)
    b[0] = 127
    exact = a.long() @ b.long().T  # |values| up to 127 * 127 * k > 2**24
    assert exact.abs().max() > 2 ** 24
    assert torch.equal(numerics.int8_matmul_exact(a, b), exact.double())
    assert torch.equal(numerics.int8_matmul_exact(a, b, torch.float32), exact.double().float())


def test_per_token_quantization_may_overwrite_its_input():
    x = torch.randn(4, 7, 64) * 3
    x[0, 0] = 0
    codes, scale = numerics.quantize_per_token(x)
    scratch = x.clone()
    overwritten_codes, overwritten_scale = numerics.quantize_per_token(scratch, overwrite=True)
    assert torch.equal(codes, overwritten_codes) and torch.equal(scale, overwritten_scale)
    assert scale[0, 0] == 0 and (codes[0, 0] == 0).all()


def test_abs_max_is_the_maximum_of_the_absolute_values():
    x = torch.randn(3, 5, 64)
    x[0, 0] = -0.0
    x[0, 1] = 0.0
    x[1, 2, 7] = -1000
    for dim, keepdim in ((-1, False), (1, True), (0, False)):
        expected = x.abs().amax(dim=dim, keepdim=keepdim)
        got = numerics.abs_max(x, dim=dim, keepdim=keepdim)
        assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())


def test_output_tolerance_admits_a_fused_epilogue_and_rejects_a_wrong_one():
    gen = torch.Generator().manual_seed(11)
    x_codes = torch.randint(-127, 128, (64, 256), generator=gen).to(torch.int8)
    weight = torch.randint(-127, 128, (96, 256), generator=gen).to(torch.int8)
    token_scale, channel_scale = torch.rand(64, generator=gen) * 1e-2, torch.rand(96, generator=gen) * 1e-2
    acc = numerics.int8_matmul_exact(x_codes, weight)
    product = (acc.float() * token_scale[:, None]) * channel_scale
    bias = (-product[0] + torch.randn(96, generator=gen) * 1e-6).half()  # row 0: the bias cancels the product
    expected = numerics.int8_linear_reference(x_codes, token_scale, weight, channel_scale, bias, torch.float16)
    fused = (product.double() + bias.double()).half()  # one rounding of product + bias, as an FMA gives
    tolerance = numerics.output_tolerance(expected, acc, token_scale, channel_scale)
    assert ((fused.float() - expected.float()).abs() <= tolerance).all()
    two_steps = expected.float().abs() * 2.0**-9 + 0.5
    assert not ((expected.float() + two_steps - expected.float()).abs() <= tolerance).all()
