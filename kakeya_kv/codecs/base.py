"""Codec interface shared by our formats and the re-implemented competitors."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Codec(ABC):
    """Lossy (or exact) storage of K and V for one layer.

    ``block_tokens`` is the sealing granularity: 512 for Kakeya formats (tokens
    stay exact in bf16 until their block is full), 1 for per-token formats
    (vLLM's TurboQuant, int4_per_token_head, fp8 compress every token on write).
    Inputs are float32 ``[H, T, D]`` (H = KV heads) holding bf16-representable
    values, with T a multiple of ``block_tokens``; outputs are the decoded
    float32 tensors of the same shape.
    """

    name: str
    family: str
    block_tokens: int = 1
    # Does a prefill chunk attend to its own tokens exact (True) or read them back from the
    # compressed cache (False)? vLLM's TurboQuant continuation prefill concatenates the raw chunk;
    # its Triton backend (fp8, int4_per_token_head) writes the chunk to the cache first and reads it back.
    self_exact: bool = True
    # What the server does to the query for this KV dtype (None = nothing): vLLM casts it to fp8 for fp8 caches.
    query_quant = None

    @abstractmethod
    def bytes_per_token_head(self, head_dim: int) -> float:
        """Stored K+V bytes per token per KV head (steady state, sealed)."""

    @abstractmethod
    def roundtrip(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def describe(self) -> str:
        return self.name


class BF16(Codec):
    """The uncompressed baseline: bf16 storage (inputs are already bf16 values)."""

    name = "bf16"
    family = "bf16"
    block_tokens = 1

    def bytes_per_token_head(self, head_dim: int) -> float:
        return 4.0 * head_dim

    def roundtrip(self, k, v, layer):
        return k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
