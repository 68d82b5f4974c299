"""KV-cache spec whose page size comes from the block-format spec (imported in every vLLM process
that unpickles it: worker and engine core)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Self

from vllm.v1.kv_cache_interface import FullAttentionSpec

from kakeya_kv.format import BLOCK_TOKENS


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

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        # FullAttentionSpec.merge rebuilds from the base fields only: re-attach ours.
        merged = super().merge(specs)
        if any((s.kakeya_slot_bytes, s.kakeya_format) != (specs[0].kakeya_slot_bytes, specs[0].kakeya_format)
               for s in specs):
            raise ValueError("Kakeya layers in one KV cache group must share one block format")
        return replace(merged, kakeya_slot_bytes=specs[0].kakeya_slot_bytes, kakeya_format=specs[0].kakeya_format)
