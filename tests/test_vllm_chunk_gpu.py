"""KAKEYA_PREFILL_ATTEND=chunk inside vLLM 0.26 (opt-in since session 16; written without a GPU, not yet run):
a prefill chunk's tokens attend each other exact in one launch per layer and step, over the blocks sealed before.

Checks, SmolLM2-135M (head_dim 64), in-process engines, copy prompts of 700-3000 tokens, each prompt alone:
1. one chunk per prompt (4096-token budget): the prompt's last token attends the whole prompt exact, so the first
   generated token is FLASH_ATTN's (near-tie allowed) and its logprob within FIRST_NATS of FLASH_ATTN's on every
   prompt (the block phases' gap, which reads compressed blocks, is recorded next to it);
2. 512-token chunks, which start on block boundaries when a prompt runs alone: chunk and block phases then give
   every query the same keys, so the greedy tokens are the block phases' (near-tie allowed);
3. all prompts in one batch (4096-token budget: chunks next to decode rows in mixed steps) complete, and their
   tokens against FLASH_ATTN are recorded.
    pytest -m gpu -p no:cacheprovider tests/test_vllm_chunk_gpu.py
"""
import random

import pytest

from tests.vllm_gpu_common import (MODEL, Stepper, assert_same_tokens, first_divergence, copy_prompt, inproc_llm,
                                   record, require_vllm_gpu)

pytestmark = pytest.mark.gpu
require_vllm_gpu()

COMMON = dict(model=MODEL, enforce_eager=True, max_model_len=4096, max_num_seqs=16, enable_prefix_caching=False,
              async_scheduling=False, gpu_memory_utilization=0.3, seed=0)
_rng = random.Random(5)
PROMPTS = {f"p{i}_{n}": copy_prompt(_rng, n) for i, n in enumerate((700, 1300, 2100, 3000))}
NEW = 32
FIRST_NATS = 0.1     # bf16 rounding of two exact attentions (ours vs FlashAttention), not compression


def _run(backend: str, env: dict, budget: int, batch: bool = False) -> dict:
    with inproc_llm(env, attention_backend=backend, max_num_batched_tokens=budget, **COMMON) as llm:
        st = Stepper(llm)
        out = {"alone": st.alone(PROMPTS, NEW)}
        if batch:
            out["batch"] = st.generate(PROMPTS, NEW)
        st.release()
        del llm
    import torch
    from kakeya_v1_3_ppl import backend as kb
    kb._KERNELS.clear()
    torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module")
def engines():
    kak = {"KAKEYA_FORMAT": "default"}
    return {"flash": _run("FLASH_ATTN", {}, 4096),
            # pinned: the run may export KAKEYA_PREFILL_ATTEND=chunk (or KAKEYA_TAIL_STORAGE=pages, which all share)
            "blocks": _run("KAKEYA", {**kak, "KAKEYA_PREFILL_ATTEND": "blocks"}, 4096),
            "chunk": _run("KAKEYA", {**kak, "KAKEYA_PREFILL_ATTEND": "chunk"}, 4096, batch=True),
            "blocks512": _run("KAKEYA", {**kak, "KAKEYA_PREFILL_ATTEND": "blocks"}, 512),
            "chunk512": _run("KAKEYA", {**kak, "KAKEYA_PREFILL_ATTEND": "chunk"}, 512)}


def _first_gap(run: dict, ref: dict) -> dict:
    """Per prompt: |logprob of the reference's first token| difference (nats), None if not in the run's top."""
    out = {}
    for k, want in ref.items():
        tok, got = want[0], run[k]
        lp = got.top[0].get(tok) if got.top else None
        out[k] = None if lp is None else abs(lp - want.top[0][tok])
    return out


def test_one_chunk_prefill_gives_flash_attn_first_token(engines):
    flash = engines["flash"]["alone"]
    gaps = {m: _first_gap(engines[m]["alone"], flash) for m in ("chunk", "blocks")}
    record("chunk_first_token_gap_nats", **gaps)
    assert_same_tokens({k: v[:1] for k, v in engines["chunk"]["alone"].items()}, {k: v[:1] for k, v in flash.items()},
                       "KAKEYA_PREFILL_ATTEND=chunk first token vs FLASH_ATTN")
    assert all(g is not None and g < FIRST_NATS for g in gaps["chunk"].values()), gaps


def test_block_aligned_chunks_give_the_block_phases_tokens(engines):
    assert_same_tokens(engines["chunk512"]["alone"], engines["blocks512"]["alone"],
                       "chunk vs block phases, 512-token chunks on block boundaries")


def test_mixed_batches_complete(engines):
    batch, flash = engines["chunk"]["batch"], engines["flash"]["alone"]
    record("chunk_batch_vs_flash", first_divergence={k: first_divergence(batch[k], flash[k]) for k in flash},
           blocks_alone_vs_flash={k: first_divergence(engines["blocks"]["alone"][k], flash[k]) for k in flash})
    assert {k: len(v) for k, v in batch.items()} == {k: NEW for k in PROMPTS}
