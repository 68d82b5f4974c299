"""Prefill launches (kakeya_kernels.variants.PREFILL_CANDIDATES, KAKEYA_PREFILL_VARIANT) in the Triton interpreter:
tiles of many query tokens x the GQA heads of one KV head, the kernel's PREFILL path (query rows re-read per block,
tail loop bounded by the tile's last query), against the baseline launch and float64 attention on the reference
codec's decode; in-bounds with poisoned guards; through the backend's data path over chunks that cross 512-token
blocks; the knob and the builder; a mixed step's two launches (decode rows / prefill chunk) through the builder; the
sm_90 compile (spills, occupancy) of each candidate."""
import os

import numpy as np
import pytest
import torch

from kakeya_kernels.variants import (ACCEPT_REL, BASELINE, FIXED_SPLITS, PREFILL_CANDIDATES, PREFILL_TUNED,
                                     decode_variant, kernel_args, num_splits, prefill_variant)
from tests.kernel_cases import build, ref_attention, rel_err
from tests.test_vllm_perlayer import glue  # noqa: F401 - vLLM stand-ins fixture

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _chunk(lens, chunks):
    """Query tokens of a prefill phase: request r's last chunks[r] positions (all inside its tail block)."""
    pos = np.concatenate([np.arange(L - c, L) for L, c in zip(lens, chunks)])
    req = np.concatenate([np.full(c, r) for r, c in enumerate(chunks)])
    return torch.tensor(pos, device=DEV), torch.tensor(req, device=DEV)


def _pages_ref(refs, v):
    """The float64 reference K/V a launch is held to: the scratch launch attends bf16 pages of the decode, so its
    reference is the reference decode rounded to bf16 (tests/test_scratch_prefill.py's docstring says why)."""
    return [(k.bfloat16().double(), x.bfloat16().double()) for k, x in refs] if v.get("scratch") else refs


def _run(kk, sc, q, pos, req, n_req, gqa, hkv, v, **kw):
    plan = kk.plan(pos, req, n_req, gqa, bm=v["bm"])
    splits = num_splits(v, plan["nt"], hkv, sc["block_table"].shape[1], sms=4)
    return kk.attention(q, pos, req, scale=q.shape[-1] ** -0.5, plan=plan, out_dtype=torch.float32, splits=splits,
                        **kernel_args(v), **{**sc, **kw})


@pytest.mark.parametrize("d,gqa,kb,vb", [(64, 4, 4, 3), (128, 4, 3, 2), (64, 1, 3, 2)])
def test_prefill_candidates_match_baseline_and_reference(d, gqa, kb, vb):
    """Fast mode, as served. Three requests in one phase: 1 sealed block + a 48-token tail whose 48 tokens are all
    new queries (a tile holds many of them: causal masking inside the tile), 1 sealed block + 11 new tokens of an
    18-token tail (earlier tail tokens are context), and a one-token row without sealed blocks (a mixed step's
    decode request). Every candidate within ACCEPT_REL of the baseline launch and within 5e-3 of float64 attention
    per query token. (Small shapes: the interpreter emulates the register-table lookups in integer ops.)"""
    lens, chunks, hkv = [560, 530, 3], [48, 11, 1], 1 if gqa > 1 else 2
    kk, sc, refs = build(lens, hkv, gqa, d, kb, vb, device=DEV, seed=d + gqa)
    pos, req = _chunk(lens, chunks)
    q = torch.randn(len(pos), hkv * gqa, d, generator=torch.Generator().manual_seed(gqa)).bfloat16().to(DEV)
    base = _run(kk, sc, q, pos, req, len(lens), gqa, hkv, BASELINE)
    for name, c in PREFILL_CANDIDATES.items():
        out = _run(kk, sc, q, pos, req, len(lens), gqa, hkv, c[d])
        assert rel_err(out, base.double().cpu()) < ACCEPT_REL, name
        kv = _pages_ref(refs, c[d])
        for i in range(len(pos)):
            r = int(req[i])
            assert rel_err(out[i], ref_attention(q[i], int(pos[i]), kv[r], gqa)) < 5e-3, (name, i)


def test_prefill_path_is_the_same_math():
    """PREFILL only changes where q comes from (re-read per block) and where the tail loop stops (past the tile's last
    query every key is masked anyway; the codes reach the MMA through an int16 bitcast, _dec16's FLAT): bit for bit
    the same output as the launch without it, in the interpreter, for 64-row tiles gathering their rows (fused) and
    for the packed (unfused) launch, fast and precise (fp32). K 5 bits: lut 4's pair-table path, V 2 bits: its
    register-table path."""
    lens, chunks, hkv, gqa, d = [600, 40], [80, 20], 1, 4, 64     # 88-token tail: early tiles stop 2 tiles short
    kk, sc, _ = build(lens, hkv, gqa, d, 5, 2, device=DEV, seed=5)
    pos, req = _chunk(lens, chunks)
    q = torch.randn(len(pos), hkv * gqa, d, generator=torch.Generator().manual_seed(5)).bfloat16().to(DEV)
    v = PREFILL_CANDIDATES["q64"][d]
    for fused, precise in ((True, False), (False, True)):
        # On sm_90 the device's Triton 3.6 cannot compile the fused fast launch WITHOUT PREFILL at 64-row tiles
        # (TritonGPUOptimizeDotOperands: "Illegal shared layout"; no served or candidate launch is that one, decode
        # tiles are <= 16 rows): the GPU reference takes 32-row tiles there, the same math per query row.
        ref_bm = 32 if DEV == "cuda" and fused and not precise else v["bm"]
        a, b = (_run(kk, sc, q, pos, req, len(lens), gqa, hkv,
                     dict(v, prefill=pf, fused=fused, bm=v["bm"] if pf else ref_bm), precise=precise)
                for pf in (False, True))
        if DEV == "cpu":
            assert torch.equal(a, b), (fused, precise)
        assert rel_err(b, a.double().cpu()) < ACCEPT_REL
    with pytest.raises(ValueError, match="prefill must be a bool"):
        _run(kk, sc, q, pos, req, len(lens), gqa, hkv, dict(BASELINE, prefill="yes"))


def _guarded(t: torch.Tensor, fill):
    buf = torch.full((t.shape[0] + 2, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    buf[1:-1] = t
    return buf, buf[1:-1]


@pytest.mark.parametrize("name", sorted(PREFILL_CANDIDATES))
def test_prefill_candidate_stays_in_bounds(name):
    """Debug bounds check with multi-token query tiles: every input between guard rows that poison a stray read
    (0xFF pages = NaN means/gains; NaN query rows around the chunk, NaN tail rows past each request's length,
    block-table entries past n_sealed at a guard page); the output between canaries a stray write would change.
    Chunks not multiples of the tile's tokens, tails not multiples of tt, splits above the blocks to split."""
    lens, chunks, hkv, gqa, d = [560, 3], [21, 3], 1, 4, 64
    v = PREFILL_CANDIDATES[name][d]
    kk, sc, refs = build(lens, hkv, gqa, d, 3, 2, device=DEV, seed=11)
    cache_buf, cache = _guarded(sc["cache"], 255)
    bt = sc["block_table"].clone()
    tail_k, tail_v = sc["tail_k"].clone(), sc["tail_v"].clone()
    for r, L in enumerate(lens):
        bt[r, L // 512:] = -1
        tail_k[r, :, L % 512:] = float("nan")
        tail_v[r, :, L % 512:] = float("nan")
    _, tk = _guarded(tail_k, float("nan"))
    _, tv = _guarded(tail_v, float("nan"))
    pos, req = _chunk(lens, chunks)
    q = torch.randn(len(pos), hkv * gqa, d, generator=torch.Generator().manual_seed(2)).bfloat16().to(DEV)
    _, qv = _guarded(q, float("nan"))
    out_buf, out = _guarded(torch.zeros(len(pos), hkv * gqa, d, device=DEV), 7.0)
    plan = kk.plan(pos, req, len(lens), gqa, bm=v["bm"])
    res = kk.attention(qv, pos, req, cache, bt, sc["n_sealed"], sc["seq_lens"], tk, tv, sc["tail_slot"],
                       scale=d ** -0.5, plan=plan, out=out, splits=3, **kernel_args(v))
    assert res is out and torch.isfinite(out).all()
    assert (out_buf[0] == 7).all() and (out_buf[-1] == 7).all()
    kv = _pages_ref(refs, v)
    for i in range(len(pos)):
        assert rel_err(out[i], ref_attention(q[i], int(pos[i]), kv[int(req[i])], gqa)) < 5e-3


@pytest.mark.parametrize("name", ["q64", "q128", "scratch"])
def test_runtime_chunked_prefill_across_blocks(name):
    """The backend's data path (planner phases -> tail write -> attention with Launches.phase -> seal) with
    KAKEYA_PREFILL_VARIANT=candidate:NAME's launch vs the baseline's: a chunked-prefill step whose chunks cross a
    512-token block in both requests (500 -> 530 and 1002 -> 1042: two phases, a seal between them), a decode step
    and a mixed step (a 20-token chunk beside a decode row: two launches with the candidate). Outputs within
    ACCEPT_REL at every step, the same sealed bytes (the seal does not depend on the attention launch)."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl.plan import Launches, TailState, plan_step
    from kakeya_v1_3_ppl.runtime import forward_compressed
    d, hkv, gqa = 64, 1, 4
    g = torch.Generator().manual_seed(3)
    kk = KakeyaKernels(d, 3, 2, DEV)
    start, steps = (500, 1002), [(530, 1042), (531, 1043), (551, 1044)]     # seq lens before / after each step
    K = [(torch.randn(L, hkv, d, generator=g) + torch.randn(d, generator=g) * 3).bfloat16() for L in steps[-1]]
    V = [torch.randn(L, hkv, d, generator=g).bfloat16() for L in steps[-1]]
    Q = [torch.randn(L, hkv * gqa, d, generator=g).bfloat16() for L in steps[-1]]
    bt = torch.tensor([[0, 2, 4], [1, 3, 5]], dtype=torch.int32, device=DEV)
    slots, ids = np.array([1, 0]), ["a", "b"]
    runs = {}
    for pv in ("baseline", f"candidate:{name}"):
        la = Launches("tuned", d, hkv, DEV, prefill=pv)
        assert la.base == prefill_variant(pv, d)
        cache = torch.zeros(6, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
        tk = torch.zeros(2, hkv, 512, d, dtype=torch.bfloat16, device=DEV)
        tv = torch.zeros_like(tk)
        state = TailState()
        # as earlier steps leave them: a's 500 tokens in its tail; b's block 0 sealed in page 1, 490 tokens in its tail
        kk.seal(K[1][None, :512].transpose(1, 2).to(DEV), V[1][None, :512].transpose(1, 2).to(DEV), cache[1:2])
        for r, (s0, blk) in enumerate(((0, 0), (512, 1))):
            tk[slots[r], :, :start[r] - s0] = K[r][s0:start[r]].transpose(0, 1).to(DEV)
            tv[slots[r], :, :start[r] - s0] = V[r][s0:start[r]].transpose(0, 1).to(DEV)
            state.set(int(slots[r]), ids[r], blk, start[r] - s0)
        prev, outs = start, []
        for seq in steps:
            n = [seq[r] - prev[r] for r in range(2)]
            qsl = np.array([0, n[0], n[0] + n[1]])
            take = lambda X: torch.cat([X[r][prev[r]:seq[r]] for r in range(2)]).to(DEV)   # noqa: E731
            q, k, v = take(Q), take(K), take(V)
            ph = [la.phase(p, DEV, gqa, bt.shape[1], decode_step=max(n) == 1)
                  for p in plan_step(qsl, np.array(seq), slots, ids, state)]
            out = torch.zeros_like(q)
            forward_compressed(kk, q, k, v, cache, tk, tv, ph, bt, d ** -0.5, out)
            outs.append(out.float().cpu())
            prev = seq
        assert cache[[0, 1, 3]].flatten(1).any(1).all() and not cache[[2, 4, 5]].any()
        runs[pv] = (torch.cat(outs), cache)
    (ob, cb), (oc, cc) = runs["baseline"], runs[f"candidate:{name}"]
    assert torch.isfinite(oc).all() and rel_err(oc, ob.double()) < ACCEPT_REL
    assert torch.equal(cb, cc)


def test_prefill_variant_table_and_knob():
    from kakeya_kv.config import ConfigError, KakeyaConfig
    from kakeya_v1_3_ppl.checks import known_env_names
    assert prefill_variant("baseline", 128) == BASELINE and prefill_variant("candidate:q64", 256) == BASELINE
    for name, c in PREFILL_CANDIDATES.items():
        for d, v in c.items():
            assert prefill_variant(f"candidate:{name}", d) == v and v["fused"]
            assert v.get("scratch") or (v["prefill"] and v["lut"] >= 2)   # scratch: exact pages (test_scratch_prefill)
            assert v["bm"] % 4 == 0 and v["waves"] >= 1      # whole tokens at GQA 4; waves = compiled occupancy
    with pytest.raises(ValueError, match="no such candidate"):
        prefill_variant("candidate:nope", 64)
    with pytest.raises(ValueError, match="tuned"):
        prefill_variant("fast", 64)
    # the measured default per head_dim (session 9's kernel timings): q64 at D=64, q128 at D=128; 256: the baseline
    assert PREFILL_TUNED == {64: PREFILL_CANDIDATES["q64"][64], 128: PREFILL_CANDIDATES["q128"][128]}
    assert prefill_variant("tuned", 64) == PREFILL_TUNED[64] and prefill_variant("tuned", 128) == PREFILL_TUNED[128]
    assert prefill_variant("tuned", 256) == BASELINE
    assert KakeyaConfig.from_env({}).prefill_variant == "tuned"
    assert KakeyaConfig.from_env({"KAKEYA_PREFILL_VARIANT": " Baseline "}).prefill_variant == "baseline"
    assert KakeyaConfig.from_env({"KAKEYA_PREFILL_VARIANT": "TUNED"}).prefill_variant == "tuned"
    assert KakeyaConfig.from_env({"KAKEYA_PREFILL_VARIANT": "candidate:q128"}).prefill_variant == "candidate:q128"
    with pytest.raises(ConfigError, match=r"KAKEYA_PREFILL_VARIANT='candidate:nope': no such candidate; known: "
                                          r"tuned, baseline, candidate:q128, candidate:q16, candidate:q64"):
        KakeyaConfig.from_env({"KAKEYA_PREFILL_VARIANT": "candidate:nope"})
    with pytest.raises(ConfigError, match=r"KAKEYA_PREFILL_VARIANT='fast': must be one of tuned, baseline"):
        KakeyaConfig.from_env({"KAKEYA_PREFILL_VARIANT": "fast"})
    # other formats have no prefill launch: baseline by default, anything else refused
    for fmt in ("v13", "exact"):
        assert KakeyaConfig.from_env({"KAKEYA_FORMAT": fmt}).prefill_variant == "baseline"
        assert KakeyaConfig.from_env({"KAKEYA_FORMAT": fmt, "KAKEYA_PREFILL_VARIANT": "baseline"}).prefill_variant \
            == "baseline"
        for bad in ("candidate:q64", "tuned"):
            with pytest.raises(ConfigError, match="only applies to KAKEYA_FORMAT=kakeya"):
                KakeyaConfig.from_env({"KAKEYA_FORMAT": fmt, "KAKEYA_PREFILL_VARIANT": bad})
    assert "KAKEYA_PREFILL_VARIANT" in known_env_names()


def test_metadata_builder_attaches_the_prefill_launch(glue, monkeypatch):  # noqa: F811 - pytest fixture
    """Under vLLM stand-ins (9 query / 3 KV heads, D 64): with KAKEYA_PREFILL_VARIANT=candidate:q64, prefill steps
    carry the candidate's launch and tiles, pure-decode steps still the decode variant's; unset: PREFILL_TUNED;
    baseline: the baseline launch."""
    import threading

    from kakeya_v1_3_ppl import context
    from tests.test_decode_variants import _builder, _cam
    monkeypatch.setattr(context, "_local", threading.local())
    backend, spec_mod = glue
    b = _builder(backend, spec_mod, monkeypatch, KAKEYA_PREFILL_VARIANT="candidate:q64")
    v = PREFILL_CANDIDATES["q64"][64]
    context.set_current(["a", "b"], [2, 0], False)
    pre = b.build(0, _cam([0, 5, 8], [5, 3]))
    assert pre.phases[0]["plan"]["bm"] == v["bm"] and pre.phases[0]["plan"]["nt"] == 2
    assert pre.phases[0]["launch"] == dict(kernel_args(v), splits=num_splits(v, 2, 3, 4, sms=4))
    dec = b.build(0, _cam([0, 1, 2], [6, 4]))
    assert "prefill" not in dec.phases[0]["launch"] and dec.phases[0]["plan"]["bm"] == 4
    monkeypatch.delenv("KAKEYA_PREFILL_VARIANT")
    b = _builder(backend, spec_mod, monkeypatch)                       # the default: PREFILL_TUNED
    context.set_current(["a", "b"], [2, 0], False)
    v = PREFILL_TUNED[64]
    assert b.build(0, _cam([0, 5, 8], [5, 3])).phases[0]["launch"] == dict(kernel_args(v),
                                                                             splits=num_splits(v, 2, 3, 4, sms=4))
    b = _builder(backend, spec_mod, monkeypatch, KAKEYA_PREFILL_VARIANT="baseline")
    context.set_current(["a", "b"], [2, 0], False)
    assert b.build(0, _cam([0, 5, 8], [5, 3])).phases[0]["launch"] == dict(kernel_args(BASELINE), splits=FIXED_SPLITS)


def _builder_gqa(backend, spec_mod, monkeypatch, hkv, gqa, d, bits, max_seqs, **env):
    """A compressed layer's metadata builder under the vLLM stand-ins, any GQA (tests.test_decode_variants._builder is
    SmolLM2's 9 / 3 heads)."""
    from types import SimpleNamespace
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(backend, "_LOGGED", True)      # skip the start-up log (needs more of vLLM's config)
    vcfg = SimpleNamespace(
        model_config=SimpleNamespace(get_num_attention_heads=lambda pc: hkv * gqa, max_model_len=2048,
                                     enforce_eager=True),
        parallel_config=None, scheduler_config=SimpleNamespace(max_num_seqs=max_seqs),
        cache_config=SimpleNamespace(num_gpu_blocks=None, block_size=512))
    spec = spec_mod.layer_spec(bits, 512, hkv, d, d)
    return backend.KakeyaMetadataBuilder(spec, ["model.layers.1.self_attn.attn"], vcfg, torch.device(DEV))


def _build_and_run(b, kk, ids, slots, bt, start, steps, Q, K, V, cache, tk, tv):
    """Steps through a metadata builder b (vLLM stand-ins) and runtime.forward_compressed: request r holds start[r]
    tokens, then seq[r] after each step of ``steps``; Q / K / V [r] are its tokens' queries / keys / values. Returns
    each step's outputs (float, CPU) and metadata."""
    from types import SimpleNamespace

    from kakeya_v1_3_ppl import context
    from kakeya_v1_3_ppl.runtime import forward_compressed
    R, d = len(ids), kk.D
    outs, metas, prev = [], [], start
    for seq in steps:
        n = [seq[r] - prev[r] for r in range(R)]
        qsl = np.concatenate([[0], np.cumsum(n)])
        context.set_current(ids, slots, False)
        qs, ss = torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq, dtype=torch.int32)
        cam = SimpleNamespace(num_reqs=R, num_actual_tokens=int(qsl[-1]), query_start_loc_cpu=qs, seq_lens=ss,
                              seq_lens_cpu_upper_bound=None, max_query_len=max(n), block_table_tensor=bt,
                              slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64))
        meta = b.build(0, cam)
        take = lambda X: torch.cat([X[r][prev[r]:seq[r]] for r in range(R)]).to(DEV)   # noqa: E731
        q = take(Q)
        out = torch.zeros_like(q)
        forward_compressed(kk, q, take(K), take(V), cache, tk, tv, meta.phases, bt, d ** -0.5, out, span=meta.span)
        outs.append(out.float().cpu())
        metas.append(meta)
        prev = seq
    return outs, metas


def test_mixed_step_runs_decode_rows_and_prefill_chunks_as_two_launches(glue, monkeypatch):  # noqa: F811 - fixture
    """Through the metadata builder (vLLM stand-ins) and the backend's data path (runtime.forward_compressed), GQA 4,
    D 64: a mixed step of three decode requests (ragged: 37, 1100 and 511 tokens, the last one filling its block) and
    a 40-token prefill chunk crossing a 512-token block (490 -> 530: phase 0 = the chunk's first 22 tokens + the
    decode rows, phase 1 = its last 18), then a pure-decode step. With the default (tuned) prefill launch, phase 0
    runs two launches: the decode rows in the decode variant's 4-row tiles and the chunk in PREFILL_TUNED's 64-row
    tiles, each with its own split count; phase 1 (prefill only) and the decode step keep one launch. Outputs within
    ACCEPT_REL of KAKEYA_PREFILL_VARIANT=baseline (one baseline launch per phase, the previous path) at every token,
    the same sealed pages."""
    import threading

    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl import context
    monkeypatch.setattr(context, "_local", threading.local())
    backend, spec_mod = glue
    d, hkv, gqa, bits = int(os.environ.get("MIXED_STEP_TEST_HEAD_DIM", 64)), 1, 4, (3, 2)   # D=128: run by hand
    ids, slots = ["a", "b", "c", "d"], np.array([3, 0, 1, 2])
    start, step1, step2 = [37, 490, 1100, 511], [38, 530, 1101, 512], [39, 531, 1102, 513]
    bt = torch.tensor([[0, 8, 8], [1, 2, 8], [3, 4, 5], [6, 7, 8]], dtype=torch.int32, device=DEV)  # 8: never read
    g = torch.Generator().manual_seed(7)
    K = [(torch.randn(L, hkv, d, generator=g) + torch.randn(d, generator=g) * 3).bfloat16() for L in step2]
    V = [torch.randn(L, hkv, d, generator=g).bfloat16() for L in step2]
    Q = [torch.randn(L, hkv * gqa, d, generator=g).bfloat16() for L in step2]
    kk = KakeyaKernels(d, *bits, DEV)
    dec_v, pre_v = decode_variant("tuned", d), PREFILL_TUNED[d]
    runs = {}
    for pv in ("tuned", "baseline"):
        b = _builder_gqa(backend, spec_mod, monkeypatch, hkv, gqa, d, bits, 4, KAKEYA_PREFILL_VARIANT=pv)
        sms = b.launches.sms                                     # 4 on the CPU, the GPU's SMs in a GPU parity run
        cache = torch.zeros(9, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
        tk = torch.zeros(5, hkv, 512, d, dtype=torch.bfloat16, device=DEV)
        tv = torch.zeros_like(tk)
        # as earlier steps leave them: c's blocks 0-1 sealed in pages 3-4, every request's open block in its tail
        kk.seal(K[2][:1024].view(2, 512, hkv, d).transpose(1, 2).to(DEV),
                V[2][:1024].view(2, 512, hkv, d).transpose(1, 2).to(DEV), cache[3:5])
        for r in range(4):
            s0 = start[r] // 512 * 512
            tk[slots[r], :, :start[r] - s0] = K[r][s0:start[r]].transpose(0, 1).to(DEV)
            tv[slots[r], :, :start[r] - s0] = V[r][s0:start[r]].transpose(0, 1).to(DEV)
            b.state.set(int(slots[r]), ids[r], start[r] // 512, start[r] - s0)
        outs, metas = _build_and_run(b, kk, ids, slots, bt, start, (step1, step2), Q, K, V, cache, tk, tv)
        runs[pv] = (torch.cat(outs), cache, [m.phases for m in metas])
    (ot, ct, (m1, m2)), (ob, cb, (b1, b2)) = runs["tuned"], runs["baseline"]
    launch = lambda v, nt: dict(kernel_args(v), splits=num_splits(v, nt, hkv, bt.shape[1], sms))   # noqa: E731
    # tuned: phase 0 = decode rows (tokens 0, 41, 42: one 4-row tile each) + the chunk's 22 tokens (88 rows: 2 tiles)
    assert len(m1) == 2 and "launch" not in m1[0]
    dec, pre = m1[0]["attn"]
    assert dec["tok"].tolist() == [0, 41, 42] and dec["plan"]["bm"] == 4 and dec["plan"]["nt"] == 3
    assert dec["launch"] == launch(dec_v, 3) and "prefill" not in dec["launch"]
    bm = pre_v["bm"]                    # 64 at D=64 (the CI case), 128 at D=128
    nt0, nt1 = -(-22 * gqa // bm), -(-18 * gqa // bm)
    assert pre["tok"].tolist() == list(range(1, 23)) and pre["plan"]["bm"] == bm and pre["plan"]["nt"] == nt0
    assert pre["launch"] == launch(pre_v, nt0) and pre["launch"]["prefill"]
    assert m1[1]["tok"].tolist() == list(range(23, 41)) and "attn" not in m1[1]         # phase 1: the chunk only
    assert m1[1]["launch"] == launch(pre_v, nt1) and m1[1]["plan"]["bm"] == bm
    (dstep,) = m2                                                                      # the decode step
    assert "attn" not in dstep and dstep["launch"] == launch(dec_v, 4) and dstep["plan"]["bm"] == 4
    # baseline: one baseline launch per phase of the mixed step (decode rows included), the decode step unchanged
    assert all("attn" not in p and p["launch"] == dict(kernel_args(BASELINE), splits=FIXED_SPLITS) for p in b1)
    assert b2[0]["launch"] == dstep["launch"]
    assert torch.isfinite(ot).all() and rel_err(ot, ob.double()) < ACCEPT_REL
    for i in range(len(ot)):                    # every token, decode rows included, not only the batch as a whole
        assert rel_err(ot[i], ob[i].double()) < ACCEPT_REL, i
    assert torch.equal(ct, cb) and ct[[1, 6]].flatten(1).any(1).all() and not ct[[2, 7, 8]].any()


@pytest.mark.parametrize("which", ["local", "device"])
def test_prefill_candidates_compile_for_sm90_without_loop_spills(which, monkeypatch):
    """sm_90 compile on the CPU (Triton's ptxas, sass_count.py): each candidate's sealed-block loop has no register
    spill and costs fewer warp-instructions per query token than the baseline's (the decode work a larger tile
    shares, a proxy only). "device": with the H200 image's Triton (KAKEYA_DEVICE_TRITON, skipped when unset),
    which also fixes ``waves``: the compiled occupancy (programs per SM) there. This machine's Triton may allocate
    registers differently (3.9 holds 3 programs of q16 at D=64, 3.6 two), so its occupancy is not checked."""
    import json
    import os

    from kakeya_kv.config import device_triton
    from tests.test_kernel_bench import _sm90_run
    if which == "device":
        path = device_triton()
        if path is None:
            pytest.skip("KAKEYA_DEVICE_TRITON unset (a folder with the GPU image's Triton)")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(path)] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    code = ("import json, triton, sass_count as S\n"
            "from kakeya_kernels.variants import PREFILL_CANDIDATES as C, BASELINE as B\n"
            "def f(v):\n"
            "    r = S.count(d, 4, 3, v['lut'], v['tt'], v['num_warps'], v['maxnreg'], v['bm'], fused=v['fused'], "
            "prefill=v.get('prefill', False))\n"
            "    return [r['spill_instructions_in_loop'], r['programs_per_sm'], "
            "r['loop_instructions'] * v['num_warps'] * 4 / v['bm'] * 64 / v['tt'], r['regs']]\n"
            "out = {'triton': triton.__file__}\n"
            "for d in (64, 128):\n"
            "    out[f'baseline {d}'] = f(B)\n"
            "    out.update({f'{n} {d}': f(c[d]) for n, c in C.items() if not c[d].get('scratch')})\n"
            "print(json.dumps(out))")
    p = _sm90_run(["-c", code], "cuobjdump", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    if which == "device":
        assert got["triton"].startswith(str(path)), got["triton"]
    for name, c in PREFILL_CANDIDATES.items():
        for d, v in c.items():
            if v.get("scratch"):     # no sealed-block loop (exact pages): compile_check.py's "scratch" configurations
                continue
            spills, resident, per_token, regs = got[f"{name} {d}"]
            assert spills == 0, f"{name} D={d}: {spills} spill instructions in the sealed loop ({regs} registers)"
            assert per_token < got[f"baseline {d}"][2], (name, d, per_token, got[f"baseline {d}"])
            if which == "device":
                assert resident == v["waves"], f"{name} D={d}: sm_90 holds {resident} programs per SM, " \
                                               f"waves={v['waves']}"


def test_chunk_exact_step_through_the_builder(glue, monkeypatch):  # noqa: F811 - fixture
    """KAKEYA_PREFILL_ATTEND=chunk through the metadata builder (vLLM stand-ins) and forward_compressed, GQA 4, D 64:
    a mixed step of a decode row (37 -> 38 tokens) and a chunk crossing a block (490 -> 1100: seals block 0 and 1
    of its span), then a pure-decode step. The chunk is the step's span (one prefill launch, PREFILL_TUNED's tiles),
    the decode row its only phase (the decode launch); the span seals the same pages as the block phases do, the
    decode row's outputs are those of the block phases bit for bit, and the chunk's differ from them (it read its
    own first block exact)."""
    import threading

    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl import context
    monkeypatch.setattr(context, "_local", threading.local())
    backend, spec_mod = glue
    d, hkv, gqa, bits = 64, 1, 4, (3, 2)
    ids, slots = ["a", "b"], np.array([1, 0])
    start, step1, step2 = [37, 490], [38, 1100], [39, 1101]
    bt = torch.tensor([[0, 5, 5], [1, 2, 3]], dtype=torch.int32, device=DEV)   # 5: never read
    g = torch.Generator().manual_seed(11)
    K = [(torch.randn(L, hkv, d, generator=g) + torch.randn(d, generator=g) * 3).bfloat16() for L in step2]
    V = [torch.randn(L, hkv, d, generator=g).bfloat16() for L in step2]
    Q = [torch.randn(L, hkv * gqa, d, generator=g).bfloat16() for L in step2]
    kk = KakeyaKernels(d, *bits, DEV)
    runs = {}
    for mode in ("chunk", "blocks"):
        b = _builder_gqa(backend, spec_mod, monkeypatch, hkv, gqa, d, bits, 2, KAKEYA_PREFILL_ATTEND=mode)
        assert b.chunk_exact == (mode == "chunk")
        cache = torch.zeros(6, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
        tk = torch.zeros(2, hkv, 512, d, dtype=torch.bfloat16, device=DEV)
        tv = torch.zeros_like(tk)
        for r in range(2):
            tk[slots[r], :, :start[r]] = K[r][:start[r]].transpose(0, 1).to(DEV)
            tv[slots[r], :, :start[r]] = V[r][:start[r]].transpose(0, 1).to(DEV)
            b.state.set(int(slots[r]), ids[r], 0, start[r])
        outs, metas = _build_and_run(b, kk, ids, slots, bt, start, (step1, step2), Q, K, V, cache, tk, tv)
        runs[mode] = (outs, cache.cpu(), metas)
    (oc, cc, (m1, m2)), (ob, cb, _) = runs["chunk"], runs["blocks"]
    v = PREFILL_TUNED[d]
    sp = m1.span
    assert sp["tok"].tolist() == list(range(1, 611)) and sp["plan"]["bm"] == v["bm"] and sp["launch"]["prefill"]
    assert sp["seal_blk"].tolist() == [0, 1] and sp["span_pages"] == 3
    (ph,) = m1.phases
    assert ph["tok"].tolist() == [0] and ph["plan"]["bm"] == 4 and "prefill" not in ph["launch"]
    assert m2.span is None and len(m2.phases) == 1
    assert torch.equal(cc, cb) and cc[[1, 2]].flatten(1).any(1).all() and not cc[[3, 5]].any()
    assert torch.equal(oc[0][0], ob[0][0]) and torch.equal(oc[1], ob[1])       # decode rows
    assert torch.isfinite(oc[0]).all() and rel_err(oc[0][23:], ob[0][23:].double()) > ACCEPT_REL  # past block 0
    assert torch.equal(oc[0][1:23], ob[0][1:23]) or rel_err(oc[0][1:23], ob[0][1:23].double()) < ACCEPT_REL
