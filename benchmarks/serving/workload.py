"""Token-id workloads for the serving benchmark (pure Python, CPU-tested).

Long contexts are reached cheaply through the prefix cache: one shared prefix of whole 512-token
blocks is prefilled once, then every request is that prefix plus a short unique suffix, so each
request prefills only its suffix and decodes over the full context. 512 is a multiple of every
backend's block size here (FLASH_ATTN/Triton/TurboQuant 16, Kakeya 512), so the prefix is made of
full, cacheable blocks for all of them; the suffix and the generated tokens stay inside one
further block (for Kakeya: in the exact tail, no seal during the timed decode).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

PREFIX_ALIGN = 512      # lcm of the block sizes in play
LOW_ID = 1000           # token ids drawn from [LOW_ID, vocab - LOW_ID): clear of special tokens


@dataclass(frozen=True)
class DecodeShape:
    """Request layout for decoding "at context C": prefix + unique + gen <= C = max_model_len."""
    context: int
    prefix: int
    unique: int
    gen: int

    @property
    def prompt(self) -> int:
        return self.prefix + self.unique


def decode_shape(context: int, gen: int, unique: int = 64) -> DecodeShape:
    """Prefix = the whole blocks below the last one; suffix and generated tokens share the last block."""
    if context < 2 * PREFIX_ALIGN or context % PREFIX_ALIGN:
        raise ValueError(f"context {context}: must be a multiple of {PREFIX_ALIGN} and at least {2 * PREFIX_ALIGN}")
    if unique < 1 or gen < 2 or unique + gen > PREFIX_ALIGN:
        raise ValueError(f"unique {unique} + gen {gen} must fit in one {PREFIX_ALIGN}-token block (gen >= 2)")
    return DecodeShape(context=context, prefix=context - PREFIX_ALIGN, unique=unique, gen=gen)


def max_batch(capacity_tokens: int, context: int, max_num_seqs: int, extra_tokens: int = 0) -> int:
    """Requests that may each grow to `context` tokens at once: KV capacity, then the scheduler's row limit.
    ``extra_tokens``: capacity each running request holds beyond its context (KAKEYA_TAIL_STORAGE=pages: its tail
    pages), so the batch is what really fits, not what the reported capacity alone suggests."""
    return max(0, min(capacity_tokens // (context + extra_tokens), max_num_seqs))


def usable_contexts(requested: list[int], max_position: int) -> tuple[list[int], list[int]]:
    """Split contexts into those the model's positions allow and those it does not."""
    ok = [c for c in requested if c <= max_position]
    return ok, [c for c in requested if c > max_position]


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    if vocab <= 2 * LOW_ID:
        raise ValueError(f"vocab {vocab} too small for ids in [{LOW_ID}, vocab - {LOW_ID})")
    return [rng.randrange(LOW_ID, vocab - LOW_ID) for _ in range(n)]


def shared_prefix_prompts(prefix: list[int], n: int, unique: int, vocab: int, seed: int) -> list[list[int]]:
    """n prompts = the same prefix + a distinct random suffix each (distinct from every other request)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        suf = tuple(random_ids(rng, unique, vocab))
        if suf in seen:
            continue
        seen.add(suf)
        out.append(list(prefix) + list(suf))
    return out


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Send offsets (s) of n requests at `rate` requests/s; rate inf = all at t=0."""
    if n < 0 or rate <= 0:
        raise ValueError(f"need n >= 0 and rate > 0, got n={n} rate={rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def sweep_prompt_count(rate: float, duration_s: float, lo: int, hi: int) -> int:
    """Requests for one rate: about `duration_s` of arrivals, within [lo, hi]."""
    if math.isinf(rate):
        return hi
    return int(min(hi, max(lo, math.ceil(rate * duration_s))))
