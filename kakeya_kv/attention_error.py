"""Per-layer attention-score and attention-output error on captured real Q/K/V.

One window is run once with exact KV while a forward hook on every attention
module records post-RoPE Q, K, V. Each format then seals K/V of that window
(compressed layers only) and we measure, on the last ``n_queries`` queries,
the relative error of the pre-softmax scores and of the attention output.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .model_format import ModelFormat

_CAPTURE: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    _CAPTURE[module.layer_idx] = (query[0].detach().clone(), key[0].detach().clone(), value[0].detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("kakeya_capture", _capture_attention)


@torch.no_grad()
def capture_qkv(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (q [Hq, T, D], k [Hkv, T, D], v [Hkv, T, D])}, K/V rounded to bf16 as stored."""
    _CAPTURE.clear()
    prev = model.config._attn_implementation
    model.set_attn_implementation("kakeya_capture")
    try:
        model(input_ids=ids[None], use_cache=False)
    finally:
        model.set_attn_implementation(prev)
    return {l: (q, k.bfloat16().float(), v.bfloat16().float()) for l, (q, k, v) in _CAPTURE.items()}


def _attend(q, k, v, scale, q_pos):
    g = q.shape[0] // k.shape[0]
    kk = k.repeat_interleave(g, 0)
    vv = v.repeat_interleave(g, 0)
    s = (q @ kk.transpose(-1, -2)) * scale
    mask = torch.arange(k.shape[1])[None, :] > q_pos[:, None]
    s = s.masked_fill(mask, float("-inf"))
    return s, torch.softmax(s, -1) @ vv, mask


@torch.no_grad()
def layer_errors(qkv: dict, fmt: ModelFormat, n_queries: int = 256) -> list[dict]:
    out = []
    for layer in sorted(qkv):
        q, k, v = qkv[layer]
        codec = fmt.codec_for(layer)
        t = k.shape[1]
        bt = 1 if codec is None else codec.block_tokens
        sealed = (t // bt) * bt
        kh, vh = k.clone(), v.clone()
        if codec is not None and sealed:
            kh[:, :sealed], vh[:, :sealed] = codec.roundtrip(k[:, :sealed], v[:, :sealed], layer)
        qs = q[:, t - n_queries:]
        pos = torch.arange(t - n_queries, t)
        scale = q.shape[-1] ** -0.5
        s, o, mask = _attend(qs, k, v, scale, pos)
        sh, oh, _ = _attend(qs, kh, vh, scale, pos)
        keep = ~mask
        ds = (sh - s)[:, keep].pow(2).sum() / s[:, keep].sub(s[:, keep].mean()).pow(2).sum()
        do = (oh - o).pow(2).sum() / o.pow(2).sum()
        out.append({"layer": layer, "score_rel_err": ds.sqrt().item(), "out_rel_err": do.sqrt().item()})
    return out
