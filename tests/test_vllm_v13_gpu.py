"""KAKEYA_FORMAT=v13 (the seed format) in vLLM on the lent GPU — NOT YET RUN on a GPU.

Perplexity of SmolLM2-135M-Instruct on 4 evaluation windows (2048 tokens, `.gpudata/windows.json` from
``python -m kakeya_kv.vllm_eval prep``), chunked prefill of 256 tokens so sealed v13 blocks are read by later
chunks, against FLASH_ATTN bf16 on the same windows. The sane bound: v13 must lose something (it is a lossy
3/2-bit format) and stay below 2.5x bf16's PPL; the HF/CPU harness measured +61 % over 32 windows
(benchmarks/results/SUMMARY.md), so a result near that is expected, far above it means a kernel bug.
Run with ``pytest -m gpu tests/test_vllm_v13_gpu.py`` after ``source .gpukit/setup.sh`` and
``source scripts/device_install.sh`` (carry ``.gpudata``).
"""
import json
import math
import os

import pytest

from tests.vllm_gpu_common import MODEL, inproc_llm, record, require_vllm_gpu

pytestmark = pytest.mark.gpu
require_vllm_gpu()

WINDOWS = ".gpudata/windows.json"
N_WINDOWS = 4


def _windows() -> list[list[int]]:
    if not os.path.isfile(WINDOWS):
        pytest.skip(f"needs {WINDOWS} (python -m kakeya_kv.vllm_eval prep, carried to the device)")
    return json.loads(open(WINDOWS).read())["windows"][:N_WINDOWS]


def _ppl(env: dict, backend: str, wins: list[list[int]]) -> float:
    with inproc_llm(env, model=MODEL, attention_backend=backend, enforce_eager=True, max_model_len=4096,
                    max_num_batched_tokens=256, max_num_seqs=4, enable_prefix_caching=False) as llm:
        from vllm import SamplingParams
        outs = llm.generate([{"prompt_token_ids": w} for w in wins],
                            SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False))
    nll = [-o.prompt_logprobs[i][w[i]].logprob for w, o in zip(wins, outs) for i in range(1, len(w))]
    return math.exp(sum(nll) / len(nll))


def test_v13_ppl_within_a_sane_bound_of_bf16():
    wins = _windows()
    bf16 = _ppl({}, "FLASH_ATTN", wins)
    v13 = _ppl({"KAKEYA_FORMAT": "v13"}, "KAKEYA", wins)
    record("v13_ppl", windows=len(wins), ppl_bf16=bf16, ppl_v13=v13, ratio=v13 / bf16)
    assert math.isfinite(v13) and 1.0 < v13 / bf16 < 2.5, (bf16, v13)
