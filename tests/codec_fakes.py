"""Codec stand-ins shared by the harness tests."""
import torch

from kakeya_kv.codecs.base import Codec


class Zero(Codec):
    """Stores nothing: any token read from a sealed block is zero."""
    name = family = "zero"
    block_tokens = 512

    def bytes_per_token_head(self, d):
        return 0.0

    def roundtrip(self, k, v, layer):
        return torch.zeros_like(k), torch.zeros_like(v)
