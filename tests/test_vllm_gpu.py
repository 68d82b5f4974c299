"""vLLM backend on the lent GPU (gpu-kit): registration, pages, request lifecycle.

Run there with ``pytest -m gpu tests/test_vllm_gpu.py`` after ``source .gpukit/setup.sh`` and
``source scripts/device_install.sh``. Skipped without CUDA or without vLLM.
"""
import os
import random

import pytest
import torch

pytestmark = pytest.mark.gpu
MODEL = "/tmp/models/SmolLM2-135M-Instruct"

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
vllm = pytest.importorskip("vllm")
if not os.path.isdir(MODEL):
    pytest.skip(f"needs the gpu-kit model at {MODEL}", allow_module_level=True)


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM
    return LLM(model=MODEL, attention_backend="KAKEYA", enforce_eager=True, gpu_memory_utilization=0.25,
               max_model_len=4096, max_num_batched_tokens=256, max_num_seqs=16, enable_prefix_caching=True,
               disable_log_stats=False)


def _kv_usage(engine) -> float:
    for m in engine.get_metrics():
        if m.name == "vllm:kv_cache_usage_perc":
            return float(m.value)
    raise AssertionError("vllm:kv_cache_usage_perc not reported")


def test_alias_resolves_to_custom_and_pages_are_512(llm):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    assert AttentionBackendEnum["KAKEYA"] is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == "kakeya_v1_3_ppl.backend.KakeyaBackend"
    cc = llm.llm_engine.vllm_config.cache_config
    assert cc.block_size == 512 and cc.num_gpu_blocks > 0


def test_random_aborts_leave_no_kv_in_use(llm):
    from vllm import SamplingParams
    eng = llm.llm_engine
    rng = random.Random(0)
    vocab = 40000
    live, aborted, finished = set(), 0, 0
    for i in range(200):
        n = rng.choice([16, 300, 511, 512, 513, 1100, 1500])
        prompt = {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(n)]}
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 48), temperature=0.0,
                                                        ignore_eos=True))
        live.add(f"r{i}")
        if i % 10 == 9:           # let some progress happen between arrivals
            for out in eng.step():
                if out.finished:
                    live.discard(out.request_id)
                    finished += 1
        if live and rng.random() < 0.3:   # abort at a random phase (prefill, mid-block, decode)
            victim = rng.choice(sorted(live))
            eng.abort_request([victim])
            live.discard(victim)
            aborted += 1
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
            if live and rng.random() < 0.05:
                victim = rng.choice(sorted(live))
                eng.abort_request([victim])
                live.discard(victim)
                aborted += 1
    eng.step()   # one idle step so the scheduler stats reflect the final state
    assert aborted > 20 and finished > 20
    assert _kv_usage(eng) == 0.0


def test_prefix_cache_hits_on_sealed_blocks(llm):
    from vllm import SamplingParams
    rng = random.Random(1)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for n in (1100, 1024):   # partial last block; whole prompt cached (last token recomputed)
        prompt = {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(n)]}
        a = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        b = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert len(a) == len(b) == 24
        if n == 1100:   # the hit covers sealed blocks only; the tail is recomputed exactly as before
            assert list(a) == list(b)
