"""Sylvester Hadamard matrices and the randomized (sign-flipped) rotation."""
from __future__ import annotations

from functools import lru_cache

import torch

from .prng import SplitMix64


@lru_cache(maxsize=None)
def sylvester(n: int) -> torch.Tensor:
    """Unnormalised natural-order Hadamard, H @ H = n I. n must be a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=None)
def signs(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(SplitMix64(seed).signs(n)).to(torch.float64)


@lru_cache(maxsize=None)
def rotation(n: int, seed: int | None) -> torch.Tensor:
    """Orthonormal R = H diag(s) / sqrt(n) (row-vector convention: z = x @ R.T).

    seed=None gives the plain normalised Hadamard (no sign flips).
    """
    h = sylvester(n)
    if seed is not None:
        h = h * signs(n, seed)[None, :]
    return (h / n ** 0.5).to(torch.float32)
