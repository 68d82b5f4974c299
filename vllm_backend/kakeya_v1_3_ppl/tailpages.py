"""Exact tails kept in the request's own pages (issue 6's capacity goal; NOTES open problem 2) — geometry and copies.

Served with KAKEYA_TAIL_STORAGE=pages: vLLM's scheduler allocates ``num_tokens // 512 + pages`` pages per request
(patches.tail_manager), the runner's block tables are ``pages`` wider (patches.widen_block_tables), the attention
kernel reads the tails from those pages (kakeya_triton._attn_kernel's TPP), and a block that fills is first copied
into one scratch shared by the layers (kakeya_triton.gather_tail_blocks), because its seal writes the first of
its tail pages (runtime.forward_compressed / forward_decode). The pool gives every compressed layer a bf16 tail
row per --max-num-seqs slot outside vLLM's KV budget (12.7 % of the capacity, session 13, H100).

The design: a request with ``nb`` sealed blocks owns the pages at block-table positions ``nb .. nb + pages - 1``
beyond its sealed ones; they hold its unsealed tokens in bf16. Within each page, KV head ``h`` uses its own slot
region (``slot_bytes`` of the layer's sealed layout) as ``bf16 [2 (K, V), tokens_per_page, head_dim]``: tail token
``t`` sits in page ``t // tokens_per_page``, row ``t % tokens_per_page``. When block ``nb`` fills, position ``nb`` is
where the seal writes it (block index = position, as now) and the new tail starts at ``nb + 1``: the shift is safe
because the phases of a step never straddle a block (plan.plan_step): a phase writes its tokens into the pages,
attends, copies a full block to the scratch and seals it from there; the next block's tokens come in a later
phase, at positions nb + 1 ...
No vLLM import: unit-tested on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kakeya_kv.format import BLOCK_TOKENS, BlockLayout


@dataclass(frozen=True)
class TailGeometry:
    """How a layer's sealed slot (one KV head's share of a page) holds exact tail tokens."""
    slot_bytes: int
    head_dim: int

    @property
    def token_bytes(self) -> int:
        return 2 * 2 * self.head_dim            # K and V, bf16

    @property
    def tokens_per_page(self) -> int:
        return self.slot_bytes // self.token_bytes

    @property
    def pages(self) -> int:
        """Pages one request's tail needs (an unsealed block has at most BLOCK_TOKENS - 1 tokens, but a phase writes
        the token that fills the block before its seal reads the tail: room for all BLOCK_TOKENS)."""
        if self.tokens_per_page < 1:
            raise ValueError(f"a {self.slot_bytes}-byte slot cannot hold one bf16 K+V token of head_dim {self.head_dim}")
        return -(-BLOCK_TOKENS // self.tokens_per_page)

    @classmethod
    def of(cls, layout: BlockLayout) -> "TailGeometry":
        return cls(layout.slot_bytes, layout.head_dim)


def group_pages(layouts: list[BlockLayout]) -> int:
    """Tail pages per request for a KV-cache group: block ids are shared by all its layers, so the layer needing the
    most pages decides (exact bf16 layers keep their unsealed tokens in place and need none)."""
    return max((TailGeometry.of(lay).pages for lay in layouts), default=0)


def tail_view(kv_layer: torch.Tensor, geom: TailGeometry) -> torch.Tensor:
    """The tail rows of a layer's pages: uint8 [num_blocks, Hkv, slot_bytes] -> bf16 view
    [num_blocks, Hkv, 2, tokens_per_page, head_dim] over each slot's first bytes (no copy)."""
    nb, hkv, sb = kv_layer.shape
    if sb != geom.slot_bytes or kv_layer.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pages [.., .., {geom.slot_bytes}], got {kv_layer.dtype} {tuple(kv_layer.shape)}")
    if sb % 2 or kv_layer.stride(-1) != 1:
        raise ValueError("tail rows are bf16: slot_bytes must be even and the slot contiguous")
    n = geom.tokens_per_page * geom.token_bytes
    return kv_layer[..., :n].view(torch.bfloat16).view(nb, hkv, 2, geom.tokens_per_page, geom.head_dim)
