"""KAKEYA_PREFILL_VARIANT=candidate:scratch inside vLLM 0.26 (issue 3's prefill candidate, issue 4): prefill chunks
decode the sealed blocks they read once into a bf16 scratch, then run the exact-page kernel.

Checks, SmolLM2-135M (head_dim 64), in-process engines, 256-token prefill chunks over prompts of 600-1700 tokens:
1. greedy tokens of the scratch engines (our exact-page kernel; candidate:scratch_fa, vLLM's FlashAttention over the
   scratch pages) == the tuned prefill launch's (one near-tie allowed, as in the lifecycle part:
   bf16 pages vs in-register decode round differently);
2. with KAKEYA_SCRATCH_MIB=1 (2 pages of 3 KV heads at D 64) phases that read 2+ sealed blocks fall back to the tuned
   launch (counted in plan.STATS), the others keep the scratch, and the tokens still match;
3. the scratch is reserved before vLLM's memory profiling: the KV memory vLLM reports shrinks by the reservation
   (512 MiB, the default cap) against the tuned engine at the same gpu_memory_utilization, within 64 MiB.
    pytest -m gpu -p no:cacheprovider tests/test_vllm_scratch_gpu.py
"""
import random

import pytest

from tests.vllm_gpu_common import MODEL, Stepper, assert_same_tokens, copy_prompt, inproc_llm, record, require_vllm_gpu

pytestmark = pytest.mark.gpu
require_vllm_gpu()

COMMON = dict(model=MODEL, attention_backend="KAKEYA", enforce_eager=True, max_model_len=4096,
              max_num_batched_tokens=256, max_num_seqs=16, enable_prefix_caching=False, async_scheduling=False,
              gpu_memory_utilization=0.3, seed=0)
_rng = random.Random(3)
PROMPTS = {f"p{i}_{n}": copy_prompt(_rng, n) for i, n in enumerate((600, 1000, 1100, 1536, 1700))}
NEW = 64


def _kv_bytes(worker) -> int:
    return int(worker.available_kv_cache_memory_bytes)


def _run(env: dict) -> tuple[dict, int, int]:
    from kakeya_v1_3_ppl import plan
    before = plan.STATS["scratch_fallbacks"]
    with inproc_llm({"KAKEYA_FORMAT": "default", **env}, **COMMON) as llm:
        kv = llm.collective_rpc(_kv_bytes)[0]
        out = Stepper(llm).generate(PROMPTS, NEW)
        del llm
    # The backend caches kernel sets (and the scratch reservation) per engine until the next engine replaces them;
    # drop them now so the next engine's memory profiling starts from a clean device.
    import torch
    from kakeya_v1_3_ppl import backend
    backend._KERNELS.clear()
    torch.cuda.empty_cache()
    return out, kv, plan.STATS["scratch_fallbacks"] - before


@pytest.fixture(scope="module")
def engines():
    return {name: _run(env) for name, env in (
        ("tuned", {"KAKEYA_PREFILL_VARIANT": "tuned"}),
        ("scratch", {"KAKEYA_PREFILL_VARIANT": "candidate:scratch"}),
        ("scratch_fa", {"KAKEYA_PREFILL_VARIANT": "candidate:scratch_fa"}),
        ("scratch_1mib", {"KAKEYA_PREFILL_VARIANT": "candidate:scratch", "KAKEYA_SCRATCH_MIB": "1"}))}


def test_scratch_prefill_gives_the_tuned_tokens(engines):
    tuned, scratch = engines["tuned"][0], engines["scratch"][0]
    record("scratch_prefill_tokens", agree=sum(a == b for k in tuned for a, b in zip(scratch[k], tuned[k]))
           / (NEW * len(tuned)), fallbacks=engines["scratch"][2])
    assert engines["scratch"][2] == 0
    assert_same_tokens(scratch, tuned, "candidate:scratch vs tuned prefill")


def test_flash_scratch_prefill_gives_the_tuned_tokens(engines):
    """candidate:scratch_fa: vLLM's FlashAttention over the scratch pages (strided paged K / V views)."""
    tuned, fa = engines["tuned"][0], engines["scratch_fa"][0]
    record("scratch_fa_prefill_tokens", agree=sum(a == b for k in tuned for a, b in zip(fa[k], tuned[k]))
           / (NEW * len(tuned)))
    assert_same_tokens(fa, tuned, "candidate:scratch_fa vs tuned prefill")


def test_over_the_cap_phases_fall_back(engines):
    out, _, fallbacks = engines["scratch_1mib"]
    record("scratch_prefill_fallbacks", fallbacks=fallbacks)
    assert fallbacks > 0
    assert_same_tokens(out, engines["tuned"][0], "candidate:scratch at 1 MiB (fallbacks) vs tuned prefill")


def test_scratch_is_counted_before_the_kv_budget(engines):
    tuned, scratch = engines["tuned"][1], engines["scratch"][1]
    record("scratch_prefill_kv_bytes", tuned=tuned, scratch=scratch, diff_mib=(tuned - scratch) / 2**20)
    assert abs((tuned - scratch) / 2**20 - 512) < 64, (tuned, scratch)
