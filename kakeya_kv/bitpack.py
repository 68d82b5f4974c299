"""LSB-first bit packing of b-bit indices (normative for every format).

Index j of a row occupies bits [j*b, j*b + b) of the row's byte string, bit 0
being the least significant bit of byte 0. Rows are packed independently and
must hold a whole number of bytes (D*b divisible by 8).
"""
from __future__ import annotations

import torch


def packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """idx [..., m] integer in [0, 2^bits) -> uint8 [..., ceil(m*bits/8)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    m = idx.shape[-1]
    nbytes = packed_bytes(m, bits)
    v = idx.to(torch.int64)
    if (v < 0).any() or (v >= (1 << bits)).any():
        raise ValueError(f"index out of range for {bits}-bit packing")
    bit_pos = torch.arange(m, dtype=torch.int64) * bits
    out = torch.zeros(*idx.shape[:-1], nbytes + 1, dtype=torch.int64)
    # Each index touches at most two bytes (bits <= 8).
    byte = bit_pos // 8
    shift = bit_pos % 8
    lo = (v << shift) & 0xFF
    hi = v >> (8 - shift)
    out.index_add_(-1, byte, lo)
    out.index_add_(-1, byte + 1, hi)
    return out[..., :nbytes].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [..., nbytes] -> int64 [..., count] (inverse of :func:`pack`)."""
    p = torch.cat([packed.to(torch.int64), torch.zeros(*packed.shape[:-1], 1, dtype=torch.int64)], -1)
    bit_pos = torch.arange(count, dtype=torch.int64) * bits
    byte = bit_pos // 8
    shift = bit_pos % 8
    word = p[..., byte] | (p[..., byte + 1] << 8)
    return (word >> shift) & ((1 << bits) - 1)
