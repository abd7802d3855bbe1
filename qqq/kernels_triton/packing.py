"""Packing of 4-bit weight codes for the W4A8 kernels.

Layout (placeholder until the kernel layout is settled): codes [N, K] -> uint8 [N, K // 2], byte j of a row
holds column 2j in its low nibble and column 2j + 1 in its high nibble. Signed per-channel codes are stored
as their low 4 bits (two's complement).
"""

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (int8 in [-8, 7] or uint8 in [0, 15]) of shape [N, K] into the kernel layout."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"expected codes of shape [N, K] with even K, got {tuple(codes.shape)}")
    nibbles = codes.to(torch.int16) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes in [-8, 7] if ``signed`` else uint8 in [0, 15]."""
    p = packed.to(torch.int16)
    nibbles = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
    if signed:
        return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
    return nibbles.to(torch.uint8)
