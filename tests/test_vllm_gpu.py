"""vLLM backend on the lent GPU (gpu-kit), through vLLM's usual engine process and async scheduling: registration and
pages, 200 requests with random aborts, prefix hits on sealed blocks, and `vllm serve --attention-backend KAKEYA`
answering an OpenAI chat request. Step-exact lifecycle tests: test_vllm_lifecycle.py; TP 2: test_vllm_tp.py.

Run there with ``pytest -m gpu tests/test_vllm_gpu.py`` after ``source .gpukit/setup.sh`` and
``source scripts/device_install.sh``. Skipped without CUDA or without vLLM. The server test and the rewritten
abort/prefix tests are NOT YET RUN on a GPU.
"""
import random
import sys
from pathlib import Path

import pytest

from tests.vllm_gpu_common import MODEL, Stepper, VOCAB_HI, VOCAB_LO, copy_prompt, record, require_vllm_gpu

pytestmark = pytest.mark.gpu
require_vllm_gpu()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "soak"))


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM
    return LLM(model=MODEL, attention_backend="KAKEYA", enforce_eager=True, gpu_memory_utilization=0.25,
               max_model_len=4096, max_num_batched_tokens=256, max_num_seqs=16, enable_prefix_caching=True,
               disable_log_stats=False)


def test_alias_resolves_to_custom_and_pages_are_512(llm):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    assert AttentionBackendEnum["KAKEYA"] is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == "kakeya_v1_3_ppl.backend.KakeyaBackend"
    cc = llm.llm_engine.vllm_config.cache_config
    assert cc.block_size == 512 and cc.num_gpu_blocks > 0


@pytest.mark.timeout_s(300)
def test_random_aborts_leave_no_kv_in_use(llm):
    s = Stepper(llm)
    rng = random.Random(0)
    live, aborted = set(), 0
    for i in range(200):
        n = rng.choice([16, 300, 511, 512, 513, 1100, 1500])
        live.add(s.add([rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)], rng.randint(1, 48)))
        if i % 10 == 9:           # let some progress happen between arrivals
            s.step()
            live -= set(s.out)
        if live and rng.random() < 0.3:   # abort at a random phase (waiting, prefill, mid-block, decode)
            victim = rng.choice(sorted(live))
            s.eng.abort_request([victim])
            live.discard(victim)
            aborted += 1
    while s.eng.has_unfinished_requests():
        s.step()
        live -= set(s.out)
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            s.eng.abort_request([victim])
            live.discard(victim)
            aborted += 1
    finished = len(s.out)
    gauge, _ = s.kv_usage_when_idle()
    record("random_aborts", aborted=aborted, finished=finished, kv_usage_end=gauge)
    assert aborted > 20 and finished > 20
    short = {r: len(s.tokens(r)) for r in s.out if len(s.tokens(r)) != s.asked[r]}
    assert not short, f"finished requests with fewer tokens than asked (ignore_eos): {short}"
    assert gauge == 0.0


def test_prefix_cache_hits_on_sealed_blocks(llm):
    s = Stepper(llm)
    rng = random.Random(1)
    for n, cached in ((1100, 1024), (1024, 512)):   # partial last block; whole prompt cached (last block recomputed)
        p = copy_prompt(rng, n)
        a = s.generate({"a": p}, 24)["a"]
        r = s.add(p, 24)
        s.drain()
        assert s.out[r].num_cached_tokens == cached
        assert s.tokens(r) == a


@pytest.mark.timeout_s(420)
def test_openai_server_answers_a_chat_request(tmp_path):
    from vllm_server import CHATML, Server, has_chat_template, request
    args = ["--attention-backend", "KAKEYA", "--served-model-name", "smollm2", "--enforce-eager",
            "--max-model-len", "4096", "--gpu-memory-utilization", "0.2", "--max-num-seqs", "8"]
    if not has_chat_template(MODEL):
        (tmp_path / "chatml.jinja").write_text(CHATML)
        args += ["--chat-template", str(tmp_path / "chatml.jinja")]
    with Server(MODEL, args, log_path=str(tmp_path / "serve.log"), startup_s=300) as srv:
        status, models = request(srv.port, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["smollm2"]
        status, out = request(srv.port, "POST", "/v1/chat/completions", {
            "model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0.0})
        assert status == 200, out
        text = out["choices"][0]["message"]["content"]
        record("openai_chat", answer=text, usage=out.get("usage"))
        assert isinstance(text, str) and text.strip() and out["usage"]["completion_tokens"] >= 1
        assert "Kakeya KV: format" in srv.log_tail(10**6)       # the backend's start-up line: it really served
