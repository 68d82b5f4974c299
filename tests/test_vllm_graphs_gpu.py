"""Full CUDA graphs for pure-decode steps (KAKEYA_CUDA_GRAPHS=1, issue 4: "CUDA graphs for decode,
UNIFORM_SINGLE_TOKEN_DECODE or better") in vLLM 0.26.

Four KAKEYA engines (and two FLASH_ATTN control engines: compiled without capture, and with full graphs) on the
same 8 prompts (contexts crossing 512-token boundaries, so blocks seal during decode):
  ref      KAKEYA k4v3, host-planned decode, eager (the path every earlier GPU run measured)
  planned  KAKEYA k4v3, KAKEYA_CUDA_GRAPHS=1, eager (the GPU-planned DecodeBuffers path without capture)
  compiled KAKEYA k4v3, KAKEYA_CUDA_GRAPHS=1, vLLM's torch.compile model, cudagraph_mode NONE (no capture)
  graphs   KAKEYA k4v3, KAKEYA_CUDA_GRAPHS=1, enforce_eager=False (vLLM compiles and captures full decode graphs)
planned must match ref and graphs must match compiled, token for token up to a near-tie
(vllm_gpu_common.assert_same_tokens). Session 8 (H200) compared graphs with ref directly: planned = ref on 8/8,
graphs 2/8 identical and one divergence at token 3 that was not a near-tie - but graphs differs from ref in two
ways at once (inductor-compiled norms/MLP and the capture), so the capture is now judged against the compiled
engine without capture, and graphs vs ref is recorded only. vLLM must really keep a FULL cudagraph mode (it
downgrades silently when a backend cannot); KV usage returns to 0. Decode tokens/s of each engine are recorded,
not asserted (session 8: graphs 982 tok/s vs 270 eager on this batch; speed is issue 6's serving benchmark).
Run: pytest -m gpu -p no:cacheprovider tests/test_vllm_graphs_gpu.py   (suite_job.sh part "graphs")
"""
import random
import time

import pytest

from tests.vllm_gpu_common import (MODEL, Stepper, assert_same_tokens, copy_prompt, first_divergence, inproc_llm,
                                   record, require_vllm_gpu)

pytestmark = pytest.mark.gpu
require_vllm_gpu()

COMMON = dict(model=MODEL, max_model_len=4096, max_num_batched_tokens=256, max_num_seqs=16, async_scheduling=False,
              enable_prefix_caching=True, disable_log_stats=False, gpu_memory_utilization=0.3, seed=0,
              attention_backend="KAKEYA")
# Order = priority: a device call cut short (session 9: 5 of 6 engines in 208 s) keeps the KAKEYA capture pair first;
# every engine's tokens are recorded as soon as it finishes, so a cut run can still be compared offline.
ENGINES = {"compiled": ({"KAKEYA_FORMAT": "default", "KAKEYA_CUDA_GRAPHS": "1"},
                        dict(enforce_eager=False, compilation_config={"cudagraph_mode": "NONE"})),
           "graphs": ({"KAKEYA_FORMAT": "default", "KAKEYA_CUDA_GRAPHS": "1"}, dict(enforce_eager=False)),
           # Control: vLLM's own FLASH_ATTN through the same compile, with and without capture - how far capture
           # alone moves greedy tokens in vLLM itself (recorded beside the KAKEYA pair, not asserted).
           "fa_compiled": ({}, dict(enforce_eager=False, compilation_config={"cudagraph_mode": "NONE"},
                                    attention_backend="FLASH_ATTN")),
           "fa_graphs": ({}, dict(enforce_eager=False, attention_backend="FLASH_ATTN")),
           "ref": ({"KAKEYA_FORMAT": "default"}, dict(enforce_eager=True)),
           "planned": ({"KAKEYA_FORMAT": "default", "KAKEYA_CUDA_GRAPHS": "1"}, dict(enforce_eager=True))}
TOKENS = 200
_rng = random.Random(5)
# Decode crosses a 512 boundary in most prompts (seal inside a decode step, captured in the graphs engine).
PROMPTS = {f"p{i}_{n}": copy_prompt(_rng, n) for i, n in enumerate((400, 450, 500, 511, 900, 1000, 1400, 1530))}


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, (env, kw) in ENGINES.items():
        with inproc_llm(env, **{**COMMON, **kw}) as llm:
            s = Stepper(llm)
            mode = str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)
            s.generate({"warm": PROMPTS["p0_400"]}, 8)        # first-use compiles outside the timed batch
            t = time.perf_counter()
            got = s.generate(PROMPTS, TOKENS)
            dt = time.perf_counter() - t
            gauge, pool = s.kv_usage_when_idle()
            out[name] = {"tokens": got, "mode": mode, "tok_s": len(PROMPTS) * TOKENS / dt, "idle": (gauge, pool)}
            record("cuda_graphs_engine", engine=name, cudagraph_mode=mode, batch_tok_s=round(out[name]["tok_s"], 1),
                   kv_idle=[gauge, pool], tokens={k: list(v) for k, v in got.items()},
                   top={k: getattr(v, "top", None) for k, v in got.items()})
            s.release()
            del llm
    return out


def test_graphs_engine_keeps_a_full_cudagraph_mode(runs):
    assert "FULL" in runs["graphs"]["mode"], f"vLLM did not keep full CUDA graphs: {runs['graphs']['mode']}"
    assert "FULL" in runs["fa_graphs"]["mode"], f"control: FLASH_ATTN did not keep full graphs: {runs['fa_graphs']['mode']}"
    assert all(runs[n]["mode"].endswith("NONE") for n in ("ref", "compiled", "fa_compiled")), \
        {n: runs[n]["mode"] for n in ("ref", "compiled", "fa_compiled")}


# (engine, its reference): each pair differs in one thing only.
PAIRS = [("planned", "ref"), ("graphs", "compiled")]


@pytest.mark.parametrize("name,ref", PAIRS)
def test_same_greedy_tokens_as_the_same_model_without_the_change(runs, name, ref):
    got, want = runs[name]["tokens"], runs[ref]["tokens"]
    fa_g, fa_c = runs["fa_graphs"]["tokens"], runs["fa_compiled"]["tokens"]
    control = {k: first_divergence(fa_g[k], fa_c[k]) for k in fa_c}
    record("cuda_graphs_parity", engine=name, reference=ref,
           first_divergence={k: first_divergence(got[k], want[k]) for k in want},
           graphs_vs_eager_ref={k: first_divergence(runs[name]["tokens"][k], runs["ref"]["tokens"][k]) for k in want},
           flash_attn_graphs_vs_compiled=control)
    assert_same_tokens(got, want, f"KAKEYA_CUDA_GRAPHS=1 ({name}) vs {ref} (control, FLASH_ATTN graphs vs compiled, "
                                  f"first divergences: {control})")


@pytest.mark.parametrize("name", list(ENGINES))
def test_kv_usage_back_to_zero(runs, name):
    assert runs[name]["idle"] == (0.0, 0.0), f"{name}: KV still in use when idle {runs[name]['idle']}"
