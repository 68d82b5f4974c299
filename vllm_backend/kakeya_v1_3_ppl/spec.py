"""KV-cache spec whose page size comes from the block-format spec (imported in every vLLM process
that unpickles it: worker and engine core)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Self

from vllm.v1.kv_cache_interface import FullAttentionSpec

from kakeya_kv.config import EXACT
from kakeya_kv.format import BLOCK_TOKENS

from .pages import layer_layout


@dataclass(frozen=True, kw_only=True)
class KakeyaAttentionSpec(FullAttentionSpec):
    """A page = block_size/512 sealed slots per KV head, dtype uint8 (shapes are in bytes)."""

    kakeya_slot_bytes: int = 0
    kakeya_format: str = "kakeya"

    @property
    def real_page_size_bytes(self) -> int:
        if self.block_size % BLOCK_TOKENS:
            raise ValueError(f"Kakeya pages hold whole {BLOCK_TOKENS}-token blocks; block_size={self.block_size}")
        return (self.block_size // BLOCK_TOKENS) * self.num_kv_heads * self.kakeya_slot_bytes

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # KAKEYA_TAIL_STORAGE=pages: a request of max_model_len also holds its tail pages (vLLM's fit check)
        from .checks import settings
        from .pages import tail_pages
        return super().max_memory_usage_bytes(vllm_config) + tail_pages(settings(), self.head_size) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        # FullAttentionSpec.merge rebuilds from the base fields only: re-attach ours.
        merged = super().merge(specs)
        if any((s.kakeya_slot_bytes, s.kakeya_format) != (specs[0].kakeya_slot_bytes, specs[0].kakeya_format)
               for s in specs):
            raise ValueError("vLLM merged Kakeya layers of different block formats into one spec (per-layer widths, "
                             "KAKEYA_LAYER_BITS, need vLLM's per-layer page sizes); unset KAKEYA_LAYER_BITS")
        return replace(merged, kakeya_slot_bytes=specs[0].kakeya_slot_bytes, kakeya_format=specs[0].kakeya_format)


@dataclass(frozen=True, kw_only=True)
class KakeyaExactSpec(FullAttentionSpec):
    """An exact (bf16) layer of an engine that keeps its tails in the requests' pages (KAKEYA_TAIL_STORAGE=pages).
    Same pages as FullAttentionSpec; the type only tells vLLM's scheduler that the group is Kakeya's: it sees ONE
    layer's spec per group (the first, often exact boundary layer 0), and must give tail pages to Kakeya groups only,
    never to another backend's 512-token full-attention group in the same process."""


KAKEYA_SPECS = (KakeyaAttentionSpec, KakeyaExactSpec)   # the specs whose group gets tail pages (patch 6a)


def layer_spec(bits, block_size: int, num_kv_heads: int, head_size: int, head_size_v: int,
               fmt: str = "kakeya", tails_in_pages: bool = False) -> FullAttentionSpec:
    """The spec of one layer: bf16 pages for EXACT, else a page of the layer's (k_bits, v_bits) layout in ``fmt``.
    Layers of different widths have different page sizes; vLLM keeps them in one KV-cache group.
    ``tails_in_pages``: exact layers are marked KakeyaExactSpec (pool engines keep vLLM's own class)."""
    import torch
    if bits == EXACT:
        cls = KakeyaExactSpec if tails_in_pages else FullAttentionSpec
        return cls(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size,
                   head_size_v=head_size_v, dtype=torch.bfloat16)
    return KakeyaAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size,
                               head_size_v=head_size_v, dtype=torch.uint8,
                               kakeya_slot_bytes=layer_layout(bits, head_size, fmt).slot_bytes,
                               kakeya_format=f"{fmt}-k{bits[0]}v{bits[1]}")
