"""Serving benchmark (issue 6): the CPU-testable parts — workload, statistics, time-bounded
subprocesses, row schema, report, the streaming client against a fake server, and the
orchestrator end-to-end on a machine without vLLM (rows must come back with reasons)."""
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.serving import client, report, rows as R, runner, serve_bench, stats, workload
from benchmarks.serving.serve_bench import cli_flags, main as bench_main

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- workload

def test_decode_shape_keeps_prefix_whole_blocks_and_fits_context():
    s = workload.decode_shape(32768, 32)
    assert s.prefix == 32256 and s.prefix % 512 == 0
    assert s.prompt + s.gen <= 32768
    for bad in ((1000, 32), (512, 32), (8192, 1), (8192, 500)):
        with pytest.raises(ValueError):
            workload.decode_shape(*bad)
    with pytest.raises(ValueError):
        workload.decode_shape(8192, 32, unique=481)


def test_max_batch_and_contexts():
    assert workload.max_batch(700_000, 32768, 96) == 21
    assert workload.max_batch(10_000_000, 32768, 96) == 96
    assert workload.max_batch(20_000, 32768, 96) == 0
    # KAKEYA_TAIL_STORAGE=pages: each running request also holds its tail pages (5 x 512 tokens at k4v3, D=128)
    assert workload.max_batch(1_700_000, 32768, 96) == 51
    assert workload.max_batch(1_700_000, 32768, 96, extra_tokens=2560) == 48
    assert workload.usable_contexts([32768, 8192], 8192) == ([8192], [32768])


def test_shared_prefix_prompts_share_prefix_and_differ_in_suffix():
    prefix = workload.random_ids(random.Random(0), 1024, 50_000)
    ps = workload.shared_prefix_prompts(prefix, 20, 64, 50_000, seed=3)
    assert all(p[:1024] == prefix and len(p) == 1088 for p in ps)
    assert len({tuple(p[1024:]) for p in ps}) == 20
    assert all(workload.LOW_ID <= t < 50_000 - workload.LOW_ID for p in ps for t in p)
    assert ps == workload.shared_prefix_prompts(prefix, 20, 64, 50_000, seed=3)     # deterministic


def test_poisson_arrivals_rate_and_edge_cases():
    offs = workload.poisson_arrivals(4.0, 4000, seed=1)
    assert offs[0] == 0 and all(b >= a for a, b in zip(offs, offs[1:]))
    assert abs(len(offs) / offs[-1] - 4.0) < 0.3
    assert workload.poisson_arrivals(math.inf, 3, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        workload.poisson_arrivals(0, 3, 0)
    assert workload.sweep_prompt_count(4, 30, 16, 400) == 120
    assert workload.sweep_prompt_count(0.1, 30, 16, 400) == 16
    assert workload.sweep_prompt_count(100, 30, 16, 400) == 400


# ----------------------------------------------------------------------------- statistics

def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.normal(size=n)
        for q in (0, 10, 50, 90, 99, 100):
            assert stats.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def _step_log(batch, dt, n_decode, prefill_s=0.5, jitter=None):
    steps, t = [stats.Step(prefill_s, batch, batch)], prefill_s   # step 1: prefill + first token
    for i in range(n_decode):
        t += dt * (1 + (jitter[i] if jitter else 0))
        steps.append(stats.Step(t, batch, batch))
    steps.append(stats.Step(t + dt, batch // 2, batch // 2))       # stragglers finishing
    return steps


def test_decode_rate_is_batch_over_median_step():
    r = stats.decode_rate(_step_log(16, 0.02, 30), 16)
    assert r["tok_s"] == pytest.approx(16 / 0.02)
    assert r["step_ms_p50"] == pytest.approx(20)
    assert r["window_tok_s"] == pytest.approx(16 / 0.02)
    # One slow outlier step moves the mean, not the median.
    jit = [0.0] * 30
    jit[10] = 5.0
    r = stats.decode_rate(_step_log(16, 0.02, 30, jitter=jit), 16)
    assert r["tok_s"] == pytest.approx(800)
    assert r["window_tok_s"] < 700


def test_decode_rate_refuses_when_the_batch_never_ran_together():
    steps = [stats.Step(0.1 * i, 8, 8) for i in range(20)]           # only 8 of 16 ever active
    with pytest.raises(ValueError, match="max active requests seen 8"):
        stats.decode_rate(steps, 16)


def test_request_trace_ttft_tpot():
    t = stats.RequestTrace(sent=1.0, chunks=[(1.5, 1), (1.6, 1), (1.8, 2)])
    assert t.ttft() == pytest.approx(0.5)
    assert t.tpot() == pytest.approx(0.3 / 3)
    assert t.tokens == 4
    assert stats.RequestTrace(sent=0.0).ttft() is None


def test_summarize_rate_counts_only_complete_requests():
    good = [stats.RequestTrace(sent=0.0, chunks=[(0.1 * (i + 1), 1), (0.1 * (i + 1) + 0.05, 3)]) for i in range(9)]
    short = stats.RequestTrace(sent=0.0, chunks=[(0.2, 1)])
    err = stats.RequestTrace(sent=0.0, error="HTTP 500")
    s = stats.summarize_rate(2.0, good + [short, err], expected_tokens=4, wall_s=3.0)
    assert (s["completed"], s["failed"]) == (9, 2)
    assert s["ttft_p50_ms"] == pytest.approx(500)
    assert s["tpot_p50_ms"] == pytest.approx(50 / 3)
    assert "HTTP 500" in s["errors"] and any("got 1 of 4" in e for e in s["errors"])
    assert stats.summarize_rate(math.inf, [], 4, 1.0)["request_rate"] is None


# ----------------------------------------------------------------------------- time-bounded children

def test_deadline_with_fake_clock():
    now = [100.0]
    d = runner.Deadline(60, clock=lambda: now[0])
    assert d.budget(150, reserve_s=5) == 55
    now[0] = 150.0
    assert d.left() == 10 and d.budget(150, reserve_s=5) == 5
    now[0] = 170.0
    assert d.budget(150) < 0


def _py(code):
    return [sys.executable, "-c", code]


def test_run_child_result_partial_and_timeout(tmp_path):
    ok = runner.run_child(_py("from benchmarks.serving.runner import emit\n"
                              "emit('PARTIAL', {'a': 1}); emit('RESULT', {'a': 2})"), str(tmp_path / "ok.log"), 30,
                          cwd=str(ROOT))
    assert ok.rc == 0 and ok.final and ok.data == {"a": 2} and not ok.timed_out
    slow = runner.run_child(_py("from benchmarks.serving.runner import emit\nimport time\n"
                                "emit('PARTIAL', {'capacity_tokens': 5}); time.sleep(60)"),
                            str(tmp_path / "slow.log"), 2, cwd=str(ROOT), grace_s=2)
    assert slow.timed_out and slow.rc is None and not slow.final
    assert slow.data == {"capacity_tokens": 5}
    assert slow.wall_s < 15
    bad = runner.run_child(_py("raise RuntimeError('boom')"), str(tmp_path / "bad.log"), 30)
    assert bad.rc == 1 and bad.data == {} and "RuntimeError: boom" in bad.error_line()
    assert runner.run_child(_py("pass"), str(tmp_path / "no.log"), 0).timed_out


def test_run_child_kills_the_whole_process_group(tmp_path):
    """A grandchild (vLLM's engine core) must not survive its parent's timeout."""
    pidfile = tmp_path / "gc.pid"
    code = ("import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)")
    res = runner.run_child(_py(code), str(tmp_path / "g.log"), 3, grace_s=2)
    assert res.timed_out
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # a zombie still answers kill(0); its state in /proc says it is dead
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("grandchild survived")


def test_parse_vllm_log():
    text = ("INFO kv_cache_utils.py:1 GPU KV cache size: 1,930,592 tokens\n"
            "INFO Maximum concurrency for 32,768 tokens per request: 58.91x\n"
            "WARNING Kakeya KV: format kakeya k4v3, 119.00 B/token/head (4.30x vs bf16) on compressed layers, "
            "boundary bf16 layers none, calibration none (data-free), exact-tail pool 7000 MiB (max_num_seqs 96), "
            "KV capacity 8018432 tokens\n"
            "WARNING Kakeya KV: exact bf16 layers are served by vLLM's FlashAttention\n")    # a later, other line
    d = runner.parse_vllm_log(text + "(EngineCore pid=1) INFO [model_runner.py:305] Model loading took 22.16 GiB and "
                                     "1.759040 seconds\nINFO [gpu_worker.py:560] Available KV cache memory: 101.78 GiB\n")
    assert (d["log_model_load_gib"], d["log_kv_cache_gib"]) == (22.16, 101.78)
    assert d["log_kv_cache_tokens"] == 1930592
    assert d["log_max_concurrency"] == pytest.approx(58.91) and d["log_max_concurrency_tokens"] == 32768
    assert d["kakeya_tail_pool_mib"] == 7000 and d["kakeya_log"].startswith("format kakeya")
    assert runner.parse_vllm_log("nothing") == {}
    merged = runner.parse_vllm_log("INFO GPU KV cache size: 34,952 tokens, Maximum concurrency for 8,192 tokens per "
                                   "request: 4.27x")            # the one-line form of some vLLM versions
    assert (merged["log_kv_cache_tokens"], merged["log_max_concurrency"]) == (34952, 4.27)


# ----------------------------------------------------------------------------- rows and report

def test_parse_rows_and_refusal():
    assert R.parse_rows("main")[:2] == [("qwen3-8b-like", "flash_bf16"), ("qwen3-8b-like", "kakeya")]
    assert R.parse_rows("smollm2-135m:kakeya") == [("smollm2-135m", "kakeya")]
    for bad in ("nope", "qwen3-8b-like:nope", "nope:kakeya"):
        with pytest.raises(ValueError):
            R.parse_rows(bad)
    assert R.refusal("kakeya_v13") is None   # v13 is served since session 6 (kernels/v13_triton.py)
    assert R.refusal("kakeya") is None and R.refusal("fp8") is None
    for name in R.PLANS["main"]:
        assert name[0] in R.MODELS and name[1] in R.CONFIGS


def _row(config, **kw):
    data = {"capacity_tokens": 1000, "prefill_tok_s": 5000.0, "decode_tok_s_b16_32k": 400.0,
            "decode_tok_s_max_batch_32k": 500.0, "max_batch_32k": 21, "head_dim": 128, **kw}
    return R.assemble_row("qwen3-8b-like", config, 1, data, status="ok")


def test_assemble_row_gives_every_missing_field_a_reason():
    r = R.assemble_row("m", "kakeya", 1, {"capacity_tokens": 10, "not_measured": {"decode_tok_s_b16_32k": "no fit"}},
                       status="partial", reason="row time limit 150s reached during decode 32k")
    R.check_row(r)
    assert r["not_measured"]["decode_tok_s_b16_32k"] == "no fit"
    assert "row time limit" in r["not_measured"]["prefill_tok_s"]
    assert "sweep" in r["not_measured"]["tpot_p50_ms"]
    assert "capacity_tokens" not in r["not_measured"]
    r["prefill_tok_s"], r["not_measured"] = None, {}
    with pytest.raises(ValueError, match="without a reason"):
        R.check_row(r)
    r = _row("flash_bf16")
    r["capacity_tokens"] = 1.5
    with pytest.raises(ValueError):
        R.check_row(r)


def test_goals_and_markdown():
    rows = [_row("flash_bf16"),
            _row("kakeya", capacity_tokens=4200, decode_tok_s_b16_32k=200.0, decode_tok_s_max_batch_32k=1600.0,
                 max_batch_32k=90)]
    rows.append(R.assemble_row("qwen3-8b-like", "kakeya_v13", 1, {}, status="not_run",
                               reason="refused by the Kakeya backend: (a test reason)"))
    res = {"gpu": "1x TEST GPU", "settings": {"max_num_seqs": 96}, "rows": rows}
    out = report.add_ratios(rows)
    k = out[1]
    assert k["capacity_ratio"] == pytest.approx(4.2)
    assert k["goals"]["decode_b16_32k"].startswith("missed: 0.50x")
    assert k["goals"]["decode_max_batch_32k"].startswith("met: 3.20x")
    exp = report.expected_capacity_ratio(k)
    assert exp == pytest.approx(512 / 119)
    assert k["goals"]["capacity"].startswith("met within 5 %: 4.20x vs 4.30x expected (-2.4 %")   # 4.2 >= 0.95 * 4.30
    md = report.markdown(res)
    assert "1x TEST GPU" in md and "| qwen3-8b-like | kakeya | 1 | 4200 | 4.20 |" in md
    assert "kakeya_v13 (tp 1): capacity_tokens, decode_tok_s_b16_32k" in md and "refused by the Kakeya backend" in md
    assert "goals" not in out[2]                              # a refused row gets no verdicts
    assert "| qwen3-8b-like | kakeya | 1 | 90 | – | – | – | – |  |" in md      # concurrency table, nothing invented


def test_plot_only_with_data(tmp_path):
    assert not report.plot({"rows": [_row("flash_bf16")]}, str(tmp_path / "a.png"))
    assert report.plot({"gpu": "x", "rows": [_row("flash_bf16"), _row("kakeya", capacity_tokens=4000)]},
                       str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_merge_latency_picks_the_reference_rate():
    rows = [_row("flash_bf16"), _row("kakeya")]
    sweep = [{"model": "qwen3-8b-like", "config": "kakeya", "tp": 1, "sweep": [
        {"request_rate": 1.0, "completed": 10, "tpot_p50_ms": 30.0, "ttft_p50_ms": 200.0},
        {"request_rate": 4.0, "completed": 40, "tpot_p50_ms": 45.0, "ttft_p50_ms": 300.0}]},
        {"model": "qwen3-8b-like", "config": "flash_bf16", "tp": 1, "error": "server did not become healthy", "sweep": []}]
    out = R.merge_latency(rows, sweep, ref_rate=4.0)
    assert out[1]["tpot_p50_ms"] == 45.0 and out[1]["latency_request_rate"] == 4.0
    assert "tpot_p50_ms" not in out[1]["not_measured"]
    assert out[0]["tpot_p50_ms"] is None and "sweep failed" in out[0]["not_measured"]["tpot_p50_ms"]
    for r in out:
        R.check_row(r)


def test_cli_flags():
    assert cli_flags({"attention_backend": "KAKEYA", "enforce_eager": True, "kv_cache_dtype": "fp8"}) == [
        "--attention-backend", "KAKEYA", "--enforce-eager", "--kv-cache-dtype", "fp8"]
    assert cli_flags({"enforce_eager": False}) == []


# ----------------------------------------------------------------------------- streaming client

async def _fake_server(chunks, status=b"200 OK", delay=0.01):
    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        body = json.loads(await reader.readexactly(n))
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        events = chunks(body) if status.startswith(b"200") else [b'{"error": "bad"}']
        for ev in events:
            data = ev if ev.startswith(b"data:") else b"data: " + ev + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(delay)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _tokens_stream(body):
    out = [json.dumps({"choices": [{"index": 0, "text": "", "token_ids": [7] * (2 if i == 1 else 1)}]}).encode()
           for i in range(body["max_tokens"] - 1)]
    out.append(b"data: [DONE]\n\n")
    return out


def test_stream_completion_against_a_fake_server():
    async def go():
        srv = await _fake_server(_tokens_stream)
        port = srv.sockets[0].getsockname()[1]
        body = client.completion_body("bench", [1, 2, 3], 5)
        t = await client.stream_completion("127.0.0.1", port, body, 10)
        traces, wall = await client.run_load("127.0.0.1", port, [body] * 3, [0.0, 0.05, 0.1], 10)
        srv.close()
        return t, traces, wall
    t, traces, wall = asyncio.run(go())
    assert t.error is None and t.tokens == 5 and len(t.chunks) == 4
    assert t.ttft() > 0 and t.tpot() > 0
    assert [x.tokens for x in traces] == [5, 5, 5] and wall >= 0.1
    assert traces[2].sent - traces[0].sent >= 0.09          # open-loop arrival offsets respected
    s = stats.summarize_rate(30.0, traces, 5, wall)
    assert s["completed"] == 3 and s["tpot_p50_ms"] > 0


def test_stream_completion_reports_http_errors_and_timeouts():
    async def go():
        srv = await _fake_server(_tokens_stream, status=b"400 Bad Request")
        port = srv.sockets[0].getsockname()[1]
        bad = await client.stream_completion("127.0.0.1", port, client.completion_body("b", [1], 3), 10)
        srv.close()
        slow = await _fake_server(_tokens_stream, delay=1.0)
        port = slow.sockets[0].getsockname()[1]
        late = await client.stream_completion("127.0.0.1", port, client.completion_body("b", [1], 5), 0.5)
        slow.close()
        refused = await client.stream_completion("127.0.0.1", 1, client.completion_body("b", [1], 3), 5)
        return bad, late, refused
    bad, late, refused = asyncio.run(go())
    assert bad.error.startswith("HTTP 400")
    assert late.error.startswith("timeout")
    assert refused.error and refused.tokens == 0


# ----------------------------------------------------------------------------- orchestrator without vLLM

def test_run_without_vllm_writes_schema_rows_with_reasons(tmp_path, monkeypatch):
    """On this CPU machine every started row fails at `import vllm`; each must still be a schema row
    with a reason, and a row the backend refuses (v13 with full CUDA graphs) is refused before any start."""
    out = tmp_path / "serving.json"
    monkeypatch.setitem(R.CONFIGS, "kakeya_v13", ("kakeya", {"attention_backend": "KAKEYA"},
                                                  {"KAKEYA_FORMAT": "v13", "KAKEYA_CUDA_GRAPHS": "1"}))
    rc = bench_main(["run", "--rows", "qwen3-8b-like:flash_bf16,qwen3-8b-like:kakeya_v13", "--deadline-s", "120",
                     "--row-limit-s", "60", "--min-row-s", "1", "--log-dir", str(tmp_path / "logs"),
                     "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    flash, v13 = res["rows"]
    for r in res["rows"]:
        R.check_row(r)
    assert v13["status"] == "not_run" and "KAKEYA_CUDA_GRAPHS" in v13["not_measured"]["capacity_tokens"]
    if importlib_has_vllm():
        pytest.skip("vLLM installed here: the failure path is not exercised")
    assert flash["status"] == "partial"
    assert "vllm" in flash["not_measured"]["capacity_tokens"].lower()
    assert (tmp_path / "serving.md").exists()
    # A call deadline already spent: rows are not started, and say so.
    rc = bench_main(["run", "--rows", "qwen3-8b-like:flash_bf16", "--deadline-s", "0", "--out", str(out),
                     "--log-dir", str(tmp_path / "logs")])
    r = json.loads(out.read_text())["rows"][0]
    assert r["status"] == "not_run" and "call deadline" in r["not_measured"]["decode_tok_s_b16_32k"]


def importlib_has_vllm():
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------- the GPU child against a fake vLLM

class _FakeEngine:
    """Steps like vLLM's engine: first step prefills (one token per new request), then one token per
    request per step; reports prefix-cache hits in whole 512-token blocks of earlier prompts."""

    def __init__(self, capacity_tokens, block_size, step_s, cache, fail_add=False):
        import types
        self.vllm_config = types.SimpleNamespace(cache_config=types.SimpleNamespace(
            num_gpu_blocks=capacity_tokens // block_size, block_size=block_size))
        self.step_s, self.cache, self.fail_add, self.reqs = step_s, cache, fail_add, {}

    def hit(self, p):
        k = (len(p) // 512) * 512
        while k and tuple(p[:k]) not in self.cache["seen"]:
            k -= 512
        return k

    def remember(self, p):
        if self.cache["on"]:
            for k in range(512, len(p) + 1, 512):
                self.cache["seen"].add(tuple(p[:k]))

    def add_request(self, rid, prompt, sp):
        if self.fail_add:
            raise TypeError("add_request() got an unexpected argument")
        p = prompt["prompt_token_ids"]
        self.reqs[rid] = {"left": sp.max_tokens, "hit": self.hit(p), "prompt": True, "p": p}

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def step(self):
        import types
        time.sleep(self.step_s)
        outs = []
        for rid, r in list(self.reqs.items()):
            if r.pop("prompt", None) is not None:
                self.remember(self.reqs[rid]["p"])
            r["left"] -= 1
            outs.append(types.SimpleNamespace(request_id=rid, num_cached_tokens=r["hit"],
                                              outputs=[types.SimpleNamespace(token_ids=[7])]))
            if r["left"] == 0:
                del self.reqs[rid]
        return outs


def _fake_vllm(monkeypatch, **engine_kw):
    import types
    cache = {"on": engine_kw.pop("prefix_cache", True), "seen": set()}
    mod = types.ModuleType("vllm")
    sp_mod = types.ModuleType("vllm.sampling_params")

    class SamplingParams:
        def __init__(self, max_tokens, **kw):
            self.max_tokens = max_tokens

    class LLM:
        def __init__(self, **kw):
            self.kw = kw
            self.llm_engine = _FakeEngine(cache=cache, **engine_kw)

        def generate(self, prompts, sp, use_tqdm=False):
            fail, self.llm_engine.fail_add = self.llm_engine.fail_add, False
            for i, p in enumerate(prompts):
                self.llm_engine.add_request(f"g{i}", p, sp)
            while self.llm_engine.has_unfinished_requests():
                self.llm_engine.step()
            self.llm_engine.fail_add = fail

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    sp_mod.RequestOutputKind = types.SimpleNamespace(DELTA=2)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_mod)


def _child_row(capsys, *extra, config="flash_bf16"):
    assert bench_main(["one", "--model", "qwen3-8b-like", "--config", config, "--gen", "12",
                       "--prefill-reps", "2", *extra]) == 0     # a later --gen wins
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")]
    return json.loads(lines[-1][7:])


def test_child_measures_through_a_fake_engine(monkeypatch, capsys):
    _fake_vllm(monkeypatch, capacity_tokens=700_000, block_size=16, step_s=0.002)
    r = _child_row(capsys)
    assert r["capacity_tokens"] == 700_000 and r["max_batch_32k"] == 21 and r["max_batch_8k"] == 85
    assert r["max_batch_32k_ran"] == 21
    d = r["details"]["32k"]
    assert d["prefix_hit_tokens"] == 32256 and d["b16"]["prefix_cached_tokens_min"] == 32256
    assert d["b16"]["method"] == "engine step log" and d["b16"]["batch"] == 16
    # batch / median step: the fake's step is >= 2 ms, so the rate is at most batch / 2 ms
    assert 0 < r["decode_tok_s_b16_32k"] <= 16 / 0.002 * 1.01
    assert 0 < r["decode_tok_s_max_batch_32k"] <= 21 / 0.002 * 1.01
    assert r["prefill_tok_s"] > 0 and r["details"]["prefill"]["prompt_tokens"] == 8192
    assert not r["not_measured"]


def test_tail_page_rows_count_each_requests_tail_pages(monkeypatch, capsys):
    """KAKEYA_TAIL_STORAGE=pages: each running request holds T tail pages beyond its context (k4v3, head_dim 128:
    5 x 512 tokens), so the largest batch is what really fits, not capacity // context."""
    for k in ("KAKEYA_FORMAT", "KAKEYA_TAIL_STORAGE", "KAKEYA_CUDA_GRAPHS"):
        monkeypatch.setenv(k, "")        # the in-process child replaces KAKEYA_* with the row's; restored afterwards
    for k in [k for k in os.environ if k.startswith("KAKEYA_")]:
        monkeypatch.setenv(k, os.environ[k])
    _fake_vllm(monkeypatch, capacity_tokens=1_700_000, block_size=512, step_s=0.002)
    r = _child_row(capsys, "--contexts", "32768", config="kakeya_tailpages")
    assert r["tail_page_tokens_per_request"] == 2560
    assert r["max_batch_32k"] == 1_700_000 // (32768 + 2560) == 48
    monkeypatch.setenv("KAKEYA_TAIL_STORAGE", "pages")      # exported in the job's shell: must not leak into a row
    r = _child_row(capsys, "--contexts", "32768", config="kakeya")
    assert r["tail_page_tokens_per_request"] == 0 and r["max_batch_32k"] == 51


def test_child_falls_back_and_refuses_a_prefix_miss(monkeypatch, capsys):
    _fake_vllm(monkeypatch, capacity_tokens=400_000, block_size=16, step_s=0.01, fail_add=True)
    r = _child_row(capsys, "--contexts", "32768", "--gen", "40")      # 32 steps apart: clear of timing noise
    assert r["details"]["32k"]["max_batch"]["method"] == "differential LLM.generate"
    assert r["decode_tok_s_max_batch_32k"] > 0 and r["max_batch_32k"] == 12
    assert r["not_measured"]["decode_tok_s_b16_32k"].startswith("capacity 400000 tokens holds 12 requests")
    _fake_vllm(monkeypatch, capacity_tokens=700_000, block_size=16, step_s=0.001, prefix_cache=False)
    r = _child_row(capsys, "--contexts", "32768")
    assert "prefix cache hit 0 of 32256" in r["not_measured"]["decode_tok_s_b16_32k"]
    assert r.get("decode_tok_s_b16_32k") is None and r["prefill_tok_s"] > 0


def test_pick_rows_prefers_the_most_complete_call():
    a = R.assemble_row("m", "kakeya", 1, {}, status="not_run", reason="call deadline")
    b = R.assemble_row("m", "kakeya", 1, {"capacity_tokens": 5}, status="partial", reason="limit")
    c = R.assemble_row("m", "flash_bf16", 1, {"capacity_tokens": 3}, status="ok")
    d = R.assemble_row("m", "flash_bf16", 1, {}, status="not_run", reason="call deadline")
    out = R.pick_rows([a, c, b, d])
    assert [(r["config"], r["status"]) for r in out] == [("kakeya", "partial"), ("flash_bf16", "ok")]
    assert R.pick_rows([b, dict(b, capacity_tokens=6)])[0]["capacity_tokens"] == 6     # equal status: later call


# ----------------------------------------------------------------------------- the sweep against a fake `vllm serve`

_FAKE_SERVE = r'''
import asyncio, json, sys
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])

async def handle(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    line = head.split(b"\r\n")[0].decode()
    if line.startswith("GET /health"):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    else:
        n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        body = json.loads(await reader.readexactly(n))
        if not body.get("stream"):
            data = json.dumps({"choices": [{"text": "", "token_ids": [5] * body["max_tokens"]}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.002)
                ev = b"data: " + json.dumps({"choices": [{"text": "", "token_ids": [5]}]}).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            ev = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ev), ev))
    await writer.drain()
    writer.close()

async def main():
    print("GPU KV cache size: 1,234 tokens", flush=True)
    srv = await asyncio.start_server(handle, "127.0.0.1", port)
    async with srv:
        await srv.serve_forever()

asyncio.run(main())
'''


def test_sweep_against_a_fake_server(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "vllm" / "entrypoints" / "cli"
    pkg.mkdir(parents=True)
    for d in (pkg.parents[1], pkg.parent, pkg):
        (d / "__init__.py").write_text("")
    (pkg / "main.py").write_text(_FAKE_SERVE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake") + os.pathsep + str(ROOT))
    out = tmp_path / "sweep.json"
    assert bench_main(["sweep", "--rows", "qwen3-8b-like:flash_bf16", "--rates", "100,inf", "--context", "2048",
                       "--prefix-len", "1024", "--unique-len", "16", "--output-len", "5", "--duration-s", "0.05",
                       "--min-prompts", "4", "--max-prompts", "6", "--startup-s", "30", "--deadline-s", "200",
                       "--port", "18931", "--log-dir", str(tmp_path / "logs"), "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert "error" not in row, row.get("error")
    assert row["log_kv_cache_tokens"] == 1234 and row["input_tokens"] == 1040
    r100, rinf = row["sweep"]
    assert r100["request_rate"] == 100.0 and r100["num_requests"] == 5 and r100["completed"] == 5
    assert rinf["request_rate"] is None and rinf["num_requests"] == 6 and rinf["completed"] == 6
    assert r100["tpot_p50_ms"] > 0 and r100["ttft_p50_ms"] > 0
    # the server's process group is gone
    with pytest.raises(OSError):
        client.post_json("http://127.0.0.1:18931/v1/completions", {"max_tokens": 1}, 2)
    merged = R.merge_latency([_row("flash_bf16")], [row], ref_rate=None)[0]
    assert merged["tpot_p50_ms"] == r100["tpot_p50_ms"] and merged["latency_request_rate"] == 100.0
    R.check_row(merged)


# ----------------------------------------------------------------------------- pre-flight of the first GPU call

def test_wait_gpu_released_polls_until_memory_is_back():
    seen = iter([90_000.0, 40_000.0, 900.0])
    t = [0.0]
    r = runner.wait_gpu_released(500.0, used=lambda: next(seen), clock=lambda: t[0],
                                 sleep=lambda s: t.__setitem__(0, t[0] + s))
    assert r == {"gpu_mem_used_mb": 900.0, "gpu_mem_wait_s": 2.0, "gpu_mem_released": True}
    stuck = runner.wait_gpu_released(500.0, used=lambda: 90_000.0, timeout_s=5, clock=lambda: t[0],
                                     sleep=lambda s: t.__setitem__(0, t[0] + s))
    assert stuck["gpu_mem_released"] is False and stuck["gpu_mem_wait_s"] >= 5
    assert runner.wait_gpu_released(None, used=lambda: None)["gpu_mem_released"] is None   # no nvidia-smi


def test_gpu_memory_used_sums_the_visible_cards():
    import types
    ok = lambda *a, **k: types.SimpleNamespace(returncode=0, stdout="1200\n800\n")
    assert runner.gpu_memory_used_mb(run=ok) == 2000.0
    bad = lambda *a, **k: types.SimpleNamespace(returncode=9, stdout="")
    assert runner.gpu_memory_used_mb(run=bad) is None

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")
    assert runner.gpu_memory_used_mb(run=missing) is None


def test_v13_row_runs_at_8k_only_and_says_why():
    ctxs, skipped = R.row_contexts("kakeya_v13", [32768, 8192])
    assert ctxs == [8192] and set(skipped) == {"decode_tok_s_b16_32k", "decode_tok_s_max_batch_32k", "max_batch_32k"}
    assert R.row_contexts("kakeya", [32768, 8192]) == ([32768, 8192], {})
    assert R.row_contexts("kakeya_v13", [32768])[0] == []
    assert ("qwen3-8b-like", "kakeya_v13") in R.PLANS["main"] and ("qwen3-8b-like", "fp8") in R.PLANS["more"]


def test_plans_put_turboquant_last_and_rest_covers_what_session_8_did_not_measure():
    main = R.PLANS["main"]
    assert main[:2] == [("qwen3-8b-like", "flash_bf16"), ("qwen3-8b-like", "kakeya")]
    assert [c for _, c in main[-2:]] == ["turboquant_4bit_nc", "turboquant_3bit_nc"]
    assert not any(c.startswith("turboquant") for _, c in main[:-2])
    assert len(set(main)) == len(main) == 16
    measured = {("qwen3-8b-like", c) for c in ("flash_bf16", "kakeya", "fp8", "int4_per_token_head")}
    rest, tq = R.PLANS["rest"], R.PLANS["tq"]
    assert not set(rest) & (measured | set(tq)) and set(rest) | set(tq) | measured == set(main)
    assert set(R.PLANS["more"]) == set(main) - set(main[:2])
    for plan in ("rest", "tq"):
        assert f"{plan}" in open(ROOT / "benchmarks/serving/serving_job.sh").read().split("case $MODE in")[1]


def test_turboquant_row_needs_its_own_time(tmp_path):
    assert R.row_time("turboquant_3bit_nc", 240, 45) == (330.0, 240.0)
    assert R.row_time("kakeya", 240, 45) == (240, 45)
    out = tmp_path / "tq.json"
    assert bench_main(["run", "--rows", "qwen3-8b-like:turboquant_4bit_nc", "--deadline-s", "200", "--out", str(out),
                       "--log-dir", str(tmp_path / "logs")]) == 0
    r = json.loads(out.read_text())["rows"][0]
    assert r["status"] == "not_run"     # a machine with vLLM but no FA2 refuses it earlier, for its own reason
    assert "(< 240s)" in r["not_measured"]["capacity_tokens"] or "FlashAttention-2" in r["not_measured"]["capacity_tokens"]


def test_run_starts_the_v13_row_at_8k(tmp_path, monkeypatch):
    """v13 is served now: the row is started (here it fails at `import vllm`), with --contexts 8192, and its 32k
    fields carry the context-cap reason rather than the child's failure."""
    out = tmp_path / "serving.json"
    started = []
    real = serve_bench.run_child

    def spy(cmd, *a, **k):
        started.append(cmd)
        return real(cmd, *a, **k)
    monkeypatch.setattr(serve_bench, "run_child", spy)
    assert bench_main(["run", "--rows", "qwen3-8b-like:kakeya_v13", "--deadline-s", "120", "--row-limit-s", "60",
                       "--min-row-s", "1", "--log-dir", str(tmp_path / "logs"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    row = res["rows"][0]
    R.check_row(row)
    assert started and started[0][started[0].index("--contexts") + 1] == "8192"
    assert "8k only" in row["not_measured"]["decode_tok_s_b16_32k"]
    assert "after_row" in row and "gpu_mem_used_mb_before" in res
    if not importlib_has_vllm():
        assert row["status"] == "partial" and "vllm" in row["not_measured"]["decode_tok_s_b16_8k"].lower()


_FAKE_VLLM = r'''
"""Stand-in `vllm` for a CPU dry run of `serve_bench run`: LLM(...) -> an engine that steps (one token per
request per step, prefix hits in whole 512-token blocks), logs vLLM's start-up lines, honours FAKE_INIT_S."""
import os, sys, time, types
from enum import Enum


class RequestOutputKind(Enum):
    CUMULATIVE = 0
    DELTA = 1


class SamplingParams:
    def __init__(self, max_tokens, **kw):
        self.max_tokens = max_tokens


class _Engine:
    def __init__(self, kw):
        self.vllm_config = types.SimpleNamespace(cache_config=types.SimpleNamespace(
            num_gpu_blocks=700_000 // 16, block_size=16))
        self.seen, self.reqs = set(), {}

    def add_request(self, rid, prompt, sp):
        p = prompt["prompt_token_ids"]
        k = (len(p) // 512) * 512
        while k and tuple(p[:k]) not in self.seen:
            k -= 512
        for j in range(512, len(p) + 1, 512):
            self.seen.add(tuple(p[:j]))
        self.reqs[rid] = [sp.max_tokens, k]

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def step(self):
        time.sleep(0.001)
        outs = []
        for rid, r in list(self.reqs.items()):
            r[0] -= 1
            outs.append(types.SimpleNamespace(request_id=rid, num_cached_tokens=r[1],
                                              outputs=[types.SimpleNamespace(token_ids=[7])]))
            if r[0] == 0:
                del self.reqs[rid]
        return outs


class LLM:
    def __init__(self, **kw):
        time.sleep(float(os.environ.get("FAKE_INIT_S", "0")))
        print("INFO GPU KV cache size: 700,000 tokens", flush=True)
        print(f"INFO Maximum concurrency for {kw['max_model_len']:,} tokens per request: 21.36x", flush=True)
        self.llm_engine = _Engine(kw)

    def generate(self, prompts, sp, use_tqdm=False):
        for i, p in enumerate(prompts):
            self.llm_engine.add_request(f"g{i}", p, sp)
        while self.llm_engine.has_unfinished_requests():
            self.llm_engine.step()
'''


def test_run_end_to_end_with_a_stand_in_vllm(tmp_path):
    """`serve_bench run` as serving_job.sh calls it, children and all, against a stand-in vLLM: rows come back
    measured, the v13 row at 8k with the reason for 32k, and a row started too late for its time is cut with
    what it measured (the call still returns every row)."""
    pkg = tmp_path / "fakevllm" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(_FAKE_VLLM)
    (pkg / "sampling_params.py").write_text("from vllm import RequestOutputKind, SamplingParams\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fakevllm'}:{ROOT}"}
    out = tmp_path / "serving_main.json"
    cmd = [sys.executable, "-m", "benchmarks.serving.serve_bench", "run", "--rows",
           "qwen3-8b-like:flash_bf16,qwen3-8b-like:kakeya_v13", "--deadline-s", "170", "--min-row-s", "1",
           "--log-dir", str(tmp_path / "logs"), "--out", str(out)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    flash, v13 = res["rows"]
    for row in res["rows"]:
        R.check_row(row)
    assert flash["status"] == "ok" and flash["capacity_tokens"] == 700_000 and flash["log_kv_cache_tokens"] == 700_000
    assert flash["decode_tok_s_b16_32k"] > 0 and flash["max_batch_32k"] == 21 and flash["prefill_tok_s"] > 0
    assert v13["status"] == "ok" and v13["max_model_len"] == 8192 and v13["decode_tok_s_b16_8k"] > 0
    assert v13["decode_tok_s_b16_32k"] is None and "8k only" in v13["not_measured"]["decode_tok_s_b16_32k"]
    assert "| qwen3-8b-like | kakeya_v13 |" in r.stdout          # the table is printed at the end
    # A slow start-up leaves less than a measurement's minimum (15 s) of the row's time: the child skips the
    # measurements and ends in time; the row keeps its capacity and says why the rest is missing.
    env["FAKE_INIT_S"] = "3"
    cmd[cmd.index("--rows") + 1] = "qwen3-8b-like:flash_bf16"
    subprocess.run(cmd + ["--row-limit-s", "4", "--min-row-s", "1"], env=env, cwd=ROOT, timeout=200, check=True,
                   capture_output=True)
    row = json.loads(out.read_text())["rows"][0]
    assert row["status"] == "ok" and row["capacity_tokens"] == 700_000 and row["decode_tok_s_b16_32k"] is None
    assert "row time budget used up before decode 32k" in row["not_measured"]["decode_tok_s_b16_32k"]
    # A start-up longer than the row's limit: the child's process group is killed, the row says where.
    env["FAKE_INIT_S"] = "30"
    t0 = time.monotonic()
    subprocess.run(cmd + ["--row-limit-s", "3", "--min-row-s", "1"], env=env, cwd=ROOT, timeout=200, check=True,
                   capture_output=True)
    row = json.loads(out.read_text())["rows"][0]
    assert time.monotonic() - t0 < 25 and row["status"] == "partial" and row["capacity_tokens"] is None
    assert row["not_measured"]["capacity_tokens"] == "row time limit 3s reached during start-up"


def test_graphs_rows_are_judged_against_graphs_bf16():
    """A CUDA-graph Kakeya row's ratios come from flash_bf16_graphs, not from the eager bf16 row (H200, b16
    32k: eager bf16 430 tok/s in session 8, graphs bf16 1039 in session 9; the eager row flattered graphs rows)."""
    rows = [_row("flash_bf16", decode_tok_s_b16_32k=400.0), _row("flash_bf16_graphs", decode_tok_s_b16_32k=1000.0),
            _row("kakeya_graphs", decode_tok_s_b16_32k=500.0), _row("kakeya", decode_tok_s_b16_32k=500.0)]
    out = {r["config"]: r for r in report.add_ratios(rows)}
    assert out["kakeya_graphs"]["decode_tok_s_b16_32k_ratio"] == pytest.approx(0.5)
    assert out["kakeya"]["decode_tok_s_b16_32k_ratio"] == pytest.approx(1.25)
    assert out["kakeya_graphs"]["goals"]["decode_b16_32k"].startswith("missed: 0.50x")
    assert "goals" not in out["flash_bf16_graphs"]
