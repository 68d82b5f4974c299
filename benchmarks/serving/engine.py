"""The vLLM-facing glue of the benchmarks (GPU side; vLLM imported lazily, tested with a fake vLLM).

Shared by serve_bench.py (serving rows) and benchmarks/vllm/decode_step.py (decode diagnosis), so
both build the engine and decode over a long context the same way.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from . import rows as R
from .stats import Step
from .workload import DecodeShape, random_ids, shared_prefix_prompts


class StepAPIError(RuntimeError):
    """The engine's add_request did not take a token-id prompt the way this code calls it (vLLM API drift)."""


def model_info(path: str) -> dict:
    c = json.load(open(Path(path) / "config.json"))
    heads = c["num_attention_heads"]
    return {"num_layers": c["num_hidden_layers"], "num_attention_heads": heads,
            "num_kv_heads": c.get("num_key_value_heads", heads),
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads, "vocab": c["vocab_size"],
            "max_position": c.get("max_position_embeddings", 1 << 20)}


def make_llm(model: str, config: str, *, max_model_len: int, gpu_util: float, max_seqs: int, batched_tokens: int,
             tp: int = 1, **override):
    """LLM for a row: dummy weights for the *-like models, token-id prompts, prefix caching on, eager
    unless the config (or `override`) says otherwise. The config's KAKEYA_* env must already be set."""
    from vllm import LLM
    spec = R.MODELS[model]
    _, kw, _ = R.CONFIGS[config]
    return LLM(model=spec["path"], load_format="dummy" if spec["dummy"] else "auto", skip_tokenizer_init=True,
               enable_prefix_caching=True, gpu_memory_utilization=gpu_util, max_model_len=max_model_len,
               max_num_seqs=max_seqs, max_num_batched_tokens=batched_tokens, tensor_parallel_size=tp, seed=0,
               **{"enforce_eager": True, **kw, **override})


def tail_page_tokens(head_dim: int) -> int:
    """Tokens of capacity each running request holds beyond its context: KAKEYA_TAIL_STORAGE=pages gives it
    tail pages after its sealed ones (0 otherwise). The config's KAKEYA_* env must already be set."""
    if os.environ.get("KAKEYA_TAIL_STORAGE", "").strip().lower() != "pages":
        return 0
    from kakeya_v1_3_ppl.checks import settings
    from kakeya_v1_3_ppl.pages import tail_pages
    from kakeya_kv.format import BLOCK_TOKENS
    return tail_pages(settings(), head_dim) * BLOCK_TOKENS


def capacity_tokens(llm) -> tuple[int, int]:
    """(KV tokens vLLM allocated, block size) as the engine's cache config reports them."""
    cc = llm.llm_engine.vllm_config.cache_config
    return (cc.num_gpu_blocks or 0) * cc.block_size, cc.block_size


def _sp(max_tokens: int, **kw):
    from vllm import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False, **kw)


def timed_generate(llm, prompts, max_tokens: int) -> float:
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], _sp(max_tokens), use_tqdm=False)
    return time.perf_counter() - t


def engine_run(llm, prompts: list[list[int]], max_tokens: int, tag: str, on_step=None) -> tuple[list[Step], dict]:
    """Add every prompt to the engine at once, step it to completion, log each step's new tokens
    (DELTA outputs: each step's RequestOutputs hold only that step's tokens). on_step(i) runs before
    step i (decode_step.py starts and stops its profiler there)."""
    from vllm.sampling_params import RequestOutputKind
    sp = _sp(max_tokens, output_kind=RequestOutputKind.DELTA)
    eng = llm.llm_engine
    for i, p in enumerate(prompts):
        try:
            eng.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, sp)
        except Exception as e:
            if i:       # some requests are in: finish them so later measurements start from an idle engine
                while eng.has_unfinished_requests():
                    eng.step()
            raise StepAPIError(f"{type(e).__name__}: {e}") from e
    cached, steps, i = {}, [], 0
    while eng.has_unfinished_requests():
        if on_step is not None:
            on_step(i)
        outs = eng.step()
        i += 1
        t = time.perf_counter()
        new = [len(o.outputs[0].token_ids) for o in outs]
        for o in outs:
            if getattr(o, "num_cached_tokens", None) is not None:
                cached[o.request_id] = o.num_cached_tokens
        if sum(new):
            steps.append(Step(t, sum(new), sum(1 for n in new if n)))
    return steps, cached


def decode_differential(llm, prompts_short, prompts_long, batch: int, g_short: int, g_long: int) -> dict:
    """Fallback when the engine's step API does not take these arguments: two LLM.generate passes of the
    same batch and prompt shape, g_long and g_short tokens; the difference cancels prefill and set-up."""
    t_s = timed_generate(llm, prompts_short, g_short)
    t_l = timed_generate(llm, prompts_long, g_long)
    if t_l <= t_s:
        raise ValueError(f"non-increasing pass times {t_s:.3f}s / {t_l:.3f}s")
    return {"tok_s": batch * (g_long - g_short) / (t_l - t_s), "method": "differential LLM.generate",
            "pass_s": [t_s, t_l]}


def prefix_probe(llm, shape: DecodeShape, vocab: int, seed: int) -> tuple[list[int], dict]:
    """Prefill the shared prefix once, then check that one request prefix+suffix hits all of it.

    Kakeya: the hit is on sealed (compressed) pages. A miss would make every batched request prefill
    the whole context, so it raises instead (the caller records the reason)."""
    prefix = random_ids(random.Random(seed), shape.prefix, vocab)
    fill_s = timed_generate(llm, [prefix], 1)
    det = {"prefix_tokens": shape.prefix, "unique_tokens": shape.unique, "gen_tokens": shape.gen,
           "prefix_fill_s": fill_s, "prefill_tok_s_single_prefix": shape.prefix / fill_s}
    try:
        _, cached = engine_run(llm, shared_prefix_prompts(prefix, 1, shape.unique, vocab, seed - 1), 2, f"probe{shape.context}")
    except StepAPIError:                      # no probe (decode falls back to LLM.generate as well)
        cached = {}
    if cached:
        det["prefix_hit_tokens"] = hit = min(cached.values())
        if hit < shape.prefix:
            raise RuntimeError(f"prefix cache hit {hit} of {shape.prefix} prefix tokens")
    return prefix, det


def measure_decode(llm, prefix: list[int], shape: DecodeShape, batch: int, vocab: int, seed: int, tag: str,
                   on_step=None) -> dict:
    """Decode throughput of `batch` requests (prefix + own suffix) after a warm-up pass at the same batch:
    batch / median lock-step interval from the engine's step log; the differential fallback if the
    step API is not usable. Records the smallest prefix hit of the timed requests."""
    warm = shared_prefix_prompts(prefix, batch, shape.unique, vocab, seed)
    timed_generate(llm, warm, 3)
    timed = shared_prefix_prompts(prefix, batch, shape.unique, vocab, seed + 1)
    try:
        steps, cached = engine_run(llm, timed, shape.gen, tag, on_step)
        from .stats import decode_rate
        r = decode_rate(steps, batch)
        r["method"] = "engine step log"
    except StepAPIError as e:                    # API drift: keep a number, say how it was made
        r = decode_differential(llm, timed, shared_prefix_prompts(prefix, batch, shape.unique, vocab, seed + 2),
                                batch, 8, shape.gen)
        r["step_api_error"], cached = str(e)[:200], {}
    r.update(batch=batch, prefix_cached_tokens_min=min(cached.values()) if cached else None)
    return r
