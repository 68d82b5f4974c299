"""Every Kakeya knob in one place: environment variables, validated with clear errors.

The vLLM backend, the CLI and the tests all read settings through here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A KAKEYA_* setting is malformed; the message names the variable and the fix."""


def cache_dir() -> Path:
    p = Path(os.environ.get("KAKEYA_CACHE_DIR", Path.home() / ".cache" / "kakeya-kv"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def parse_layer_list(name: str, raw: str | None, num_layers: int | None = None) -> tuple[int, ...]:
    """Parse "0,1,26,27" (empty = none). Rejects non-integers, negatives, duplicates, out-of-range."""
    if raw is None or raw.strip() == "":
        return ()
    out = []
    for tok in raw.split(","):
        tok = tok.strip()
        if not tok:
            raise ConfigError(f"{name}={raw!r}: empty entry (use e.g. \"0,1,26,27\")")
        try:
            v = int(tok)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: {tok!r} is not an integer layer index") from None
        if v < 0:
            raise ConfigError(f"{name}={raw!r}: negative layer index {v}")
        if num_layers is not None and v >= num_layers:
            raise ConfigError(f"{name}={raw!r}: layer {v} out of range for a model with {num_layers} layers")
        if v in out:
            raise ConfigError(f"{name}={raw!r}: layer {v} listed twice")
        out.append(v)
    return tuple(sorted(out))


def _int_env(env, name: str, default: int, allowed: tuple[int, ...]) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not an integer (allowed: {allowed})") from None
    if v not in allowed:
        raise ConfigError(f"{name}={raw!r}: must be one of {allowed}")
    return v


FORMATS = ("kakeya", "v13", "exact")


@dataclass(frozen=True)
class KakeyaConfig:
    format: str = "kakeya"
    k_bits: int = 4
    v_bits: int = 3
    boundary_skip_layers: tuple[int, ...] = ()
    skip_layers: tuple[int, ...] = ()
    calibration: str | None = None
    cuda_graphs: bool = False     # experimental: full CUDA graphs for pure-decode steps
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env=None, num_layers: int | None = None) -> "KakeyaConfig":
        env = os.environ if env is None else env
        fmt = env.get("KAKEYA_FORMAT", "kakeya").strip().lower() or "kakeya"
        if fmt == "default":
            fmt = "kakeya"
        if fmt not in FORMATS:
            raise ConfigError(f"KAKEYA_FORMAT={fmt!r}: unknown format (allowed: default, {', '.join(FORMATS)})")
        from .format import ALLOWED_BITS
        return cls(
            format=fmt,
            k_bits=_int_env(env, "KAKEYA_K_BITS", 4 if fmt == "kakeya" else 3, ALLOWED_BITS[fmt]["k"]),
            v_bits=_int_env(env, "KAKEYA_V_BITS", 3 if fmt == "kakeya" else 2, ALLOWED_BITS[fmt]["v"]),
            boundary_skip_layers=parse_layer_list(
                "KAKEYA_BOUNDARY_SKIP_LAYERS", env.get("KAKEYA_BOUNDARY_SKIP_LAYERS"), num_layers),
            skip_layers=parse_layer_list("KAKEYA_SKIP_LAYERS", env.get("KAKEYA_SKIP_LAYERS"), num_layers),
            calibration=env.get("KAKEYA_CALIBRATION") or None,
            cuda_graphs=bool(_int_env(env, "KAKEYA_CUDA_GRAPHS", 0, (0, 1))),
        )
