"""The KV-cache configurations the vLLM evaluation can run, by name (no vLLM import here).

A name is an entry of TABLE, any `kakeya_k{K}v{V}` the format allows, or `recipe:PATH` — a
deploy/recipes/*.env file (read with `config.read_env_file`, validated by `KakeyaConfig`), run as
KAKEYA with exactly that environment, whatever knobs it sets (bit widths, boundary layers,
KAKEYA_LAYER_BITS, a calibration bundle).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, KakeyaConfig, read_env_file


@dataclass(frozen=True)
class VllmConfig:
    name: str
    family: str
    llm: dict = field(default_factory=dict)     # extra LLM(...) keyword arguments
    env: dict = field(default_factory=dict)     # KAKEYA_* environment of the config's process
    hf_format: str | None = None                # the HF harness's format for the same setting (gap report)


KAKEYA = {"attention_backend": "KAKEYA"}
TABLE = {c.name: c for c in [
    VllmConfig("flash_bf16", "bf16", {"attention_backend": "FLASH_ATTN"}, hf_format="bf16"),
    VllmConfig("triton_bf16", "bf16", {"attention_backend": "TRITON_ATTN"}),     # numeric-noise reference
    VllmConfig("triton_fp8", "fp8", {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "fp8"}, hf_format="fp8_e4m3"),
    VllmConfig("int4_per_token_head", "int4_per_token_head",
               {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "int4_per_token_head"},
               hf_format="int4_per_token_head"),
    VllmConfig("kakeya_exact", "kakeya", KAKEYA, {"KAKEYA_FORMAT": "exact"}),
    VllmConfig("kakeya_custom", "kakeya", {"attention_backend": "CUSTOM"}, hf_format="kakeya_k4v3_kuni"),
    # boundary layers exact (mixed page sizes in one KV group)
    VllmConfig("kakeya_k3v2_b0-29", "kakeya", KAKEYA,
               {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2", "KAKEYA_BOUNDARY_SKIP_LAYERS": "0,29"}),
    # experimental: GPU-planned decode steps captured as full CUDA graphs
    VllmConfig("kakeya_k4v3_graphs", "kakeya", {**KAKEYA, "enforce_eager": False}, {"KAKEYA_CUDA_GRAPHS": "1"}),
    VllmConfig("kakeya_k4v3_cal", "kakeya", KAKEYA, {"KAKEYA_CALIBRATION": ".gpudata/bundle"}),
    # K on the uniform grid, read by the int8 K-score decode launch (variants.CANDIDATES["ki8"])
    VllmConfig("kakeya_k4v3_kuni_ki8", "kakeya", KAKEYA,
               {"KAKEYA_K_GRID": "uniform", "KAKEYA_DECODE_VARIANT": "candidate:ki8"}, hf_format="kakeya_k4v3_kuni"),
    # the default with exact tails in the requests' own pages (KAKEYA_TAIL_STORAGE=pages): same numbers expected,
    # the data path equals the pool's bit for bit (tests/test_vllm_runtime.py); larger capacity
    VllmConfig("kakeya_k4v3_tailpages", "kakeya", KAKEYA, {"KAKEYA_TAIL_STORAGE": "pages"}, hf_format="kakeya_k4v3_kuni"),
    # vLLM adds layers 0, 1, L-2, L-1 as bf16 for every TurboQuant preset (the HF twins do the same)
    *[VllmConfig(f"turboquant_{p}", "turboquant", {"kv_cache_dtype": f"turboquant_{p}"}, hf_format=f"turboquant_{p}")
      for p in ("k8v4", "4bit_nc", "k3v4_nc", "3bit_nc")],
]}


def resolve(name: str) -> VllmConfig:
    """The config a name stands for; ConfigError (one line) for an unknown name or a bad recipe."""
    if name in TABLE:
        return TABLE[name]
    m = re.fullmatch(r"kakeya_k(\d)v(\d)(_lloyd)?", name)
    if m:
        # KAKEYA_K_GRID=auto puts 4-bit K on the uniform grid; _lloyd pins Lloyd-Max (the pre-session-13 default)
        env = {"KAKEYA_FORMAT": "kakeya", "KAKEYA_K_BITS": m[1], "KAKEYA_V_BITS": m[2],
               **({"KAKEYA_K_GRID": "lloyd"} if m[3] else {})}
        cfg = KakeyaConfig.from_env(env)      # refuses widths the format does not allow
        twin = f"kakeya_k{m[1]}v{m[2]}" + ("_kuni" if cfg.k_grid == "uniform" else "")
        return VllmConfig(name, "kakeya", KAKEYA, env, hf_format=twin)
    if name.startswith("recipe:"):
        path = Path(name[len("recipe:"):])
        if not path.is_file():
            raise ConfigError(f"{name}: no such recipe file {path}")
        env = read_env_file(path)
        KakeyaConfig.from_env(env)
        return VllmConfig(f"recipe:{path.stem}", "kakeya", KAKEYA, env, hf_format=f"recipe:{path}")
    raise ConfigError(f"unknown vLLM config {name!r}: known {sorted(TABLE)}, kakeya_k<K>v<V>[_lloyd] or recipe:PATH")


def setting_key(c: VllmConfig):
    """What the config actually runs: equal keys give the same vLLM run (None: never merged)."""
    if c.family != "kakeya":
        return None
    return tuple(sorted((k, repr(v)) for k, v in c.llm.items())), repr(KakeyaConfig.from_env(c.env))


def dedupe(configs: list[VllmConfig]) -> tuple[list[VllmConfig], dict[str, str]]:
    """Drop configs whose setting an earlier one already runs (e.g. a recipe equal to kakeya_k3v2);
    returns (configs to run, {dropped name: name whose measurement it shares})."""
    run, alias, seen = [], {}, {}
    for c in configs:
        key = setting_key(c)
        if key is not None and key in seen:
            alias[c.name] = seen[key]
            continue
        if key is not None:
            seen[key] = c.name
        run.append(c)
    return run, alias
