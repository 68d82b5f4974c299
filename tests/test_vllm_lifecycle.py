"""Request lifecycle of the KAKEYA backend in vLLM 0.26 (issues 4 and 7): greedy parity with FLASH_ATTN, aborts at
every phase, preemption under a tiny KV budget, prefix-cache hits on sealed and partial blocks, chunk boundaries at
511/512/513, very different lengths in one batch.

Run on an H200 in session 6: 32 passed (benchmarks/results/vllm_s6/suite_lifecycle_h200.txt; the TRITON_ATTN
control and the recorded nats gaps were added after that run). Run it in its own
pytest process (the engines run in-process, one at a time):
    pytest -m gpu -p no:cacheprovider tests/test_vllm_lifecycle.py
Engines: FLASH_ATTN bf16 (reference outputs only), then KAKEYA k4v3, then KAKEYA exact, each with 256-token
prefill chunks, no async scheduling (one LLMEngine.step() = one scheduler step) and 40 KV pages of 512 tokens.

References: KAKEYA exact must reproduce FLASH_ATTN's greedy tokens on copy prompts; every other check is
self-consistency within one format: the same prompt alone / batched / preempted / prefix-hit / chunked differently
gives the same tokens. "Same" allows one near-tie (vllm_gpu_common.assert_same_tokens): greedy outputs may split
where both runs rank the two tokens within TIE_NATS of each other (bf16 rounding of another kernel or batch shape),
and are not compared after it; any other difference fails. Why not token for token: vLLM's own TRITON_ATTN bf16
matched FLASH_ATTN's greedy continuation on only 2 of 8 such prompts (H200, session 3,
benchmarks/results/vllm_quality.md "greedy identical"); the flash_parity fixture re-records that control.

KAKEYA_EXACT_ATTENTION=flash (exact layers served by vLLM's own FlashAttention backend; NOT YET RUN on a GPU): two
more engines, parity only (the other tests skip for them, to fit the part's time cap): exact_flash must reproduce
FLASH_ATTN token for token on all 8 x 256 (no near-tie allowance: same kernels, same batches); k4v3 with
boundary layers 0,1,28,29 through FA must run and give 8 full outputs. Both check that the intended layers are
FA's. FLASH_ATTN at block size 512 (the KAKEYA engines' page size) is recorded as a second control: if exact_flash
misses the default-block reference but matches this one, the difference is FA's own page-size-dependent choices.

Request ids: vLLM 0.26 keys its scheduler by an internal id (the given id plus a random suffix): read scheduler
state through Stepper.request / Stepper.computed, never sched.requests[given id].
"""
import os
import random

import pytest

from tests.vllm_gpu_common import (MODEL, Stepper, assert_same_tokens, copy_prompt, first_divergence, inproc_llm,
                                   near_tie, record, require_vllm_gpu, tie_gaps)

pytestmark = pytest.mark.gpu
require_vllm_gpu()

# Exact tails kept in the requests' own pages (KAKEYA_TAIL_STORAGE=pages exported for the run): each running
# request then holds `TAIL` pages after its sealed ones; the exact engine has no tails and refuses that setting,
# so it runs with the pool value (the patches installed from the env leave it alone: 0 tail pages).
TAIL_PAGES_RUN = os.environ.get("KAKEYA_TAIL_STORAGE", "").strip().lower() == "pages"
# The same for KAKEYA_PREFILL_ATTEND=chunk exported (kakeya format only): the exact engine runs block phases.
CHUNK_RUN = os.environ.get("KAKEYA_PREFILL_ATTEND", "").strip().lower() == "chunk"


def _tail_pages() -> int:
    if not TAIL_PAGES_RUN:
        return 0
    from kakeya_kv.config import KakeyaConfig
    from kakeya_v1_3_ppl.pages import tail_pages
    return tail_pages(KakeyaConfig.from_env({**os.environ, "KAKEYA_FORMAT": "default"}), 64)   # SmolLM2: head_dim 64


TAIL = _tail_pages()


def _held(tokens: int, tail: int) -> int:
    """Pages vLLM holds for a request of ``tokens`` tokens: cdiv with the pool, full blocks + tail with pages."""
    return tokens // 512 + tail if tail else -(-tokens // 512)


def budget_pages(fmt_env: dict) -> int:
    """KV budget in 512-token pages (one is vLLM's null block), small enough to force preemption: the six PRESSURE
    prompts (3000-3060 tokens) are all admitted (6 x _held(3060) pages) but cannot all grow past 3072 tokens
    (6 more pages): 40 with the pool or the exact format, 34 + 6 x TAIL with tails in pages."""
    tail = 0 if fmt_env.get("KAKEYA_FORMAT") == "exact" else TAIL
    return 6 * _held(3060, tail) + 4


COMMON = dict(model=MODEL, enforce_eager=True, max_model_len=4096, max_num_batched_tokens=256, max_num_seqs=16,
              enable_prefix_caching=True, async_scheduling=False, disable_log_stats=False,
              gpu_memory_utilization=0.3, seed=0)
# The lossy default first: if the job's time cap cuts the module short, the product's format has been tested.
FORMATS = {"k4v3": {"KAKEYA_FORMAT": "default"},
           "exact": {"KAKEYA_FORMAT": "exact", **({"KAKEYA_TAIL_STORAGE": "pool"} if TAIL_PAGES_RUN else {}),
                     **({"KAKEYA_PREFILL_ATTEND": "blocks"} if CHUNK_RUN else {})}}
# Exact layers through vLLM's FlashAttention: format -> (KAKEYA_* settings, layers that must be FA's).
FLASH = {"exact_flash": ({"KAKEYA_FORMAT": "exact", "KAKEYA_EXACT_ATTENTION": "flash"}, set(range(30))),
         "k4v3_b_flash": ({"KAKEYA_FORMAT": "default", "KAKEYA_BOUNDARY_SKIP_LAYERS": "0,1,28,29",
                           "KAKEYA_EXACT_ATTENTION": "flash"}, {0, 1, 28, 29})}
FORMATS.update({name: env for name, (env, _) in FLASH.items()})
FLASH_TESTS = {"test_parity_with_flash_attn", "test_flash_layers_are_flash_attention"}


def _prompts(seed: int, lengths) -> dict:
    rng = random.Random(seed)
    return {f"p{i}_{n}": copy_prompt(rng, n) for i, n in enumerate(lengths)}


# 8 prompts x 256 tokens whose contexts cross several 512 boundaries (issue 4's parity set); 8 x 4 pages fit.
PARITY = _prompts(1, (600, 777, 1000, 1023, 1100, 1300, 1536, 1700))


def _parity_record(name: str, got: dict, want: dict, **fields) -> None:
    div = {k: first_divergence(got[k], want[k]) for k in want}
    at = {k: i for k, i in div.items() if i is not None}
    record(name, first_divergence=div, gaps_nats={k: tie_gaps(got[k], want[k], i) for k, i in at.items()},
           not_a_near_tie={k: near_tie(got[k], want[k], i) for k, i in at.items()},
           agree=sum(a == b for k in want for a, b in zip(got[k], want[k])) / (256 * len(want)), **fields)


def _copy_hits(outs: dict) -> int:
    """Generated tokens that continue the prompt's repeated segment (copy_prompt): a task-accuracy sanity figure."""
    hits = 0
    for k, p in PARITY.items():
        seg = max(8, min(len(p) // 3, 800))
        hits += sum(t == p[(len(p) + i) % seg] for i, t in enumerate(outs[k]))
    return hits


@pytest.fixture(scope="module")
def flash_refs():
    """FLASH_ATTN's greedy outputs ("default": vLLM's default block size; "page512": block size 512, only for the
    KAKEYA_EXACT_ATTENTION=flash diagnosis), made (and their engines gone) before any KAKEYA engine starts. Control:
    vLLM's own TRITON_ATTN on the same bf16 cache, recorded against it - how often two correct bf16 kernels already
    split greedily on these prompts, and by how many nats (the scale the near-tie rule must cover)."""
    with inproc_llm({}, attention_backend="FLASH_ATTN", **COMMON) as llm:
        out = Stepper(llm).generate(PARITY, 256)
        del llm                       # the engine's memory is freed when the context exits
    record("parity_copy_hits", format="FLASH_ATTN", copy_hits=_copy_hits(out), total=256 * len(PARITY))
    with inproc_llm({}, attention_backend="TRITON_ATTN", **COMMON) as llm:
        _parity_record("parity_control_triton_attn_vs_flash_attn", Stepper(llm).generate(PARITY, 256), out)
        del llm
    with inproc_llm({}, attention_backend="FLASH_ATTN", block_size=512, **COMMON) as llm:
        out512 = Stepper(llm).generate(PARITY, 256)
        del llm
    _parity_record("parity_control_flash_attn_block512_vs_flash_attn", out512, out)
    return {"default": out, "page512": out512}


@pytest.fixture(scope="module")
def flash_parity(flash_refs):
    return flash_refs["default"]


@pytest.fixture(scope="module", params=list(FORMATS))
def kk(request, flash_parity):
    pages = budget_pages(FORMATS[request.param])
    with inproc_llm(FORMATS[request.param], attention_backend="KAKEYA", num_gpu_blocks_override=pages,
                    **COMMON) as llm:
        s = Stepper(llm)
        s.format = request.param
        cc = llm.llm_engine.vllm_config.cache_config
        assert cc.block_size == 512 and cc.num_gpu_blocks == pages
        yield s
        s.release()
        del llm, cc


@pytest.fixture(autouse=True)
def _no_leftovers(request, kk):
    """A test that fails midway leaves requests running on the module's engine; abort them so that the next test
    (whose prefix-cache reset needs every page free) fails only for its own reasons."""
    if kk.format in FLASH and request.node.originalname not in FLASH_TESTS:
        pytest.skip("KAKEYA_EXACT_ATTENTION=flash engines run the parity checks only (the lifecycle part's time cap)")
    yield
    kk.abort_unfinished()


def _idle(s: Stepper, what: str) -> None:
    gauge, pool = s.kv_usage_when_idle()
    assert gauge == 0.0 and pool == 0.0, f"{s.format} {what}: KV pages still in use (gauge {gauge}, pool {pool})"


def test_parity_with_flash_attn(kk, flash_parity, flash_refs):
    """Exact mode reproduces FLASH_ATTN greedily (our Triton kernel: up to a near-tie; through FA, exact_flash: token
    for token); the lossy formats are recorded, not asserted (k4v3_b_flash: 8 full outputs, no error)."""
    kk.reset_prefix_cache()
    got = kk.generate(PARITY, 256)
    _parity_record("parity_vs_flash_attn", got, flash_parity, format=kk.format)
    record("parity_copy_hits", format=kk.format, copy_hits=_copy_hits(got), total=256 * len(PARITY))
    if kk.format == "exact":
        assert_same_tokens(got, flash_parity, "KAKEYA exact vs FLASH_ATTN")
    elif kk.format == "exact_flash":
        same = sorted(k for k in PARITY if list(got[k]) == list(flash_parity[k]))
        same512 = sorted(k for k in PARITY if list(got[k]) == list(flash_refs["page512"][k]))
        record("parity_exact_flash_strict", identical=len(same), identical_vs_block512=len(same512))
        assert len(same) == len(PARITY), (
            f"KAKEYA exact through FlashAttention vs FLASH_ATTN: {len(same)}/{len(PARITY)} outputs identical "
            f"(first divergences { {k: first_divergence(got[k], flash_parity[k]) for k in PARITY if k not in same} }; "
            f"vs FLASH_ATTN at block size 512: {len(same512)}/{len(PARITY)} identical)")
    elif kk.format == "k4v3_b_flash":
        bad = {k: len(v) for k, v in got.items() if len(v) != 256 or not all(0 <= t < 49152 for t in v)}
        assert not bad, f"k4v3 with FlashAttention boundary layers: outputs not 256 SmolLM2 token ids: {bad}"
    _idle(kk, "after the parity batch")


def test_flash_layers_are_flash_attention(kk):
    """KAKEYA_EXACT_ATTENTION=flash puts vLLM's FlashAttention impl and backend on exactly the exact layers."""
    if kk.format not in FLASH:
        pytest.skip("only for the KAKEYA_EXACT_ATTENTION=flash engines")
    from vllm.model_executor.models.utils import extract_layer_index
    rows = kk.llm.apply_model(lambda model: sorted(
        (extract_layer_index(m.layer_name), type(m.impl).__name__, m.attn_backend.__name__)
        for m in model.modules() if type(m).__name__ == "Attention"))
    rows = rows[0] if rows and isinstance(rows[0], list) else rows
    fa = {i for i, impl, backend in rows if (impl, backend) == ("FlashAttentionImpl", "FlashAttentionBackend")}
    ours = {i for i, impl, backend in rows if impl == "KakeyaImpl" and backend.startswith("KakeyaBackend")}
    record("flash_layers", format=kk.format, fa_layers=sorted(fa), kakeya_layers=sorted(ours))
    want = FLASH[kk.format][1]
    assert fa == want and ours == {i for i, _, _ in rows} - want, rows


# Six prompts of 3000-3060 tokens need 6 pages each with the pool (36 of the 39 usable), so all are admitted; past
# 3072 tokens each needs a 7th page (42 > 39): the scheduler must preempt running requests to let them grow (with
# tails in pages: 5 + TAIL each, then 6 + TAIL, same margins; see budget_pages).
PRESSURE = _prompts(2, (3000, 3012, 3024, 3036, 3048, 3060))
PRESSURE_TOKENS = 100      # every prompt crosses 3072 tokens


@pytest.fixture(scope="module")
def pressure_ref(kk):
    kk.reset_prefix_cache()
    ref = {}
    for pair in (("p0_3000", "p1_3012"), ("p2_3024", "p3_3036"), ("p4_3048", "p5_3060")):   # 14 pages: no pressure
        ref.update(kk.generate({k: PRESSURE[k] for k in pair}, PRESSURE_TOKENS))
    return ref


def test_preemption_gives_the_unpressured_output(kk, pressure_ref):
    kk.reset_prefix_cache()
    before = kk.metric("vllm:num_preemptions")
    ids = {k: kk.add(p, PRESSURE_TOKENS) for k, p in PRESSURE.items()}
    preempted = set()
    while kk.eng.has_unfinished_requests():
        kk.step()
        preempted |= {k for k, r in ids.items() if (q := kk.request(r)) is not None and q.num_preemptions}
    n = kk.metric("vllm:num_preemptions") - before
    record("preemption", format=kk.format, preemptions=n, preempted_requests=sorted(preempted))
    assert preempted, "the tiny KV budget caused no preemption: the test did not test anything"
    assert n > 0, f"requests {sorted(preempted)} were preempted but vllm:num_preemptions did not count them"
    assert_same_tokens({k: kk.tokens(r) for k, r in ids.items()}, pressure_ref, f"{kk.format} preempted vs unpressured")
    _idle(kk, "after preemption")


def test_abort_while_preempted_leaves_the_others_intact(kk, pressure_ref):
    from vllm.v1.request import RequestStatus
    kk.reset_prefix_cache()
    ids = {k: kk.add(p, PRESSURE_TOKENS) for k, p in PRESSURE.items()}

    def preempted():
        return [k for k, r in ids.items()
                if (q := kk.request(r)) is not None and q.status == RequestStatus.PREEMPTED]

    kk.step_until(lambda: preempted())
    victim = preempted()[0]
    kk.eng.abort_request([ids[victim]])
    kk.drain()
    rest = {k: kk.tokens(r) for k, r in ids.items() if k != victim}
    assert_same_tokens(rest, {k: pressure_ref[k] for k in rest}, f"{kk.format} after aborting a preempted request")
    _idle(kk, "after aborting a preempted request")


PROBE = _prompts(3, (900,))


@pytest.mark.parametrize("phase", ["waiting", "mid_prefill", "prefill_at_seal", "after_prefill", "mid_block_decode",
                                   "decode_at_seal"])
def test_abort_at_every_phase(kk, phase):
    """Abort one request at an exact point of its life, then: no page in use, and a probe request (which reuses
    the freed tail slot) gives the same tokens as before the abort."""
    kk.reset_prefix_cache()
    want = kk.generate(PROBE, 40)
    rng = random.Random(sum(map(ord, phase)))
    n = {"after_prefill": 700, "mid_block_decode": 600, "decode_at_seal": 500}.get(phase, 1300)
    rid = kk.add(copy_prompt(rng, n), 64)
    stop = {"waiting": lambda: True,
            "mid_prefill": lambda: kk.computed(rid) == 256,              # alone: one 256-token chunk done
            "prefill_at_seal": lambda: kk.computed(rid) == 512,          # the step that filled (and sealed) block 0
            "after_prefill": lambda: kk.computed(rid) == 700,            # first token sampled, block 1 partly full
            "mid_block_decode": lambda: kk.computed(rid) == 620,
            "decode_at_seal": lambda: kk.computed(rid) == 512}[phase]    # token 511 decoded: block 0 sealed in decode
    kk.step_until(stop)
    kk.eng.abort_request([rid])
    _idle(kk, f"after an abort at {phase}")
    assert_same_tokens(kk.generate(PROBE, 40), want, f"{kk.format} probe after an abort at {phase}")


def test_prefix_cache_hits_on_sealed_and_partial_blocks(kk):
    rng = random.Random(4)
    a = copy_prompt(rng, 1100)
    b = a[:700] + copy_prompt(rng, 400)                 # shares block 0 and 188 tokens of A's partial block 1
    c = copy_prompt(rng, 460)
    kk.reset_prefix_cache()
    cold = {"a": kk.generate({"a": a}, 32)["a"]}
    kk.reset_prefix_cache()
    cold["b"] = kk.generate({"b": b}, 32)["b"]
    kk.reset_prefix_cache()
    c_out = kk.generate({"c": c}, 100)["c"]             # block 0 of C is filled and sealed during decode
    d = c + c_out[:80]
    kk.reset_prefix_cache()
    cold["d"] = kk.generate({"d": d}, 32)["d"]

    kk.reset_prefix_cache()
    hits, warm = {}, {}
    for key, prompt, prime in (("a", a, a), ("b", b, a), ("d", d, None)):
        if prime is not None:
            kk.generate({"prime": prime}, 1)
        else:
            kk.generate({"prime": c}, 100)              # re-create C's decode-sealed block 0
        r = kk.add(prompt, 32)
        kk.drain()
        warm[key], hits[key] = kk.tokens(r), kk.out[r].num_cached_tokens
    record("prefix_hits", format=kk.format, cached_tokens=hits)
    assert hits == {"a": 1024, "b": 512, "d": 512}, hits
    assert_same_tokens(warm, cold, f"{kk.format} prefix hit vs cold")
    _idle(kk, "after prefix hits")


@pytest.mark.parametrize("when", ["same_step", "after_seal"])
def test_identical_prompt_joins_a_running_one(kk, when):
    """vLLM caches a block when it schedules the step that fills it, so a copy admitted in that very step hits a
    page that is sealed during the step (the planner must attend it after the seal). A decoding neighbour makes the
    first copy's chunks end at 1, 256, 511: its 4th step computes tokens 511..519, and the second copy, added
    before that step, is admitted in it with a hit on page 0. "after_seal": the copy joins one step later."""
    rng = random.Random(5)
    nb, p = copy_prompt(rng, 255), copy_prompt(rng, 520)
    kk.reset_prefix_cache()
    want = kk.alone({"nb": nb, "p": p}, 32)
    kk.reset_prefix_cache()
    r_nb, r1 = kk.add(nb, 32), kk.add(p, 32)
    kk.step_until(lambda: kk.computed(r1) >= (511 if when == "same_step" else 520))
    assert kk.computed(r1) == (511 if when == "same_step" else 520)
    r2 = kk.add(p, 32)
    kk.drain()
    assert kk.out[r2].num_cached_tokens == 512
    assert_same_tokens({"nb": kk.tokens(r_nb), "1": kk.tokens(r1), "2": kk.tokens(r2)},
                       {"nb": want["nb"], "1": want["p"], "2": want["p"]}, f"{kk.format} identical prompts, {when}")


@pytest.mark.parametrize("boundary", [511, 512, 513])
def test_chunk_boundary_at(kk, boundary):
    """A decoding neighbour takes one token of each step's 256-token budget, so the victim's chunks end at
    256 - Lc, then every 255 tokens: with a neighbour prompt of Lc = 766 - boundary tokens the third chunk
    ends exactly at 511 / 512 / 513 (the alone run's chunks end at 256, 512, 768...)."""
    rng = random.Random(boundary)
    nb, victim = copy_prompt(rng, 766 - boundary), copy_prompt(rng, 1300)
    kk.reset_prefix_cache()
    want = kk.alone({"nb": nb, "v": victim}, 24)
    kk.reset_prefix_cache()
    r_nb, r_v = kk.add(nb, 24), kk.add(victim, 24)
    for _ in range(3):
        kk.step()
    assert kk.computed(r_v) == boundary, f"scheduler split differently: {kk.computed(r_v)} tokens after 3 steps"
    kk.drain()
    assert_same_tokens({"nb": kk.tokens(r_nb), "v": kk.tokens(r_v)}, want, f"{kk.format} chunk boundary {boundary}")


def test_very_different_lengths_in_one_batch(kk):
    prompts = _prompts(6, (1, 7, 511, 512, 513, 1023, 1025, 3000))
    kk.reset_prefix_cache()
    want = kk.alone(prompts, 24)
    kk.reset_prefix_cache()
    assert_same_tokens(kk.generate(prompts, 24), want, f"{kk.format} mixed lengths batched vs alone")
    _idle(kk, "after the mixed batch")
