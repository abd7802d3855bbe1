"""The weight unpacks of the W4A8 kernels (``w4a8_gemm``, the W4A16 baseline): packed int4 bytes (``packing.py``)
-> int8 lanes for the integer tensor cores, per-channel (``16 * code``) or per-group (QQQ's FusedDequantQuant).

Two formulations of each unpack, the same numbers: on the GPU (``USE_ASM``) PTX through
``tl.inline_asm_elementwise`` working on 4 packed bytes per instruction (mask/shift for per-channel; the
0x6400 exponent trick, one ``fma.rn.f16x2`` with +1152 for the rounding and ``prmt`` for per-group, as in the
original CUDA kernel); under the interpreter (CPU tests) plain Triton ops (fp32 exponent and magic-number
tricks). The GPU check in ``experiments/gemm_speed.py --check`` compares the PTX path with the reference.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import triton
import triton.language as tl

from qqq.kernels_triton.activation_quant import round_to_int32

if TYPE_CHECKING:
    import torch


@triton.jit
def int8_from_group_codes(q, ratio, CLAMP: tl.constexpr = True):
    """``clamp(round_half_even((q - 8) * ratio), -127, 127)`` as int8, for int32 nibbles ``q`` in [0, 15] and
    fp32 ratios (fp16 values, so the product is exact in fp32 and only the final rounding happens). Without
    ``CLAMP`` the caller guarantees every ``|(q - 8) * ratio| < 127.5``."""
    centred = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # (2**23 + q) - (2**23 + 8)
    w = round_to_int32(centred * ratio)
    if CLAMP:
        w = tl.minimum(tl.maximum(w, -127), 127)
    return w.to(tl.int8)


@triton.jit
def unpack_signed_x16_asm(packed):
    """Per-channel unpack on the GPU, 4 bytes per instruction: (low, high) int8 lanes holding 16 * code."""
    w_low = tl.inline_asm_elementwise(
        "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r", [packed],
        dtype=tl.int8, is_pure=True, pack=4)
    w_high = tl.inline_asm_elementwise(
        "and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
    return w_low, w_high


@triton.jit
def unpack_signed_x16(packed, USE_ASM: tl.constexpr):
    """Per-channel codes of a packed byte tile as (low, high) int8 lanes holding 16 * code: PTX on the GPU, plain
    shifts and masks elsewhere (the interpreter)."""
    if USE_ASM:
        w_low, w_high = unpack_signed_x16_asm(packed)
    else:
        w_low = (packed << 4).to(tl.uint8).to(tl.int8, bitcast=True)
        w_high = (packed & 0xF0).to(tl.uint8).to(tl.int8, bitcast=True)
    return w_low, w_high


# QQQ's FusedDequantQuant in PTX for one 32-bit word of packed codes (8 weights) and the f16x2 ratio words of its
# low and high nibbles; the operand numbers depend on how the caller packs its tensors. The min/max lines clamp
# to [-127, 127]; they never act when every |(q - 8) * ratio| < 127.5 (``numerics.group_products_fit_int8``),
# and the UNCLAMPED variants drop them (8 of 27 instructions)
_CLAMP_LINES = """        max.f16x2 a, a, kmin;
        max.f16x2 b, b, kmin;
        max.f16x2 c, c, kmin;
        max.f16x2 d, d, kmin;
        min.f16x2 a, a, kmax;
        min.f16x2 b, b, kmax;
        min.f16x2 c, c, kmax;
        min.f16x2 d, d, kmax;
"""
_FUSED_DEQUANT_QUANT_PTX = """{
        .reg .b32 x, a, b, c, d, k1032, k1152, kmin, kmax;
        mov.b32 k1032, 0x64086408;
        mov.b32 k1152, 0x64806480;
        mov.b32 kmin, 0x64016401;
        mov.b32 kmax, 0x64FF64FF;
        mov.b32 x, PACKED;
        lop3.b32 a, x, 0x000F000F, 0x64006400, 0xEA;
        shr.u32 b, x, 8;
        lop3.b32 b, b, 0x000F000F, 0x64006400, 0xEA;
        shr.u32 c, x, 4;
        lop3.b32 c, c, 0x000F000F, 0x64006400, 0xEA;
        shr.u32 d, x, 12;
        lop3.b32 d, d, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 a, a, k1032;
        sub.f16x2 b, b, k1032;
        sub.f16x2 c, c, k1032;
        sub.f16x2 d, d, k1032;
        fma.rn.f16x2 a, a, RATIO_LOW, k1152;
        fma.rn.f16x2 b, b, RATIO_LOW, k1152;
        fma.rn.f16x2 c, c, RATIO_HIGH, k1152;
        fma.rn.f16x2 d, d, RATIO_HIGH, k1152;
CLAMP_LINES        prmt.b32 a, a, b, 0x6240;
        prmt.b32 c, c, d, 0x6240;
        xor.b32 $0, a, 0x80808080;
        xor.b32 $1, c, 0x80808080;
        }"""


def _fused_dequant_quant_ptx(ratio_high_operand: str, clamp: bool) -> tl.constexpr:
    text = _FUSED_DEQUANT_QUANT_PTX.replace("CLAMP_LINES", _CLAMP_LINES if clamp else "")
    return tl.constexpr(text.replace("PACKED", "$2").replace("RATIO_LOW", "$3").replace("RATIO_HIGH", ratio_high_operand))


# int8 tensors with pack=4: the word is $2, each int32 ratio operand comes as 4 registers (the first is used)
FUSED_DEQUANT_QUANT_BYTES = _fused_dequant_quant_ptx("$7", clamp=True)
FUSED_DEQUANT_QUANT_BYTES_UNCLAMPED = _fused_dequant_quant_ptx("$7", clamp=False)
# int32 word tensors with pack=1
FUSED_DEQUANT_QUANT_WORDS = _fused_dequant_quant_ptx("$4", clamp=True)
FUSED_DEQUANT_QUANT_WORDS_UNCLAMPED = _fused_dequant_quant_ptx("$4", clamp=False)


@triton.jit
def int8_from_group_codes_asm(packed, ratio_pair_low, ratio_pair_high, CLAMP: tl.constexpr = True):
    """QQQ's FusedDequantQuant on the GPU, 8 weights per ~20 instructions. For each byte pair of a 32-bit
    word, the nibbles become fp16 ``1024 + q`` (exponent trick), ``- 1032`` gives ``q - 8`` exactly, one
    ``fma.rn.f16x2`` with the ratio and ``+ 1152`` rounds ``(q - 8) * r`` half to even into the low byte
    (+128 offset; fp16 has ulp 1 on [1024, 2048)), min/max clamp it to [-127, 127] like the spec, and
    ``prmt`` + xor 0x80 gather four int8 lanes. ``ratio_pair_*`` hold the fp16 ratio of the low / high
    nibbles twice (an f16x2 word, int32 tensors; with pack=4 each comes as 4 registers, the first is used).
    Returns (low-nibble weights, high-nibble weights). ``CLAMP=False``: no min/max (see ``_CLAMP_LINES``)."""
    ptx: tl.constexpr = FUSED_DEQUANT_QUANT_BYTES if CLAMP else FUSED_DEQUANT_QUANT_BYTES_UNCLAMPED
    return tl.inline_asm_elementwise(
        ptx, "=r,=r,r,r,r,r,r,r,r,r,r", [packed, ratio_pair_low, ratio_pair_high], dtype=(tl.int8, tl.int8),
        is_pure=True, pack=4)


@triton.jit
def ratio_pair(r):
    """fp16 ratios -> int32 words holding the ratio twice (the f16x2 operand of the PTX dequant)."""
    bits = r.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def int8_words_from_group_codes(packed, r_low, r_high, USE_ASM: tl.constexpr, CLAMP: tl.constexpr = True):
    """Per-group codes in int32 words (8 codes each, ``packing.py``) -> (low-nibble, high-nibble) words of four int8
    lanes ``clamp(round_half_even((q - 8) * ratio), -127, 127)``, with the fp16 ratios ``r_low`` / ``r_high``
    of each word's nibbles (broadcast to ``packed``'s shape): the word form of ``int8_from_group_codes_asm``
    (PTX) / ``int8_from_group_codes``."""
    if USE_ASM:
        ptx: tl.constexpr = FUSED_DEQUANT_QUANT_WORDS if CLAMP else FUSED_DEQUANT_QUANT_WORDS_UNCLAMPED
        low, high = tl.inline_asm_elementwise(ptx, "=r,=r,r,r,r", [packed, ratio_pair(r_low), ratio_pair(r_high)],
                                              dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        low = tl.zeros_like(packed)
        high = tl.zeros_like(packed)
        for lane in tl.static_range(4):
            q_low = (packed >> (8 * lane)) & 0xF
            q_high = (packed >> (8 * lane + 4)) & 0xF
            low |= (int8_from_group_codes(q_low, r_low.to(tl.float32)).to(tl.int32) & 0xFF) << (8 * lane)
            high |= (int8_from_group_codes(q_high, r_high.to(tl.float32)).to(tl.int32) & 0xFF) << (8 * lane)
    return low, high


@triton.jit
def _permuted_byte(a, b, selector, lane: tl.constexpr):
    field = (selector >> (4 * lane)) & 0xF
    source = field & 7
    byte = tl.where(source < 4, a >> (8 * (source & 3)), b >> (8 * (source & 3))) & 0xFF
    byte = tl.where(field >= 8, tl.where(byte >= 0x80, 0xFF, 0), byte)
    return byte << (8 * lane)


@triton.jit
def byte_permute(a, b, selector, USE_ASM: tl.constexpr):
    """PTX ``prmt.b32`` on int32 words: byte j of the result is byte ``f & 7`` of the eight bytes of (``a``, ``b``),
    ``a``'s first, for the 4-bit field ``f = selector >> 4j``, or that byte's sign bit repeated (0x00 / 0xFF) when
    ``f & 8``. Only the selector's low 16 bits count."""
    if USE_ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, selector], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return (_permuted_byte(a, b, selector, 0) | _permuted_byte(a, b, selector, 1)
                | _permuted_byte(a, b, selector, 2) | _permuted_byte(a, b, selector, 3))


# The tables from the 8 magnitudes min(round_half_even(m * r), 127), m = 1..8, in four f16x2 words (low half
# first): fp16 1024 + m * r rounds to an integer there (ulp 1) whose low byte is the magnitude; ``prmt`` gathers
# those bytes. The positive table's byte 0 (m = 0) is the sign of a byte below 128: 0.
_GROUP_TABLES_PTX = """{
        .reg .b32 r, h87, h65, h43, h21, t, k1024, kmax;
        mov.b32 r, $4;
        mov.b32 k1024, 0x64006400;
        mov.b32 kmax, 0x647F647F;
        mov.b32 h87, 0x47004800;
        mov.b32 h65, 0x45004600;
        mov.b32 h43, 0x42004400;
        mov.b32 h21, 0x3C004000;
        fma.rn.f16x2 h87, r, h87, k1024;
        fma.rn.f16x2 h65, r, h65, k1024;
        fma.rn.f16x2 h43, r, h43, k1024;
        fma.rn.f16x2 h21, r, h21, k1024;
        min.f16x2 h87, h87, kmax;
        min.f16x2 h65, h65, kmax;
        min.f16x2 h43, h43, kmax;
        min.f16x2 h21, h21, kmax;
        prmt.b32 $0, h87, h65, 0x6420;
        prmt.b32 $1, h43, h21, 0x6420;
        prmt.b32 $2, h21, h43, 0x6028;
        prmt.b32 t, h43, h65, 0x0460;
        prmt.b32 $3, t, h87, 0x6210;
        }"""
GROUP_TABLES = tl.constexpr(_GROUP_TABLES_PTX)

# A packed word's signed int8 words (low nibbles, high nibbles: FusedDequantQuant's outputs) from its group's tables
# (``group_tables``) in 13 instructions, the clamp included, against 19 / 27 for the fp16 arithmetic: the four
# lookups of ``int8_words_from_group_tables`` (a, b: the codes of the low / high 16 bits in nibble order), then per
# byte ``(0x80 - negative) ^ 0x80 | positive``, which is ``positive - negative`` (one of the two is 0, and a
# magnitude <= 127 never borrows from 0x80), then the lanes gathered back into the low and the high nibbles' words.
_GROUP_LOOKUP_PTX = """{
        .reg .b32 x, f, xh, fh, na, nb, pa, pb, k80;
        mov.b32 k80, 0x80808080;
        mov.b32 x, PACKED;
        xor.b32 f, x, 0x88888888;
        shr.u32 xh, x, 16;
        shr.u32 fh, f, 16;
        prmt.b32 na, NEG_LOW, NEG_HIGH, x;
        prmt.b32 nb, NEG_LOW, NEG_HIGH, xh;
        prmt.b32 pa, POS_LOW, POS_HIGH, f;
        prmt.b32 pb, POS_LOW, POS_HIGH, fh;
        sub.u32 na, k80, na;
        sub.u32 nb, k80, nb;
        lop3.b32 na, na, k80, pa, 0xBE;
        lop3.b32 nb, nb, k80, pb, 0xBE;
        prmt.b32 $0, na, nb, 0x6420;
        prmt.b32 $1, na, nb, 0x7531;
        }"""
# int8 tensors with pack=4: the word is $2, each int32 table operand comes as 4 registers (the first is used)
GROUP_LOOKUP_BYTES = tl.constexpr(_GROUP_LOOKUP_PTX.replace("PACKED", "$2").replace("NEG_LOW", "$3")
                                  .replace("NEG_HIGH", "$7").replace("POS_LOW", "$11").replace("POS_HIGH", "$15"))


@triton.jit
def _magnitude(m: tl.constexpr, ratio):
    return tl.minimum(round_to_int32(m * ratio), 127)


@triton.jit
def group_tables(ratio, USE_ASM: tl.constexpr):
    """A group's weights ``clamp(round_half_even((q - 8) * ratio), -127, 127)`` for the codes q = 0..15 as two
    ``prmt`` tables of two int32 words each: ``negative`` holds the magnitudes ``round((8 - q) * ratio)`` of
    q = 0..7 (byte q), ``positive`` the weights ``round((q - 8) * ratio)`` of q = 8..15 (byte q - 8); every byte
    is in [0, 127] (ties to even are symmetric, so the magnitude of a negative weight is the rounded magnitude).
    The clamp always applies, even where every product of the layer fits int8 (``ratios_fit_int8``): that holds for
    the codes a group has, and a code it lacks still has a byte, whose sign bit ``int8_words_from_group_tables``
    reads. ``ratio``: fp16. Returns (negative low, negative high, positive low, positive high)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(GROUP_TABLES, "=r,=r,=r,=r,r", [ratio_pair(ratio)], dtype=(tl.int32,) * 4,
                                         is_pure=True, pack=1)
    else:
        r = ratio.to(tl.float32)
        return (_magnitude(8, r) | _magnitude(7, r) << 8 | _magnitude(6, r) << 16 | _magnitude(5, r) << 24,
                _magnitude(4, r) | _magnitude(3, r) << 8 | _magnitude(2, r) << 16 | _magnitude(1, r) << 24,
                _magnitude(1, r) << 8 | _magnitude(2, r) << 16 | _magnitude(3, r) << 24,
                _magnitude(4, r) | _magnitude(5, r) << 8 | _magnitude(6, r) << 16 | _magnitude(7, r) << 24)


@triton.jit
def int8_words_from_group_tables(packed, negative_low, negative_high, positive_low, positive_high,
                                 USE_ASM: tl.constexpr):
    """Per-group codes in int32 words (8 codes each, ``packing.py``) through the tables of ``group_tables``, four
    ``prmt`` per word instead of the ~19 instructions of the fp16 FusedDequantQuant. Returns int8x4 words
    ``(negative_a, negative_b, positive_a, positive_b)``: word a holds the codes of the word's low 16 bits in nibble
    order (the low and the high nibble of byte 0, then of byte 1), word b those of its high 16 bits; ``positive``
    has the weights of the codes >= 8 and 0 elsewhere, ``negative`` the magnitudes of the codes < 8 and 0
    elsewhere (the sign-replicating ``prmt`` of a byte in [0, 127]), so a code's weight is positive - negative."""
    flipped = packed ^ -2004318072  # 0x88888888: codes >= 8 index the positive table directly
    high_half = packed >> 16
    flipped_high_half = flipped >> 16
    return (byte_permute(negative_low, negative_high, packed, USE_ASM),
            byte_permute(negative_low, negative_high, high_half, USE_ASM),
            byte_permute(positive_low, positive_high, flipped, USE_ASM),
            byte_permute(positive_low, positive_high, flipped_high_half, USE_ASM))


def use_inline_asm(t: torch.Tensor) -> bool:
    """The PTX unpack paths run on CUDA; the interpreter (CPU tests) runs the plain Triton formulation."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
