"""The per-group unpack PTX of ``qqq.kernels_triton.unpack`` (QQQ's FusedDequantQuant, the group tables and the
lookup in them) run on the CPU, through a small emulator of the opcodes it uses, against the spec
(``numerics.int8_weight_from_groups``).

The interpreter runs the plain Triton formulation, never the PTX, and the GPU suite needs a GPU: without this, a
wrong selector or lop3 table in the PTX text would pass the CPU suite. The emulator implements each opcode as PTX
defines it (``prmt`` in its default mode, ``lop3`` by its truth table, f16x2 arithmetic with one rounding to nearest
even), on numpy arrays of 32-bit words, one word per lane.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qqq import numerics
from qqq.kernels_triton import unpack

MASK = np.uint64(0xFFFFFFFF)


def _halves(word):
    return np.stack([word & 0xFFFF, word >> 16]).astype(np.uint16).view(np.float16)


def _word(halves):
    bits = halves.astype(np.float16).view(np.uint16).astype(np.uint64)
    return bits[0] | bits[1] << np.uint64(16)


def _prmt(a, b, selector):
    source = [(a >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)]
    source += [(b >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)]
    out = np.zeros_like(a)
    for lane in range(4):
        field = (selector >> np.uint64(4 * lane)) & np.uint64(0xF)
        byte = np.choose((field & np.uint64(7)).astype(np.int64), source)
        sign = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= np.where(field & np.uint64(8), sign, byte) << np.uint64(8 * lane)
    return out


def _lop3(a, b, c, table):
    out = np.zeros_like(a)
    for index in range(8):
        if table >> index & 1:
            term = MASK
            for value, bit in ((a, 4), (b, 2), (c, 1)):
                term = term & (value if index & bit else ~value & MASK)
            out |= term
    return out


def _f16x2(op):
    def run(*operands):
        halves = [_halves(x).astype(np.float64) for x in operands]  # fp16 values and their products are exact here
        return _word(op(*halves).astype(np.float16))  # the one rounding, to nearest even
    return run


OPCODES = {
    "mov.b32": lambda a: a,
    "xor.b32": lambda a, b: a ^ b,
    "and.b32": lambda a, b: a & b,
    "shr.u32": lambda a, b: a >> b,
    "shl.b32": lambda a, b: (a << b) & MASK,
    "sub.u32": lambda a, b: (a - b) & MASK,
    "prmt.b32": _prmt,
    "lop3.b32": lambda a, b, c, table: _lop3(a, b, c, int(table[0])),
    "fma.rn.f16x2": _f16x2(lambda a, b, c: a * b + c),
    "sub.f16x2": _f16x2(lambda a, b: a - b),
    "min.f16x2": _f16x2(np.minimum),
    "max.f16x2": _f16x2(np.maximum),
}


def run_ptx(text: str, inputs: dict[str, np.ndarray], outputs: int) -> list[np.ndarray]:
    """Runs PTX ``text`` lane-wise on uint32 inputs (operand names such as ``$2`` -> words); returns ``$0`` ..
    ``$(outputs - 1)``. Fails on any opcode the emulator does not know."""
    lanes = len(next(iter(inputs.values())))
    registers = {name: words.astype(np.uint64) for name, words in inputs.items()}

    def value(operand):
        if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", operand):
            return np.full(lanes, int(operand, 0), dtype=np.uint64)
        return registers[operand]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}", "") or line.startswith(".reg"):
            continue
        opcode, operands = line.split(None, 1)
        destination, *sources = [operand.strip() for operand in operands.split(",")]
        assert opcode in OPCODES, f"the emulator has no {opcode}"
        registers[destination] = OPCODES[opcode](*map(value, sources)) & MASK
    return [registers[f"${i}"].astype(np.uint32) for i in range(outputs)]


def _spec_words(words: np.ndarray, ratio_low: np.ndarray, ratio_high: np.ndarray):
    """The int8 words of the low and the high nibbles of each word, ``round((q - 8) * ratio)`` per lane, with the
    low nibbles' and the high nibbles' ratios."""
    lanes_at = np.arange(4, dtype=np.uint32) * 8

    def weights(shift, ratio):
        codes = torch.from_numpy(((words[:, None] >> (lanes_at + shift)) & 0xF).astype(np.uint8))
        lanes = numerics.int8_weight_from_groups(codes, torch.from_numpy(ratio)[:, None])
        return (lanes.numpy().view(np.uint8).astype(np.uint32) << lanes_at).sum(1)
    return weights(0, ratio_low), weights(4, ratio_high)


def _ratio_pair(ratio: np.ndarray) -> np.ndarray:
    bits = ratio.view(np.uint16).astype(np.uint32)
    return bits | bits << 16


# typical ratios (every product fits int8, as two_level_scales makes them) and ratios past the int8 edge
RATIOS = {"typical": (0.0, 127 / 8), "clamping": (15.0, 40.0)}


def _random_words_and_ratios(kind: str, n: int = 20000):
    """Random words and two fp16 ratios a word (for its low and its high nibbles), the edges first."""
    generator = np.random.default_rng(1 + len(kind))
    words = generator.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    ratios = generator.uniform(*RATIOS[kind], (2, n)).astype(np.float16)
    ratios[:, :4] = [0.0, 1 / 64, 127 / 8, 0.5] if kind == "typical" else [15.9, 17.0, 18.0, 1000.0]
    return words, ratios[0], ratios[1]


@pytest.mark.parametrize("kind", sorted(RATIOS))
def test_group_tables_ptx_holds_the_spec_magnitudes(kind):
    """``GROUP_TABLES``: byte q of the negative table (q = 0..7) is |round((q - 8) * ratio)| clamped to 127, byte
    q - 8 of the positive one (q = 8..15) the weight, as ``group_tables`` documents."""
    _, ratio, _ = _random_words_and_ratios(kind)
    tables = run_ptx(unpack.GROUP_TABLES.value, {"$4": _ratio_pair(ratio)}, outputs=4)
    weights = numerics.int8_weight_from_groups(torch.arange(16, dtype=torch.uint8).repeat(len(ratio), 1),
                                               torch.from_numpy(ratio)[:, None]).numpy().astype(np.int64)
    table_bytes = np.stack([(word.astype(np.int64)[:, None] >> (8 * np.arange(4))) & 0xFF for word in tables], 1)
    negative, positive = table_bytes[:, :2].reshape(-1, 8), table_bytes[:, 2:].reshape(-1, 8)
    np.testing.assert_array_equal(negative, -weights[:, :8])
    np.testing.assert_array_equal(positive, weights[:, 8:])


@pytest.mark.parametrize("kind", sorted(RATIOS))
def test_group_lookup_ptx_gives_the_spec_weights(kind):
    """``GROUP_TABLES`` then ``GROUP_LOOKUP_BYTES`` (operands as the byte form numbers them) = the clamped spec."""
    words, ratio, _ = _random_words_and_ratios(kind)
    tables = run_ptx(unpack.GROUP_TABLES.value, {"$4": _ratio_pair(ratio)}, outputs=4)
    low, high = run_ptx(unpack.GROUP_LOOKUP_BYTES.value,
                        {"$2": words, "$3": tables[0], "$7": tables[1], "$11": tables[2], "$15": tables[3]},
                        outputs=2)
    expected_low, expected_high = _spec_words(words, ratio, ratio)
    np.testing.assert_array_equal(low, expected_low)
    np.testing.assert_array_equal(high, expected_high)


@pytest.mark.parametrize("kind", sorted(RATIOS))
def test_fused_dequant_quant_ptx_gives_the_spec_weights(kind):
    """QQQ's FusedDequantQuant PTX (word form; the low and the high nibbles under ratios of their own, as groups of
    32 have them) = the spec: clamped, and unclamped where every product fits."""
    words, ratio_low, ratio_high = _random_words_and_ratios(kind)
    operands = {"$2": words, "$3": _ratio_pair(ratio_low), "$4": _ratio_pair(ratio_high)}
    expected_low, expected_high = _spec_words(words, ratio_low, ratio_high)
    variants = [unpack.FUSED_DEQUANT_QUANT_WORDS]
    if kind == "typical":  # every product fits int8: the variant without the clamp must give the same words
        variants.append(unpack.FUSED_DEQUANT_QUANT_WORDS_UNCLAMPED)
        assert numerics.group_products_fit_int8(torch.arange(16).repeat(2, 1),
                                                torch.from_numpy(np.stack([ratio_low, ratio_high]).max(1))[:, None])
    for ptx in variants:
        low, high = run_ptx(ptx.value, operands, outputs=2)
        np.testing.assert_array_equal(low, expected_low)
        np.testing.assert_array_equal(high, expected_high)


def test_the_emulator_knows_prmt_and_lop3():
    """The emulator's two least obvious opcodes on words whose answers are written out by hand."""
    a, b = np.array([0x44332211], np.uint64), np.array([0x88776655], np.uint64)
    assert _prmt(a, b, np.array([0x7531], np.uint64))[0] == 0x88664422
    assert _prmt(a, b, np.array([0x0F08], np.uint64))[0] == 0x11FF1100  # fields 8, F: the signs of 0x11 and 0x88
    assert _lop3(np.array([0xF0], np.uint64), np.array([0xCC], np.uint64), np.array([0xAA], np.uint64), 0xBE)[0] \
        == 0xBE
