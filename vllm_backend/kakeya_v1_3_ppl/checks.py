"""Start-up checks of the vLLM backend, without importing vLLM (unit-tested on CPU).

Every refusal is one line that names the setting and what to do instead.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
from dataclasses import replace
from pathlib import Path

from kakeya_kv import config as _config
from kakeya_kv.config import ConfigError, KakeyaConfig
from kakeya_kv.format import SUPPORTED_HEAD_DIMS

# Read by the CPU tools, not the backend, but legitimately set in the same shells.
_TOOL_ENV = frozenset({"KAKEYA_WHEEL_DIR"})


@functools.cache
def known_env_names() -> frozenset[str]:
    """Every KAKEYA_* variable the code reads. The knobs are taken from kakeya_kv.config's own source, so a knob
    added there is known here without keeping a second list in step."""
    return frozenset(re.findall(r'"(KAKEYA_[A-Z0-9_]+)"', inspect.getsource(_config))) | _TOOL_ENV


def check_env_names(env) -> None:
    """A misspelt knob (KAKEYA_KBITS=3) would otherwise be ignored silently and serve the defaults."""
    known = known_env_names()
    for name in sorted(n for n in env if n.startswith("KAKEYA_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"{name} is not a Kakeya setting ({hint}known: {', '.join(sorted(known))}); "
                          "rename or unset it")


def _calibration_path(cfg: KakeyaConfig) -> KakeyaConfig:
    """Resolve KAKEYA_CALIBRATION once, so every process (and the log line) names the same absolute folder."""
    if not cfg.calibration:
        return cfg
    if cfg.format == "exact":
        raise ConfigError(f"KAKEYA_CALIBRATION={cfg.calibration!r} has no effect with KAKEYA_FORMAT=exact "
                          "(nothing is quantized); unset one of them")
    p = Path(cfg.calibration).expanduser().resolve()
    if not p.is_dir():
        raise ConfigError(f"KAKEYA_CALIBRATION={cfg.calibration!r} (resolved to {p}) is not a directory; point it "
                          "at a folder written by `kakeya-kv calibrate --out DIR`, or unset it")
    return replace(cfg, calibration=str(p))


def additional_env(additional_config) -> dict[str, str]:
    """vLLM's --additional-config '{"kakeya": {"k_bits": 3, "boundary_skip_layers": [0, 1]}}' as KAKEYA_* settings
    (keys: the env names without the KAKEYA_ prefix, any case, or the full names; lists are comma-joined)."""
    sect = (additional_config or {}).get("kakeya") if isinstance(additional_config, dict) else None
    if sect is None:
        return {}
    if not isinstance(sect, dict):
        raise ConfigError(f"--additional-config kakeya={sect!r}: expected an object of settings, e.g. "
                          '{"kakeya": {"k_bits": 3}}')
    out = {}
    for key, val in sect.items():
        name = key.upper() if key.upper().startswith("KAKEYA_") else "KAKEYA_" + key.upper()
        if isinstance(val, (list, tuple)):
            val = ",".join(map(str, val))
        elif isinstance(val, bool):
            val = str(int(val))
        elif not isinstance(val, (str, int)):
            raise ConfigError(f"--additional-config kakeya.{key}={val!r}: expected a string, integer or list")
        out[name] = str(val)
    check_env_names(out)
    if "KAKEYA_TAIL_STORAGE" in out:
        # Each process's scheduler allocation is patched at plugin registration, before any config is read: a value
        # that only some processes see would let layers address tail pages the scheduler never allocated.
        raise ConfigError("KAKEYA_TAIL_STORAGE cannot be set in --additional-config: export it in the environment "
                          "of the vLLM processes (the scheduler's page allocation is patched when the plugin "
                          "registers)")
    return out


def apply_additional_config(additional_config, env=None) -> None:
    """Export the --additional-config settings into this process's environment (every vLLM process gets the
    config, so each does this once), refusing one that contradicts a KAKEYA_* variable already set."""
    env = os.environ if env is None else env
    for name, val in additional_env(additional_config).items():
        have = env.get(name)
        if have is not None and have.strip() != val.strip():
            raise ConfigError(f"{name}={have!r} in the environment but {val!r} in --additional-config; set it in "
                              "one place")
        env[name] = val


def _current_additional_config():
    """vLLM's additional_config of the engine being built in this process (None outside vLLM)."""
    try:
        from vllm.config import vllm as _vc
    except ImportError:
        return None
    cur = getattr(_vc, "_current_vllm_config", None)
    return getattr(cur, "additional_config", None)


def settings(num_layers: int | None = None, env=None) -> KakeyaConfig:
    """KAKEYA_* settings as the backend serves them (environment, plus vLLM's --additional-config when an engine
    is being built in this process)."""
    if env is None:
        apply_additional_config(_current_additional_config())
    env = os.environ if env is None else env
    check_env_names(env)
    cfg = KakeyaConfig.from_env(env, num_layers=num_layers)
    if cfg.format == "v13":
        check_v13(cfg)
    return _calibration_path(cfg)


def check_v13(cfg: KakeyaConfig) -> None:
    """v13 serves through host-planned phases only (no in-graph seal: its encoder runs batched torch linear
    algebra) and has no calibration bundle format."""
    if cfg.cuda_graphs:          # an explicit 1 (auto stays off for v13)
        raise ConfigError("KAKEYA_CUDA_GRAPHS=1 is not available with KAKEYA_FORMAT=v13 (no GPU-planned decode step: "
                          "its seal is batched torch linear algebra, not a graph-capturable kernel); unset "
                          "KAKEYA_CUDA_GRAPHS")
    if cfg.calibration:
        raise ConfigError(f"KAKEYA_CALIBRATION={cfg.calibration!r}: calibration bundles are for the default format; "
                          "KAKEYA_FORMAT=v13 uses the seed Lloyd-Max tables, unset one of them")


def check_selection(reasons: list[str]) -> None:
    """vLLM's backend selector lists why a backend does not fit a layer (MLA, sliding window, attention sinks,
    encoder or non-causal attention, head size, dtype, KV-cache dtype): turn that list into one actionable line."""
    if reasons:
        raise ValueError(f"Kakeya backend cannot serve this model: {'; '.join(reasons)}; serve it with another "
                         "--attention-backend (e.g. FLASH_ATTN) or a supported model (bf16, full causal attention, "
                         f"head_dim in {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")


def check_layer(*, head_size: int, alibi: bool, sliding_window, logits_soft_cap, attn_type: str,
                kv_cache_dtype: str, kv_sharing: bool) -> None:
    """Refuse attention variants the kernels do not implement (never a silent wrong result)."""
    bad = [name for name, is_bad in (
        ("ALiBi", alibi), ("sliding window", sliding_window is not None),
        ("logit soft-cap", bool(logits_soft_cap)), (f"attention type {attn_type!r}", attn_type != "decoder"),
        (f"--kv-cache-dtype {kv_cache_dtype}", kv_cache_dtype not in ("auto", "bfloat16")),
        ("KV sharing between layers", kv_sharing)) if is_bad]
    if bad:
        raise ValueError(f"Kakeya backend does not support {', '.join(bad)}; serve this model with another "
                         "--attention-backend (e.g. FLASH_ATTN)")
    if head_size not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"Kakeya backend: head_dim {head_size} is not supported by the block format "
                         f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}); use another --attention-backend")


def check_block_size(block_size: int, block_tokens: int = 512) -> None:
    if block_size % block_tokens:
        raise ValueError(f"Kakeya backend stores {block_tokens}-token sealed blocks: use --block-size {block_tokens} "
                         f"(or a multiple), not {block_size}")


def check_capacity(num_gpu_blocks: int | None, block_size: int, max_model_len: int) -> None:
    """At least one request of max_model_len must fit, in whole 512-token pages."""
    if num_gpu_blocks is None:
        return
    need = -(-max_model_len // block_size)
    if num_gpu_blocks < need:
        raise ValueError(f"Kakeya backend: the KV budget holds {num_gpu_blocks} pages of {block_size} tokens but one "
                         f"request of max_model_len={max_model_len} needs {need}; raise --gpu-memory-utilization or "
                         "lower --max-model-len")


def tail_pool_bytes(max_num_seqs: int, num_kv_heads: int, head_dim: int, compressed_layers: int,
                    block_tokens: int = 512) -> int:
    """bf16 K+V of one unsealed block per request row, per compressed layer."""
    return max_num_seqs * block_tokens * num_kv_heads * head_dim * 2 * 2 * compressed_layers


def default_max_num_seqs(default: int, per_row_bytes: int, gpu_total_bytes: int, percent: int) -> int:
    """vLLM's default --max-num-seqs lowered so that the exact-tail pool (per_row_bytes per request row) takes at
    most ``percent`` % of the GPU: vLLM 0.26 defaults to 1024 rows on H100/H200, 72 GiB of tails for a
    Qwen3-8B-like model, which check_tail_pool refuses. Never below 1."""
    if per_row_bytes <= 0:
        return default
    return max(1, min(default, int(percent / 100 * gpu_total_bytes // per_row_bytes)))


def check_tail_pool(max_num_seqs: int, num_kv_heads: int, head_dim: int, compressed_layers: int,
                    gpu_total_bytes: int, max_fraction: float = 0.25) -> int:
    """The exact tails are sized by --max-num-seqs; refuse a pool that would eat the KV budget."""
    need = tail_pool_bytes(max_num_seqs, num_kv_heads, head_dim, compressed_layers)
    if need > max_fraction * gpu_total_bytes:
        per_seq = need / max_num_seqs
        fit = int(max_fraction * gpu_total_bytes // per_seq)
        raise ValueError(f"Kakeya backend: the exact-tail pool for --max-num-seqs {max_num_seqs} would take "
                         f"{need / 2**30:.1f} GiB ({100 * need / gpu_total_bytes:.0f} % of the GPU; "
                         f"{per_seq / 2**20:.0f} MiB per request row, taken from the KV cache); use "
                         f"--max-num-seqs {max(fit, 1)} or less (fewer rows leave more KV capacity), or leave it "
                         "unset: the backend then sizes it to KAKEYA_TAIL_POOL_PERCENT of the GPU")
    return need
