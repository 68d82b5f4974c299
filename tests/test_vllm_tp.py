"""Tensor parallel 2 gives the same greedy output as TP 1 with the KAKEYA backend (issue 4). NOT YET RUN on a GPU.

SmolLM2's 9 query / 3 KV heads do not split over 2 GPUs, so both runs use a head-padded copy of it (zero heads
appended, same GQA group: the same function, see vllm_gpu_common.pad_heads, CPU-tested in test_soak.py) with
12 / 4 heads. Needs 2 GPUs (the lent nvidia-h200-x2 kind); skipped otherwise.
    pytest -m gpu -p no:cacheprovider tests/test_vllm_tp.py
"""
import random

import pytest

from tests.vllm_gpu_common import (MODEL, Stepper, assert_same_tokens, copy_prompt, first_divergence, inproc_llm,
                                   padded_model_dir, record, require_vllm_gpu)

pytestmark = pytest.mark.gpu
require_vllm_gpu(min_gpus=2)

PADDED = "/tmp/models/SmolLM2-135M-Instruct-12h4kv"


@pytest.mark.parametrize("fmt", ["default", "exact"])
def test_tp2_matches_tp1(fmt):
    model = padded_model_dir(MODEL, PADDED, 12, 4)
    rng = random.Random(7)
    prompts = {f"p{n}": copy_prompt(rng, n) for n in (300, 700, 1300, 2100)}
    out = {}
    for tp in (1, 2):
        with inproc_llm({"KAKEYA_FORMAT": fmt}, inproc=False, model=model, attention_backend="KAKEYA",
                        tensor_parallel_size=tp, enforce_eager=True, max_model_len=4096, max_num_batched_tokens=256,
                        max_num_seqs=8, gpu_memory_utilization=0.3, disable_log_stats=False) as llm:
            out[tp] = Stepper(llm).generate(prompts, 64)
    record("tp2_vs_tp1", format=fmt, first_divergence={k: first_divergence(out[2][k], out[1][k]) for k in prompts})
    assert_same_tokens(out[2], out[1], f"KAKEYA {fmt}: TP 2 vs TP 1")
