"""Shared pieces of the vLLM GPU tests (test_vllm_gpu.py, test_vllm_lifecycle.py): the model, prompts whose greedy
continuation is confident, an in-process engine driven one scheduler step at a time, metric readers, and the
head padding that makes SmolLM2 splittable for tensor parallel 2. Importing this module needs neither vLLM nor a
GPU (the padding is CPU-tested in test_gpu_helpers.py)."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import random
from pathlib import Path

import torch

MODEL = "/tmp/models/SmolLM2-135M-Instruct"      # written by the gpu-kit's setup.sh (--with-smollm2)
VOCAB_LO, VOCAB_HI = 100, 40000                  # token ids clear of SmolLM2's special tokens (vocab 49152)


def require_vllm_gpu(min_gpus: int = 1) -> None:
    """Module-level guard of the vLLM GPU tests: skip unless CUDA (min_gpus devices), vLLM and the kit's model."""
    import pytest
    if torch.cuda.device_count() < min_gpus:
        pytest.skip(f"needs {min_gpus} CUDA GPU(s)", allow_module_level=True)
    pytest.importorskip("vllm")
    if not os.path.isdir(MODEL):
        pytest.skip(f"needs the gpu-kit model at {MODEL}", allow_module_level=True)


def copy_prompt(rng: random.Random, n: int) -> list[int]:
    """n token ids: a random segment repeated. The model continues the repetition (induction), so greedy
    decoding mostly has large logit margins and a wrong K/V anywhere in the copied span changes the output. Not
    always: on the H200 (vLLM 0.26, SmolLM2-135M) KAKEYA exact and FLASH_ATTN, same batches, split greedily on
    6 of 8 such prompts (first at token 1..70) from attention rounding alone, so comparisons allow a near-tie
    (assert_same_tokens). Long prompts repeat segments longer than a 512-token block, so copying reads sealed
    (compressed) blocks, not only the tail."""
    seg = max(8, min(n // 3, 800))
    base = [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(seg)]
    return [base[i % seg] for i in range(n)]


def first_divergence(a, b) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix of the other), None if equal."""
    a, b = list(a), list(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


TOP_LOGPROBS = 3      # top logprobs kept per generated token (Stepper), for the near-tie rule below
TIE_NATS = 1.0        # a divergence counts as a near-tie only if each run's two candidates are this close


class Gen(list):
    """Generated token ids plus, per position, the run's top logprobs {token: logprob} (``top``; None if the
    engine gave none). Compares and slices as a plain list."""
    top: list[dict[int, float]] | None = None


def tie_gaps(got, want, i: int) -> dict:
    """At a divergence: how much each run preferred its own token over the other's (nats; None where the other
    token is not in its top logprobs) - recorded so that TIE_NATS can be set from what bf16 rounding really does."""
    out = {}
    for name, run, other in (("got", got, want), ("want", want, got)):
        top = getattr(run, "top", None)
        t = top[i] if top is not None and i < min(len(top), len(run), len(other)) else None
        out[name] = (round(t[run[i]] - t[other[i]], 4) if t and run[i] in t and other[i] in t else None)
    return out


def near_tie(got, want, i: int) -> str | None:
    """None if the divergence at position i is a greedy near-tie seen by both runs: each run's token is among
    the other run's top logprobs and within TIE_NATS of that run's own choice (bf16 rounding differences between
    kernels or batch shapes flip such ties; a wrong K/V gives a token the other run did not consider).
    Otherwise a reason."""
    gt, wt = getattr(got, "top", None), getattr(want, "top", None)
    if gt is None or wt is None or i >= min(len(got), len(want), len(gt), len(wt)):
        return "no logprobs at the divergence" if i < min(len(got), len(want)) else "length differs"
    for name, top, own, other in (("got", gt[i], got[i], want[i]), ("want", wt[i], want[i], got[i])):
        if other not in top:
            return f"{name}'s top-{TOP_LOGPROBS} at {i} lacks the other run's token {other}"
        gap = top[own] - top[other]
        if gap > TIE_NATS:
            return f"{name} preferred {own} over {other} by {gap:.2f} nats at {i}"
    return None


def assert_same_tokens(got: dict, want: dict, what: str) -> None:
    """Same greedy tokens, up to a near-tie (see near_tie): after a near-tie flip the contexts differ, so the
    rest is not compared. Without logprobs (plain lists): token for token."""
    div = {k: first_divergence(got[k], want[k]) for k in want}
    div = {k: v for k, v in div.items() if v is not None}
    bad = {k: (i, why) for k, i in div.items() if (why := near_tie(got[k], want[k], i)) is not None}
    assert not bad, (f"{what}: {len(bad)}/{len(want)} outputs differ beyond a near-tie: {bad} "
                     f"(near-tie divergences: { {k: i for k, i in div.items() if k not in bad} })")


def record(name: str, **fields) -> None:
    """Diagnostics for the device job's result folder (GPU_TEST_RECORD names a JSON-lines file); a no-op otherwise."""
    path = os.environ.get("GPU_TEST_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **fields}) + "\n")


def metric(metrics, name: str) -> float:
    """Sum of a vLLM metric over its label sets (engines); vLLM's reader strips a counter's _total suffix."""
    vals = [float(m.value) for m in metrics if m.name == name]
    if not vals:
        raise AssertionError(f"{name} not reported (disable_log_stats=False?)")
    return sum(vals)


@contextlib.contextmanager
def inproc_llm(env: dict[str, str], inproc: bool = True, **kwargs):
    """An LLM whose engine core runs in this process (no busy loop): every LLMEngine.step() is exactly one scheduler
    step, so a test can stop at a known number of computed tokens and read the scheduler's state (``inproc=False``:
    vLLM's usual engine process). One at a time: the engine is shut down and the distributed state cleaned on exit.
    ``env`` (KAKEYA_* knobs) is set for the engine's lifetime."""
    saved = {k: os.environ.get(k) for k in [*env, "VLLM_ENABLE_V1_MULTIPROCESSING"]}
    os.environ.update(env)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if inproc else "1"
    llm = None
    try:
        from vllm import LLM
        llm = LLM(**kwargs)
        yield llm
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Stepper:
    """Drives an in-process LLM's engine request by request and step by step (greedy, ignore_eos)."""

    def __init__(self, llm):
        self.llm, self.eng = llm, llm.llm_engine
        core = getattr(self.eng.engine_core, "engine_core", None)     # None: the engine runs in another process
        self.sched = None if core is None else core.scheduler
        self.n = 0
        self.out: dict[str, object] = {}      # request id -> final RequestOutput
        self.asked: dict[str, int] = {}       # request id -> max_tokens
        self.internal: dict[str, str] = {}    # request id -> the engine's internal id (vLLM appends a suffix)

    def release(self) -> None:
        """Drop the engine references (an in-process engine's GPU memory is freed only when nothing holds it)."""
        self.llm = self.eng = self.sched = None

    def add(self, tokens: list[int], max_tokens: int) -> str:
        from vllm import SamplingParams
        self.n += 1
        rid = f"q{self.n}"
        # vLLM 0.26 makes the id unique inside the engine (``{rid}-{8 random chars}``, the scheduler's key) and
        # returns it; outputs and abort_request keep using the id given here.
        internal = self.eng.add_request(rid, {"prompt_token_ids": list(tokens)},
                                        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                       detokenize=False, logprobs=TOP_LOGPROBS))
        self.internal[rid] = internal if isinstance(internal, str) else rid
        self.asked[rid] = max_tokens
        return rid

    def step(self) -> None:
        for o in self.eng.step():
            if o.finished:
                self.out[o.request_id] = o

    def request(self, rid: str):
        """The scheduler's Request of an unfinished request (None once finished or aborted)."""
        return self.sched.requests.get(self.internal[rid])

    def computed(self, rid: str) -> int:
        r = self.request(rid)
        if r is None:
            raise AssertionError(f"request {rid} ({self.internal[rid]}) is not in the scheduler "
                                 f"({'finished' if rid in self.out else 'unknown or aborted'})")
        return r.num_computed_tokens

    def step_until(self, cond, limit: int = 4000) -> None:
        for _ in range(limit):
            if cond():
                return
            self.step()
        raise AssertionError(f"condition not reached within {limit} steps")

    def drain(self, limit: int = 20000) -> None:
        self.step_until(lambda: not self.eng.has_unfinished_requests(), limit)

    def abort_unfinished(self) -> list[str]:
        """Abort every request this stepper added that has not finished (a failed test's leftovers, so that the
        next test on the same engine starts idle). Returns their ids."""
        left = [r for r in self.asked if r not in self.out]
        if left and self.eng is not None:
            self.eng.abort_request(left)
        return left

    def tokens(self, rid: str) -> list[int]:
        c = self.out[rid].outputs[0]
        g = Gen(c.token_ids)
        lps = getattr(c, "logprobs", None)
        if lps is not None:
            g.top = [{int(t): float(getattr(lp, "logprob", lp)) for t, lp in pos.items()} for pos in lps]
        return g

    def generate(self, prompts: dict, max_tokens: int) -> dict:
        """All prompts in one batch -> {key: generated token ids}."""
        ids = {k: self.add(p, max_tokens) for k, p in prompts.items()}
        self.drain()
        return {k: self.tokens(r) for k, r in ids.items()}

    def alone(self, prompts: dict, max_tokens: int) -> dict:
        """Each prompt by itself (no batch neighbours, no KV pressure)."""
        return {k: self.generate({k: p}, max_tokens)[k] for k, p in prompts.items()}

    def reset_prefix_cache(self) -> None:
        assert self.llm.reset_prefix_cache(), "prefix cache reset refused (requests still running?)"

    def metric(self, name: str) -> float:
        return metric(self.llm.get_metrics(), name)

    def kv_usage_when_idle(self) -> tuple[float, float | None]:
        """(vllm:kv_cache_usage_perc, the block pool's own usage or None out of process) with no request left.
        vLLM publishes scheduler stats only at the end of a step that produced outputs, so an abort alone leaves
        the gauge stale: finish a 1-token request first."""
        assert not self.eng.has_unfinished_requests()
        self.generate({"tick": [VOCAB_LO + 7] * 16}, 1)
        pool = None if self.sched is None else self.sched.kv_cache_manager.usage
        return self.metric("vllm:kv_cache_usage_perc"), pool


def pad_heads(state: dict[str, torch.Tensor], cfg: dict, num_heads: int, num_kv_heads: int) -> tuple[dict, dict]:
    """Add all-zero attention heads so that the head counts divide a tensor-parallel size (SmolLM2's 9 query /
    3 KV heads do not divide 2). New KV heads have zero K/V projections; new query heads zero Q rows and zero
    o_proj columns, and each keeps the model's GQA group size, so the extra heads add exactly zero to every
    residual: the padded model computes the same function. Llama-layout (q/k/v/o_proj) checkpoints only."""
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // hq
    if num_heads % num_kv_heads or num_heads // num_kv_heads != hq // hkv or num_heads < hq or num_kv_heads < hkv:
        raise ValueError(f"cannot pad {hq}/{hkv} heads to {num_heads}/{num_kv_heads} with the same GQA group")
    out = {}
    for name, t in state.items():
        rows = {"q_proj": num_heads, "k_proj": num_kv_heads, "v_proj": num_kv_heads}
        kind = next((k for k in (*rows, "o_proj") if f"self_attn.{k}." in name), None)
        if kind in rows:                          # [H*D, hidden] weight or [H*D] bias: zero rows appended
            pad = torch.zeros((rows[kind] * d - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            out[name] = torch.cat([t, pad], 0)
        elif kind == "o_proj" and name.endswith("weight"):   # [hidden, H*D]: zero columns appended
            out[name] = torch.cat([t, torch.zeros((t.shape[0], num_heads * d - t.shape[1]), dtype=t.dtype)], 1)
        else:
            out[name] = t
    return out, dict(cfg, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=d)


def padded_model_dir(src: str, dst: str, num_heads: int, num_kv_heads: int) -> str:
    """Write a head-padded copy of a safetensors HF model folder (tokenizer files copied as they are)."""
    from safetensors.torch import load_file, save_file
    src_p, dst_p = Path(src), Path(dst)
    if (dst_p / "config.json").is_file():
        return dst
    dst_p.mkdir(parents=True, exist_ok=True)
    state = {}
    for f in sorted(src_p.glob("*.safetensors")):
        state.update(load_file(str(f)))
    state, cfg = pad_heads(state, json.loads((src_p / "config.json").read_text()), num_heads, num_kv_heads)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst_p / "model.safetensors"),
              metadata={"format": "pt"})
    for f in src_p.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            (dst_p / f.name).write_bytes(f.read_bytes())
    (dst_p / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst
