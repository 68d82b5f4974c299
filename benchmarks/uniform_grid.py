"""Quality study: uniform centroid grid (lloyd_max.uniform_table) vs Lloyd-Max for the default format.

    nice python benchmarks/uniform_grid.py --windows 32 --deadline-s 3000

Two parts, one JSON + one markdown (benchmarks/results/UNIFORM_GRID.{json,md}):
1. the grid step: MSE-optimal for N(0,1) (closed form) vs the step that minimises the error AFTER the
   per-token LS gain on Gaussian vectors of length D (Monte Carlo), with the Lloyd-Max error at the same bits;
2. the HF/CPU quality protocol (SmolLM2-135M, Austen windows of 2048, second half scored, chunk 256):
   kakeya_k{K}v{V} vs kakeya_k{K}v{V}_uni on the same windows, with the paired per-window difference.
The run stops between windows when the next window would end past --deadline-s (every format keeps the
same windows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kakeya_kv import lloyd_max

PAIRS = ("kakeya_k4v3", "kakeya_k4v4", "kakeya_k3v2")


def ls_error(z: torch.Tensor, table: torch.Tensor) -> float:
    """Relative squared error ||z - g c||^2 / ||z||^2 of the codec's per-token step: nearest level of
    u = z / rms(z), then the least-squares gain g."""
    u = z / z.pow(2).mean(-1, keepdim=True).sqrt()
    c = table.to(z.dtype)[lloyd_max.quantize(u, table.to(z.dtype)).long()]
    g = (z * c).sum(-1, keepdim=True) / c.pow(2).sum(-1, keepdim=True)
    return ((z - g * c).pow(2).sum() / z.pow(2).sum()).item()


def grid_study(n_vectors: int, seed: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for d in (64, 128):
        z = torch.randn(n_vectors, d, generator=gen, dtype=torch.float64)
        for bits in (2, 3, 4, 5):
            dm = lloyd_max.uniform_delta(bits)
            dls = lloyd_max.golden_min(lambda s: ls_error(z, lloyd_max.uniform_table(bits, s).double()),
                                       0.8 * dm, 1.2 * dm, tol=1e-5)
            rows.append({
                "head_dim": d, "bits": bits, "delta_mse_opt": dm, "delta_ls_opt": dls,
                "mse_n01_uniform": lloyd_max.uniform_mse(bits, dm),
                "ls_err_uniform_mse_opt": ls_error(z, lloyd_max.uniform_table(bits).double()),
                "ls_err_uniform_ls_opt": ls_error(z, lloyd_max.uniform_table(bits, dls).double()),
                "ls_err_lloyd_max": ls_error(z, lloyd_max.gaussian_table(bits).double()),
            })
    return rows


def quality(a) -> dict:
    from kakeya_kv import formats, harness
    from kakeya_kv.cli import _load, _windows
    from kakeya_kv.quality import mean_ci, paired_delta_pct

    t0 = time.time()
    model, tok = _load(a.threads)
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tw = "_" + a.twin
    names = [n for p in a.pairs.split(",") for n in (p, p + tw)]
    fmts = formats.by_name(L, names)
    wins = _windows(tok, a.windows, a.window)
    state = {"last": None, "dur": 0.0}

    def should_stop() -> bool:     # called before each window: stop if the next one would overrun
        now = time.time()
        if state["last"] is not None:
            state["dur"] = now - state["last"]
            print(f"window done in {state['dur']:.0f} s, elapsed {now - t0:.0f} s", file=sys.stderr, flush=True)
        state["last"] = now
        return bool(a.deadline_s) and now + state["dur"] > t0 + a.deadline_s

    ref, results = harness.evaluate(model, wins, fmts, chunk=a.chunk, should_stop=should_stop)
    bf16_bytes = fmts[0].bytes_per_token(L, H, D)
    by = {r.fmt.name: r for r in results}
    rows = []
    for r in results:
        s = harness.summarize(r, ref)
        rows.append({"name": r.fmt.name, "ratio_vs_bf16": bf16_bytes / r.fmt.bytes_per_token(L, H, D),
                     "bytes_per_token": r.fmt.bytes_per_token(L, H, D), **s,
                     "window_nll": list(r.nll), "window_kld": list(r.kld)})
    pairs = []
    for p in a.pairs.split(","):
        lm, un = by[p], by[p + tw]
        d, ci = paired_delta_pct(un.nll, lm.nll)
        dk, dkci = mean_ci([x - y for x, y in zip(un.kld, lm.kld)])
        pairs.append({"lloyd": p, "uniform": p + tw, "paired_ppl_diff_pct": d, "paired_ppl_diff_pct_ci95": ci,
                      "kld_diff": dk, "kld_diff_ci95": dkci,
                      "kld_ratio": (sum(un.kld) / sum(lm.kld)) if sum(lm.kld) else None})
    return {"windows": len(ref.nll), "windows_requested": len(wins), "window_tokens": a.window, "chunk": a.chunk,
            "scored_tokens_per_window": a.window // 2, "geometry": {"layers": L, "kv_heads": H, "head_dim": D},
            "bf16_ppl": math.exp(sum(ref.nll) / len(ref.nll)), "bf16_window_nll": list(ref.nll),
            "formats": rows, "pairs": pairs, "elapsed_s": time.time() - t0}


def _f(x, f="{:+.3f}"):
    return "—" if x is None else f.format(x)


def _ci(ci, f="{:+.3f}"):
    return "—" if ci is None else f"[{f.format(ci[0])}, {f.format(ci[1])}]"


def markdown(doc: dict) -> str:
    k_only = doc.get("twin") == "kuni"
    out = ["# Uniform centroid grid vs Lloyd-Max (default `kakeya` format" + (", K stream only" if k_only else "")
           + ")", "",
           f"Command: `{doc['command']}` — {doc['host']['cpus']} shared CPU cores, wall {doc['elapsed_s']:.0f} s.", "",
           "## Grid step (N(0,1); error after the per-token LS gain on Gaussian vectors, "
           f"{doc['grid_vectors']} vectors, seed {doc['grid_seed']})", "",
           "| D | bits | Δ MSE-opt | Δ LS-opt | N(0,1) MSE uniform | LS err uniform (Δ MSE-opt) | "
           "LS err uniform (Δ LS-opt) | LS err Lloyd-Max | uniform / LM |",
           "|---|---|---|---|---|---|---|---|---|"]
    for g in doc["grid"]:
        out.append(f"| {g['head_dim']} | {g['bits']} | {g['delta_mse_opt']:.5f} | {g['delta_ls_opt']:.5f} | "
                   f"{g['mse_n01_uniform']:.5f} | {g['ls_err_uniform_mse_opt']:.5f} | {g['ls_err_uniform_ls_opt']:.5f} | "
                   f"{g['ls_err_lloyd_max']:.5f} | {g['ls_err_uniform_mse_opt'] / g['ls_err_lloyd_max']:.3f} |")
    q = doc.get("quality")
    if q:
        out += ["", f"## Quality (HF/CPU, SmolLM2-135M-Instruct, Austen, {q['windows']} windows of {q['window_tokens']} "
                f"tokens, second half scored, chunk {q['chunk']}; bf16 PPL {q['bf16_ppl']:.3f}; quality wall "
                f"{q['elapsed_s']:.0f} s)", "",
                "| format | ratio | ΔPPL % vs bf16 [95 % CI] | KLD | top-1 | K rel MSE | V rel MSE |",
                "|---|---|---|---|---|---|---|"]
        for r in q["formats"]:
            out.append(f"| {r['name']} | {r['ratio_vs_bf16']:.2f} | {r['delta_ppl_pct']:+.3f} "
                       f"{_ci(r['delta_ppl_pct_ci95'])} | {r['kld']:.5f} | {r['top1_agree']:.4f} | "
                       f"{r['k_rel_mse']:.5f} | {r['v_rel_mse']:.5f} |")
        out += ["", "Paired per-window difference, uniform − Lloyd-Max (same windows):", "",
                "| pair | ΔPPL diff pp [95 % CI] | KLD diff [95 % CI] | KLD uniform / LM |", "|---|---|---|---|"]
        for p in q["pairs"]:
            out.append(f"| {p['uniform']} − {p['lloyd']} | {_f(p['paired_ppl_diff_pct'])} "
                       f"{_ci(p['paired_ppl_diff_pct_ci95'])} | {_f(p['kld_diff'], '{:+.5f}')} "
                       f"{_ci(p['kld_diff_ci95'], '{:+.5f}')} | {_f(p['kld_ratio'], '{:.3f}')} |")
    if doc.get("notes"):      # added by hand after a run, with the verdict
        out += ["", "Notes:", ""] + ["- " + n for n in doc["notes"]]
    if doc.get("verdict"):
        out += ["", "## Verdict", "", doc["verdict"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/uniform_grid.py")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--pairs", default=",".join(PAIRS), help="Lloyd-Max format names; each runs with its twin")
    p.add_argument("--twin", choices=("uni", "kuni"), default="uni",
                   help="uni: both streams on the uniform grid; kuni: K only (the int8 K-score path's format)")
    p.add_argument("--name", default="UNIFORM_GRID", help="output file stem under --out")
    p.add_argument("--deadline-s", type=float, default=0.0, help="stop between windows before this many seconds")
    p.add_argument("--grid-vectors", type=int, default=20000)
    p.add_argument("--grid-seed", type=int, default=0)
    p.add_argument("--no-quality", action="store_true", help="grid step study only")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    t0 = time.time()
    doc = {"command": "python benchmarks/uniform_grid.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "grid_vectors": a.grid_vectors, "grid_seed": a.grid_seed, "twin": a.twin,
           "grid": grid_study(a.grid_vectors, a.grid_seed),
           "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}}
    if not a.no_quality:
        doc["quality"] = quality(a)
    doc["elapsed_s"] = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{a.name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
