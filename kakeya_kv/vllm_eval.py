"""PPL / greedy parity / KV capacity of KV-cache configurations inside vLLM (GPU, gpu-kit).

    kakeya-kv eval --backend vllm --configs flash_bf16,kakeya_k4v3,...   (= python -m kakeya_kv.vllm_eval run)
    python -m kakeya_kv.vllm_eval prep --out .gpudata/windows.json       # CPU: the token windows
    python -m kakeya_kv.vllm_eval merge A.partial B.partial --gpu NAME   # rows of several calls -> one result

Protocol: windows of 2048 tokens (the HF harness's windows of the evaluation books), second half
scored via prompt_logprobs, prefill in chunks of 256 tokens (max_num_batched_tokens=256) so that
scored tokens attend to sealed/compressed blocks. Every config runs in its own subprocess (fresh
GPU memory) with the same gpu_memory_utilization; capacity = the KV tokens vLLM reports.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

MODEL = "/tmp/models/SmolLM2-135M-Instruct"
CONFIGS = {
    # name: (family, LLM kwargs, env)
    "flash_bf16": ("bf16", {"attention_backend": "FLASH_ATTN"}, {}),
    "triton_bf16": ("bf16", {"attention_backend": "TRITON_ATTN"}, {}),   # numeric-noise reference
    "triton_fp8": ("fp8", {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "fp8"}, {}),
    "int4_per_token_head": ("int4_per_token_head", {"attention_backend": "TRITON_ATTN",
                                                    "kv_cache_dtype": "int4_per_token_head"}, {}),
    "kakeya_exact": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_FORMAT": "exact"}),
    "kakeya_k4v3": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_FORMAT": "default"}),
    "kakeya_k4v4": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_K_BITS": "4", "KAKEYA_V_BITS": "4"}),
    "kakeya_k3v3": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "3"}),
    "kakeya_k3v2": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2"}),
    "kakeya_custom": ("kakeya", {"attention_backend": "CUSTOM"}, {}),
    # boundary layers exact (mixed page sizes in one KV group) and a calibration bundle
    "kakeya_k3v2_b0-29": ("kakeya", {"attention_backend": "KAKEYA"},
                          {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2", "KAKEYA_BOUNDARY_SKIP_LAYERS": "0,29"}),
    # experimental: GPU-planned decode steps captured as full CUDA graphs
    "kakeya_k4v3_graphs": ("kakeya", {"attention_backend": "KAKEYA", "enforce_eager": False},
                           {"KAKEYA_CUDA_GRAPHS": "1"}),
    "kakeya_k4v3_cal": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_CALIBRATION": ".gpudata/bundle"}),
}
for _p in ("k8v4", "4bit_nc", "k3v4_nc", "3bit_nc"):
    CONFIGS[f"turboquant_{_p}"] = ("turboquant", {"kv_cache_dtype": f"turboquant_{_p}"}, {})


def prep(a) -> int:
    from transformers import AutoTokenizer

    from kakeya_kv import data
    from kakeya_kv.cli import _windows
    tok = AutoTokenizer.from_pretrained(data.smollm2_dir())
    wins = _windows(tok, a.n, 2048)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump({"windows": [w.tolist() for w in wins]}, open(a.out, "w"))
    print(f"wrote {len(wins)} windows to {a.out}")
    return 0


def one(a) -> int:
    """Run one config in this process; print one RESULT json line."""
    family, kw, env = CONFIGS[a.config]
    os.environ.update(env)
    from vllm import LLM, SamplingParams
    d = json.load(open(a.windows))
    wins = d["windows"][:a.n]
    t0 = time.time()
    args = dict(model=MODEL, enforce_eager=a.eager, gpu_memory_utilization=a.gpu_util, max_model_len=4096,
                max_num_batched_tokens=a.chunk, max_num_seqs=8, enable_prefix_caching=False)
    llm = LLM(**{**args, **kw})     # a config may override (e.g. enforce_eager=False for CUDA graphs)
    t_load = time.time() - t0
    cc = llm.llm_engine.vllm_config.cache_config
    cap = (cc.num_gpu_blocks or 0) * cc.block_size
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    t0 = time.time()
    outs = llm.generate([{"prompt_token_ids": w} for w in wins], sp, use_tqdm=False)
    t_ppl = time.time() - t0
    win_nll = []
    for w, o in zip(wins, outs):
        h = len(w) // 2
        win_nll.append(-sum(o.prompt_logprobs[p][w[p]].logprob for p in range(h, len(w))) / (len(w) - h))
    # Greedy continuations of 8 prompts of 1000 tokens: prefill and generation cross 512-token seals.
    gen = llm.generate([{"prompt_token_ids": w[:a.gen_prompt]} for w in wins[:8]],
                       SamplingParams(max_tokens=a.gen_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
    res = {"name": a.config, "family": family, "capacity_tokens": cap, "block_size": cc.block_size,
           "ppl": math.exp(sum(win_nll) / len(win_nll)), "window_nll": win_nll,
           "greedy": [list(g.outputs[0].token_ids) for g in gen], "load_s": t_load, "ppl_s": t_ppl}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def run(a) -> int:
    rows = []
    for name in a.configs.split(","):
        cmd = [sys.executable, "-m", "kakeya_kv.vllm_eval", "one", "--config", name, "--windows", a.windows, "--n", str(a.n),
               "--chunk", str(a.chunk), "--gpu-util", str(a.gpu_util), "--gen-tokens", str(a.gen_tokens)]
        if a.eager:
            cmd.append("--eager")
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            tail = (p.stdout + p.stderr)[-3000:]
            print(f"[{name}] FAILED rc={p.returncode} ({time.time() - t0:.0f}s)\n{tail}", flush=True)
            rows.append({"name": name, "error": tail[-800:]})
            continue
        r = json.loads(line[0][7:])
        kv_log = [l for l in p.stderr.splitlines() if "Kakeya KV:" in l or "GPU KV cache size" in l]
        r["log"] = kv_log[-3:]
        rows.append(r)
        json.dump(rows, open(a.out + ".partial", "w"))
        print(f"[{name}] ppl {r['ppl']:.4f} capacity {r['capacity_tokens']} ({time.time() - t0:.0f}s)", flush=True)
    return finish(rows, a)


def merge(a) -> int:
    rows = []
    for f in a.inputs:
        rows.extend(json.load(open(f)))
    return finish(rows, a, gpu=a.gpu)


def finish(rows, a, gpu: str | None = None) -> int:
    import torch
    base = next((r for r in rows if r.get("name") == "flash_bf16" and "ppl" in r), None)
    for r in rows:
        if base and "ppl" in r:
            r["ratio_vs_bf16"] = r["capacity_tokens"] / base["capacity_tokens"]
            r["delta_ppl_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
            d = [x - y for x, y in zip(r["window_nll"], base["window_nll"])]
            m = sum(d) / len(d)
            sd = (sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1)) ** 0.5
            half = 1.96 * sd / math.sqrt(len(d))
            r["delta_ppl_pct_ci95"] = [100 * (math.exp(m - half) - 1), 100 * (math.exp(m + half) - 1)]
            first = [next((i for i, (x, y) in enumerate(zip(g, h)) if x != y), len(h))
                     for g, h in zip(r["greedy"], base["greedy"])]
            r["greedy_identical_prompts"] = sum(f == len(h) for f, h in zip(first, base["greedy"]))
            r["greedy_first_divergence"] = first
    out = {"gpu": gpu or torch.cuda.get_device_name(0), "model": "SmolLM2-135M-Instruct (gpu-kit bf16)",
           "windows": a.n, "window_tokens": 2048, "chunk": a.chunk, "gpu_memory_utilization": a.gpu_util,
           "configs": rows}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    json.dump(out, open(a.out, "w"), indent=1)
    md = markdown(out)
    open(os.path.splitext(a.out)[0] + ".md", "w").write(md)
    plot(out, os.path.splitext(a.out)[0] + ".png")
    print(md)
    return 0


def markdown(out: dict) -> str:
    lines = [f"# vLLM quality and capacity ({out['gpu']}, {out['model']})", "",
             f"{out['windows']} windows x {out['window_tokens']} tokens (Austen evaluation books, the HF harness's "
             f"windows), second halves scored via prompt_logprobs, prefill chunks of {out['chunk']} tokens, "
             f"gpu_memory_utilization {out['gpu_memory_utilization']}, enforce_eager. Capacity = KV tokens vLLM "
             "reports; ratio = capacity / FLASH_ATTN bf16 capacity; CI = 95 % over windows of the paired "
             "per-window NLL difference. Greedy: 8 prompts of 1000 tokens + 256 generated tokens, count of "
             "continuations identical to FLASH_ATTN.", "",
             "| config | family | capacity tokens | ratio | PPL | ΔPPL % | 95% CI | greedy identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(out["configs"], key=lambda r: -r.get("ratio_vs_bf16", 0)):
        if "ppl" not in r:
            lines.append(f"| {r['name']} | | FAILED | | | | | |")
            continue
        ci = r.get("delta_ppl_pct_ci95", [0, 0])
        lines.append(f"| {r['name']} | {r['family']} | {r['capacity_tokens']} | {r.get('ratio_vs_bf16', 0):.2f} | "
                     f"{r['ppl']:.4f} | {r.get('delta_ppl_pct', 0):+.2f} | [{ci[0]:+.2f}, {ci[1]:+.2f}] | "
                     f"{r.get('greedy_identical_prompts', '-')}/{len(r['greedy'])} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"kakeya": "tab:red", "turboquant": "tab:blue", "int4_per_token_head": "tab:green", "fp8": "tab:purple",
              "bf16": "black"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in out["configs"]:
        if "delta_ppl_pct" not in r:
            continue
        x, y, ci = r["ratio_vs_bf16"], r["delta_ppl_pct"], r["delta_ppl_pct_ci95"]
        ax.errorbar(x, y, yerr=[[y - ci[0]], [ci[1] - y]], fmt="o", color=colors.get(r["family"], "gray"), capsize=2)
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KV capacity vs FLASH_ATTN bf16 (tokens vLLM reports)")
    ax.set_ylabel("ΔPPL vs FLASH_ATTN bf16, % (95% CI)")
    ax.grid(alpha=0.3)
    ax.set_title(f"vLLM 0.26, {out['gpu']}: {out['windows']} windows, chunked prefill {out['chunk']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kakeya-kv eval --backend vllm")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prep")
    pp.add_argument("--out", default=".gpudata/windows.json")
    pp.add_argument("--n", type=int, default=32)
    pp.set_defaults(fn=prep)
    mg = sub.add_parser("merge", help="merge .partial row files of several calls into one result")
    mg.add_argument("inputs", nargs="+")
    mg.add_argument("--gpu", required=True)
    mg.add_argument("--n", type=int, default=32)
    mg.add_argument("--chunk", type=int, default=256)
    mg.add_argument("--gpu-util", type=float, default=0.3)
    mg.add_argument("--out", default="benchmarks/results/vllm_quality.json")
    mg.set_defaults(fn=merge)
    for name, fn in (("one", one), ("run", run)):
        s = sub.add_parser(name)
        s.add_argument("--windows", default=".gpudata/windows.json")
        s.add_argument("--n", type=int, default=32)
        s.add_argument("--chunk", type=int, default=256)
        s.add_argument("--gpu-util", type=float, default=0.3)
        s.add_argument("--gen-tokens", type=int, default=256)
        s.add_argument("--gen-prompt", type=int, default=1000)
        s.add_argument("--eager", action="store_true")
        s.set_defaults(fn=fn)
        if name == "one":
            s.add_argument("--config", required=True)
        else:
            s.add_argument("--configs", default="flash_bf16,kakeya_exact,kakeya_k4v3")
            s.add_argument("--out", default="benchmarks/results/vllm_quality.json")
            s.add_argument("--timeout", type=int, default=400)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
