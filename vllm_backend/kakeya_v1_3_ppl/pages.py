"""Per-layer page layout of the vLLM cache (no vLLM import: unit-tested on CPU).

Each layer's page holds one 512-token block of every KV head in that layer's own format: the
``kakeya`` layout of its (K bits, V bits) (KAKEYA_K_BITS/V_BITS, or KAKEYA_LAYER_BITS for the
layer) or bf16 for exact layers. vLLM puts such FullAttention-derived layers with different page
sizes into one KV-cache group (``UniformTypeKVCacheSpecs``): one block id covers every layer, and
the number of blocks is the KV budget over the *sum* of the per-layer page sizes — so the capacity
ratio vs bf16 is exactly the whole-model byte ratio computed here.
"""
from __future__ import annotations

from kakeya_kv.config import EXACT, KakeyaConfig
from kakeya_kv.format import BLOCK_TOKENS, BlockLayout, exact_layout, kakeya_layout, v13_layout


def layer_layout(bits, head_dim: int, fmt: str = "kakeya") -> BlockLayout:
    """The block layout of a layer stored with ``bits`` = (k_bits, v_bits) or EXACT, in format ``fmt``
    (KAKEYA_FORMAT: kakeya or v13; v13 = the seed geometry d_eff = D/2, k = 16, 8 % K outlier budget)."""
    if bits == EXACT:
        return exact_layout(head_dim)
    if fmt == "v13":
        return v13_layout(head_dim, k_bits=bits[0], v_bits=bits[1])
    return kakeya_layout(head_dim, *bits)


def kv_cache_shape(bits, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   fmt: str = "kakeya") -> tuple[int, ...]:
    """Shape vLLM views the layer's raw page memory as (uint8 slots, or bf16 [.., K|V, 512, D] for exact)."""
    if block_size != BLOCK_TOKENS:
        raise ValueError(f"Kakeya kernel block size must be {BLOCK_TOKENS}, got {block_size}")
    if bits == EXACT:
        return (num_blocks, num_kv_heads, 2, block_size, head_dim)
    return (num_blocks, num_kv_heads, layer_layout(bits, head_dim, fmt).slot_bytes)


def page_bytes(bits, block_size: int, num_kv_heads: int, head_dim: int, fmt: str = "kakeya") -> int:
    """Bytes of one page (block_size tokens, all KV heads) of a layer."""
    if block_size % BLOCK_TOKENS:
        raise ValueError(f"Kakeya pages hold whole {BLOCK_TOKENS}-token blocks; block_size={block_size}")
    return (block_size // BLOCK_TOKENS) * num_kv_heads * layer_layout(bits, head_dim, fmt).slot_bytes


def model_pages(cfg: KakeyaConfig, num_layers: int, num_kv_heads: int, head_dim: int) -> dict:
    """Per-layer widths and page bytes, and the whole-model ratio vs bf16 pages (what vLLM's capacity shows,
    before the exact-tail pool)."""
    plan = cfg.layer_plan(num_layers)
    pages = [page_bytes(b, BLOCK_TOKENS, num_kv_heads, head_dim, cfg.format) for b in plan]
    bf16 = page_bytes(EXACT, BLOCK_TOKENS, num_kv_heads, head_dim) * num_layers
    return {"bits": plan, "page_bytes": pages, "bytes_per_block": sum(pages), "ratio_vs_bf16": bf16 / sum(pages),
            "widths": sorted({b for b in plan if b != EXACT})}


def describe(cfg: KakeyaConfig, num_layers: int, num_kv_heads: int, head_dim: int) -> str:
    """One line for the start-up log: which layers get which widths, and the whole-model ratio."""
    m = model_pages(cfg, num_layers, num_kv_heads, head_dim)
    groups: dict = {}
    for layer, b in enumerate(m["bits"]):
        groups.setdefault("exact bf16" if b == EXACT else f"k{b[0]}v{b[1]}", []).append(layer)
    parts = [f"{name}: {_ranges(layers)}" for name, layers in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    return (f"{'; '.join(parts)} -> {m['bytes_per_block'] / BLOCK_TOKENS / num_kv_heads / num_layers:.2f} "
            f"B/token/head/layer on average, {m['ratio_vs_bf16']:.2f}x vs bf16 pages")


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def tails_in_pages(cfg: KakeyaConfig) -> bool:
    """The config keeps exact tails in the requests' own pages (only the kakeya format has such tails)."""
    return cfg.tail_storage == "pages" and cfg.format == "kakeya"


def tail_pages(cfg: KakeyaConfig, head_dim: int) -> int:
    """Pages per running request that KAKEYA_TAIL_STORAGE=pages adds after its sealed ones (0 with the pool): the
    widest need of the compressed widths the config serves (tailpages.group_pages; exact layers need none). From
    the config and head_dim only, so the scheduler, which sees no layer plan, computes the same number."""
    if not tails_in_pages(cfg):
        return 0
    from .tailpages import group_pages
    widths = {(cfg.k_bits, cfg.v_bits)} | {(kb, vb) for _, kb, vb in cfg.layer_bits}
    return group_pages([layer_layout(b, head_dim, cfg.format) for b in sorted(widths)])

