"""Decode ms/step in vLLM for Kakeya eager / piecewise CUDA graphs / full graphs (KAKEYA_CUDA_GRAPHS=1)
against FLASH_ATTN eager / graphs, with a torch.profiler top-kernels table: where a decode step goes.

    python -m benchmarks.vllm.decode_step run --context 32768 --batch 16 --out $OUT/decode_step.json
    python -m benchmarks.vllm.decode_step report --input decode_step.json      # .md again (CPU)

Same workload as the serving benchmark (benchmarks/serving: dummy-weight Qwen3-8B-like, shared prefix of
context-512 tokens from the prefix cache, unique 64-token suffix per request). One subprocess per variant
(fresh GPU memory), each bounded in time; the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
so the profiler sees the GPU work. "GPU busy" = profiled kernel time per step / wall ms per step
(kernels on several streams can overlap, so it is an estimate); a low value means host overhead
(eager launches, the Kakeya CPU planner) dominates. Not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.serving import rows as R
from benchmarks.serving.runner import Deadline, emit, gpu_name, parse_vllm_log, run_child, write_json

ROOT = Path(__file__).resolve().parents[2]

# variant: (serving config, LLM overrides, extra env)
VARIANTS = {
    "flash_eager": ("flash_bf16", {}, {}),
    "flash_graphs": ("flash_bf16", {"enforce_eager": False}, {}),
    "kakeya_eager": ("kakeya", {}, {}),
    "kakeya_piecewise": ("kakeya", {"enforce_eager": False}, {"KAKEYA_CUDA_GRAPHS": "0"}),
    "kakeya_full_graphs": ("kakeya", {"enforce_eager": False}, {"KAKEYA_CUDA_GRAPHS": "1"}),
}


def kernel_table(records: list[tuple[str, int, float]], steps: int, top: int = 15) -> dict:
    """records: (kernel name, calls, device µs) over `steps` profiled decode steps -> top kernels by time."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    total = sum(us for _, _, us in records)
    rows = sorted(records, key=lambda r: -r[2])[:top]
    return {"steps": steps, "device_ms_per_step": total / steps / 1e3, "kernels": [
        {"name": n[:120], "calls_per_step": c / steps, "us_per_step": us / steps,
         "share": us / total if total else None} for n, c, us in rows]}


def _profile_records(prof) -> list[tuple[str, int, float]]:
    """GPU kernel entries of a torch.profiler run (attribute names differ between torch versions)."""
    evs = list(prof.key_averages())

    def dev(e):
        v = getattr(e, "self_device_time_total", None)
        return v if v is not None else getattr(e, "self_cuda_time_total", 0)

    gpu = [e for e in evs if str(getattr(e, "device_type", "")).endswith("CUDA") and dev(e) > 0]
    if not gpu:      # no device_type on the averages: kernels are the entries with device time and no CPU time
        gpu = [e for e in evs if dev(e) > 0 and getattr(e, "self_cpu_time_total", 0) == 0]
    return [(e.key, e.count, float(dev(e))) for e in gpu]


def one(a) -> int:
    """One variant in this process (GPU)."""
    config, override, env = VARIANTS[a.variant]
    os.environ.update({**R.CONFIGS[config][2], **env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    from benchmarks.serving.engine import (StepAPIError, capacity_tokens, engine_run, make_llm, measure_decode,
                                           model_info, prefix_probe, timed_generate)
    from benchmarks.serving.workload import decode_shape, shared_prefix_prompts
    info = model_info(R.MODELS[a.model]["path"])
    shape = decode_shape(a.context, a.gen)
    out = {"variant": a.variant, "config": config, "model": a.model, "context": a.context, "batch": a.batch,
           "env": env, "overrides": override}
    if not override.get("enforce_eager", True):
        # Capture only the sizes this run uses: start-up time is what the device budget pays for.
        override = {**override, "compilation_config": {"cudagraph_capture_sizes": sorted({1, 2, 4, 8, a.batch})}}
    t0 = time.time()
    llm = make_llm(a.model, config, max_model_len=a.context, gpu_util=a.gpu_util, max_seqs=a.max_seqs,
                   batched_tokens=a.batched_tokens, **override)
    out["init_s"] = time.time() - t0
    out["capacity_tokens"] = capacity_tokens(llm)[0]
    emit("PARTIAL", out)
    prefix, det = prefix_probe(llm, shape, info["vocab"], 4321)
    out["prefix"] = det
    r = measure_decode(llm, prefix, shape, a.batch, info["vocab"], 77, "timed")
    # The differential fallback has no per-step intervals: its mean step time stands in for the median.
    out.update(ms_step_p50=r.get("step_ms_p50") or 1e3 * a.batch / r["tok_s"], ms_step_p90=r.get("step_ms_p90"),
               tok_s=r["tok_s"], method=r["method"], decode=r)
    emit("PARTIAL", out)

    import torch
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    first, n = 4, a.profile_steps                      # profile lock-step decode steps only

    def on_step(i):
        if i == first:
            prof.start()
        elif i == first + n:
            torch.cuda.synchronize()
            prof.stop()

    prompts = shared_prefix_prompts(prefix, a.batch, shape.unique, info["vocab"], 99)
    try:
        engine_run(llm, prompts, max(shape.gen, first + n + 2), "prof", on_step)
        out["profile"] = kernel_table(_profile_records(prof), n, a.top)
    except StepAPIError:        # no step hook: profile a whole generate pass (its prefill step included)
        prof.start()
        timed_generate(llm, prompts, shape.gen)
        torch.cuda.synchronize()
        prof.stop()
        out["profile"] = kernel_table(_profile_records(prof), shape.gen, a.top)
        out["profile"]["includes_prefill_step"] = True
    if out.get("ms_step_p50"):
        out["gpu_busy"] = out["profile"]["device_ms_per_step"] / out["ms_step_p50"]
    emit("RESULT", out)
    return 0


def markdown(res: dict) -> str:
    lines = [f"# Decode step in vLLM ({res.get('gpu', '')}): {res['model']}, context {res['context']}, "
             f"batch {res['batch']}", "",
             "Shared prefix from the prefix cache + unique 64-token suffix per request; ms/step = median interval "
             "between lock-step decode steps after a warm-up pass. GPU busy = profiled kernel time / wall time per "
             "step (estimate).", "",
             "| variant | ms/step p50 | p90 | tok/s | GPU busy | init s | method | status |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v, p="{:.2f}": "–" if v is None else p.format(v)   # noqa: E731
    for v in res["variants"]:
        lines.append(f"| {v['variant']} | {f(v.get('ms_step_p50'))} | {f(v.get('ms_step_p90'))} | "
                     f"{f(v.get('tok_s'), '{:.0f}')} | {f(v.get('gpu_busy'), '{:.0%}')} | {f(v.get('init_s'), '{:.0f}')} | "
                     f"{v.get('method', '')} | "
                     f"{v.get('status', '')}{': ' + v['reason'] if v.get('reason') else ''} |")
    for v in res["variants"]:
        p = v.get("profile")
        if not p:
            continue
        lines += ["", f"## {v['variant']}: top kernels ({p['device_ms_per_step']:.2f} device ms/step over "
                      f"{p['steps']} steps)", "", "| kernel | calls/step | µs/step | share |", "|---|---|---|---|"]
        for k in p["kernels"]:
            lines.append(f"| `{k['name']}` | {k['calls_per_step']:.1f} | {k['us_per_step']:.1f} | "
                         f"{f(k['share'], '{:.1%}')} |")
    return "\n".join(lines) + "\n"


def run(a) -> int:
    deadline = Deadline(a.deadline_s)
    res = {"gpu": gpu_name(), "model": a.model, "context": a.context, "batch": a.batch, "variants": []}
    os.makedirs(a.log_dir, exist_ok=True)
    for name in a.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        budget = deadline.budget(a.variant_limit_s, reserve_s=5)
        if budget < a.min_variant_s:
            res["variants"].append({"variant": name, "status": "not_run", "reason": f"call deadline ({budget:.0f}s left)"})
        else:
            cmd = [sys.executable, "-m", "benchmarks.vllm.decode_step", "one", "--variant", name, "--model", a.model,
                   "--context", str(a.context), "--batch", str(a.batch), "--gen", str(a.gen),
                   "--gpu-util", str(a.gpu_util), "--max-seqs", str(a.max_seqs),
                   "--batched-tokens", str(a.batched_tokens), "--profile-steps", str(a.profile_steps)]
            child = run_child(cmd, os.path.join(a.log_dir, f"decode_step__{name}.log"), budget, cwd=str(ROOT))
            v = {**child.data, **parse_vllm_log(child.log_text), "variant": name}
            if child.final and child.rc == 0:
                v["status"] = "ok"
            else:
                v["status"] = "partial"
                v["reason"] = (f"time limit {budget:.0f}s" if child.timed_out else f"rc={child.rc}: {child.error_line()}")
            res["variants"].append(v)
        write_json(a.out, res)
        open(os.path.splitext(a.out)[0] + ".md", "w").write(markdown(res))
        print(f"[{name}] {res['variants'][-1].get('status')} ms/step {res['variants'][-1].get('ms_step_p50')}",
              flush=True)
    return 0


def report(a) -> int:
    res = json.load(open(a.input))
    md = markdown(res)
    open(os.path.splitext(a.input)[0] + ".md", "w").write(md)
    print(md)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="decode_step")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("one", one), ("run", run)):
        s = sub.add_parser(name)
        s.add_argument("--model", default="qwen3-8b-like", choices=sorted(R.MODELS))
        s.add_argument("--context", type=int, default=32768)
        s.add_argument("--batch", type=int, default=16)
        s.add_argument("--gen", type=int, default=32)
        s.add_argument("--gpu-util", type=float, default=0.9)
        s.add_argument("--max-seqs", type=int, default=32)
        s.add_argument("--batched-tokens", type=int, default=16384)
        s.add_argument("--profile-steps", type=int, default=5)
        s.add_argument("--top", type=int, default=15)
        s.set_defaults(fn=fn)
        if name == "one":
            s.add_argument("--variant", required=True, choices=sorted(VARIANTS))
        else:
            s.add_argument("--variants", default=",".join(VARIANTS))
            s.add_argument("--deadline-s", type=float, default=500)
            s.add_argument("--variant-limit-s", type=float, default=150)
            s.add_argument("--min-variant-s", type=float, default=40)
            s.add_argument("--log-dir", default="/tmp/decode_step_logs")
            s.add_argument("--out", default="benchmarks/results/decode_step.json")
    r = sub.add_parser("report")
    r.add_argument("--input", required=True)
    r.set_defaults(fn=report)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
