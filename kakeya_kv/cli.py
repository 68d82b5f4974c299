"""`kakeya-kv` command line: compare formats on real data, ablate, print the block format."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path("benchmarks/results")


def _load(threads: int, model: str = "smollm2"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import data
    torch.set_num_threads(threads)
    d = data.model_dir(model)
    tok = AutoTokenizer.from_pretrained(d)
    from .query_quant import NAME   # SDPA + the query cast some vLLM KV dtypes apply
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation=NAME).eval()
    return model, tok


def _windows(tok, n: int, length: int):
    """Evaluation windows (never the calibration books)."""
    from . import data
    return data.windows(tok, data.EVAL_BOOKS, n, length)


def cmd_compare(a) -> int:
    from tqdm import tqdm

    from . import data, formats, harness
    from .attention_error import capture_qkv, layer_errors
    from .report import markdown_table, plot_frontier, summary_markdown, write_json

    t0 = time.time()
    n_windows = 32 if a.full else a.windows
    model, tok = _load(a.threads, a.model)
    cfg = model.config
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or D
    fmts = formats.by_name(L, a.formats.split(",")) if a.formats else formats.standard_formats(L)
    wins = _windows(tok, n_windows, a.window)
    stop = (lambda: time.time() > t0 + a.deadline_s) if a.deadline_s else None
    with tqdm(total=len(wins) * len(fmts), desc="windows x formats", file=sys.stderr) as bar:
        ref, results = harness.evaluate(model, wins, fmts, chunk=a.chunk, progress=bar, should_stop=stop)
    qkv = capture_qkv(model, wins[0])
    bf16_bytes = fmts[0].bytes_per_token(L, H, D)
    rows = []
    per_layer = {}
    for r in [ref] + results:
        s = harness.summarize(r, ref)
        b = r.fmt.bytes_per_token(L, H, D)
        tail = r.fmt.tail_tokens()
        # Honest tail accounting at the evaluated context: on average half a block
        # of bf16 tokens per request per compressed layer is still unsealed.
        n_comp = sum(r.fmt.codec_for(l) is not None for l in range(L))
        avg_tail = (tail / 2) * n_comp * H * 4 * D / a.window
        errs = layer_errors(qkv, r.fmt)
        per_layer[r.fmt.name] = errs
        rows.append({
            "name": r.fmt.name, "family": r.fmt.family, "exact_layers": list(r.fmt.exact_layers),
            "notes": r.fmt.notes, "block_tokens": r.fmt.codec.block_tokens,
            "bytes_per_token": b, "ratio_vs_bf16": bf16_bytes / b,
            "ratio_vs_bf16_with_avg_tail_at_window": bf16_bytes / (b + avg_tail),
            "score_rel_err_mean": sum(e["score_rel_err"] for e in errs) / len(errs),
            "out_rel_err_mean": sum(e["out_rel_err"] for e in errs) / len(errs),
            **s,
        })
    res = {
        "model": data.MODELS[a.model][1],
        "corpus": "Jane Austen (Debian r-cran-janeaustenr): " + ", ".join(data.EVAL_BOOKS),
        "windows": len(ref.nll), "windows_requested": len(wins),
        "stopped_at_deadline": len(ref.nll) < len(wins), "window_tokens": a.window, "chunk": a.chunk, "scored_tokens_per_window": a.window // 2,
        "geometry": {"layers": L, "kv_heads": H, "head_dim": D},
        "bf16_ppl": math.exp(sum(ref.nll) / len(ref.nll)),
        "formats": rows,
        "per_layer_attention_error_window0": per_layer,
        "command": "kakeya-kv " + " ".join(sys.argv[1:]),
        "elapsed_s": time.time() - t0,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
    }
    out = Path(a.out)
    write_json(out / "codec_compare.json", res)
    table = markdown_table(res)
    (out / "SUMMARY.md").write_text(summary_markdown(res))
    plot_frontier(res, out / "codec_compare.png")
    print(table)
    print(f"\nwrote {out / 'codec_compare.json'}, {out / 'SUMMARY.md'}, {out / 'codec_compare.png'}")
    return 0


def cmd_eval(a) -> int:
    """quality.json (issue 5's schema) from either backend, same config names."""
    if a.backend == "vllm":
        from .vllm_eval import main as vllm_main
        return vllm_main(["run", *a.rest])
    from .hf_eval import main as hf_main
    return hf_main(a.rest)


def cmd_report(a) -> int:
    """Re-render SUMMARY.md and the plot from an existing codec_compare.json (no model run)."""
    from .report import plot_frontier, summary_markdown
    out = Path(a.out)
    res = json.loads((out / "codec_compare.json").read_text())
    (out / "SUMMARY.md").write_text(summary_markdown(res))
    plot_frontier(res, out / "codec_compare.png")
    print(summary_markdown(res))
    return 0


def cmd_format(a) -> int:
    from .format import describe, layout
    for fmt, params in (("kakeya", {}), ("v13", {}), ("exact", {})):
        for d in (64, 128, 256):
            print(describe(layout(fmt, d, **params)) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kakeya-kv", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="PPL/KLD of every KV format on real text (SmolLM2 + Austen)")
    c.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-coder-1.5b"],
                   help="smollm2 (embedded default, head_dim 64) or qwen2.5-coder-1.5b (head_dim 128, ~1.1 GB download)")
    c.add_argument("--windows", type=int, default=4, help="windows of real text (default 4; --full = 32)")
    c.add_argument("--full", action="store_true", help="32 windows")
    c.add_argument("--window", type=int, default=2048)
    c.add_argument("--chunk", type=int, default=256, help="prefill chunk (≤256 so scored tokens read sealed blocks)")
    c.add_argument("--formats", default="", help="comma list of format names (default: all)")
    c.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    c.add_argument("--out", default=str(RESULTS))
    c.add_argument("--deadline-s", type=float, default=0.0,
                   help="start no new window after this many seconds; the result records the windows done")
    c.set_defaults(fn=cmd_compare)
    ab = sub.add_parser("ablate", help="v13 variance_ratio x d_res MSE-inflation grid + kakeya design ablation")
    ab.add_argument("--layers", default="3,10,15,18,22,27")
    ab.add_argument("--windows", type=int, default=4)
    ab.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ab.add_argument("--out", default=str(RESULTS))
    ab.set_defaults(fn=lambda a: __import__("kakeya_kv.ablate", fromlist=["run"]).run(a))
    cb = sub.add_parser("calibrate", help="write a calibration bundle (HF/CPU) from calibration text")
    cb.add_argument("--model", default="smollm2", choices=["smollm2"], help="the embedded default model")
    cb.add_argument("--out", required=True)
    cb.add_argument("--windows", type=int, default=8)
    cb.add_argument("--window", type=int, default=2048)
    cb.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    cb.set_defaults(fn=lambda a: __import__("kakeya_calibration.calibrate", fromlist=["run"]).run(a))
    ev = sub.add_parser("eval", help="quality.json (PPL, KLD, NIAH, ratio) of vLLM config names: --backend hf "
                                     "(CPU harness twins) or vllm (GPU, gpu-kit)")
    ev.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ev.add_argument("rest", nargs=argparse.REMAINDER,
                    help="hf: kakeya_kv.hf_eval options (--configs, --windows, --niah-depths, --out); "
                         "vllm: kakeya_kv.vllm_eval run options")
    ev.set_defaults(fn=cmd_eval)
    rc = sub.add_parser("recipe", help="search the highest-ratio servable setting within a ΔPPL budget (HF/CPU)")
    rc.add_argument("--model", default="smollm2", choices=["smollm2"], help="the embedded default model")
    rc.add_argument("--model-name", default="smollm2-135m-instruct-auto")
    rc.add_argument("--budget-ppl", type=float, default=1.0, help="max ΔPPL vs bf16 in percent")
    rc.add_argument("--windows", type=int, default=16, help="held-out windows (calibration books)")
    rc.add_argument("--window", type=int, default=2048)
    rc.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    rc.add_argument("--out", default="", help="recipe path (default deploy/recipes/<model-name>.env)")
    rc.add_argument("--sensitivity", default=str(RESULTS / "sensitivity.json"),
                    help="per-layer table from `kakeya-kv sensitivity`: its most sensitive layers are the ones "
                         "upgraded to more bits (KAKEYA_LAYER_BITS) or kept exact; without it only uniform bits "
                         "and first/last exact layers are tried")
    rc.set_defaults(fn=lambda a: __import__("kakeya_kv.recipe", fromlist=["run_recipe"]).run_recipe(a))
    se = sub.add_parser("sensitivity", help="ΔPPL when only layer L is compressed, every L (HF/CPU)")
    se.add_argument("--k-bits", type=int, default=3)
    se.add_argument("--v-bits", type=int, default=2)
    se.add_argument("--windows", type=int, default=4)
    se.add_argument("--window", type=int, default=2048)
    se.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    se.add_argument("--out", default=str(RESULTS))
    se.set_defaults(fn=lambda a: __import__("kakeya_kv.recipe", fromlist=["run_sensitivity"]).run_sensitivity(a))
    nh = sub.add_parser("niah", help="needle in a haystack at 4k/8k through the codec cache (HF/CPU)")
    nh.add_argument("--formats", default="kakeya_k4v3,kakeya_k3v2,turboquant_4bit_nc,int4_per_token_head")
    nh.add_argument("--contexts", default="4096,8192")
    nh.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    nh.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    nh.add_argument("--out", default=str(RESULTS))
    nh.set_defaults(fn=lambda a: __import__("kakeya_kv.niah", fromlist=["main"]).main(a))
    r = sub.add_parser("report", help="re-render SUMMARY.md + plot from codec_compare.json")
    r.add_argument("--out", default=str(RESULTS))
    r.set_defaults(fn=cmd_report)
    f = sub.add_parser("format", help="print the block-format byte layouts")
    f.set_defaults(fn=cmd_format)
    a, extra = p.parse_known_args(argv)
    if extra and a.cmd != "eval":    # eval hands its options to the backend's own parser
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if a.cmd == "eval":
        a.rest = extra + a.rest
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
