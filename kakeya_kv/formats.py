"""The named whole-model formats that `kakeya-kv compare` evaluates."""
from __future__ import annotations

from pathlib import Path

from .codecs.base import BF16
from .codecs.competitors import competitor_codecs
from .codecs.kakeya import KakeyaCodec
from .codecs.v13 import V13Codec
from .config import EXACT, KakeyaConfig, format_layer_bits, read_env_file
from .model_format import ModelFormat, vllm_tq_boundary

# Our default format's settings evaluated in the comparison (all layers compressed).
KAKEYA_SETTINGS = ((4, 4), (4, 3), (3, 3), (3, 2))


def codec_grid(cfg: KakeyaConfig) -> str:
    """The HF codec's grid for the K table a KAKEYA_* setting serves (KAKEYA_K_GRID as KakeyaConfig resolved it)."""
    return "k_uniform" if cfg.k_grid == "uniform" else "lloyd"


def standard_formats(num_layers: int) -> list[ModelFormat]:
    tq_skip = vllm_tq_boundary(num_layers)
    out = [ModelFormat("bf16", "bf16", BF16())]
    for kb, vb in KAKEYA_SETTINGS:     # as served (no bundle): kakeya_k4v3_kuni is the default's exact twin
        served = KakeyaConfig.from_env({"KAKEYA_K_BITS": str(kb), "KAKEYA_V_BITS": str(vb)})
        c = KakeyaCodec(kb, vb, grid=codec_grid(served))
        out.append(ModelFormat(c.name, "kakeya", c))
    out.append(ModelFormat("v13", "v13", V13Codec(), notes="seed defaults: d_eff=D/2, k=16, K b3 + 8% outliers T=2, V b2"))
    for c in competitor_codecs():
        if c.family == "turboquant":
            out.append(ModelFormat(c.name, c.family, c, tq_skip, notes="as vLLM runs it: layers 0,1,L-2,L-1 bf16"))
            out.append(ModelFormat(c.name + "_noboundary", c.family, c, (), notes="all layers compressed"))
        else:
            out.append(ModelFormat(c.name, c.family, c))
    return out


def from_config(cfg: KakeyaConfig, num_layers: int, name: str) -> ModelFormat:
    """The whole-model format a KAKEYA_* setting serves: per-layer widths, boundary layers exact."""
    if cfg.format == "exact":
        return ModelFormat(name, "bf16", BF16(), notes="KAKEYA_FORMAT=exact")
    grid = codec_grid(cfg)
    make = ((lambda kb, vb: KakeyaCodec(kb, vb, grid=grid)) if cfg.format == "kakeya"
            else (lambda kb, vb: V13Codec(k_bits=kb, v_bits=vb)))
    plan = cfg.layer_plan(num_layers)
    default = make(cfg.k_bits, cfg.v_bits)
    per_layer = {i: make(*b) for i, b in enumerate(plan) if b != EXACT and b != (cfg.k_bits, cfg.v_bits)}
    notes = f"k{cfg.k_bits}v{cfg.v_bits}" + ("; K grid uniform" if grid == "k_uniform" else "")
    if cfg.layer_bits:
        notes += f"; KAKEYA_LAYER_BITS={format_layer_bits(cfg.layer_bits)}"
    if cfg.boundary_skip_layers:
        notes += f"; exact layers {','.join(map(str, cfg.boundary_skip_layers))}"
    return ModelFormat(name, cfg.format, default, cfg.boundary_skip_layers, notes=notes, layer_codecs=per_layer)


def from_recipe(path: str, num_layers: int) -> ModelFormat:
    """A recipe env file (deploy/recipes/*.env) as a format named after the file."""
    f = from_config(KakeyaConfig.from_env(read_env_file(path), num_layers=num_layers), num_layers, Path(path).stem)
    f.extra["recipe"] = str(path)
    return f


def by_name(num_layers: int, names: list[str]) -> list[ModelFormat]:
    """Formats by name: the standard ones, any kakeya_k{b}v{b} the format allows (suffix _uni: uniform
    centroid grid, same bytes; _kuni: uniform for K only), or recipe:PATH (an env file)."""
    import re
    allf = {f.name: f for f in standard_formats(num_layers)}
    for n in names:   # any kakeya bit widths the format allows, e.g. kakeya_k5v4
        m = re.fullmatch(r"kakeya_k(\d)v(\d)(_uni|_kuni)?", n)
        if m and n not in allf:
            c = KakeyaCodec(int(m[1]), int(m[2]), grid={None: "lloyd", "_uni": "uniform", "_kuni": "k_uniform"}[m[3]])
            allf[n] = ModelFormat(c.name, "kakeya", c)
        elif n.startswith("recipe:"):
            allf[n] = from_recipe(n[len("recipe:"):], num_layers)
    unknown = [n for n in names if n not in allf]
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; known: {sorted(allf)}")
    chosen = [allf[n] for n in names if n != "bf16"]
    return [allf["bf16"]] + chosen
