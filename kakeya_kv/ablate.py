"""`kakeya-kv ablate`: design ablations on real captured KV.

1. The seed's v13 grid, variance_ratio x d_res (d_res = residual coordinates
   per vector stored exactly): K/V MSE inflation relative to (1.0, 0), plus
   the slot bytes each point costs.
2. Our default format's design choices (centring, sink flag, shaping, bits):
   rel MSE, attention error and end-to-end PPL/KLD on real windows.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .attention_error import capture_qkv, layer_errors
from .codecs.base import BF16
from .codecs.kakeya import KakeyaCodec
from .codecs.v13 import V13Codec
from .model_format import ModelFormat
from .report import write_json

VR = (1.0, 0.99, 0.95, 0.9, 0.8)
DRES = (0, 2, 4, 8)


def _rel(a, b):
    return ((a - b).pow(2).sum() / (b - b.mean(-2, keepdim=True)).pow(2).sum()).item()


def run(a) -> int:
    from . import harness
    from .cli import _load, _windows
    model, tok = _load(a.threads)
    wins = _windows(tok, a.windows, 2048)
    qkv = capture_qkv(model, wins[0])
    layers = [int(x) for x in a.layers.split(",")]
    D = qkv[layers[0]][1].shape[-1]

    grid = []
    base = None
    for vr in tqdm(VR, desc="v13 grid", file=sys.stderr):
        for dres in DRES:
            frac = 0.08 + dres / (D // 2)
            c = V13Codec(variance_ratio=vr, d_res=dres, k_outlier_frac=frac)
            ke = ve = 0.0
            for l in layers:
                _, k, v = qkv[l]
                kh, vh = c.roundtrip(k[:, :1024], v[:, :1024], l)
                ke += _rel(kh, k[:, :1024]) / len(layers)
                ve += _rel(vh, v[:, :1024]) / len(layers)
            base = base or (ke, ve)
            grid.append({"variance_ratio": vr, "d_res": dres, "k_rel_mse": ke, "v_rel_mse": ve,
                         "k_mse_inflation": ke / base[0], "v_mse_inflation": ve / base[1],
                         "bytes_per_token_head": c.bytes_per_token_head(D)})

    variants = [KakeyaCodec(4, 3), KakeyaCodec(4, 3, sink=False), KakeyaCodec(4, 3, shape=False),
                KakeyaCodec(4, 3, center=False), KakeyaCodec(4, 4), KakeyaCodec(3, 3), KakeyaCodec(3, 2)]
    fmts = [ModelFormat("bf16", "bf16", BF16())] + [ModelFormat(c.name, "kakeya", c) for c in variants]
    with tqdm(total=len(wins) * len(fmts), desc="kakeya ablation", file=sys.stderr) as bar:
        ref, res = harness.evaluate(model, wins, fmts, progress=bar)
    kak = []
    for r in res:
        s = harness.summarize(r, ref)
        errs = [e for e in layer_errors(qkv, r.fmt) if e["layer"] in layers]
        kak.append({"name": r.fmt.name, "bytes_per_token_head": r.fmt.codec.bytes_per_token_head(D),
                    "score_rel_err": sum(e["score_rel_err"] for e in errs) / len(errs),
                    "out_rel_err": sum(e["out_rel_err"] for e in errs) / len(errs),
                    **{k: s[k] for k in ("delta_ppl_pct", "delta_ppl_pct_ci95", "kld", "k_rel_mse", "v_rel_mse")}})
    out = {"layers": layers, "windows": len(wins), "v13_grid": grid, "kakeya_ablation": kak,
           "command": "kakeya-kv " + " ".join(sys.argv[1:])}
    write_json(Path(a.out) / "ablation.json", out)
    md = ["# Ablations (SmolLM2-135M, real Austen text)", "",
          f"## v13: variance_ratio × d_res, K/V MSE inflation vs (1.0, 0) — layers {layers}, 1024 tokens", "",
          "| variance_ratio | d_res | K rel MSE | K inflation | V rel MSE | V inflation | B/token/head |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {g['variance_ratio']} | {g['d_res']} | {g['k_rel_mse']:.4f} | {g['k_mse_inflation']:.2f}× | "
           f"{g['v_rel_mse']:.4f} | {g['v_mse_inflation']:.2f}× | {g['bytes_per_token_head']:.1f} |" for g in grid]
    md += ["", f"## kakeya design ablation ({len(wins)} windows × 2048, chunk 256, all layers compressed)", "",
           "| variant | B/token/head | ΔPPL % | 95% CI | KLD | K rel MSE | V rel MSE | score err | out err |",
           "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {k['name']} | {k['bytes_per_token_head']:.1f} | {k['delta_ppl_pct']:+.2f} | "
           f"[{k['delta_ppl_pct_ci95'][0]:+.2f}, {k['delta_ppl_pct_ci95'][1]:+.2f}] | {k['kld']:.4f} | "
           f"{k['k_rel_mse']:.4f} | {k['v_rel_mse']:.4f} | {k['score_rel_err']:.4f} | {k['out_rel_err']:.4f} |"
           for k in kak]
    (Path(a.out) / "ABLATION.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0
