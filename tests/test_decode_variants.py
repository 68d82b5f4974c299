"""The backend's decode variants (kakeya_kernels.variants) in the Triton interpreter: the tuned launch (pair table,
fused gather + combine, 4-row GQA tiles, waves split rule) stays inside its buffers and agrees with the baseline
launch and the CPU reference codec; the planner builds the metadata it needs; the knob picks it."""
import numpy as np
import pytest
import torch

from kakeya_kernels.variants import (ACCEPT_REL, BASELINE, CANDIDATES, FIXED_SPLITS, TUNED, decode_variant,
                                     kernel_args, num_splits)
from tests.kernel_cases import build, ref_attention, rel_err
from tests.test_vllm_perlayer import glue  # noqa: F401 - vLLM stand-ins fixture

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _launch(v, nt, hkv, max_blocks, sms):
    return dict(kernel_args(v), splits=num_splits(v, nt, hkv, max_blocks, sms))


def _guarded(t: torch.Tensor, fill):
    """t inside a buffer with one guard row of `fill` on each side (dim 0): returns (buffer, view of t)."""
    buf = torch.full((t.shape[0] + 2, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    buf[1:-1] = t
    return buf, buf[1:-1]


@pytest.mark.parametrize("d,sms", [(64, 4), (128, 4), (64, 132)])
def test_tuned_launch_stays_in_bounds(d, sms):
    """Debug bounds check: every buffer the tuned launch reads sits between guard rows that poison any stray
    read (0xFF pages = NaN means / gains; NaN query and tail rows, NaN tail positions past each request's length,
    block-table entries past n_sealed pointing at a guard page); the output sits between canary rows that a stray
    write would change. Ragged lengths, tails not multiples of tt, more splits than blocks (sms=132)."""
    lens, hkv, gqa = [1, 600, 1100], 2, 4
    kk, sc, refs = build(lens, hkv, gqa, d, device=DEV, seed=d)
    v = TUNED[d]
    cache_buf, cache = _guarded(sc["cache"], 255)
    bt = sc["block_table"].clone()
    for r, L in enumerate(lens):
        bt[r, L // 512:] = -1                                     # never read: would land on the guard page
    tail_k, tail_v = sc["tail_k"].clone(), sc["tail_v"].clone()
    for r, L in enumerate(lens):
        tail_k[r, :, L % 512:] = float("nan")                     # positions past the request's length
        tail_v[r, :, L % 512:] = float("nan")
    tk_buf, tk = _guarded(tail_k, float("nan"))
    tv_buf, tv = _guarded(tail_v, float("nan"))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), hkv * gqa, d, generator=g).bfloat16().to(DEV)
    q_buf, qv = _guarded(q, float("nan"))
    out_buf, out = _guarded(torch.zeros(len(lens), hkv * gqa, d, device=DEV), 7.0)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    req = torch.arange(len(lens), device=DEV)
    plan = kk.plan(pos, req, len(lens), gqa, bm=v["bm"])
    kw = _launch(v, plan["nt"], hkv, bt.shape[1], sms)
    assert kw["splits"] == (max(lens) // 512 + 1 if sms == 132 else 2)     # 3 tiles x 2 heads; cap blocks + 1
    res = kk.attention(qv, pos, req, cache, bt, sc["n_sealed"], sc["seq_lens"], tk, tv, sc["tail_slot"],
                       scale=d ** -0.5, plan=plan, out=out, **kw)
    assert res is out and torch.isfinite(out).all()
    assert (out_buf[0] == 7).all() and (out_buf[-1] == 7).all()
    for i in range(len(lens)):
        assert rel_err(out[i], ref_attention(q[i], lens[i] - 1, refs[i], gqa)) < 5e-3


@pytest.mark.parametrize("kb,vb", [(4, 3), (3, 2), (5, 4)])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_tuned_matches_baseline_and_reference(kb, vb, gqa):
    """Fast mode, as served: tuned vs the baseline launch within the bench's ACCEPT_REL, and vs float64 attention on
    the reference codec's decode of the sealed bytes. Lengths 1 / 77 / 1100 (tails 1, 77, 76: not multiples of tt)."""
    lens, hkv, d = [1077, 1, 77, 1100][: 3 + (gqa == 3)], 3 if gqa == 3 else 2, 64
    kk, sc, refs = build(lens, hkv, gqa, d, kb, vb, device=DEV, seed=10 * kb + gqa)
    g = torch.Generator().manual_seed(gqa)
    q = torch.randn(len(lens), hkv * gqa, d, generator=g).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    req = torch.arange(len(lens), device=DEV)
    outs = {}
    for name in ("tuned", "baseline"):
        v = decode_variant(name, d)
        plan = kk.plan(pos, req, len(lens), gqa, bm=v["bm"])
        outs[name] = kk.attention(q, pos, req, scale=d ** -0.5, plan=plan, out_dtype=torch.float32,
                                  **_launch(v, plan["nt"], hkv, sc["block_table"].shape[1], sms=4), **sc)
    assert rel_err(outs["tuned"], outs["baseline"].double().cpu()) < ACCEPT_REL
    for i in range(len(lens)):
        assert rel_err(outs["tuned"][i], ref_attention(q[i], lens[i] - 1, refs[i], gqa)) < 5e-3


def test_variant_table_and_split_rule():
    # Session 9's per-head_dim winners: capped launches sized to one full wave (fill 4): D=64 128-token tiles,
    # D=128 the register prefetch.
    assert decode_variant("tuned", 128) == TUNED[128] and TUNED[128]["pf"] and TUNED[128]["tt"] == 64
    assert TUNED[64]["tt"] == 128 and "pf" not in TUNED[64]
    assert all(v["bm"] == 4 and v["lut"] == 4 and v["fused"] and v["num_warps"] == 4 and v["maxnreg"] == 128
               and v["waves"] is None and v["fill"] == 4 for v in TUNED.values())
    assert decode_variant("baseline", 64) == BASELINE and decode_variant("tuned", 256) == BASELINE   # not measured
    with pytest.raises(ValueError, match="tuned"):
        decode_variant("fast", 64)
    assert num_splits(BASELINE, 1, 8, 100, 132) == FIXED_SPLITS
    # waves 2 (session 8's default at D=128): H200 (132 SMs), batch 16, GQA 4 in 4-row tiles, 8 KV heads -> 3 splits
    waves2 = CANDIDATES["t128_reg4"][128]
    assert num_splits(waves2, 16, 8, 32, 132) == 3
    assert num_splits(waves2, 1, 8, 2, 132) == 3          # capped at blocks + tail
    assert num_splits(waves2, 4096, 8, 64, 132) == 1
    # fill: one full wave of resident programs (round down), capped by the blocks the same way
    assert num_splits(dict(TUNED[64], waves=None, fill=4), 16, 8, 32, 132) == 4    # 512 programs <= 4 x 132
    assert num_splits(dict(TUNED[64], waves=None, fill=4), 64, 8, 32, 132) == 1
    assert num_splits(dict(TUNED[64], waves=None, fill=4), 1, 8, 2, 132) == 3


def test_candidates_are_servable_by_name(glue):  # noqa: F811 - pytest fixture
    """KAKEYA_DECODE_VARIANT=candidate:NAME serves a sweep candidate without a code change (the next device call
    can use a winner at once); unknown names fail at configuration with the known ones listed."""
    from kakeya_kernels.variants import CANDIDATES
    from kakeya_kv.config import ConfigError, KakeyaConfig
    assert decode_variant("candidate:fill", 64) == CANDIDATES["fill"][64]
    assert decode_variant("candidate:fill", 256) == BASELINE             # a head_dim the candidate does not cover
    with pytest.raises(ValueError, match="no such candidate"):
        decode_variant("candidate:nope", 64)
    assert KakeyaConfig.from_env({"KAKEYA_DECODE_VARIANT": "candidate:t128_fill4"}).decode_variant == \
        "candidate:t128_fill4"
    assert KakeyaConfig.from_env({"KAKEYA_DECODE_VARIANT": "candidate:ki8", "KAKEYA_K_GRID": "uniform"}
                                 ).decode_variant == "candidate:ki8"   # ki8 needs the uniform K grid (test_ki8_decode)
    with pytest.raises(ConfigError, match="candidate:fill"):
        KakeyaConfig.from_env({"KAKEYA_DECODE_VARIANT": "candidate:nope"})
    # the planner's launch for it: its kernel knobs and its split rule (fill: one full wave)
    from kakeya_v1_3_ppl.plan import Launches
    la = Launches("candidate:fill", 64, 8, "cpu")
    ph = la.attach({"plan": {"nt": 4}}, la.decode, max_blocks=64)
    assert ph["launch"] == dict(kernel_args(CANDIDATES["fill"][64]), splits=num_splits(CANDIDATES["fill"][64], 4, 8,
                                                                                       64, la.sms))


def test_planner_builds_the_fused_source_map():
    """Host phases and the GPU decode buffers carry the tile row -> query row map the fused launch gathers with,
    equal to the kernel's own plan, for 4-row tiles and GQA 1 / 3 / 4 / 8."""
    from kakeya_kernels.kakeya_triton import gqa_plan
    from kakeya_v1_3_ppl.plan import DecodeBuffers, TailState, plan_step, to_device
    for gqa in (1, 3, 4, 8):
        seq = np.array([700, 5, 1300])
        (ph,) = plan_step(np.array([0, 1, 2, 3]), seq, np.array([2, 0, 1]), ["a", "b", "c"], None)
        dev = to_device(ph, "cpu", gqa, 4)["plan"]
        ref = gqa_plan(ph.q_pos, ph.q_req, 3, gqa, 4)
        assert dev["src"].tolist() == ref["src"].tolist() and dev["nt"] == ref["nt"]
        buf = DecodeBuffers(5, gqa, 4, "cpu")
        d = buf.fill(3, torch.tensor(seq, dtype=torch.int32), torch.zeros(3, 3, dtype=torch.int32),
                     torch.tensor([2, 0, 1]))["plan"]
        assert d["src"].tolist() == ref["src"].tolist() and d["dest"].tolist() == ref["dest"].tolist()
    ph = plan_step(np.array([0, 3]), np.array([3]), np.array([0]), ["x"], TailState())[0]   # 3-token prefill
    assert to_device(ph, "cpu", 2, 4)["plan"]["src"].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]


@pytest.mark.parametrize("bits", [(4, 3), (3, 2), (5, 4)])
def test_runtime_decode_steps_tuned_vs_baseline(bits):
    """The backend's data path with the builder's launches (Launches.attach), over decode steps that seal a block, for each width a per-layer recipe may give a layer: the host-planned and the GPU-planned
    (DecodeBuffers, CUDA-graph) decode paths with the tuned launch agree with the baseline launch within ACCEPT_REL
    at every step, and seal the same bytes (seals do not depend on the attention launch)."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl.plan import DecodeBuffers, Launches, TailState, plan_step, to_device
    from kakeya_v1_3_ppl.runtime import forward_compressed, forward_decode
    d, hkv, gqa, steps = 64, 3, 3, 4
    g = torch.Generator().manual_seed(sum(bits))
    kk = KakeyaKernels(d, *bits, DEV)
    L0 = [510, 37]
    K = [(torch.randn(L + steps, hkv, d, generator=g) + torch.randn(d, generator=g) * 3).bfloat16() for L in L0]
    V = [torch.randn(L + steps, hkv, d, generator=g).bfloat16() for L in L0]
    bt = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=DEV)
    slots = np.array([4, 1])
    ids = ["a", "b"]
    runs = {}
    for name in ("tuned", "baseline"):
        la = Launches(name, d, hkv, DEV)
        cache = torch.zeros(4, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
        tk = torch.zeros(6, hkv, 512, d, dtype=torch.bfloat16, device=DEV)
        tv = torch.zeros_like(tk)
        state = TailState()
        for r in range(2):   # the prompts' tokens as a prefill leaves them (its attention is tested elsewhere)
            tk[slots[r], :, :L0[r]] = K[r][:L0[r]].transpose(0, 1).to(DEV)
            tv[slots[r], :, :L0[r]] = V[r][:L0[r]].transpose(0, 1).to(DEV)
            state.set(int(slots[r]), ids[r], 0, L0[r])
        host = (cache, tk, tv)
        gpu = (cache.clone(), tk.clone(), tv.clone())
        buf = DecodeBuffers(8, gqa, la.decode["bm"], DEV)
        outs = []
        for s in range(steps):
            seq = np.array([L0[0] + s + 1, L0[1] + s + 1])
            qd = torch.randn(2, hkv * gqa, d, generator=torch.Generator().manual_seed(s)).bfloat16().to(DEV)
            kd = torch.stack([K[0][L0[0] + s], K[1][L0[1] + s]]).to(DEV)
            vd = torch.stack([V[0][L0[0] + s], V[1][L0[1] + s]]).to(DEV)
            oa, ob = torch.zeros_like(qd), torch.zeros_like(qd)
            ph = [la.attach(to_device(p, DEV, gqa, la.decode["bm"]), la.decode, 2)
                  for p in plan_step(np.array([0, 1, 2]), seq, slots, ids, state)]
            forward_compressed(kk, qd, kd, vd, *host, ph, bt, d ** -0.5, oa)
            dd = la.attach(buf.fill(2, torch.tensor(seq, dtype=torch.int32, device=DEV), bt,
                                    torch.tensor(slots, device=DEV)), la.decode, 2)
            forward_decode(kk, qd, kd, vd, *gpu, dd, bt, d ** -0.5, ob)
            assert torch.equal(oa, ob), f"{name} step {s}: host and GPU-planned decode differ"
            outs.append(oa)
        assert torch.equal(host[0], gpu[0]) and host[0][3].any()      # request a's block 0 sealed into page 3
        runs[name] = (torch.stack(outs), host[0])
    assert rel_err(runs["tuned"][0], runs["baseline"][0].double().cpu()) < ACCEPT_REL
    assert torch.equal(runs["tuned"][1], runs["baseline"][1])
    assert Launches("tuned", d, hkv, DEV).decode["lut"] == 4 and Launches("baseline", d, hkv, DEV).decode == BASELINE


def test_decode_variant_knob():
    from kakeya_kv.config import ConfigError, KakeyaConfig
    from kakeya_v1_3_ppl.checks import known_env_names
    assert KakeyaConfig.from_env({}).decode_variant == "tuned"
    assert KakeyaConfig.from_env({"KAKEYA_DECODE_VARIANT": " Baseline "}).decode_variant == "baseline"
    with pytest.raises(ConfigError, match=r"KAKEYA_DECODE_VARIANT='fast': must be one of tuned, baseline"):
        KakeyaConfig.from_env({"KAKEYA_DECODE_VARIANT": "fast"})
    assert "KAKEYA_DECODE_VARIANT" in known_env_names()


def _builder(backend, spec_mod, monkeypatch, enforce_eager=True, **env):
    from types import SimpleNamespace
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(backend, "_LOGGED", True)      # skip the start-up log (needs more of vLLM's config)
    vcfg = SimpleNamespace(
        model_config=SimpleNamespace(get_num_attention_heads=lambda pc: 9, max_model_len=2048,
                                     enforce_eager=enforce_eager),
        parallel_config=None, scheduler_config=SimpleNamespace(max_num_seqs=4),
        cache_config=SimpleNamespace(num_gpu_blocks=None, block_size=512))
    spec = spec_mod.layer_spec((3, 2), 512, 3, 64, 64)
    return backend.KakeyaMetadataBuilder(spec, ["model.layers.1.self_attn.attn"], vcfg, torch.device("cpu"))


def _cam(qsl, seq):
    from types import SimpleNamespace
    qsl, seq = torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq, dtype=torch.int32)
    return SimpleNamespace(num_reqs=len(seq), num_actual_tokens=int(qsl[-1]), query_start_loc_cpu=qsl,
                           seq_lens=seq, seq_lens_cpu_upper_bound=None, max_query_len=int((qsl[1:] - qsl[:-1]).max()),
                           block_table_tensor=torch.zeros(len(seq), 4, dtype=torch.int32),
                           slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64))


@pytest.mark.parametrize("name", ["tuned", "baseline"])
def test_metadata_builder_attaches_the_decode_launch(glue, monkeypatch, name):  # noqa: F811 - pytest fixture
    """Under vLLM stand-ins (SmolLM2 geometry: 9 query / 3 KV heads, D 64): prefill steps carry the baseline launch,
    pure-decode steps KAKEYA_DECODE_VARIANT's (host-planned and GPU-planned alike), with the tiles it needs."""
    import threading

    from kakeya_v1_3_ppl import context
    monkeypatch.setattr(context, "_local", threading.local())   # the batch identity set here ends with the test
    backend, spec_mod = glue
    b = _builder(backend, spec_mod, monkeypatch, KAKEYA_DECODE_VARIANT=name, KAKEYA_PREFILL_VARIANT="baseline")
    v = decode_variant(name, 64)
    context.set_current(["a", "b"], [2, 0], False)
    pre = b.build(0, _cam([0, 5, 8], [5, 3]))
    assert pre.phases[0]["launch"] == dict(kernel_args(BASELINE), splits=FIXED_SPLITS)
    assert pre.phases[0]["plan"]["bm"] == 16
    dec = b.build(0, _cam([0, 1, 2], [6, 4]))
    (ph,) = dec.phases
    splits = num_splits(v, ph["plan"]["nt"], 3, 4, sms=4)    # CPU builder: 4 "SMs"
    assert ph["launch"] == dict(kernel_args(v), splits=splits) and ph["plan"]["bm"] == v["bm"]
    assert ph["plan"]["nt"] == 2 and "src" in ph["plan"]                # one tile per request either way
    monkeypatch.setenv("KAKEYA_CUDA_GRAPHS", "1")
    g = _builder(backend, spec_mod, monkeypatch)
    context.set_current(["a", "b"], [2, 0], False, req_idx_gpu=torch.tensor([2, 0]))
    assert g.build(0, _cam([0, 5, 8], [5, 3])).decode is None          # prefill: host-planned
    gd = g.build(0, _cam([0, 1, 2], [6, 4])).decode
    cap = g.build_for_cudagraph_capture(_cam([0, 1, 2], [1, 1])).decode
    for d in (gd, cap):
        assert d["launch"] == ph["launch"] and d["plan"]["bm"] == v["bm"] and d["plan"]["src"].numel() == d["plan"]["nt"] * v["bm"]


@pytest.mark.parametrize("env,eager,gpu", [("", True, False), ("", False, True), ("auto", False, True),
                                           ("0", False, False), ("1", True, True)])
def test_decode_graphs_follow_the_knob_and_auto_follows_enforce_eager(glue, monkeypatch, env, eager, gpu):  # noqa: F811
    """KAKEYA_CUDA_GRAPHS auto (the default): pure-decode steps are GPU-planned and vLLM may capture them as full
    graphs exactly when it does not run eager; 0 / 1 force it off / on (1 also in eager engines)."""
    import threading

    from kakeya_v1_3_ppl import context
    monkeypatch.setattr(context, "_local", threading.local())
    backend, spec_mod = glue
    if env:
        monkeypatch.setenv("KAKEYA_CUDA_GRAPHS", env)
    else:
        monkeypatch.delenv("KAKEYA_CUDA_GRAPHS", raising=False)
    b = _builder(backend, spec_mod, monkeypatch, enforce_eager=eager)
    context.set_current(["a", "b"], [2, 0], False, req_idx_gpu=torch.tensor([2, 0]))
    assert b.build(0, _cam([0, 5, 8], [5, 3])).decode is None           # prefill: host-planned either way
    assert (b.build(0, _cam([0, 1, 2], [6, 4])).decode is not None) is gpu
    want = "UNIFORM_SINGLE_TOKEN_DECODE" if gpu else "NEVER"
    from types import SimpleNamespace
    vcfg = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=eager))
    assert backend.KakeyaMetadataBuilder.get_cudagraph_support(vcfg, None).name == want


def test_v13_keeps_host_planned_decode_unless_asked():
    from kakeya_kv.config import ConfigError, KakeyaConfig, cuda_graphs_for
    assert cuda_graphs_for(KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13"}), enforce_eager=False) is False
    assert cuda_graphs_for(KakeyaConfig.from_env({"KAKEYA_FORMAT": "exact"}), enforce_eager=False) is False
    assert cuda_graphs_for(KakeyaConfig.from_env({}), enforce_eager=False) is True
    with pytest.raises(ConfigError, match="KAKEYA_CUDA_GRAPHS='2'"):
        KakeyaConfig.from_env({"KAKEYA_CUDA_GRAPHS": "2"})
