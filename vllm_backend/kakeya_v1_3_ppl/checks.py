"""Start-up checks of the vLLM backend, without importing vLLM (unit-tested on CPU).

Every refusal is one line that names the setting and what to do instead.
"""
from __future__ import annotations

from kakeya_kv.config import KakeyaConfig
from kakeya_kv.format import SUPPORTED_HEAD_DIMS


def settings(num_layers: int | None = None, env=None) -> KakeyaConfig:
    """KAKEYA_* settings as the backend serves them."""
    cfg = KakeyaConfig.from_env(env, num_layers=num_layers)
    if cfg.format == "v13":
        raise ValueError("KAKEYA_FORMAT=v13: the seed format has a CPU reference codec but no Triton attention "
                         "kernels yet, so the vLLM backend cannot serve it; use KAKEYA_FORMAT=default or exact")
    return cfg


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


def check_tail_pool(max_num_seqs: int, num_kv_heads: int, head_dim: int, compressed_layers: int,
                    gpu_total_bytes: int, max_fraction: float = 0.25) -> int:
    """The exact tails are sized by --max-num-seqs; refuse a pool that would eat the KV budget."""
    need = tail_pool_bytes(max_num_seqs, num_kv_heads, head_dim, compressed_layers)
    if need > max_fraction * gpu_total_bytes:
        per_seq = need / max_num_seqs
        fit = int(max_fraction * gpu_total_bytes // per_seq)
        raise ValueError(f"Kakeya backend: the exact-tail pool for --max-num-seqs {max_num_seqs} would take "
                         f"{need / 2**30:.1f} GiB ({100 * need / gpu_total_bytes:.0f} % of the GPU); use "
                         f"--max-num-seqs {max(fit, 1)} or less")
    return need
