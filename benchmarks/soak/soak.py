"""Soak (issue 7): N mixed requests through vLLM's OpenAI server with the KAKEYA backend, on 127.0.0.1 only.

    source .gpukit/setup.sh; source scripts/device_install.sh
    python benchmarks/soak/soak.py --out $OUT/soak.json --deadline-s 420

Mix: prompt lengths log-uniform 16 -> 16k tokens (token-id prompts, ~30 % start with one of 4 shared prefixes so the
prefix cache is hit, also by requests running at the same time), 1-128 new tokens with ignore_eos, ~15 % aborted by
the client (connection closed before the first token, or after k streamed tokens), `--concurrency` in flight.
Checks: no request fails or returns fewer tokens than asked; once idle, vLLM's KV usage is back to 0 and the engine
worker's allocated GPU memory (KAKEYA_MEMORY_LOG, read at an idle step after the warm-up and after the requests) did
not grow; nvidia-smi's growth (which includes the caching allocator's reserve) is reported beside it. Throughput per
100 completed requests is logged. SmolLM2's trained context is 8k, so 16k prompts run past it (max_position_embeddings
raised by --hf-overrides so the RoPE table covers them): the outputs are meaningless, the cache mechanics are what is
tested. Bounded: no request is sent after --deadline-s minus a reserve for the checks and shutdown.
Writes benchmarks/results/soak.json's schema {"gpu","requests","errors","aborted","kv_usage_end","mem_growth_mb"} +
details, from the start on: a placeholder at once, counts every 50 requests, the partial result on SIGINT/SIGTERM
(`complete: false`, `cut_short`: why, end-state fields None), the full result before the server is stopped.
"requests" counts requests actually sent and answered, never the planned number ("planned").
Server mode (--mode auto): vLLM's default CUDA graphs (KAKEYA_CUDA_GRAPHS auto: full graphs for pure-decode
steps), and --enforce-eager if that start or its warm-up fails (recorded as mode / graphs_start_failure).
Size (seed 0, computed): 1000 requests = 2.63 M prompt tokens (124 over 8k) + 63 k generated tokens, 145 planned
aborts. Session 8 (H200, eager after the graphs warm-up hit the RoPE-table assert fixed since): 1000 requests in
116 s, 0 errors, KV usage 0, nvidia-smi +798 MiB at the very end (flat for the first 900) - the reason the check now
reads the worker's allocated bytes (benchmarks/results/vllm_s8/soak/); the rerun with both fixes passed in graphs
mode (benchmarks/results/soak.json).
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_server import Server, gpu_memory_used_mb, gpu_name, request  # noqa: E402

MODEL = "/tmp/models/SmolLM2-135M-Instruct"
VOCAB_LO, VOCAB_HI = 100, 40000
# Pass criterion on the worker's allocated bytes at idle (KV pages and tail pool are preallocated, so only
# per-request leftovers can move it); the nvidia-smi fallback (no memory log) has the same limit.
MEM_GROWTH_LIMIT_MB = 16.0


@dataclass
class Req:
    idx: int
    prompt_len: int
    max_tokens: int
    prefix: int | None          # index of the shared prefix the prompt starts with
    abort: str | None           # None, "before_first_token", or "after_tokens"
    abort_after: int = 0        # streamed tokens read before closing ("after_tokens")
    seed: int = 0


def request_mix(n: int, seed: int = 0, min_len: int = 16, max_len: int = 16384, max_new: int = 128,
                abort_frac: float = 0.15, shared_frac: float = 0.3, n_prefixes: int = 4) -> list[Req]:
    """Deterministic request list; the first two requests are the extreme lengths so every run covers them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i < 2:
            length = (max_len, min_len)[i]
        else:
            length = int(round(math.exp(rng.uniform(math.log(min_len), math.log(max_len)))))
        new = rng.randint(1, max_new)
        prefix = rng.randrange(n_prefixes) if rng.random() < shared_frac else None
        abort, after = None, 0
        if i >= 2 and rng.random() < abort_frac:
            if new > 1 and rng.random() < 0.5:
                abort, after = "after_tokens", rng.randint(1, new - 1)
            else:
                abort = "before_first_token"
        out.append(Req(i, min(max(length, min_len), max_len), new, prefix, abort, after, rng.randrange(1 << 30)))
    return out


def shared_prefixes(seed: int, n: int = 4, max_len: int = 16384) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [[rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(min(1024 << k, max_len))] for k in range(n)]


def prompt_ids(r: Req, prefixes: list[list[int]]) -> list[int]:
    rng = random.Random(r.seed)
    head = prefixes[r.prefix][:r.prompt_len] if r.prefix is not None else []
    return head + [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(r.prompt_len - len(head))]


def send(port: int, model: str, r: Req, prefixes, timeout: float) -> dict:
    """One request; returns a result row (status ok / aborted / error)."""
    t0 = time.monotonic()
    body = {"model": model, "prompt": prompt_ids(r, prefixes), "max_tokens": r.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": r.abort == "after_tokens"}
    row = {"idx": r.idx, "prompt_len": r.prompt_len, "max_tokens": r.max_tokens, "abort": r.abort, "t0": t0}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        if r.abort == "before_first_token":
            return {**row, "status": "aborted", "t1": time.monotonic()}
        resp = conn.getresponse()
        if resp.status != 200:
            return {**row, "status": "error", "t1": time.monotonic(),
                    "error": f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"}
        if r.abort == "after_tokens":
            seen = 0
            while seen < r.abort_after:
                line = resp.readline()
                if not line:
                    return {**row, "status": "error", "t1": time.monotonic(),
                            "error": f"stream ended after {seen} of {r.abort_after} events"}
                if line.startswith(b"data: {"):
                    seen += 1
            return {**row, "status": "aborted", "t1": time.monotonic()}
        out = json.loads(resp.read())
        n = out.get("usage", {}).get("completion_tokens")
        if n != r.max_tokens:
            return {**row, "status": "error", "t1": time.monotonic(),
                    "error": f"{n} completion tokens, asked {r.max_tokens}"}
        return {**row, "status": "ok", "t1": time.monotonic(), "completion_tokens": n}
    except (OSError, ValueError, http.client.HTTPException) as e:
        return {**row, "status": "error", "t1": time.monotonic(), "error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()        # for an abort: the server sees the disconnect and aborts the request


def throughput_per_100(rows: list[dict], t_start: float) -> list[dict]:
    """Completed requests in completion order, in groups of 100: tokens (prompt + new) and requests per second."""
    done = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["t1"])
    out, t_prev = [], t_start
    for g in range(0, len(done) - len(done) % 100, 100):
        grp = done[g:g + 100]
        dt = max(grp[-1]["t1"] - t_prev, 1e-9)
        out.append({"completed": f"{g + 1}-{g + 100}", "tok_s": sum(r["prompt_len"] + r["completion_tokens"]
                                                                    for r in grp) / dt, "req_s": 100 / dt})
        t_prev = grp[-1]["t1"]
    return out


def summarize(rows: list[dict], planned: int, *, gpu: str, kv_usage_end: float | None, mem_base: float | None,
              mem_end: float | None, wall_s: float, t_start: float, alloc_base: dict | None = None,
              alloc_end: dict | None = None, **extra) -> dict:
    """mem_base/mem_end: GPU MiB in use (nvidia-smi) when idle before/after the requests; alloc_base/alloc_end: the
    engine worker's KAKEYA_MEMORY_LOG lines at those two idle points. The leak check (mem_growth_mb) uses torch's
    allocated bytes when the log has them: nvidia-smi's number also holds the caching allocator's reserve, which
    grows to the largest step seen and is never handed back (reported as gpu_used_growth_mb / reserved_growth_mb)."""
    errors = [r for r in rows if r["status"] == "error"]
    tput = throughput_per_100(rows, t_start)
    rates = [t["tok_s"] for t in tput[1:]]            # the first group includes the ramp-up
    used_growth = None if mem_base is None or mem_end is None else mem_end - mem_base
    if alloc_base and alloc_end:
        growth, basis = alloc_end["allocated_mb"] - alloc_base["allocated_mb"], "torch.cuda.memory_allocated"
        more = {"reserved_growth_mb": alloc_end["reserved_mb"] - alloc_base["reserved_mb"],
                "allocated_mb_base": alloc_base["allocated_mb"], "allocated_mb_end": alloc_end["allocated_mb"],
                "max_allocated_mb": alloc_end.get("max_allocated_mb")}
    else:
        growth, basis, more = used_growth, "nvidia-smi memory.used", {}
    res = {"gpu": gpu, "requests": len(rows), "errors": len(errors),
           "aborted": sum(r["status"] == "aborted" for r in rows), "kv_usage_end": kv_usage_end,
           "mem_growth_mb": growth, "mem_growth_basis": basis, "gpu_used_growth_mb": used_growth, **more,
           "planned": planned, "completed": sum(r["status"] == "ok" for r in rows),
           "not_sent_deadline": planned - len(rows), "wall_s": wall_s, "throughput_per_100": tput,
           "throughput_min_over_median": min(rates) / statistics.median(rates) if len(rates) >= 2 else None,
           "error_samples": [f"#{r['idx']} ({r['prompt_len']} tok): {r['error']}" for r in errors[:8]], **extra}
    res["passed"] = (res["errors"] == 0 and res["requests"] == planned and kv_usage_end == 0.0
                     and growth is not None and growth <= MEM_GROWTH_LIMIT_MB)
    return res


def read_memory_log(path: str, after: float) -> dict | None:
    """The newest KAKEYA_MEMORY_LOG line written after wall time `after` (None if there is none)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    for raw in reversed(lines):
        try:
            rec = json.loads(raw)
        except ValueError:          # a line being written right now
            continue
        return rec if rec.get("t", 0) > after else None
    return None


def one_token(srv: Server, model: str, token: int) -> None:
    """A 16-token prompt, 1 new token: one short step on an otherwise idle server."""
    request(srv.port, "POST", "/v1/completions", {"model": model, "prompt": [token] * 16, "max_tokens": 1},
            timeout=60)


def idle_memory(srv: Server, model: str, log_path: str) -> dict | None:
    """The worker's memory at an idle step: wait past the log's 1 s interval, run one tiny request (its first step
    is logged before it allocates anything), read that line."""
    time.sleep(1.2)
    t = time.time()
    one_token(srv, model, VOCAB_LO + 11)
    return read_memory_log(log_path, t)


def position_override(model: str, need: int) -> list[str]:
    """`--hf-overrides` raising max_position_embeddings to `need` where the model's config is shorter. vLLM sizes
    the RoPE cos/sin table by it: past it, eager mode reads outside the table silently and the compiled (CUDA
    graphs) model trips a device-side assert (session 8, SmolLM2's 8192 with 16k prompts)."""
    try:
        have = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return []
    if have is None or have >= need:
        return []
    return ["--hf-overrides", json.dumps({"max_position_embeddings": need})]


def settle(srv: Server, model: str, timeout_s: float = 60) -> dict:
    """Wait until nothing runs or waits, then finish a 1-token request: vLLM publishes scheduler stats (KV usage)
    only at the end of a step that produced output, so the last abort alone leaves the gauge stale."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        m = srv.metrics()
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            break
        time.sleep(1)
    one_token(srv, model, VOCAB_LO + 7)
    return srv.metrics()


class CutShort(BaseException):
    """Raised by a test's exit_fn in place of os._exit after a signal (the partial result is already written)."""


def write_result(path: Path, res: dict) -> None:
    """Atomic (tmp + rename; the tmp name is per thread): a kill mid-write leaves the previous complete file."""
    tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(path)


def partial_result(rows: list[dict], planned: int, *, gpu: str, reason: str, **extra) -> dict:
    """The issue's schema for a soak that did not finish: counts of what completed so far, the end-state fields
    (kv_usage_end, mem_growth_mb) None because they were not measured, and why."""
    done = list(rows)
    return {"gpu": gpu, "requests": len(done), "errors": sum(r["status"] == "error" for r in done),
            "aborted": sum(r["status"] == "aborted" for r in done), "kv_usage_end": None, "mem_growth_mb": None,
            "planned": planned, "completed": sum(r["status"] == "ok" for r in done), "complete": False,
            "cut_short": reason, "passed": False,
            "not_measured": {"kv_usage_end": reason, "mem_growth_mb": reason},
            "error_samples": [f"#{r['idx']} ({r['prompt_len']} tok): {r['error']}"
                              for r in done if r["status"] == "error"][:8], **extra}


def start_server(a, args: list[str], log_path: str, t_begin: float, warm_up, on_server=lambda srv: None,
                 env: dict | None = None):
    """Start `vllm serve` and warm it up: in --mode auto first with vLLM's default piecewise CUDA graphs (start
    bounded by --graphs-startup-s), then eager if that start or its warm-up fails. on_server(srv) sees each server before its start (a signal handler must be able to stop it).
    Returns (server, mode, why the graphs attempt failed or None)."""
    modes = {"graphs": ["graphs"], "eager": ["eager"], "auto": ["graphs", "eager"]}[a.mode]
    why = None
    for i, mode in enumerate(modes):
        left = a.deadline_s - a.reserve_s - (time.monotonic() - t_begin) - 30
        limit = min(a.graphs_startup_s if mode == "graphs" and i + 1 < len(modes) else a.startup_s, left)
        srv = Server(a.model, args + (["--enforce-eager"] if mode == "eager" else []),
                     env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", **(env or {})}, startup_s=max(limit, 1),
                     log_path=log_path if i == 0 else log_path.replace(".log", f".{mode}.log"))
        on_server(srv)
        try:
            srv.__enter__()
        except (RuntimeError, TimeoutError) as e:
            why = f"{mode} start failed: {type(e).__name__}: {e}"[-1500:]
            if i + 1 == len(modes):
                raise
        else:
            try:
                warm_up(srv)
                return srv, mode, why
            except (RuntimeError, OSError) as e:
                srv.stop()
                why = f"{mode} warm-up failed: {type(e).__name__}: {e}"[-1500:]
                if i + 1 == len(modes):
                    raise
        print(f"[soak] {why.splitlines()[0]}; retrying with --enforce-eager", flush=True)
    raise AssertionError("unreachable")


def main(argv=None, exit_fn=os._exit) -> int:
    """exit_fn ends the process after SIGINT/SIGTERM (os._exit: no wait for the request threads, whose locks a
    signal may have interrupted; tests pass a function that raises CutShort)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-s", type=float, default=420, help="no request is sent after this minus --reserve-s")
    ap.add_argument("--reserve-s", type=float, default=75)
    ap.add_argument("--startup-s", type=float, default=240)
    ap.add_argument("--mode", choices=("auto", "graphs", "eager"), default="auto",
                    help="graphs: vLLM's default CUDA graphs (full decode graphs with KAKEYA_CUDA_GRAPHS auto); "
                         "eager: --enforce-eager; auto: graphs, and "
                         "eager if the graphs start fails")
    ap.add_argument("--graphs-startup-s", type=float, default=150, help="--mode auto: limit of the graphs start")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    a = ap.parse_args(argv)
    t_begin = time.monotonic()
    name = "soak"
    args = ["--attention-backend", "KAKEYA", "--served-model-name", name, "--max-model-len", str(a.max_len + 256),
            "--max-num-seqs", str(a.concurrency), "--gpu-memory-utilization", "0.3", "--enable-prefix-caching",
            *position_override(a.model, a.max_len + 256), *a.server_arg]
    reqs = request_mix(a.requests, a.seed, max_len=a.max_len)
    prefixes = shared_prefixes(a.seed, max_len=a.max_len)
    gpu = gpu_name()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, lock = [], threading.Lock()
    state = {"phase": "server start-up", "final": False, "mode": None, "halt": False, "srv": None}
    mem_trace: list = []             # [requests answered, GPU MiB in use, worker allocated MiB] every 100 requests
    info = dict(concurrency=a.concurrency, max_len=a.max_len, server_args=args, mem_trace_mb=mem_trace)

    def snapshot(reason: str) -> dict:
        return partial_result(rows, len(reqs), gpu=gpu, reason=reason, phase=state["phase"],
                              total_s=time.monotonic() - t_begin, **{**info, "mode": state["mode"]})

    write_result(out, snapshot("not finished: the soak was still running when this file was written"))

    def on_signal(signum, frame):
        # Runs in the main thread wherever it was (possibly inside executor or lock internals): write, stop the
        # server's process group, leave without unwinding.
        state["halt"] = True            # worker threads neither send nor overwrite the file from now on
        if not state["final"]:          # a signal during shutdown must not replace the finished result
            write_result(out, snapshot(f"cut short by signal {signum} during {state['phase']}"))
        print(f"[soak] signal {signum} during {state['phase']}: result file written, stopping", flush=True)
        if state["srv"] is not None:
            state["srv"].stop(grace_s=10)   # within the suite job's 20 s between SIGINT and SIGKILL
        exit_fn(0 if state["final"] and json.loads(out.read_text()).get("passed") else 1)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def write_failure(e: Exception) -> None:
        if not state["final"] and not state.get("failure_written"):
            state["halt"] = state["failure_written"] = True
            fail = snapshot(f"failed during {state['phase']}")
            fail["failure"] = f"{type(e).__name__}: {e}"[-3000:]
            write_result(out, fail)

    res = None
    try:
        def warm_up(srv):
            """Not counted: the longest prompt and a full batch, so allocator pools reach their steady size."""
            state["phase"] = "warm-up"
            warm = [Req(-1 - i, n, 4, None, None, 0, 7 + i) for i, n in enumerate([a.max_len] + [512] * a.concurrency)]
            with ThreadPoolExecutor(a.concurrency) as ex:
                bad = [w for w in ex.map(lambda r: send(srv.port, name, r, prefixes, 300), warm) if w["status"] != "ok"]
            if bad:
                raise RuntimeError(f"warm-up failed: {bad[0]}")
            settle(srv, name)

        memlog = str(out.with_suffix(".memory.jsonl"))
        Path(memlog).unlink(missing_ok=True)
        srv, mode, graphs_failure = start_server(a, args, str(out.with_suffix(".server.log")), t_begin, warm_up,
                                                 on_server=lambda s_: state.update(srv=s_, phase="server start-up"),
                                                 env={"KAKEYA_MEMORY_LOG": memlog})
        state["mode"] = mode
        info.update(mode=mode, **({"graphs_start_failure": graphs_failure} if graphs_failure else {}))
        try:
            startup = time.monotonic() - t_begin
            alloc_base = idle_memory(srv, name, memlog)
            mem_base = gpu_memory_used_mb()
            info["mem_base_mb"] = mem_base
            stop_at = t_begin + a.deadline_s - a.reserve_s
            state["phase"] = "requests"

            def one(r: Req):
                if time.monotonic() > stop_at or state["halt"]:
                    return
                row = send(srv.port, name, r, prefixes, timeout=max(30.0, stop_at + 60 - time.monotonic()))
                with lock:
                    if state["halt"]:       # answered after a signal or a failure: not part of the result
                        return
                    rows.append(row)
                    n = len(rows)
                    if n % 50 == 0:         # a kill -9 still leaves counts at most 50 requests old
                        write_result(out, snapshot("not finished: the soak was still running when this file was "
                                                   "written"))
                if n % 100 == 0:
                    # Under load (activations included): a plateau here and a return to base at the end is no
                    # leak; a steady climb is one.
                    rec = read_memory_log(memlog, 0.0)
                    mem_trace.append([n, gpu_memory_used_mb(), rec and round(rec["allocated_mb"], 1)])
                    print(f"[soak] {n} done, {sum(x['status'] == 'error' for x in rows)} errors, "
                          f"{time.monotonic() - t_begin:.0f} s, GPU {mem_trace[-1][1]} MiB", flush=True)

            t_start = time.monotonic()
            ex = ThreadPoolExecutor(a.concurrency)
            try:
                list(ex.map(one, reqs))
            except BaseException:
                state["halt"] = True
                raise
            finally:                        # on a signal: do not wait for requests still in flight
                ex.shutdown(wait=False, cancel_futures=True)
            wall = time.monotonic() - t_start
            state["phase"] = "end-state checks"
            m = settle(srv, name)
            alloc_end = idle_memory(srv, name, memlog)
            res = summarize(list(rows), len(reqs), gpu=gpu, kv_usage_end=m.get("vllm:kv_cache_usage_perc"),
                            mem_base=mem_base, mem_end=gpu_memory_used_mb(), wall_s=wall, t_start=t_start,
                            alloc_base=alloc_base, alloc_end=alloc_end,
                            startup_and_warmup_s=startup, preemptions=m.get("vllm:num_preemptions_total"),
                            prefix_cache_hits=m.get("vllm:prefix_cache_hits_total"),
                            prefix_cache_queries=m.get("vllm:prefix_cache_queries_total"), complete=True,
                            cut_short=(None if len(rows) == len(reqs) else
                                       f"deadline: {len(reqs) - len(rows)} of {len(reqs)} planned requests not sent"),
                            **info)
            res["total_s"] = time.monotonic() - t_begin
            write_result(out, res)                         # before the server stop, which may take a while
            state["final"], state["phase"] = True, "server stop"
        except Exception as e:  # noqa: BLE001 - written before the server stop, which may take a while
            write_failure(e)
            raise
        finally:
            srv.stop()
            state["srv"] = None
    except CutShort:
        pass                                               # the handler wrote the partial file
    except Exception as e:  # noqa: BLE001 - the result file must say why the soak did not complete
        write_failure(e)
    finally:
        for s_, h in old.items():
            signal.signal(s_, h)
    if state["final"] and res is not None:
        res["total_s"] = time.monotonic() - t_begin
        write_result(out, res)
    final = json.loads(out.read_text())
    print(json.dumps({k: final.get(k) for k in ("gpu", "requests", "errors", "aborted", "kv_usage_end",
                                                "mem_growth_mb", "passed", "cut_short", "failure")}), flush=True)
    return 0 if final.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
