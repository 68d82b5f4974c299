"""Statistics of the serving benchmark (pure Python, CPU-tested).

* decode rate from a step log: one entry per engine step as the front end saw it
  (time, tokens that step added, requests that got a token);
* per-request latency from streamed chunk arrival times (TTFT, TPOT);
* a request-rate sweep summary (p50/p99).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def percentile(xs, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default 'linear' method); q in [0, 100]."""
    v = sorted(float(x) for x in xs)
    if not v:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} outside [0, 100]")
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def median(xs) -> float:
    return percentile(xs, 50)


@dataclass
class Step:
    t: float          # front-end time the step's outputs arrived (s)
    tokens: int       # tokens added by this step over all requests
    active: int       # requests that received a token in this step


def decode_rate(steps: list[Step], batch: int, skip: int = 2, min_intervals: int = 3) -> dict:
    """Decode throughput of `batch` requests decoding in lock-step.

    Only steps where every one of the `batch` requests got exactly one token count (the first
    step also prefills, the last ones may have requests finishing); the first `skip` of those are
    dropped as ramp-up. Headline = batch / median step interval; `window_tok_s` (tokens over the
    window's duration) cross-checks it: they differ when the front end coalesces outputs.
    """
    full = [s for s in steps if s.active == batch and s.tokens == batch]
    # Intervals only between consecutive steps of the log (a step in between breaks the chain).
    idx = {id(s): i for i, s in enumerate(steps)}
    full = full[skip:]
    dts = [b.t - a.t for a, b in zip(full, full[1:]) if idx[id(b)] == idx[id(a)] + 1]
    if len(dts) < min_intervals:
        raise ValueError(f"only {len(dts)} lock-step decode intervals of batch {batch} (need {min_intervals}); "
                         f"max active requests seen {max((s.active for s in steps), default=0)}")
    p50 = median(dts)
    if p50 <= 0:
        raise ValueError("non-increasing step times")
    span = full[-1].t - full[0].t
    return {"tok_s": batch / p50, "step_ms_p50": 1e3 * p50, "step_ms_p90": 1e3 * percentile(dts, 90),
            "intervals": len(dts), "window_tok_s": batch * len(dts) / span if span > 0 else None,
            "max_active": max(s.active for s in steps)}


@dataclass
class RequestTrace:
    """One streamed request: send time, (arrival time, tokens in chunk) per chunk, error if any."""
    sent: float
    chunks: list = field(default_factory=list)
    error: str | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    def tpot(self) -> float | None:
        """Mean time per output token after the first: (last - first arrival) / (tokens - first chunk's)."""
        if len(self.chunks) < 2:
            return None
        rest = self.tokens - self.chunks[0][1]
        return (self.chunks[-1][0] - self.chunks[0][0]) / rest if rest > 0 else None

    def e2e(self) -> float | None:
        return self.chunks[-1][0] - self.sent if self.chunks else None


def _pcts(xs, scale: float = 1e3) -> dict:
    if not xs:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": scale * percentile(xs, 50), "p99": scale * percentile(xs, 99), "mean": scale * sum(xs) / len(xs)}


def summarize_rate(rate: float, traces: list[RequestTrace], expected_tokens: int, wall_s: float) -> dict:
    """One point of the request-rate sweep. A request counts as completed only with all its tokens."""
    ok = [t for t in traces if t.error is None and t.tokens == expected_tokens]
    bad = [t for t in traces if t not in ok]
    errors = sorted({t.error or f"got {t.tokens} of {expected_tokens} tokens" for t in bad})
    ttft = _pcts([t.ttft() for t in ok])
    tpot = _pcts([x for x in (t.tpot() for t in ok) if x is not None])
    e2e = _pcts([t.e2e() for t in ok])
    return {"request_rate": None if math.isinf(rate) else rate, "num_requests": len(traces), "completed": len(ok),
            "failed": len(bad), "errors": errors[:3], "wall_s": wall_s,
            "request_throughput": len(ok) / wall_s if wall_s > 0 else None,
            "output_tok_s": sum(t.tokens for t in ok) / wall_s if wall_s > 0 else None,
            "ttft_p50_ms": ttft["p50"], "ttft_p99_ms": ttft["p99"], "tpot_p50_ms": tpot["p50"],
            "tpot_p99_ms": tpot["p99"], "e2e_p50_ms": e2e["p50"]}
