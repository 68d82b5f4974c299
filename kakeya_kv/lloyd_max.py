"""Lloyd-Max scalar quantiser tables for N(0, 1) (normative constants of the format).

Computed by the Lloyd iteration with closed-form Gaussian conditional means,
run to a 1e-13 fixed point; only the positive half is listed (tables are
symmetric). :func:`solve` recomputes them (tests check the constants).
"""
from __future__ import annotations

import math

import torch

_HALF = {
    1: (0.797884561,),
    2: (0.452780035, 1.510417608),
    3: (0.245094179, 0.756005281, 1.343909279, 2.151945705),
    4: (0.128395030, 0.388048299, 0.656759119, 0.942340456, 1.256231197, 1.618046386, 2.069017227, 2.732589571),
    5: (0.065889660, 0.198051830, 0.331378306, 0.466699523, 0.604933624, 0.747135704, 0.894565117, 1.048783320,
        1.211804381, 1.386340340, 1.576228079, 1.787233218, 2.028728399, 2.317739404, 2.691119577, 3.260732493),
    6: (0.033409603, 0.100278579, 0.167297384, 0.234567655, 0.302193701, 0.370283682, 0.438950884, 0.508315164,
        0.578504577, 0.649657284, 0.721923791, 0.795469645, 0.870478705, 0.947157182, 1.025738695, 1.106490682,
        1.189722668, 1.275797085, 1.365143678, 1.458279079, 1.555833962, 1.658591657, 1.767544645, 1.883979993,
        2.009613770, 2.146812905, 2.298983841, 2.471307354, 2.672276297, 2.917409132, 3.240439239, 3.744103228),
}


def gaussian_table(bits: int) -> torch.Tensor:
    """Ascending float32 centroids of the 2^bits-level Lloyd-Max quantiser for N(0,1)."""
    if bits not in _HALF:
        raise ValueError(f"no Lloyd-Max table for {bits} bits (have {sorted(_HALF)})")
    h = torch.tensor(_HALF[bits], dtype=torch.float32)
    return torch.cat([-h.flip(0), h])


def solve(bits: int, tol: float = 1e-13, max_iter: int = 10000) -> list[float]:
    """Recompute the N(0,1) table (used by tests to check the constants)."""
    def pdf(x):
        return 0.0 if math.isinf(x) else math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cdf(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    n = 2 ** bits
    c = [-3 + 6 * (i + 0.5) / n for i in range(n)]
    for _ in range(max_iter):
        t = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(n - 1)] + [math.inf]
        nc = [(pdf(t[i]) - pdf(t[i + 1])) / (cdf(t[i + 1]) - cdf(t[i])) for i in range(n)]
        done = max(abs(a - b) for a, b in zip(c, nc)) < tol
        c = nc
        if done:
            break
    return c


def quantize(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid index (ties to the lower index) for an ascending table."""
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids, right=False).to(torch.uint8)


def fit(samples: torch.Tensor, bits: int, iters: int = 100) -> torch.Tensor:
    """Lloyd-Max table fitted to empirical samples (calibration), started from the Gaussian table."""
    s = samples.flatten().to(torch.float64)
    c = gaussian_table(bits).to(torch.float64) * s.std()
    for _ in range(iters):
        idx = torch.bucketize(s, (c[1:] + c[:-1]) / 2)
        sums = torch.zeros_like(c).index_add_(0, idx, s)
        cnt = torch.zeros_like(c).index_add_(0, idx, torch.ones_like(s))
        c = torch.where(cnt > 0, sums / cnt.clamp_min(1), c)
    return c.sort().values.to(torch.float32)


# Uniform grid c_j = (j - (2^b - 1)/2) * delta: a candidate centroid table for a lookup-free decode
# kernel (codes go to the MMA as integers, the per-token gain absorbs delta). Same byte format.
def uniform_mse(bits: int, delta: float) -> float:
    """Expected squared error of the nearest-level uniform grid of step delta on N(0, 1) (closed form)."""
    def pdf(x):
        return 0.0 if math.isinf(x) else math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def xpdf(x):
        return 0.0 if math.isinf(x) else x * pdf(x)

    def cdf(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    n = 2 ** bits
    c = [(j - (n - 1) / 2) * delta for j in range(n)]
    t = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(n - 1)] + [math.inf]
    # int_a^b (x - c)^2 phi = (1 + c^2)(Phi(b) - Phi(a)) - (b phi(b) - a phi(a)) + 2c (phi(b) - phi(a))
    return sum((1 + cj * cj) * (cdf(b) - cdf(a)) - (xpdf(b) - xpdf(a)) + 2 * cj * (pdf(b) - pdf(a))
               for cj, a, b in zip(c, t[:-1], t[1:]))


def golden_min(f, lo: float, hi: float, tol: float = 1e-12) -> float:
    """Minimiser of a unimodal f on [lo, hi] (golden-section search)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    while b - a > tol:
        c, d = b - g * (b - a), a + g * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


_UNIFORM_DELTA: dict[int, float] = {}


def uniform_delta(bits: int) -> float:
    """The MSE-optimal step of the 2^bits-level uniform grid for N(0, 1) (cached)."""
    if bits not in _HALF:
        raise ValueError(f"no uniform grid for {bits} bits (have {sorted(_HALF)})")
    if bits not in _UNIFORM_DELTA:
        _UNIFORM_DELTA[bits] = golden_min(lambda s: uniform_mse(bits, s), 1e-3, 2.5)
    return _UNIFORM_DELTA[bits]


def uniform_table(bits: int, delta: float | None = None) -> torch.Tensor:
    """Ascending float32 levels (j - (2^bits - 1)/2) * delta, j = 0..2^bits-1 (default: uniform_delta)."""
    step = uniform_delta(bits) if delta is None else delta
    if not step > 0:
        raise ValueError(f"uniform grid step must be > 0, got {step}")
    n = 2 ** bits
    return ((torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * step).float()
