"""Serving benchmark (issue 6): KV capacity, max concurrent long requests, decode and prefill
throughput, TPOT/TTFT through the OpenAI server, for vLLM's KV formats and Kakeya, same card.

    python -m benchmarks.serving.serve_bench run --rows main --deadline-s 480 --out $OUT/serving_main.json
    python -m benchmarks.serving.serve_bench sweep --rows qwen3-8b-like:flash_bf16,qwen3-8b-like:kakeya ...
    python -m benchmarks.serving.serve_bench report --inputs A.json B.json [--sweep S.json] --out serving.json

`run` starts one subprocess (`one`) per row, in priority order, each bounded by --row-limit-s and
by the call's --deadline-s; rows are written to --out as they complete, a row cut by a limit keeps
what it measured and says why the rest is missing. Device jobs: serving_job.sh. Not yet run on a GPU.
Method (also in serving.md): benchmarks/serving/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from . import rows as R
from .engine import (capacity_tokens, make_llm, measure_decode, model_info, prefix_probe, tail_page_tokens,
                     timed_generate)
from .runner import (Deadline, emit, gpu_memory_used_mb, gpu_name, kill_group, parse_vllm_log, run_child,
                     wait_gpu_released, write_json)
from .stats import median, summarize_rate
from .workload import (decode_shape, max_batch, poisson_arrivals, random_ids, shared_prefix_prompts,
                       sweep_prompt_count, usable_contexts)

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- child (GPU)

def one(a) -> int:
    """One row in this process (GPU): prints PARTIAL lines after each measurement and a RESULT line."""
    _, kw, env = R.CONFIGS[a.config]
    for k in [k for k in os.environ if k.startswith("KAKEYA_")]:
        del os.environ[k]        # a row is its config: nothing exported in the job's shell leaks into it
    os.environ.update(env)
    info = model_info(R.MODELS[a.model]["path"])
    stop_at = a.stop_at or float("inf")
    ctxs, too_long = usable_contexts([int(c) for c in a.contexts.split(",")], info["max_position"])
    row = {"model": a.model, "config": a.config, "tp": a.tp, **info, "max_num_seqs": a.max_seqs,
           "gpu_memory_utilization": a.gpu_util, "max_num_batched_tokens": a.batched_tokens,
           "mode": "eager" if kw.get("enforce_eager", True) else "compiled+cudagraphs", "not_measured": {}, "details": {}}
    nm = row["not_measured"]
    for c in too_long:
        for m in ("decode_tok_s_b16", "decode_tok_s_max_batch", "max_batch"):
            nm[R.field_name(m, c)] = f"model max_position_embeddings {info['max_position']} < context {c}"
    if not ctxs:
        raise SystemExit(f"no requested context fits {a.model} (max_position_embeddings {info['max_position']})")

    def progress(doing: str) -> bool:
        row["in_progress"] = doing
        emit("PARTIAL", row)
        return time.time() < stop_at - a.min_measure_s

    t0 = time.time()
    llm = make_llm(a.model, a.config, max_model_len=max(ctxs), gpu_util=a.gpu_util, max_seqs=a.max_seqs,
                   batched_tokens=a.batched_tokens, tp=a.tp)
    cap, block = capacity_tokens(llm)
    row.update(init_s=time.time() - t0, block_size=block, capacity_tokens=cap, max_model_len=max(ctxs),
               tail_page_tokens_per_request=tail_page_tokens(info["head_dim"]))
    vocab, seed = info["vocab"], 1234

    def measure(name: str, fields: list[str], fn) -> None:
        """Run one measurement unless the row's time is nearly up; any failure becomes its fields' reason."""
        if not progress(name):
            for f in fields:
                nm.setdefault(f, f"row time budget used up before {name}")
            return
        try:
            fn()
        except Exception as e:                      # the row goes on; the reason is recorded per field
            msg = f"{name} failed: {type(e).__name__}: {e}"[:300]
            row.setdefault("errors", []).append(msg)
            for f in fields:
                nm.setdefault(f, msg)

    def warmup():
        rng_prompt = random_ids(random.Random(seed), 2048, vocab)
        row["details"]["warmup_s"] = timed_generate(llm, [rng_prompt], 8)

    measure("warm-up", [], warmup)

    def decode_at(C: int):
        shape = decode_shape(C, a.gen)
        B_max = max_batch(row["capacity_tokens"], C, a.max_seqs, row["tail_page_tokens_per_request"])
        row[R.field_name("max_batch", C)] = B_max
        prefix, det = prefix_probe(llm, shape, vocab, seed + C)
        det["max_batch_from_capacity"] = B_max
        row["details"][f"{C // 1024}k"] = det
        for label, B in (("b16", 16), ("max_batch", B_max)):
            f = R.field_name(f"decode_tok_s_{label}", C)
            if B < 1 or (label == "b16" and B_max < 16):
                nm[f] = (f"capacity {row['capacity_tokens']} tokens holds {B_max} requests of {C} tokens"
                         + (" (< 16)" if label == "b16" else ""))
                continue
            if label == "max_batch" and B == 16 and "b16" in det:
                det["max_batch"] = det["b16"]
                row[f] = row[R.field_name("decode_tok_s_b16", C)]
                continue
            if not progress(f"{f} (batch {B})"):
                nm[f] = f"row time budget used up before {f}"
                continue
            try:
                r = measure_decode(llm, prefix, shape, B, vocab, seed + 7 * B + C, f"t{label}{C}")
                det[label] = r
                row[f] = r["tok_s"]
                if label == "max_batch":
                    row[R.field_name("max_batch", C) + "_ran"] = r.get("max_active")
            except Exception as e:
                nm[f] = f"{type(e).__name__}: {e}"[:300]

    def prefill():
        n = min(a.prefill_tokens, max(ctxs) - 16)
        rng = random.Random(seed + 99)
        times = [timed_generate(llm, [random_ids(rng, n, vocab)], 1) for _ in range(a.prefill_reps + 1)]
        row["details"]["prefill"] = {"prompt_tokens": n, "batch": 1, "times_s": times, "first_dropped": True}
        row["prefill_tok_s"] = n / median(times[1:])

    # Priority order: the longest context first (the claim), then prefill, then the shorter contexts.
    ordered = sorted(ctxs, reverse=True)
    measure(f"decode {ordered[0] // 1024}k", [R.field_name(m, ordered[0]) for m in
                                            ("decode_tok_s_b16", "decode_tok_s_max_batch", "max_batch")],
            lambda: decode_at(ordered[0]))
    measure("prefill", ["prefill_tok_s"], prefill)
    for C in ordered[1:]:
        measure(f"decode {C // 1024}k", [R.field_name(m, C) for m in
                                       ("decode_tok_s_b16", "decode_tok_s_max_batch", "max_batch")],
                lambda C=C: decode_at(C))
    row.pop("in_progress", None)
    row["row_s"] = time.time() - t0
    emit("RESULT", row)
    return 0


# ----------------------------------------------------------------------------- orchestration (no CUDA here)

def preflight(config: str) -> str | None:
    """Reasons known before starting vLLM: a Kakeya refusal, TurboQuant without the FA2 extension."""
    why = R.refusal(config)
    if why:
        return why
    if config.startswith("turboquant"):
        spec = importlib.util.find_spec("vllm")
        if spec is not None and spec.origin:
            fa = Path(spec.origin).parent / "vllm_flash_attn"
            if not any(fa.glob("_vllm_fa2_C*.so")):
                return "vLLM's TurboQuant needs FlashAttention-2: the gpu-kit was built without --with-fa2"
    return None


def _settings(a) -> dict:
    return {"gpu_memory_utilization": a.gpu_util, "max_num_seqs": a.max_seqs, "max_num_batched_tokens":
            a.batched_tokens, "contexts": a.contexts, "decode_gen_tokens": a.gen, "tp": a.tp}


def _child_reason(res, budget: float) -> str:
    doing = res.data.get("in_progress", "start-up")
    if res.timed_out:
        return f"row time limit {budget:.0f}s reached during {doing}"
    return f"child exited rc={res.rc} during {doing}: {res.error_line()}"


def run(a) -> int:
    from .report import markdown
    deadline = Deadline(a.deadline_s)
    res = {"gpu": gpu_name(), "settings": _settings(a), "plan": a.rows, "rows": []}
    os.makedirs(a.log_dir, exist_ok=True)
    mem_base = gpu_memory_used_mb()             # before any row: what "released" means between rows
    res["gpu_mem_used_mb_before"] = mem_base
    for model, config in R.parse_rows(a.rows):
        t0 = time.time()
        why = preflight(config)
        ctxs, ctx_skipped = R.row_contexts(config, [int(c) for c in a.contexts.split(",")])
        limit_s, min_s = R.row_time(config, a.row_limit_s, a.min_row_s)
        budget = deadline.budget(limit_s, reserve_s=a.reserve_s)
        if why is None and not ctxs:
            why = next(iter(ctx_skipped.values()))
        if why is None and budget < min_s:
            why = f"call deadline: {max(budget, 0):.0f}s left for the row (< {min_s:.0f}s)"
        if why:
            row = R.assemble_row(model, config, a.tp, {}, status="not_run", reason=why, skipped=ctx_skipped)
        else:
            cmd = [sys.executable, "-m", "benchmarks.serving.serve_bench", "one", "--model", model, "--config", config,
                   "--tp", str(a.tp), "--contexts", ",".join(map(str, ctxs)), "--gen", str(a.gen),
                   "--gpu-util", str(a.gpu_util), "--max-seqs", str(a.max_seqs), "--batched-tokens",
                   str(a.batched_tokens), "--stop-at", str(time.time() + budget)]
            log = os.path.join(a.log_dir, f"{model}__{config}__tp{a.tp}.log")
            child = run_child(cmd, log, budget, cwd=str(ROOT))
            data = {**child.data, **parse_vllm_log(child.log_text)}
            ok = child.final and child.rc == 0
            row = R.assemble_row(model, config, a.tp, data, status="ok" if ok else "partial",
                                 reason=None if ok else _child_reason(child, budget), skipped=ctx_skipped)
            row["after_row"] = wait_gpu_released(mem_base, timeout_s=min(30.0, max(deadline.left(), 0)))
        row["gpu"] = res["gpu"]
        row["wall_s"] = round(time.time() - t0, 1)
        res["rows"].append(row)
        res["elapsed_s"] = round(a.deadline_s - deadline.left(), 1)
        write_json(a.out, res)
        open(os.path.splitext(a.out)[0] + ".md", "w").write(markdown(res))
        print(f"[{model} / {config}] {row['status']} in {row['wall_s']}s: capacity {row['capacity_tokens']} "
              f"b16@32k {row['decode_tok_s_b16_32k']} max@32k {row['decode_tok_s_max_batch_32k']} "
              f"(batch {row['max_batch_32k']}) b16@8k {row.get('decode_tok_s_b16_8k')} prefill {row['prefill_tok_s']}",
              flush=True)
    print(markdown(res), flush=True)            # the call's table in the device output's tail
    return 0


# ----------------------------------------------------------------------------- request-rate sweep

def cli_flags(kw: dict) -> list[str]:
    """LLM(**kw) keyword arguments of a config -> `vllm serve` flags."""
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                out.append(flag)
        else:
            out += [flag, str(v)]
    return out


def sweep_one(model: str, config: str, a, deadline: Deadline) -> dict:
    from . import client
    _, kw, env = R.CONFIGS[config]
    spec, rates = R.MODELS[model], [float(r) for r in a.rates.split(",")]
    info = model_info(spec["path"])
    kw = {"enforce_eager": True, **kw}
    port = a.port
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", spec["path"], "--served-model-name", "bench",
           "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--enable-prefix-caching",
           "--gpu-memory-utilization", str(a.gpu_util), "--max-model-len", str(a.context), "--max-num-seqs",
           str(a.max_seqs), "--max-num-batched-tokens", str(a.batched_tokens), "--tensor-parallel-size", str(a.tp),
           "--seed", "0"] + (["--load-format", "dummy"] if spec["dummy"] else []) + cli_flags(kw)
    out = {"model": model, "config": config, "tp": a.tp, "input_tokens": None, "output_tokens": a.output_len,
           "sweep": []}
    why = preflight(config)
    if why:
        out["error"] = why
        return out
    log = open(os.path.join(a.log_dir, f"serve__{model}__{config}__tp{a.tp}.log"), "w")
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True,
                           cwd=str(ROOT))
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        if not client.wait_healthy(base + "/health", min(a.startup_s, deadline.left() - 30),
                                   alive=lambda: srv.poll() is None):
            out["error"] = "server did not become healthy: " + open(log.name, errors="replace").read()[-400:]
            return out
        out["startup_s"] = time.time() - t0
        out.update(parse_vllm_log(open(log.name, errors="replace").read()))
        prefix = random_ids(random.Random(5), a.prefix_len, info["vocab"])
        out["input_tokens"] = a.prefix_len + a.unique_len
        client.post_json(base + "/v1/completions", client.completion_body("bench", prefix, 1, stream=False),
                         max(deadline.left() - 30, 10))
        # Warm-up (kernel JIT, first-use allocations): a few concurrent requests, not recorded.
        warm = shared_prefix_prompts(prefix, 4, a.unique_len, info["vocab"], seed=99)
        asyncio.run(client.run_load("127.0.0.1", port, [client.completion_body("bench", w, 8) for w in warm],
                                    [0.0] * 4, a.request_timeout_s))
        for i, rate in enumerate(rates):
            n = sweep_prompt_count(rate, a.duration_s, a.min_prompts, a.max_prompts)
            if deadline.left() < a.duration_s + 60:
                out["sweep"].append({"request_rate": rate, "skipped": "call deadline"})
                continue
            prompts = shared_prefix_prompts(prefix, n, a.unique_len, info["vocab"], seed=100 + i)
            bodies = [client.completion_body("bench", p, a.output_len) for p in prompts]
            offs = poisson_arrivals(rate, n, seed=200 + i)
            # An overloaded rate must not run past the call: requests still open then count as failed.
            timeout = min(a.request_timeout_s, deadline.left() - offs[-1] - 20)
            traces, wall = asyncio.run(client.run_load("127.0.0.1", port, bodies, offs, timeout))
            out["sweep"].append(summarize_rate(rate, traces, a.output_len, wall))
            print(f"[{model} / {config}] rate {rate}: {out['sweep'][-1]}", flush=True)
    finally:
        kill_group(srv, 15)
        srv.wait()
        log.close()
    return out


def sweep(a) -> int:
    if a.prefix_len % 512 or a.prefix_len + a.unique_len + a.output_len > a.context:
        raise SystemExit(f"--prefix-len {a.prefix_len} must be whole 512-token blocks and prefix + unique + output "
                         f"must fit --context {a.context}")
    deadline = Deadline(a.deadline_s)
    os.makedirs(a.log_dir, exist_ok=True)
    res = {"gpu": gpu_name(), "settings": {"rates": a.rates, "prefix_tokens": a.prefix_len,
                                            "unique_tokens": a.unique_len, "output_tokens": a.output_len,
                                            "duration_s": a.duration_s, "max_num_seqs": a.max_seqs,
                                            "gpu_memory_utilization": a.gpu_util, "tp": a.tp}, "rows": []}
    for model, config in R.parse_rows(a.rows):
        if deadline.left() < a.startup_s / 2:
            res["rows"].append({"model": model, "config": config, "tp": a.tp, "error": "call deadline", "sweep": []})
        else:
            res["rows"].append(sweep_one(model, config, a, deadline))
        write_json(a.out, res)
    return 0


# ----------------------------------------------------------------------------- report

def report(a) -> int:
    from .report import markdown, plot
    rows, gpus = [], []
    for f in a.inputs:
        d = json.load(open(f))
        gpus.append(d.get("gpu", "unknown"))
        for r in d["rows"]:
            rows.append({**r, "gpu": r.get("gpu", d.get("gpu"))})
    rows = R.pick_rows(rows)
    if a.sweep:
        s = json.load(open(a.sweep))
        rows = R.merge_latency(rows, s["rows"], a.ref_rate)
    for r in rows:
        R.check_row(r)
    res = {"gpu": " + ".join(sorted(set(gpus))), "settings": json.load(open(a.inputs[0])).get("settings", {}),
           "rows": rows}
    kernels = None
    if a.kernels:
        kernels = json.load(open(a.kernels))
        res["kernels_input"] = a.kernels           # provenance of the cause models in the .md
    write_json(a.out, res)
    base = os.path.splitext(a.out)[0]
    open(base + ".md", "w").write(markdown(res, kernels, a.kernels or "kernels.json"))
    plot(res, base + ".png")
    print(open(base + ".md").read())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="serve_bench")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s):
        s.add_argument("--tp", type=int, default=1)
        s.add_argument("--gpu-util", type=float, default=0.9)
        s.add_argument("--max-seqs", type=int, default=96,
                       help="same for every row; covers every config's largest 32k batch on an H200 "
                            "(the Kakeya exact-tail pool scales with it)")
        s.add_argument("--batched-tokens", type=int, default=16384)

    o = sub.add_parser("one", help="one row in this process (GPU)")
    common(o)
    o.add_argument("--model", required=True, choices=sorted(R.MODELS))
    o.add_argument("--config", required=True, choices=sorted(R.CONFIGS))
    o.add_argument("--contexts", default="32768,8192")
    o.add_argument("--gen", type=int, default=32, help="decode tokens per request in the timed pass")
    o.add_argument("--prefill-tokens", type=int, default=8192)
    o.add_argument("--prefill-reps", type=int, default=3)
    o.add_argument("--stop-at", type=float, default=0.0, help="wall-clock time (epoch s) the row must end by")
    o.add_argument("--min-measure-s", type=float, default=15.0, help="skip a measurement with less time left")
    o.set_defaults(fn=one)

    r = sub.add_parser("run", help="rows in priority order, one subprocess each, bounded in time")
    common(r)
    r.add_argument("--rows", default="main", help=f"plan ({', '.join(R.PLANS)}) or model:config,...")
    r.add_argument("--contexts", default="32768,8192")
    r.add_argument("--gen", type=int, default=32)
    r.add_argument("--deadline-s", type=float, default=480, help="the whole call's budget for rows")
    r.add_argument("--row-limit-s", type=float, default=240,
                   help="an 8B dummy init + the Kakeya kernels' first Triton compiles at head_dim 128 (never "
                        "timed) come before the first measurement")
    r.add_argument("--min-row-s", type=float, default=45, help="do not start a row with less time than this "
                   "(rows.ROW_TIME overrides both limits for TurboQuant)")
    r.add_argument("--reserve-s", type=float, default=5)
    r.add_argument("--log-dir", default="/tmp/serving_logs")
    r.add_argument("--out", default="benchmarks/results/serving.json")
    r.set_defaults(fn=run)

    s = sub.add_parser("sweep", help="TPOT/TTFT for a request-rate sweep through the OpenAI server")
    common(s)
    # vLLM's default execution mode (CUDA graphs; KAKEYA_CUDA_GRAPHS auto): what `vllm serve` users get. Session
    # 15's eager rows measured host-planned Kakeya decode (TPOT 29.5 vs 20.5 ms at 1 req/s), not the default.
    s.add_argument("--rows", default="qwen3-8b-like:flash_bf16_graphs,qwen3-8b-like:kakeya_graphs")
    s.add_argument("--rates", default="1,4,16")
    s.add_argument("--context", type=int, default=8192, help="--max-model-len of the server")
    s.add_argument("--prefix-len", type=int, default=7680, help="shared prefix (prefix cache), whole 512-blocks")
    s.add_argument("--unique-len", type=int, default=256)
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--duration-s", type=float, default=30, help="arrivals per rate: about this many seconds")
    s.add_argument("--min-prompts", type=int, default=16)
    s.add_argument("--max-prompts", type=int, default=400)
    s.add_argument("--request-timeout-s", type=float, default=180)
    s.add_argument("--startup-s", type=float, default=240)
    s.add_argument("--deadline-s", type=float, default=500)
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--log-dir", default="/tmp/serving_logs")
    s.add_argument("--out", default="benchmarks/results/serving_sweep.json")
    s.set_defaults(fn=sweep)

    rp = sub.add_parser("report", help="merge call outputs -> serving.json/.md/.png (CPU)")
    rp.add_argument("--inputs", nargs="+", required=True)
    rp.add_argument("--sweep", default=None)
    rp.add_argument("--ref-rate", type=float, default=None, help="sweep rate for tpot/ttft_p50_ms (default: lowest)")
    rp.add_argument("--kernels", default=None, help="kernel bench result (kernels.json, same card) for the decode and "
                    "prefill cause models in the .md's Causes section")
    rp.add_argument("--out", default="benchmarks/results/serving.json")
    rp.set_defaults(fn=report)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
