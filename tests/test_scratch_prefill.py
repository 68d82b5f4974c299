"""The decode-once-then-attend prefill launch (PREFILL_CANDIDATES["scratch"], kakeya_kernels.scratch) in the Triton
interpreter: sealed blocks decoded once into bf16 exact pages (KakeyaKernels.decode_into), then the exact-page kernel
over them + the exact tail. Against the baseline launch, float64 attention on the reference decode, the backend's
mixed step, the scratch cap and its knob.

Tolerance vs float64: the scratch stores decoded K/V in bf16, as FlashAttention's cache does; rounding the
reference's own decoded K/V to bf16 alone moves this data's outputs by ~1e-2 relative (keys with per-channel offsets
of ~3 sigma), so the 5e-3 bound is checked against float64 attention on the bf16-rounded reference decode (what the
pages hold), and the unrounded reference gets the exact-page bound of test_kernels (1e-2)."""
import numpy as np
import pytest
import torch

from kakeya_kernels.variants import ACCEPT_REL, BASELINE, PREFILL_CANDIDATES, kernel_args, num_splits
from tests.kernel_cases import build, ref_attention, rel_err
from tests.test_prefill_variants import _pages_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SCRATCH = PREFILL_CANDIDATES["scratch"]


def _phase(lens, chunks, hkv, gqa, d, seed):
    kk, sc, refs = build(lens, hkv, gqa, d, 4, 3, device=DEV, seed=seed)
    pos = torch.tensor(np.concatenate([np.arange(L - c, L) for L, c in zip(lens, chunks)]), device=DEV)
    req = torch.tensor(np.concatenate([np.full(c, r) for r, c in enumerate(chunks)]), device=DEV)
    q = torch.randn(len(pos), hkv * gqa, d, generator=torch.Generator().manual_seed(seed)).bfloat16().to(DEV)
    return kk, sc, refs, q, pos, req


def _run(kk, sc, q, pos, req, n_req, gqa, hkv, v, n_sealed_host=None, **kw):
    plan = kk.plan(pos, req, n_req, gqa, bm=v["bm"])
    if n_sealed_host is not None:
        plan["n_sealed_host"] = n_sealed_host
    splits = num_splits(v, plan["nt"], hkv, sc["block_table"].shape[1], sms=4)
    return kk.attention(q, pos, req, scale=q.shape[-1] ** -0.5, plan=plan, out_dtype=torch.float32, splits=splits,
                        **kernel_args(v), **{**sc, **kw}), plan


def test_scratch_matches_baseline_and_reference():
    """One phase of five requests, GQA 4, D 64, ragged context: 1 token (no sealed block, one query), 511 (40 new
    tokens, all in the tail), 512 (a sealed block read by its own last 3 tokens: a prefix-cache hit's read-only
    phase), 513 (1 sealed + a 1-token tail), 1100 (2 sealed + 76 tail tokens, 30 new). Host counts from the plan (as
    the backend passes them) and read back (none given): the same output. Fast mode (as served) and precise."""
    lens, chunks, hkv, gqa, d = [1, 511, 512, 513, 1100], [1, 40, 3, 1, 30], 1, 4, 64
    kk, sc, refs, q, pos, req = _phase(lens, chunks, hkv, gqa, d, seed=1)
    ns = np.array([L // 512 for L in lens])
    base, _ = _run(kk, sc, q, pos, req, len(lens), gqa, hkv, BASELINE)
    out, plan = _run(kk, sc, q, pos, req, len(lens), gqa, hkv, SCRATCH[d], n_sealed_host=ns)
    lay = plan["scratch_layout"]                   # cached in the plan: one copy per step, not per layer
    assert lay["pages"] == int(ns.sum()) + len(lens) and lay["n_blocks"] == int(ns.sum())
    assert rel_err(out, base.double().cpu()) < ACCEPT_REL
    back, _ = _run(kk, sc, q, pos, req, len(lens), gqa, hkv, SCRATCH[d])
    assert torch.equal(back, out)
    prec, _ = _run(kk, sc, q, pos, req, len(lens), gqa, hkv, SCRATCH[d], n_sealed_host=ns, precise=True)
    rb = _pages_ref(refs, SCRATCH[d])
    for i in range(len(pos)):
        r, p = int(req[i]), int(pos[i])
        assert rel_err(out[i], ref_attention(q[i], p, rb[r], gqa)) < 5e-3, i
        assert rel_err(prec[i], ref_attention(q[i], p, rb[r], gqa)) < 1e-3, i
        assert rel_err(out[i], ref_attention(q[i], p, refs[r], gqa)) < 1e-2, i


def test_decode_into_is_the_reference_decode_in_bf16():
    """The scratch's block decoder (indirect pages, fast mode: fp16 centroids through the attention kernel's
    register-table decoder, _hada rotation) writes the reference codec's decode rounded to bf16: < 10 % of the
    elements one bf16 step off (fp16 centroids carry 11 bits and the fast rotation ~16, so values near a bf16
    rounding midpoint may round the other way: 4.2 % here; with fp32 centroids, before session 11, < 1 %), none more
    (up to 2^-9 of the row's RMS on elements near 0: the fp16 centroids' rounding); the debug decode (fp32 centroids
    and rotation) within one bf16 step up to fp32 noise."""
    lens, hkv, d = [1100], 2, 64
    kk, sc, refs = build(lens, hkv, 1, d, 4, 3, device=DEV, seed=4)
    pages = sc["block_table"][0, :2].to(torch.int32)
    buf = torch.full((5, hkv, 2, 512, d), float("nan"), dtype=torch.bfloat16, device=DEV)
    kk.decode_into(sc["cache"], pages, buf, torch.tensor([3, 1], dtype=torch.int32, device=DEV))
    assert buf[[0, 2, 4]].isnan().all()                          # only the destination pages are written
    for kv in range(2):
        ref = refs[0][kv][:, :1024].reshape(hkv, 2, 512, d).transpose(0, 1)     # [block, head, 512, D]
        got = buf[[3, 1], :, kv].double().cpu()
        assert (got != ref.bfloat16().double()).float().mean() < 1e-1
        # fp16 centroids: an absolute error of ~2^-11 of the row's scale on top of bf16 rounding (elements near 0)
        rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
        assert ((got - ref).abs() <= ref.abs() * 2.0 ** -7 + 2.0 ** -9 * rms).all()
        dbg = kk.decode(sc["cache"][pages.long()])[kv].double().cpu()
        assert ((dbg - ref).abs() <= ref.abs() * 2.0 ** -7 + 1e-5 * ref.abs().max()).all()


def test_scratch_cap_and_knob():
    """Past KAKEYA_SCRATCH_MIB the launch refuses with the knob's name; the buffer is reused across calls; the knob
    (and v13's old name as an alias) validated in kakeya_kv.config."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_kv.config import ConfigError, KakeyaConfig
    from kakeya_v1_3_ppl.checks import known_env_names
    lens, chunks, hkv, gqa, d = [600] * 5, [3] * 5, 1, 4, 64        # 5 x (1 sealed + 1 tail) pages x 128 KiB
    kk, sc, _, q, pos, req = _phase(lens, chunks, hkv, gqa, d, seed=2)
    ns = np.ones(5, dtype=np.int64)
    _run(kk, sc, q, pos, req, 5, gqa, hkv, SCRATCH[d], n_sealed_host=ns)
    first = kk.scratch.buf
    _run(kk, sc, q, pos, req, 5, gqa, hkv, SCRATCH[d], n_sealed_host=ns)
    assert kk.scratch.buf is first and first.shape[0] >= 10
    small = KakeyaKernels(d, 4, 3, DEV, scratch_mib=1)
    with pytest.raises(RuntimeError, match=r"kakeya kakeya: .* 1 MiB decode scratch \(10 pages\), over "
                                           r"KAKEYA_SCRATCH_MIB = 1 MiB"):
        _run(small, sc, q, pos, req, 5, gqa, hkv, SCRATCH[d], n_sealed_host=ns)
    assert KakeyaConfig.from_env({}).scratch_mib == 512
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13"}).scratch_mib == 1024
    assert KakeyaConfig.from_env({"KAKEYA_SCRATCH_MIB": "64"}).scratch_mib == 64
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13", "KAKEYA_V13_SCRATCH_MIB": "32"}).scratch_mib == 32
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13", "KAKEYA_SCRATCH_MIB": "32",
                                  "KAKEYA_V13_SCRATCH_MIB": "32"}).scratch_mib == 32
    for env, msg in (({"KAKEYA_SCRATCH_MIB": "lots"}, "KAKEYA_SCRATCH_MIB='lots': not an integer"),
                     ({"KAKEYA_SCRATCH_MIB": "0"}, "must be 1..1048576 MiB"),
                     ({"KAKEYA_FORMAT": "exact", "KAKEYA_SCRATCH_MIB": "8"}, "no effect with KAKEYA_FORMAT=exact"),
                     ({"KAKEYA_V13_SCRATCH_MIB": "8"}, "only applies to KAKEYA_FORMAT=v13"),
                     ({"KAKEYA_FORMAT": "v13", "KAKEYA_SCRATCH_MIB": "8", "KAKEYA_V13_SCRATCH_MIB": "9"}, "disagree")):
        with pytest.raises(ConfigError, match=msg):
            KakeyaConfig.from_env(env)
    assert {"KAKEYA_SCRATCH_MIB", "KAKEYA_V13_SCRATCH_MIB"} <= known_env_names()
    assert KakeyaConfig.from_env({"KAKEYA_PREFILL_VARIANT": "candidate:scratch"}).prefill_variant == "candidate:scratch"


def test_mixed_step_scratch_launch_decodes_only_its_requests():
    """Launches.phase with KAKEYA_PREFILL_VARIANT=candidate:scratch on a mixed phase (a 1-token decode row with 2
    sealed blocks + a 30-token chunk with 1): two launches; the scratch launch's plan marks the decode request -1
    (planner's host counts), so its scratch holds the chunk's request only (1 sealed + 1 tail page, not 2 + 3), and
    the step's output matches KAKEYA_PREFILL_VARIANT=baseline within ACCEPT_REL at every token."""
    from kakeya_v1_3_ppl.plan import Launches, Phase
    from kakeya_v1_3_ppl.runtime import forward_compressed
    lens, chunks, hkv, gqa, d = [1100, 600], [1, 30], 1, 4, 64
    kk, sc, _, q, pos, req = _phase(lens, chunks, hkv, gqa, d, seed=6)
    e = np.empty(0, dtype=np.int64)
    ph = Phase(tok=np.arange(len(pos)), q_pos=pos.cpu().numpy().astype(np.int64), q_req=req.cpu().numpy().astype(
        np.int64), rows=np.arange(2), n_sealed=np.array([2, 1]), seq_end=np.array(lens), tail_slot=np.arange(2),
        write_tok=e, write_slot=e, write_off=e, seal_row=e, seal_blk=e, seal_slot=e)
    outs = {}
    for pv in ("baseline", "candidate:scratch", "candidate:scratch_fa"):
        la = Launches("tuned", d, hkv, DEV, prefill=pv)
        p = la.phase(ph, DEV, gqa, sc["block_table"].shape[1])
        out = torch.zeros(len(pos), hkv * gqa, d, device=DEV)
        forward_compressed(kk, q, None, None, sc["cache"], sc["tail_k"], sc["tail_v"], [p], sc["block_table"],
                           d ** -0.5, out)
        outs[pv] = (out.cpu(), p)
    dec, pre = outs["candidate:scratch"][1]["attn"]
    assert pre["launch"]["scratch"] and not dec["launch"].get("scratch")
    assert pre["plan"]["n_sealed_host"].tolist() == [-1, 1] and dec["plan"]["n_sealed_host"].tolist() == [2, -1]
    assert pre["plan"]["scratch_layout"]["pages"] == 2
    a, b, c = outs["candidate:scratch"][0], outs["baseline"][0], outs["candidate:scratch_fa"][0]
    assert outs["candidate:scratch_fa"][1]["attn"][1]["plan"]["scratch_layout"]["flash_meta"]["cu_q"].tolist() == \
        [0, 30]
    for i in range(len(pos)):
        assert rel_err(a[i], b[i].double()) < ACCEPT_REL, i
        assert rel_err(c[i], b[i].double()) < ACCEPT_REL, i


def test_phase_over_the_cap_falls_back_to_the_tuned_prefill_launch():
    """KAKEYA_PREFILL_VARIANT=candidate:scratch with a 1 MiB cap (8 pages of one KV head at D 64): a phase of three
    20-token chunks over 2 sealed blocks each needs 3 x 3 = 9 pages, so Launches.phase plans the tuned prefill launch
    instead (counted in ``fallbacks``) and the step still matches the baseline launch; at 2 MiB the same phase keeps
    the scratch launch. The reservation allocates the whole cap once and later phases reuse it."""
    from kakeya_kernels.variants import PREFILL_TUNED
    from kakeya_v1_3_ppl.plan import Launches, Phase
    from kakeya_v1_3_ppl.runtime import forward_compressed
    lens, chunks, hkv, gqa, d = [1100] * 3, [20] * 3, 1, 4, 64
    kk, sc, _, q, pos, req = _phase(lens, chunks, hkv, gqa, d, seed=7)
    e = np.empty(0, dtype=np.int64)
    ph = Phase(tok=np.arange(len(pos)), q_pos=pos.cpu().numpy().astype(np.int64), q_req=req.cpu().numpy().astype(
        np.int64), rows=np.arange(3), n_sealed=np.array([2, 2, 2]), seq_end=np.array(lens), tail_slot=np.arange(3),
        write_tok=e, write_slot=e, write_off=e, seal_row=e, seal_blk=e, seal_slot=e)
    width = sc["block_table"].shape[1]
    roomy = Launches("tuned", d, hkv, DEV, prefill="candidate:scratch", scratch_mib=2)
    assert roomy.scratch_cap == 16 and roomy.phase(ph, DEV, gqa, width)["launch"]["scratch"] and roomy.fallbacks == 0
    tight = Launches("tuned", d, hkv, DEV, prefill="candidate:scratch", scratch_mib=1)
    p = tight.phase(ph, DEV, gqa, width)
    assert tight.scratch_cap == 8 and tight.fallbacks == 1
    assert not p["launch"].get("scratch") and p["plan"]["bm"] == PREFILL_TUNED[d]["bm"]
    assert p["launch"] == dict(kernel_args(PREFILL_TUNED[d]), splits=p["launch"]["splits"])
    outs = {}
    for name, pp in (("fallback", p), ("baseline", Launches("tuned", d, hkv, DEV, prefill="baseline").phase(
            ph, DEV, gqa, width))):
        out = torch.zeros(len(pos), hkv * gqa, d, device=DEV)
        forward_compressed(kk, q, None, None, sc["cache"], sc["tail_k"], sc["tail_v"], [pp], sc["block_table"],
                           d ** -0.5, out)
        outs[name] = out.cpu()
    for i in range(len(pos)):
        assert rel_err(outs["fallback"][i], outs["baseline"][i].double()) < ACCEPT_REL, i
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    small = KakeyaKernels(d, 4, 3, DEV, scratch_mib=1)
    buf = small.scratch.reserve(hkv, DEV)
    assert buf.shape[0] == small.scratch.capacity_pages(hkv) == 8
    assert small.scratch.get(3, hkv, DEV, "test") is buf


def test_flash_scratch_matches_the_exact_page_kernel():
    """candidate:scratch_fa: FlashAttention's paged varlen over the scratch's K / V views (here its torch stand-in,
    tests/kernel_cases.ref_flash_varlen, unless vLLM's FA is present) == the exact-page kernel on the same pages, for
    the ragged phase of test_scratch_matches_baseline_and_reference's shape incl. a request not in the launch
    (n_sealed_host -1: its rows are left out of the varlen batch) and host metadata from the planner's arrays."""
    lens, chunks, hkv, gqa, d = [1, 600, 1100, 530, 700], [1, 40, 17, 3, 0], 2, 4, 64
    kk, sc, refs, q, pos, req = _phase(lens, chunks, hkv, gqa, d, seed=9)
    ns = np.array([0, 1, 2, 1, -1])
    a, _ = _run(kk, sc, q, pos, req, 5, gqa, hkv, SCRATCH[d], n_sealed_host=ns)
    b, plan = _run(kk, sc, q, pos, req, 5, gqa, hkv, PREFILL_CANDIDATES["scratch_fa"][d], n_sealed_host=ns)
    assert rel_err(b, a.double().cpu()) < 5e-3
    assert plan["scratch_layout"]["flash_meta"]["cu_q"].tolist() == [0, 1, 41, 58, 61]
    assert plan["scratch_layout"]["pages"] == 8
    # Host arrays as the planner attaches them: the same result, and the metadata cached for the next layer.
    plan2 = kk.plan(pos, req, 5, gqa, bm=128)
    plan2.update(n_sealed_host=ns, q_count_host=np.bincount(req.cpu().numpy(), minlength=5),
                 seq_end_host=np.array(lens))
    c = kk.attention(q, pos, req, scale=d ** -0.5, plan=plan2, out_dtype=torch.float32,
                     **kernel_args(PREFILL_CANDIDATES["scratch_fa"][d]), **sc)
    fm = plan2["scratch_layout"]["flash_meta"]
    assert torch.equal(c, b) and fm["max_q"] == 40 and fm["max_k"] == 1100
    # Into a bf16 destination: FlashAttention writes it directly.
    dst = torch.zeros(len(pos), hkv * gqa, d, dtype=torch.bfloat16, device=DEV)
    r = kk.attention(q, pos, req, scale=d ** -0.5, plan=plan2, out=dst,
                     **kernel_args(PREFILL_CANDIDATES["scratch_fa"][d]), **sc)
    assert r is dst and rel_err(dst.float(), b.double().cpu()) < 1e-2
    kv = _pages_ref(refs, SCRATCH[d])
    for i in range(len(pos)):
        r = int(req[i])
        assert rel_err(b[i], ref_attention(q[i], int(pos[i]), kv[r], gqa)) < 5e-3, i


@pytest.mark.real_flash
def test_flash_scratch_needs_vllm_flash_attention():
    from kakeya_kernels import scratch
    from kakeya_v1_3_ppl.plan import Launches
    try:
        import vllm.vllm_flash_attn  # noqa: F401
        pytest.skip("vLLM's FlashAttention is importable here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="needs vLLM's FlashAttention .* use the candidate 'scratch'"):
        scratch.flash_varlen(64)
    with pytest.raises(RuntimeError, match="needs vLLM's FlashAttention"):
        Launches("tuned", 64, 2, DEV, prefill="candidate:scratch_fa")
