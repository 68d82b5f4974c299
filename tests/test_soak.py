"""CPU parts of the GPU soak and suite helpers: request mix, result summary, Prometheus parsing, server process-group
stop, and the head padding that makes SmolLM2 splittable for tensor parallel 2."""
import os
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


sys.path.insert(0, str(ROOT / "benchmarks" / "soak"))
soak = _load("soak", ROOT / "benchmarks" / "soak" / "soak.py")
vllm_server = sys.modules["vllm_server"]


def test_request_mix_is_deterministic_and_covers_the_range():
    a, b = soak.request_mix(1000, seed=3), soak.request_mix(1000, seed=3)
    assert a == b and a != soak.request_mix(1000, seed=4)
    lens = [r.prompt_len for r in a]
    assert (max(lens), min(lens)) == (16384, 16) and lens[:2] == [16384, 16]
    assert sum(n < 512 for n in lens) > 200 and sum(n > 4096 for n in lens) > 100     # log-uniform: both ends
    aborts = [r for r in a if r.abort]
    assert 100 < len(aborts) < 200
    assert {r.abort for r in aborts} == {"before_first_token", "after_tokens"}
    assert all(1 <= r.abort_after < r.max_tokens for r in aborts if r.abort == "after_tokens")
    assert all(1 <= r.max_tokens <= 128 for r in a) and 200 < sum(r.prefix is not None for r in a) < 400


def test_prompts_have_the_planned_length_and_share_prefixes():
    prefixes = soak.shared_prefixes(0)
    assert [len(p) for p in prefixes] == [1024, 2048, 4096, 8192]
    reqs = [r for r in soak.request_mix(300, seed=0) if r.prefix is not None]
    for r in reqs[:20]:
        ids = soak.prompt_ids(r, prefixes)
        assert len(ids) == r.prompt_len and ids == soak.prompt_ids(r, prefixes)
        n = min(r.prompt_len, len(prefixes[r.prefix]))
        assert ids[:n] == prefixes[r.prefix][:n]


def _row(i, status, t1, n=10, prompt=100, **kw):
    return {"idx": i, "status": status, "t1": t1, "prompt_len": prompt, "completion_tokens": n, "max_tokens": n, **kw}


def test_summary_counts_throughput_and_pass_criteria():
    rows = [_row(i, "ok", 1.0 + i * 0.01) for i in range(250)]
    rows += [_row(1000, "aborted", 5.0), _row(1001, "error", 5.0, error="HTTP 500: boom")]
    res = soak.summarize(rows, 260, gpu="X", kv_usage_end=0.0, mem_base=1000.0, mem_end=1010.0, wall_s=4.0,
                         t_start=1.0)
    assert (res["requests"], res["errors"], res["aborted"], res["completed"]) == (252, 1, 1, 250)
    assert res["not_sent_deadline"] == 8 and res["mem_growth_mb"] == 10.0
    assert [t["completed"] for t in res["throughput_per_100"]] == ["1-100", "101-200"]
    # group 2: 100 requests of 110 tokens between t=1.99 and t=2.99
    assert res["throughput_per_100"][1]["tok_s"] == pytest.approx(11000, rel=1e-6)
    assert res["error_samples"] == ["#1001 (100 tok): HTTP 500: boom"] and res["passed"] is False
    clean = [r for r in rows if r["status"] != "error"]
    ok = soak.summarize(clean, len(clean), gpu="X", kv_usage_end=0.0, mem_base=1.0, mem_end=2.0, wall_s=1,
                        t_start=1.0)
    assert ok["passed"] is True
    for bad in (dict(kv_usage_end=0.01), dict(mem_end=1.0 + soak.MEM_GROWTH_LIMIT_MB + 1), dict(mem_end=None)):
        args = {**dict(gpu="X", kv_usage_end=0.0, mem_base=1.0, mem_end=2.0, wall_s=1, t_start=1.0), **bad}
        assert soak.summarize(clean, len(clean), **args)["passed"] is False, bad


def test_prometheus_text_is_summed_over_labels():
    text = """# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="soak"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="soak"} 0.5
vllm:num_preemptions_total{engine="0",model_name="soak"} 3.0
vllm:request_success_total{finished_reason="stop",model_name="a b"} 2.0
"""
    m = vllm_server.parse_prometheus(text)
    assert m == {"vllm:kv_cache_usage_perc": 0.75, "vllm:num_preemptions_total": 3.0,
                 "vllm:request_success_total": 2.0}


def test_server_stop_kills_the_whole_process_group(tmp_path):
    """stop() must reach children (vLLM's engine core and workers), not only the process it started."""
    srv = vllm_server.Server("unused", log_path=str(tmp_path / "log"))
    child_pid = tmp_path / "child"
    srv.proc = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open({str(child_pid)!r}, "w").write(str(c.pid))
time.sleep(600)
"""], start_new_session=True)
    for _ in range(100):
        if child_pid.exists() and child_pid.read_text():
            break
        time.sleep(0.1)
    pid = int(child_pid.read_text())
    srv.stop(grace_s=5)
    import os
    assert srv.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(srv.proc.pid, 0)       # no process of the group is left
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_head_padding_keeps_the_model_function():
    """The padded checkpoint (zero heads appended, same GQA group) computes the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.vllm_gpu_common import pad_heads
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).float().eval()
    state, pcfg = pad_heads(model.state_dict(), cfg.to_dict(), 6, 2)
    assert (pcfg["num_attention_heads"], pcfg["num_key_value_heads"], pcfg["head_dim"]) == (6, 2, 16)
    padded = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in pcfg.items() if k in cfg.to_dict()})).float().eval()
    padded.load_state_dict(state)
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, padded(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="same GQA group"):
        pad_heads(model.state_dict(), cfg.to_dict(), 4, 2)


def test_same_tokens_allows_only_a_near_tie():
    from tests.vllm_gpu_common import Gen, assert_same_tokens

    def gen(toks, tops):
        g = Gen(toks)
        g.top = tops
        return g
    same = {7: -0.1, 8: -3.0}
    want = gen([1, 7, 5], [{1: -0.01}, same, {5: -0.1}])
    assert_same_tokens({"a": gen([1, 7, 5], want.top)}, {"a": want}, "equal")
    # A flip where both runs rank 7 and 9 within TIE_NATS: a near-tie, the rest is not compared.
    tie_w = gen([1, 7, 5], [{1: -0.01}, {7: -0.60, 9: -0.80}, {5: -0.1}])
    tie_g = gen([1, 9, 2], [{1: -0.01}, {9: -0.65, 7: -0.75}, {2: -0.1}])
    assert_same_tokens({"a": tie_g}, {"a": tie_w}, "near-tie")
    # The other run's token is far behind, or not among the top logprobs at all, or no logprobs: a failure.
    far = gen([1, 9, 5], [{1: -0.01}, {9: -0.05, 7: -4.0}, {5: -0.1}])
    with pytest.raises(AssertionError, match="by 3.95 nats"):
        assert_same_tokens({"a": far}, {"a": tie_w}, "far")
    absent = gen([1, 9, 5], [{1: -0.01}, {9: -0.05, 3: -4.0}, {5: -0.1}])
    with pytest.raises(AssertionError, match="lacks the other run's token 7"):
        assert_same_tokens({"a": absent}, {"a": tie_w}, "absent")
    with pytest.raises(AssertionError, match="no logprobs"):
        assert_same_tokens({"a": [1, 9, 5]}, {"a": [1, 7, 5]}, "plain")
    with pytest.raises(AssertionError, match="length differs"):
        assert_same_tokens({"a": gen([1, 7], want.top[:2])}, {"a": want}, "short")


def test_timeout_marker_interrupts_a_long_call():
    """conftest's SIGALRM timeout (the device has no pytest-timeout) fails a hung test instead of the whole job."""
    from tests.conftest import pytest_runtest_call

    class Item:
        nodeid = "t"

        def get_closest_marker(self, name):
            return pytest.mark.timeout_s(1).mark if name == "timeout_s" else None

    hook = pytest_runtest_call(Item())
    next(hook)
    with pytest.raises(TimeoutError, match="still running after 1 s"):
        time.sleep(3)
    with pytest.raises(StopIteration):
        next(hook)


# The fake worker's KAKEYA_MEMORY_LOG: path (from the server env), allocated MiB grows by leak_mb per completion.
_MEM = {"path": None, "leak_mb": 0.0, "n": 0}


class _FakeOpenAI:
    """A stand-in for vLLM's OpenAI server: completions (JSON or SSE stream), /metrics, /health; appends a
    memory-log line per completion like the backend's KAKEYA_MEMORY_LOG."""

    def __enter__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = (b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.0\n"
                        if self.path == "/metrics" else b"ok")
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n = len(req["prompt"])
                if _MEM["path"]:
                    _MEM["n"] += 1
                    mb = 500.0 + _MEM["leak_mb"] * _MEM["n"]
                    with open(_MEM["path"], "a") as f:
                        f.write(json.dumps({"t": time.time(), "allocated_mb": mb, "reserved_mb": mb + 100,
                                            "max_allocated_mb": mb + 50}) + "\n")
                if n == 13:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"engine dead")
                    return
                self.send_response(200)
                self.end_headers()
                if req.get("stream"):
                    for i in range(req["max_tokens"]):
                        self.wfile.write(b'data: {"choices": [{"text": "x"}]}\n\n')
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                got = req["max_tokens"] - (n == 17)          # a 17-token prompt comes back one token short
                self.wfile.write(json.dumps({"usage": {"completion_tokens": got}}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self.httpd.server_address[1]

    def __exit__(self, *exc):
        self.httpd.shutdown()


def test_client_classifies_ok_aborted_and_failed_requests():
    prefixes = soak.shared_prefixes(0)
    with _FakeOpenAI() as port:
        def go(n, max_tokens=8, abort=None, after=0):
            return soak.send(port, "m", soak.Req(0, n, max_tokens, None, abort, after, 1), prefixes, timeout=10)
        assert go(20)["status"] == "ok" and go(20)["completion_tokens"] == 8
        assert go(20, abort="after_tokens", after=3)["status"] == "aborted"
        assert go(20, abort="before_first_token")["status"] == "aborted"
        assert go(20, max_tokens=2, abort="after_tokens", after=5)["error"] == "stream ended after 2 of 5 events"
        assert go(13)["error"].startswith("HTTP 500: engine dead")
        assert go(17)["error"] == "7 completion tokens, asked 8"
        srv = vllm_server.Server("unused", port=port)
        assert soak.settle(srv, "m", timeout_s=5)["vllm:kv_cache_usage_perc"] == 0.0


class _FakeEngine:
    """Just enough of vLLM's in-process LLMEngine for Stepper: 256-token chunks, one token per decode step."""

    class _Req:
        def __init__(self, prompt, max_tokens):
            self.prompt, self.max_tokens, self.num_computed_tokens, self.out = prompt, max_tokens, 0, []

    def __init__(self):
        import types
        self.sched = types.SimpleNamespace(requests={}, kv_cache_manager=types.SimpleNamespace(usage=0.0))
        self.engine_core = types.SimpleNamespace(engine_core=types.SimpleNamespace(scheduler=self.sched))

    def add_request(self, rid, prompt, params):
        # As vLLM 0.26: the scheduler's key is the given id plus a random suffix, returned here; outputs and
        # abort_request use the given id.
        internal = f"{rid}-{len(self.sched.requests):08x}"
        self.sched.requests[internal] = self._Req(prompt["prompt_token_ids"], params.max_tokens)
        self.sched.requests[internal].external = rid
        return internal

    def abort_request(self, ids):
        for k in [k for k, r in self.sched.requests.items() if r.external in ids]:
            del self.sched.requests[k]

    def has_unfinished_requests(self):
        return bool(self.sched.requests)

    def step(self):
        import types
        outs = []
        for rid, r in list(self.sched.requests.items()):
            n = len(r.prompt) + len(r.out)
            r.num_computed_tokens = min(n, r.num_computed_tokens + 256) if r.num_computed_tokens < len(r.prompt) \
                else r.num_computed_tokens + 1
            if r.num_computed_tokens >= len(r.prompt):
                r.out.append(sum(r.prompt) % 97 + len(r.out))
            done = len(r.out) == r.max_tokens
            outs.append(types.SimpleNamespace(request_id=r.external, finished=done, num_cached_tokens=0,
                                              outputs=[types.SimpleNamespace(token_ids=list(r.out), logprobs=None)]))
            if done:
                del self.sched.requests[rid]
        return outs


def test_stepper_drives_an_engine_step_by_step(monkeypatch):
    import types

    from tests import vllm_gpu_common as g
    fake_vllm = types.SimpleNamespace(SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    eng = _FakeEngine()
    llm = types.SimpleNamespace(llm_engine=eng, reset_prefix_cache=lambda: True,
                                get_metrics=lambda: [types.SimpleNamespace(name="vllm:kv_cache_usage_perc", value=0.0)])
    s = g.Stepper(llm)
    prompts = {"a": [1] * 600, "b": [2] * 10}
    assert s.generate(prompts, 5) == s.alone(prompts, 5) == {"a": [600 % 97 + i for i in range(5)],
                                                             "b": [20 + i for i in range(5)]}
    rid = s.add([3] * 700, 9)
    assert s.internal[rid] != rid and s.request(rid) is s.sched.requests[s.internal[rid]]
    s.step_until(lambda: s.computed(rid) == 512)
    s.eng.abort_request([rid])
    assert s.request(rid) is None
    with pytest.raises(AssertionError, match="not in the scheduler"):
        s.computed(rid)
    assert s.kv_usage_when_idle() == (0.0, 0.0) and s.asked["q1"] == 5
    left = s.add([4] * 300, 9)
    s.step()
    assert s.abort_unfinished() == [rid, left] and not s.eng.has_unfinished_requests()
    with pytest.raises(AssertionError, match="not reached"):
        s.step_until(lambda: False, limit=3)
    s.release()
    assert s.llm is None and s.sched is None


def test_tie_gaps_report_each_runs_preference():
    from tests.vllm_gpu_common import Gen, tie_gaps
    w, g = Gen([1, 7]), Gen([1, 9])
    w.top = [{1: -0.01}, {7: -0.60, 9: -0.80}]
    g.top = [{1: -0.01}, {9: -0.65, 3: -0.75}]
    assert tie_gaps(g, w, 1) == {"got": None, "want": 0.2}     # 7 not in got's top: no gap for it
    assert tie_gaps([1, 9], w, 1) == {"got": None, "want": 0.2}


def test_gpu_name_from_nvidia_smi(tmp_path, monkeypatch):
    from kakeya_kv.subproc import gpu_name
    smi = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for lines, want in ((["NVIDIA H200"], "NVIDIA H200"), (["NVIDIA H200", "NVIDIA H200"], "2x NVIDIA H200"),
                        ([], "unknown")):
        smi.write_text("#!/bin/sh\n" + "".join(f"echo '{x}'\n" for x in lines))
        smi.chmod(0o755)
        assert gpu_name() == want
    smi.unlink()
    monkeypatch.setenv("PATH", str(tmp_path))            # no nvidia-smi at all
    assert gpu_name() == "unknown"


# ----------------------------------------------------------------------------- soak.main end to end (fake server)

class _FakeServerCM:
    """Stands in for vllm_server.Server around a _FakeOpenAI port; `fail_graphs` makes a start without
    --enforce-eager fail as a crashed `vllm serve` does."""
    started: list = []

    def __init__(self, port, fail_graphs=False, dead_graphs=False):
        self.port_, self.fail_graphs, self.dead_graphs = port, fail_graphs, dead_graphs

    def __call__(self, model, args, env=None, startup_s=0, log_path=None):
        _FakeServerCM.started.append((list(args), startup_s))
        _MEM["path"] = (env or {}).get("KAKEYA_MEMORY_LOG")
        graphs = "--enforce-eager" not in args
        # dead_graphs: the graphs server starts but answers nothing (a port nobody listens on)
        port = vllm_server.free_port() if self.dead_graphs and graphs else self.port_
        srv = vllm_server.Server(model, args, port=port, log_path=log_path)
        fail = self.fail_graphs and graphs

        live_port = port

        class CM:
            port = live_port

            def __enter__(self):
                if fail:
                    raise RuntimeError("vllm serve exited with 1:\ncompile failed")
                return self

            def stop(self, grace_s=30):
                pass

            def metrics(self):
                return srv.metrics()
        return CM()


def _soak_main(monkeypatch, tmp_path, port, *extra, fail_graphs=False, dead_graphs=False, leak_mb=0.0):
    _FakeServerCM.started = []
    _MEM.update(path=None, leak_mb=leak_mb, n=0)
    monkeypatch.setattr(soak, "Server", _FakeServerCM(port, fail_graphs, dead_graphs))
    monkeypatch.setattr(soak, "gpu_memory_used_mb", lambda: 1000.0)
    monkeypatch.setattr(soak, "gpu_name", lambda: "FakeGPU")
    out = tmp_path / "soak.json"
    def exit_fn(code):
        raise soak.CutShort(code)
    rc = soak.main(["--requests", "40", "--max-len", "64", "--concurrency", "4", "--out", str(out), *extra],
                   exit_fn=exit_fn)
    import json
    return rc, json.loads(out.read_text())


SCHEMA = ("gpu", "requests", "errors", "aborted", "kv_usage_end", "mem_growth_mb")


def test_soak_main_writes_the_schema_and_falls_back_to_eager(monkeypatch, tmp_path):
    with _FakeOpenAI() as port:
        rc, res = _soak_main(monkeypatch, tmp_path, port, "--requests", "120", fail_graphs=True)
    assert all(k in res for k in SCHEMA)
    # The fake fails 13-token prompts and shortens 17-token ones: errors, if any, are counted, never hidden.
    assert res["requests"] == 120 and res["planned"] == 120 and res["complete"] is True and res["cut_short"] is None
    assert res["mem_trace_mb"] == [[100, 1000.0, 500.0]] and res["mem_base_mb"] == 1000.0
    assert res["kv_usage_end"] == 0.0 and res["mem_growth_mb"] == 0.0 and res["passed"] is (res["errors"] == 0)
    assert res["mem_growth_basis"] == "torch.cuda.memory_allocated" and res["gpu_used_growth_mb"] == 0.0
    assert rc == (0 if res["passed"] else 1)
    assert res["mode"] == "eager" and "compile failed" in res["graphs_start_failure"]
    (first, first_limit), (second, _) = _FakeServerCM.started
    assert "--enforce-eager" not in first and "--enforce-eager" in second and first_limit <= 150


def test_soak_main_fails_on_a_growing_allocated_memory(monkeypatch, tmp_path):
    """nvidia-smi flat (1000 MiB throughout), but the worker's allocated bytes climb 0.5 MiB per request: a leak."""
    with _FakeOpenAI() as port:
        rc, res = _soak_main(monkeypatch, tmp_path, port, "--mode", "eager", leak_mb=0.5)
    assert res["requests"] == 40 and res["gpu_used_growth_mb"] == 0.0
    assert res["mem_growth_mb"] > soak.MEM_GROWTH_LIMIT_MB and res["passed"] is False and rc == 1
    assert res["reserved_growth_mb"] == res["mem_growth_mb"]


def test_position_override_only_where_the_model_is_shorter(tmp_path):
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 8192}')
    assert soak.position_override(str(tmp_path), 16640) == ["--hf-overrides", '{"max_position_embeddings": 16640}']
    assert soak.position_override(str(tmp_path), 8192) == []
    assert soak.position_override(str(tmp_path / "missing"), 16640) == []


def test_soak_main_records_what_was_sent_when_the_deadline_cuts_it(monkeypatch, tmp_path):
    with _FakeOpenAI() as port:
        # deadline - reserve < 0: the warm-up runs, no request is sent; the file says so and does not pass
        rc, res = _soak_main(monkeypatch, tmp_path, port, "--deadline-s", "60", "--reserve-s", "61", "--mode", "eager")
    assert rc == 1 and res["requests"] == 0 and res["planned"] == 40 and res["passed"] is False
    assert res["cut_short"].startswith("deadline: 40 of 40")


def test_soak_main_leaves_a_partial_file_when_signalled(monkeypatch, tmp_path):
    """The suite job's cap sends SIGINT: soak.json must hold the schema with what completed and why it stopped."""
    # 3 s: past the warm-up and the idle memory probe (1.2 s), so requests are running when the signal comes
    import signal
    import threading
    real_send = soak.send

    def slow_send(*a, **k):
        time.sleep(0.05)
        return real_send(*a, **k)
    monkeypatch.setattr(soak, "send", slow_send)
    with _FakeOpenAI() as port:
        timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        try:
            rc, res = _soak_main(monkeypatch, tmp_path, port, "--mode", "eager", "--requests", "3000")
        finally:
            timer.cancel()
    assert rc == 1 and all(k in res for k in SCHEMA)
    assert res["complete"] is False and res["passed"] is False and "signal 2" in res["cut_short"]
    assert 0 < res["requests"] < 3000 and res["planned"] == 3000
    assert res["kv_usage_end"] is None and "kv_usage_end" in res["not_measured"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # handlers restored


def test_soak_main_falls_back_to_eager_when_the_graphs_warm_up_fails(monkeypatch, tmp_path):
    with _FakeOpenAI() as port:
        rc, res = _soak_main(monkeypatch, tmp_path, port, dead_graphs=True)
    assert res["mode"] == "eager" and "graphs warm-up failed" in res["graphs_start_failure"]
    assert res["requests"] == 40 and res["complete"] is True


def test_soak_main_writes_the_failure_when_the_server_cannot_start(monkeypatch, tmp_path):
    with _FakeOpenAI() as port:
        rc, res = _soak_main(monkeypatch, tmp_path, port, "--mode", "graphs", fail_graphs=True)
    assert rc == 1 and all(k in res for k in SCHEMA) and res["requests"] == 0 and res["passed"] is False
    assert "compile failed" in res["failure"] and res["cut_short"] == "failed during server start-up"


_FAKE_SERVE = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
args = sys.argv[1:]
if os.environ.get("FAKE_FAIL_GRAPHS") and "--enforce-eager" not in args:
    sys.exit("fake vllm serve: graph capture failed")
port = int(args[args.index("--port") + 1])
if os.environ.get("FAKE_PID_FILE"):
    open(os.environ["FAKE_PID_FILE"], "a").write(f"{os.getpid()}\n")
delay = float(os.environ.get("FAKE_DELAY", "0"))

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        body = (b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.0\n"
                if self.path == "/metrics" else b"ok")
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(delay)
        self.send_response(200)
        self.end_headers()
        try:
            if req.get("stream"):
                for i in range(req["max_tokens"]):
                    self.wfile.write(b'data: {"choices": [{"text": "x"}]}\n\n')
                self.wfile.write(b"data: [DONE]\n\n")
            else:
                self.wfile.write(json.dumps({"usage": {"completion_tokens": req["max_tokens"]}}).encode())
        except OSError:
            pass

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _fake_vllm_tree(tmp_path):
    """A `vllm` package whose `python -m vllm.entrypoints.cli.main serve` is a tiny stand-in server."""
    pkg = tmp_path / "fakevllm" / "vllm" / "entrypoints" / "cli"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "main.py").write_text(_FAKE_SERVE)
    return tmp_path / "fakevllm"


def _soak_cli(tmp_path, env_extra, *args):
    env = {**os.environ, "PYTHONPATH": f"{_fake_vllm_tree(tmp_path)}:{ROOT}", **env_extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "soak" / "soak.py"), "--out",
                             str(tmp_path / "soak.json"), "--max-len", "64", "--concurrency", "4", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_soak_cli_end_to_end_with_a_stand_in_server(tmp_path):
    """The device path as the suite job runs it: real Server class, graphs start fails -> eager, SIGINT mid-run ->
    soak.json holds the partial schema and the stand-in server's process group is gone."""
    import json
    import signal
    pids = tmp_path / "server_pids"
    p = _soak_cli(tmp_path, {"FAKE_FAIL_GRAPHS": "1", "FAKE_DELAY": "0.05", "FAKE_PID_FILE": str(pids)},
                  "--requests", "5000")
    out = tmp_path / "soak.json"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if out.exists() and json.loads(out.read_text()).get("phase") == "requests":
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("soak never reached its request phase:\n" + p.communicate()[0][-3000:])
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=60)[0]
    res = json.loads(out.read_text())
    assert p.returncode == 1, log[-2000:]
    assert res["mode"] == "eager" and "graph capture failed" in res["graphs_start_failure"]
    assert res["complete"] is False and "signal 2" in res["cut_short"] and 0 < res["requests"] < 5000
    assert (tmp_path / "soak.server.eager.log").exists() and "result file written" in log
    server = int(pids.read_text().split()[-1])         # the eager stand-in, in its own session
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(server, signal.SIGKILL)
        pytest.fail("the signal handler left the server running")
