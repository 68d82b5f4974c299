"""The one PRNG of the block-format specification: SplitMix64.

Every random quantity a format needs (sign flips, sketch matrices, K-means
seeds) is derived from this generator, so CPU, GPU and any future
implementation produce identical values from the same seed.

    state <- state + 0x9E3779B97F4A7C15 (mod 2^64)
    z <- state
    z <- (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 (mod 2^64)
    z <- (z ^ (z >> 27)) * 0x94D049BB133111EB (mod 2^64)
    out <- z ^ (z >> 31)

Derived draws (normative):
  sign      : +1 if out >> 63 == 0 else -1
  uniform   : (out >> 11) * 2^-53                      in [0, 1)
  gaussian  : Box-Muller, u1 = 1 - uniform, u2 = uniform,
              g = sqrt(-2 ln u1) * cos(2 pi u2)        (one draw per two outputs)
"""
from __future__ import annotations

import math

import numpy as np

_MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


class SplitMix64:
    def __init__(self, seed: int):
        self.state = seed & _MASK

    def next_u64(self) -> int:
        self.state = (self.state + GOLDEN) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def signs(self, n: int) -> np.ndarray:
        return np.array([1.0 if (self.next_u64() >> 63) == 0 else -1.0 for _ in range(n)], dtype=np.float32)

    def uniform(self) -> float:
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))

    def gaussians(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.float64)
        for i in range(n):
            u1 = 1.0 - self.uniform()
            u2 = self.uniform()
            out[i] = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
        return out
