"""A whole-model KV format: a default codec, optional per-layer codecs (other bit widths), and exact
bf16 (boundary) layers."""
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
    # Layers stored with another codec than `codec` (e.g. more bits on sensitive layers). The codecs must
    # share `codec`'s block_tokens / self_exact / query handling: the harness applies those model-wide.
    layer_codecs: dict[int, Codec] = field(default_factory=dict)

    def __post_init__(self):
        clash = sorted(set(self.layer_codecs) & set(self.exact_layers))
        if clash:
            raise ValueError(f"{self.name}: layer(s) {clash} both exact and given a codec")
        for layer, c in self.layer_codecs.items():
            same = (c.block_tokens, c.self_exact, c.query_quant) == (
                self.codec.block_tokens, self.codec.self_exact, self.codec.query_quant)
            if not same or isinstance(c, BF16):
                raise ValueError(f"{self.name}: layer {layer}'s codec {c.name} must differ from {self.codec.name} "
                                 "only in its stored bytes (use exact_layers for bf16 layers)")

    def codec_for(self, layer: int) -> Codec | None:
        """None means the layer stores exact bf16 K/V."""
        if layer in self.exact_layers or isinstance(self.codec, BF16):
            return None
        return self.layer_codecs.get(layer, self.codec)

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int) -> float:
        """Whole-model stored KV bytes per token (sealed steady state), from each layer's byte layout."""
        bf16 = 4.0 * head_dim    # bf16 K + V (= exact_layout's bytes per token and head)
        total = 0.0
        for layer in range(num_layers):
            c = self.codec_for(layer)
            total += num_kv_heads * (bf16 if c is None else c.bytes_per_token_head(head_dim))
        return total

    def ratio_vs_bf16(self, num_layers: int, num_kv_heads: int, head_dim: int) -> float:
        return 4.0 * head_dim * num_layers * num_kv_heads / self.bytes_per_token(num_layers, num_kv_heads, head_dim)

    def tail_tokens(self) -> int:
        """Tokens per request that stay exact bf16 before sealing (worst case)."""
        return self.codec.block_tokens - 1


def vllm_tq_boundary(num_layers: int) -> tuple[int, ...]:
    """vLLM 0.26 always keeps the first two and last two layers bf16 for turboquant_* dtypes."""
    n = min(2, num_layers // 2)
    return tuple(sorted(set(range(n)) | set(range(num_layers - n, num_layers))))
