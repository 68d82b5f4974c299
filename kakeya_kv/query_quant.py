"""Query quantization as vLLM applies it for some KV dtypes (TRITON_ATTN + fp8: the query is cast to
fp8 e4m3 with the static per-tensor q_scale, 1.0 without checkpoint scales). The harness runs the model
with the ``kakeya_sdpa`` attention (= transformers' SDPA, plus this cast when a format asks for it)."""
from __future__ import annotations

import contextlib

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kakeya_sdpa"
_state = {"quantize": None}   # None or a callable applied to the query


def _attention(module, query, key, value, attention_mask, **kwargs):
    q = _state["quantize"]
    if q is not None:
        query = q(query.float()).to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, _attention)
# The mask builder is looked up by the same name: without it the model would run without a causal mask.
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def quantized_query(fn):
    """Within the block, every attention call sees fn(query) (None = unchanged)."""
    old = _state["quantize"]
    _state["quantize"] = fn
    try:
        yield
    finally:
        _state["quantize"] = old
