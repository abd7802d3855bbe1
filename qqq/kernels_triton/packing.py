"""Packing of 4-bit weight codes for the W4A8 kernels.

Layout ("k / k+32 halves of 64-column chunks"): codes [N, K] -> uint8 [N, K // 2], row-major, one row per
output channel. Each row is cut into chunks of 64 columns; chunk ``c`` occupies bytes ``32c .. 32c + 31`` and
byte ``32c + j`` holds

    low nibble  = code[n, 64c + j]        (j = 0 .. 31)
    high nibble = code[n, 64c + 32 + j]

So a kernel that loads a [BLOCK_N, BLOCK_K // 2] byte tile (BLOCK_K a multiple of 64) gets every packed byte
exactly once, with contiguous 16-byte vector loads, and splits it into two int8 tiles without any shuffle:
the low nibbles are the columns ``k0 + 64c + j`` and the high nibbles the same columns shifted by 32. The
activation tile is split the same way (two runs of 32 contiguous bytes per chunk) and the kernel issues two
dots. Per-channel codes are signed (two's complement nibbles): ``byte & 0xF0`` and ``byte << 4`` read as int8
are exactly ``16 * code`` (the x16 is undone in the epilogue, exactly, by a power of two). Per-group codes are
unsigned [0, 15] with zero point 8.

Constraint: K (in_features) must be a multiple of 64. N is free.
"""

import torch

PACK_CHUNK_K = 64  # columns per chunk; the two nibbles of a byte are PACK_CHUNK_K // 2 columns apart
PACK_HALF_K = PACK_CHUNK_K // 2


def check_packable(in_features: int) -> None:
    if in_features % PACK_CHUNK_K:
        raise ValueError(
            f"in_features={in_features} is not a multiple of {PACK_CHUNK_K}: the int4 layout of the W4A8 kernels "
            f"packs columns in chunks of {PACK_CHUNK_K} (pad the layer's input dimension)"
        )


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (int8 in [-8, 7] or uint8 in [0, 15]) of shape [N, K] into uint8 [N, K // 2]."""
    if codes.dim() != 2:
        raise ValueError(f"expected codes of shape [N, K], got {tuple(codes.shape)}")
    if codes.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"expected int8 (signed, [-8, 7]) or uint8 ([0, 15]) codes, got {codes.dtype}")
    n, k = codes.shape
    check_packable(k)
    nibbles = (codes.to(torch.int16) & 0xF).reshape(n, k // PACK_CHUNK_K, 2, PACK_HALF_K)
    packed = nibbles[:, :, 0, :] | (nibbles[:, :, 1, :] << 4)
    return packed.reshape(n, k // 2).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes in [-8, 7] if ``signed`` else uint8 in [0, 15]."""
    check_packable(in_features)
    n = packed.shape[0]
    if packed.dim() != 2 or packed.shape[1] != in_features // 2:
        raise ValueError(f"packed weight of shape {tuple(packed.shape)} does not hold {in_features} columns")
    p = packed.to(torch.int16).reshape(n, in_features // PACK_CHUNK_K, 1, PACK_HALF_K)
    nibbles = torch.cat((p & 0xF, (p >> 4) & 0xF), dim=2).reshape(n, in_features)
    if signed:
        return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
    return nibbles.to(torch.uint8)
