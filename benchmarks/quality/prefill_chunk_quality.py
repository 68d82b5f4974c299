"""What KAKEYA_PREFILL_ATTEND=chunk buys in quality (HF/CPU, SmolLM2-135M, the harness's codec cache).

Each window's first half is the prompt, its second half is scored in 256-token chunks (the quality tables'
protocol: every scored token reads the blocks before its own compressed, as decode does). The prompt is prefilled
either in 256-token chunks — what vLLM's default `blocks` mode gives for any chunk size — or in one chunk, what
`chunk` mode gives a prompt scheduled in one step: the prompt's tokens attend each other exact, so the K/V the
scored tokens read compressed were computed from exact hidden states. KLD / ΔPPL against bf16 (same windows, paired).

    python benchmarks/quality/prefill_chunk_quality.py [--windows 32] [--length 2048] [--formats kakeya_k4v3_kuni]
        [--out benchmarks/results]   # -> prefill_chunk_quality.json / .md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kakeya_kv import formats
from kakeya_kv.cli import _load, _windows
from kakeya_kv.codecs.base import BF16
from kakeya_kv.harness import FormatResult, SealStats, summarize, window_logprobs
from kakeya_kv.model_format import ModelFormat


def _score(r: FormatResult, lp: torch.Tensor, w: torch.Tensor, score_from: int, ref_lp: torch.Tensor | None):
    r.nll.append(-lp.gather(1, w[score_from:][:, None]).mean().item())
    r.kld.append(0.0 if ref_lp is None else (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item())
    r.top1.append(1.0 if ref_lp is None else (ref_lp.argmax(-1) == lp.argmax(-1)).float().mean().item())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--formats", default="kakeya_k4v3_kuni")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    t0 = time.time()
    model, tok = _load(a.threads)
    fmts = [f for f in formats.by_name(model.config.num_hidden_layers, a.formats.split(",")) if f.name != "bf16"]
    wins = _windows(tok, a.windows, a.length)
    half = a.length // 2
    ref = FormatResult(ModelFormat("bf16", "bf16", BF16()))
    runs = {(f.name, mode): FormatResult(f) for f in fmts for mode in ("blocks", "chunk")}
    with tqdm(total=len(wins) * (1 + len(runs)), desc="windows x runs", file=sys.stderr) as bar:
        for w in wins:
            ref_lp = window_logprobs(model, w, ref.fmt, 256, half, ref.stats)
            _score(ref, ref_lp, w, half, None)
            bar.update(1)
            for (name, mode), r in runs.items():
                lp = window_logprobs(model, w, r.fmt, 256, half, r.stats,
                                     prefill_chunk=half if mode == "chunk" else None)
                _score(r, lp, w, half, ref_lp)
                bar.update(1)
    rows = [{"format": name, "prefill": mode, **summarize(r, ref)} for (name, mode), r in runs.items()]
    out = Path(a.out)
    res = {"model": "SmolLM2-135M-Instruct (CPU, fp32 compute, bf16 K/V)", "windows": len(wins),
           "window_tokens": a.length, "prompt_tokens": half, "scored_chunk": 256,
           "prefill": {"blocks": "prompt in 256-token chunks (vLLM KAKEYA_PREFILL_ATTEND=blocks, any chunk size)",
                       "chunk": f"prompt in one {half}-token chunk (vLLM KAKEYA_PREFILL_ATTEND=chunk)"},
           "command": "python " + " ".join(sys.argv), "elapsed_s": round(time.time() - t0, 1), "rows": rows}
    (out / "prefill_chunk_quality.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Prompt prefill mode vs quality (HF/CPU, {len(wins)} windows x {a.length} tokens, prompt = first "
             f"{half}, second half scored in 256-token chunks)", "",
             "| format | prompt prefill | KLD vs bf16 (sd over windows) | ΔPPL % [95 % CI] | top-1 agree |",
             "|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["delta_ppl_pct_ci95"]
        lines.append(f"| {r['format']} | {r['prefill']} | {r['kld']:.5f} ({r['kld_window_sd']:.5f}) | "
                     f"{r['delta_ppl_pct']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['top1_agree']:.4f} |")
    lines += ["", f"Command: `{res['command']}` ({res['elapsed_s']} s)."]
    (out / "prefill_chunk_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
