"""KAKEYA_PREFILL_VARIANT=candidate:scratch inside vLLM 0.26 (issue 3's prefill candidate, issue 4): prefill chunks
decode the sealed blocks they read once into a bf16 scratch, then run the exact-page kernel.

Checks, SmolLM2-135M (head_dim 64), in-process engines, 256-token prefill chunks over prompts of 600-1700 tokens:
1. greedy tokens of the scratch engines (our exact-page kernel; candidate:scratch_fa, vLLM's FlashAttention over the
   scratch pages) == the tuned prefill launch's (one near-tie allowed, as in the lifecycle part:
   bf16 pages vs in-register decode round differently);
2. with KAKEYA_SCRATCH_MIB=1 (2 pages of 3 KV heads at D 64) phases that read 2+ sealed blocks fall back to the tuned
   launch (counted in plan.STATS), the others keep the scratch, and the tokens still match;
3. the scratch is reserved whole (512 MiB, the default cap) while the model loads, before any request. Whether
   vLLM's profiling counts it is measured in fresh processes by the serving rows (session 11, H100: kakeya_scratch_fa
   vs kakeya, model loading 22.66 vs 22.16 GiB, KV memory 46.72 vs 47.22 GiB); here, with in-process engines one
   after the other, the KV-bytes difference is only recorded: session 11 saw 249 MiB, not 512 (memory the previous
   engine left in PyTorch's cache is invisible to vLLM's driver-level load measurement).
Session 11 (H100, first run): 1 passed (scratch tokens), 3 failed: scratch_fa and the 1 MiB engine each differ from
the tuned launch beyond the near-tie rule on one prompt (p3_1536, at generated tokens 2 and 6; the 1 MiB engine runs
the scratch launch only for phases with <= 1 sealed block), and the old 512 +- 64 MiB KV-bytes assertion (249 MiB).
The divergences' logprob gaps are now recorded (scratch_*_gaps) to tell a flat distribution from a real error.
    pytest -m gpu -p no:cacheprovider tests/test_vllm_scratch_gpu.py
"""
import random

import pytest

from tests.vllm_gpu_common import (MODEL, Stepper, assert_same_tokens, copy_prompt, first_divergence, inproc_llm,
                                   near_tie, record, require_vllm_gpu, tie_gaps)

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
        from kakeya_v1_3_ppl import backend
        # Scratch buffers right after start-up (before any request): [pages, H, 2, 512, D] or None.
        bufs = [v.buf for k, v in backend._KERNELS.items() if k[0] == "scratch"]
        out = Stepper(llm).generate(PROMPTS, NEW)
        del llm
    # The backend caches kernel sets (and the scratch reservation) per engine until the next engine replaces them;
    # drop them now so the next engine's memory profiling starts from a clean device.
    import torch
    from kakeya_v1_3_ppl import backend
    backend._KERNELS.clear()
    torch.cuda.empty_cache()
    return out, kv, plan.STATS["scratch_fallbacks"] - before, [None if b is None else tuple(b.shape) for b in bufs]


def _gaps(name: str, got: dict, want: dict) -> None:
    div = {k: first_divergence(got[k], want[k]) for k in want}
    at = {k: i for k, i in div.items() if i is not None}
    record(name, first_divergence=div, gaps_nats={k: tie_gaps(got[k], want[k], i) for k, i in at.items()},
           not_a_near_tie={k: near_tie(got[k], want[k], i) for k, i in at.items()})


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
    _gaps("scratch_gaps", scratch, tuned)
    assert engines["scratch"][2] == 0
    assert_same_tokens(scratch, tuned, "candidate:scratch vs tuned prefill")


def test_flash_scratch_prefill_gives_the_tuned_tokens(engines):
    """candidate:scratch_fa: vLLM's FlashAttention over the scratch pages (strided paged K / V views)."""
    tuned, fa = engines["tuned"][0], engines["scratch_fa"][0]
    record("scratch_fa_prefill_tokens", agree=sum(a == b for k in tuned for a, b in zip(fa[k], tuned[k]))
           / (NEW * len(tuned)))
    _gaps("scratch_fa_gaps", fa, tuned)
    assert_same_tokens(fa, tuned, "candidate:scratch_fa vs tuned prefill")


def test_over_the_cap_phases_fall_back(engines):
    out, _, fallbacks, _ = engines["scratch_1mib"]
    record("scratch_prefill_fallbacks", fallbacks=fallbacks)
    _gaps("scratch_1mib_gaps", out, engines["tuned"][0])
    assert fallbacks > 0
    assert_same_tokens(out, engines["tuned"][0], "candidate:scratch at 1 MiB (fallbacks) vs tuned prefill")


def test_scratch_is_reserved_at_load(engines):
    tuned, scratch = engines["tuned"][1], engines["scratch"][1]
    record("scratch_prefill_kv_bytes", tuned=tuned, scratch=scratch, diff_mib=(tuned - scratch) / 2**20,
           buffers={n: e[3] for n, e in engines.items()})
    # SmolLM2: 3 KV heads x 128 KiB pages (D 64): 512 MiB = 1365 pages, allocated before the first request.
    assert engines["scratch"][3] == [(1365, 3, 2, 512, 64)] and engines["scratch_1mib"][3] == [(2, 3, 2, 512, 64)]
    assert engines["tuned"][3] == [None]
