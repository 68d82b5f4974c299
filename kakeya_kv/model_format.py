"""A whole-model KV format: one codec for compressed layers, bf16 for exact (boundary) layers."""
from __future__ import annotations

from dataclasses import dataclass, field

from .codecs.base import BF16, Codec


@dataclass
class ModelFormat:
    name: str
    family: str
    codec: Codec
    exact_layers: tuple[int, ...] = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def codec_for(self, layer: int) -> Codec | None:
        """None means the layer stores exact bf16 K/V."""
        if layer in self.exact_layers or isinstance(self.codec, BF16):
            return None
        return self.codec

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int) -> float:
        """Whole-model stored KV bytes per token (sealed steady state)."""
        total = 0.0
        for layer in range(num_layers):
            c = self.codec_for(layer)
            total += num_kv_heads * (4.0 * head_dim if c is None else c.bytes_per_token_head(head_dim))
        return total

    def tail_tokens(self) -> int:
        """Tokens per request that stay exact bf16 before sealing (worst case)."""
        return self.codec.block_tokens - 1


def vllm_tq_boundary(num_layers: int) -> tuple[int, ...]:
    """vLLM 0.26 always keeps the first two and last two layers bf16 for turboquant_* dtypes."""
    n = min(2, num_layers // 2)
    return tuple(sorted(set(range(n)) | set(range(num_layers - n, num_layers))))
