"""``exact`` block format: bf16 K/V in the sealed-slot layout (lossless mode)."""
from __future__ import annotations

import torch

from ..format import BLOCK_TOKENS, exact_layout
from .base import Codec


class ExactCodec(Codec):
    name = "exact"
    family = "bf16"
    block_tokens = BLOCK_TOKENS

    def bytes_per_token_head(self, head_dim: int) -> float:
        return exact_layout(head_dim).bytes_per_token_head

    def encode(self, k, v, layer):
        h, t, d = k.shape
        m = t // BLOCK_TOKENS
        lay = exact_layout(d)
        ks = k.to(torch.bfloat16).reshape(h, m, BLOCK_TOKENS * d).view(torch.uint8)
        vs = v.to(torch.bfloat16).reshape(h, m, BLOCK_TOKENS * d).view(torch.uint8)
        assert ks.shape[-1] == lay.k.size
        return torch.cat([ks, vs], -1)

    def decode(self, slots, head_dim):
        lay = exact_layout(head_dim)
        h, m, _ = slots.shape
        k = slots[..., :lay.k.size].contiguous().view(torch.bfloat16).float()
        v = slots[..., lay.k.size:].contiguous().view(torch.bfloat16).float()
        return k.reshape(h, m * BLOCK_TOKENS, head_dim), v.reshape(h, m * BLOCK_TOKENS, head_dim)

    def roundtrip(self, k, v, layer):
        return self.decode(self.encode(k, v, layer), k.shape[-1])
