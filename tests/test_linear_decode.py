"""The lookup-free ("linear") decode path (kakeya_triton LUT 5 / 6, variants.CANDIDATES["linear"]) for uniform-grid
tables (lloyd_max.uniform_table, KakeyaCodec(grid="uniform")): the seal writes the reference codec's bytes with such
tables, the linear decode computes the same attention as the register-table lookup (lut 4) on that cache and as
float64 attention on the reference decode, and the host refuses tables that are not a uniform grid."""
import pytest
import torch

from kakeya_kernels import kakeya_triton as K
from kakeya_kernels.variants import ACCEPT_REL, CANDIDATES, TUNED, kernel_args, num_splits
from kakeya_kv import lloyd_max
from kakeya_kv.codecs.kakeya import KakeyaCodec
from tests.kernel_cases import build_paged, ref_attention, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def uniform_kernels(d, kb, vb, **kw):
    return K.KakeyaKernels(d, kb, vb, DEV, k_table=lloyd_max.uniform_table(kb),
                           v_table=lloyd_max.uniform_table(vb), **kw)


def build_uniform(lens, hkv, d, kb, vb, seed):
    """A paged scenario sealed with uniform-grid tables; references decoded by KakeyaCodec(grid="uniform")."""
    kk = uniform_kernels(d, kb, vb)
    codec = KakeyaCodec(kb, vb, grid="uniform")
    sc, refs = build_paged(kk, lens, hkv, d, torch.Generator().manual_seed(seed),
                           (lambda slots: codec.decode(slots.transpose(0, 1), d)), DEV)
    return kk, sc, refs


@pytest.mark.parametrize("d,kb,vb", [(64, 4, 3), (128, 3, 2)])
def test_seal_with_uniform_tables_matches_reference_bytes(d, kb, vb):
    """The seal takes any table (a calibration bundle's, or the uniform grid): its bytes equal the CPU reference
    codec's with grid="uniform" within the seal's documented tolerance (tests/test_kernels.py: a code may flip at a
    decision boundary, < 1e-3 of the bytes), and they differ from the Lloyd-Max bytes (the table is really used)."""
    g = torch.Generator().manual_seed(5)
    k = (torch.randn(1, 2, 512, d, generator=g) * 2 + torch.randn(d, generator=g) * 5).bfloat16()
    v = torch.randn(1, 2, 512, d, generator=g).bfloat16()
    kk = uniform_kernels(d, kb, vb)
    slots = torch.zeros(1, 2, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
    kk.seal(k.to(DEV), v.to(DEV), slots)
    ref = KakeyaCodec(kb, vb, grid="uniform").encode(k[0].float(), v[0].float(), 0)[:, 0]
    got = slots[0].cpu()
    assert (got != ref).float().mean().item() < 1e-3
    lloyd = KakeyaCodec(kb, vb).encode(k[0].float(), v[0].float(), 0)[:, 0]
    assert (lloyd != ref).float().mean().item() > 0.05


def _run(kk, sc, lens, hkv, gqa, d, v, q, precise=False):
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    req = torch.arange(len(lens), device=DEV)
    plan = kk.plan(pos, req, len(lens), gqa, bm=v["bm"])
    splits = num_splits(v, plan["nt"], hkv, sc["block_table"].shape[1], sms=4)
    return kk.attention(q, pos, req, scale=d ** -0.5, plan=plan, out_dtype=torch.float32, splits=splits,
                        precise=precise, **kernel_args(v), **sc)


@pytest.mark.parametrize("d,kb,vb,gqa", [(64, 4, 3, 4), (64, 3, 2, 2), (128, 4, 3, 4), (128, 3, 2, 1),
                                         (64, 5, 4, 4), (64, 2, 4, 2)])
def test_linear_decode_matches_lut4_and_float64(d, kb, vb, gqa):
    """On one uniform-table cache, ragged lengths (tails 53 / 1 / 88): the linear launch (the candidate as served:
    TUNED + lut 5 (the exact-subtract fp16 trick), and with swap at k4; the integer-convert lut 6; lut 7 in the
    interpreter) within ACCEPT_REL of the lut-4 launch and within 5e-3 of float64
    attention on the reference decode. Not bit for bit: lut 4 multiplies fp16-rounded centroids (j - mid) * Delta
    (~2^-11 relative each) where the linear path multiplies the exact 2 (j - mid) and applies Delta / 2 in fp32 with
    the gain. k5 (K keeps the pair table inside lut 5: its step stays in the table) and k2v4 cover the width paths."""
    lens, hkv = [1077, 1, 600], 2
    kk, sc, refs = build_uniform(lens, hkv, d, kb, vb, seed=d + 10 * kb + vb)
    q = torch.randn(len(lens), hkv * gqa, d, generator=torch.Generator().manual_seed(kb)).bfloat16().to(DEV)
    lin = CANDIDATES["linear"][d]
    assert lin["lut"] == 5
    out4 = _run(kk, sc, lens, hkv, gqa, d, dict(lin, lut=4), q)
    # lut 7 (offset taken off after the MMA) is exact in the interpreter's IEEE fp32 only: on the GPU the tensor cores'
    # truncating accumulation leaves a bias (session 13, H100: 1e-2 vs float64), and the kernel refuses it there.
    lut7 = (dict(lin, lut=7),) if DEV == "cpu" else ()
    if DEV == "cuda":
        with pytest.raises(ValueError, match="lut 7"):
            _run(kk, sc, lens, hkv, gqa, d, dict(lin, lut=7), q)
    bad = []   # every launch is checked before failing: which of them miss tells the cause apart
    for v in (lin, dict(lin, lut=6)) + lut7 + ((dict(lin, swap=True),) if kb == 4 else ()):
        out = _run(kk, sc, lens, hkv, gqa, d, v, q)
        errs = [rel_err(out, out4.double().cpu())] + [rel_err(out[i], ref_attention(q[i], lens[i] - 1, refs[i], gqa))
                                                      for i in range(len(lens))]
        if not (errs[0] < ACCEPT_REL and max(errs[1:]) < 5e-3):
            bad.append((v["lut"], v.get("swap", False), [f"{e:.1e}" for e in errs]))
    assert not bad, f"(lut, swap, [vs lut 4, vs float64 per request]) that missed: {bad}"
    if d == 64 and kb <= 4:
        # fp32 (precise) path, both streams linear: the only difference left from the fp32 table lookup (lut 0) is
        # float32 rounding of the levels, so a wrong code order or step would show far above 1e-5. (A 5-bit stream
        # takes the fp16 pair table in every lut >= 2, precise or not: ~3e-5 from lut 0 there.)
        p0 = _run(kk, sc, lens, hkv, gqa, d, dict(lin, lut=0, pf=False), q, precise=True)
        assert rel_err(_run(kk, sc, lens, hkv, gqa, d, dict(lin, lut=5), q, precise=True), p0.double().cpu()) < 1e-5
        # lut 7 in fp32: the offset 1024 + 2^b rides through the fp32 sums (cancellation, not a code error)
        assert rel_err(_run(kk, sc, lens, hkv, gqa, d, dict(lin, lut=7), q, precise=True), p0.double().cpu()) < 1e-4


def test_linear_codes_are_exact_and_in_order():
    """The decoded coordinates themselves, both conversions, every code value in every nibble: 2 j - (2^b - 1),
    exact in fp16, in dims 8 g + k for code k of word g (one layout check independent of attention)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dec(raw_ptr, out_ptr, D: tl.constexpr, BITS: tl.constexpr, TT: tl.constexpr, LUT: tl.constexpr):
        t = tl.arange(0, TT)
        w = tl.arange(0, D // 8)
        raw = tl.load(raw_ptr + t[:, None] * (D // 8) + w[None, :])
        c = K._dec16(raw, raw_ptr, raw_ptr, D, BITS, 8, TT, LUT, 0)
        tl.store(out_ptr + t[:, None] * D + tl.arange(0, D)[None, :], c.to(tl.float32))

    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4):
        codes = torch.randint(0, 1 << bits, (16, 64), generator=g)
        codes[0] = torch.arange(64) % (1 << bits)
        # pack LSB-first, bits per code, into int32 words of 8 codes (the _raw16 layout of the register path)
        words = torch.zeros(16, 8, dtype=torch.int64)
        for k in range(8):
            words |= codes[:, k::8] << (bits * k)
        raw = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous().to(DEV)
        for lut in (5, 6, 7):
            out = torch.empty(16, 64, dtype=torch.float32, device=DEV)
            dec[(1,)](raw, out, D=64, BITS=bits, TT=16, LUT=lut)
            off = 1024 + (1 << bits) if lut == 7 else 0     # lut 7 leaves the offset to the attention kernel
            assert torch.equal(out.cpu(), (2 * codes - ((1 << bits) - 1) + off).float()), (bits, lut)


def test_uniform_step_and_refusals():
    for bits in (2, 3, 4, 5):
        assert K.uniform_step(lloyd_max.uniform_table(bits)) == pytest.approx(lloyd_max.uniform_delta(bits), rel=1e-6)
        assert K.uniform_step(lloyd_max.gaussian_table(bits)) is None
    t = lloyd_max.uniform_table(3)
    assert K.uniform_step(t + 0.01) is None                  # equal steps, not symmetric
    assert K.uniform_step(t.flip(0)) is None                 # descending
    assert K.uniform_step(torch.zeros(8)) is None
    # a 5-bit stream keeps the pair table: its table need not be uniform, its step is not applied
    assert K.linear_steps({"k": lloyd_max.gaussian_table(5), "v": lloyd_max.uniform_table(3)},
                          {"k": 5, "v": 3}) == (1.0, pytest.approx(lloyd_max.uniform_delta(3) / 2))
    with pytest.raises(ValueError, match="uniform-grid K table"):
        K.KakeyaKernels(64, 4, 3, DEV, lut=5)                # default Lloyd-Max tables
    with pytest.raises(ValueError, match="uniform-grid V table"):
        K.KakeyaKernels(64, 4, 3, DEV, k_table=lloyd_max.uniform_table(4), lut=6)
    kk, sc, _ = build_uniform([600], 1, 64, 4, 3, seed=1)
    q = torch.zeros(1, 1, 64, dtype=torch.bfloat16, device=DEV)
    pos, req = torch.tensor([599], device=DEV), torch.zeros(1, dtype=torch.long, device=DEV)
    kl = K.KakeyaKernels(64, 4, 3, DEV)                     # Lloyd-Max tables: a per-call lut 5 is refused too
    with pytest.raises(ValueError, match="uniform-grid K table"):
        kl.attention(q, pos, req, scale=0.1, lut=5, **sc)
    assert kk.attention(q, pos, req, scale=0.1, lut=5, **sc).shape == (1, 1, 64)


def test_linear_candidate_is_opt_in():
    assert all(v["lut"] == 4 for v in TUNED.values())
    for d, v in CANDIDATES["linear"].items():
        assert v == dict(TUNED[d], lut=5)


def test_bench_times_linear_on_a_uniform_table_cache():
    """bench_kernels' sweep: a linear candidate runs on a cache sealed with uniform-grid tables and is compared with
    the same launch at lut 4 there (on the default cache it would be refused); other variants keep the default
    cache and the baseline reference. Tiny shape, interpreter."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))
    import bench_kernels as B
    torch.manual_seed(0)
    scs = B.SweepScenarios(K.KakeyaKernels(64, 4, 3, "cpu"), 2, 1024, 64, sms=4, device="cpu", hkv=2)
    sc, ref, ref_v = scs.pick(TUNED[64])
    assert sc is scs.default and ref_v is None and scs.uniform is None
    lin = CANDIDATES["linear"][64]
    assert lin in B.short_sweep(64) and CANDIDATES["linear"][128] in B.short_sweep(128)
    sc, ref, ref_v = scs.pick(lin)
    assert sc is scs.uniform and ref_v == dict(lin, lut=4, ki8=False)
    ki8 = CANDIDATES["ki8"][64]          # the int8 K-score launch reads uniform-grid K only: same cache, no ki8 ref
    assert ki8 in B.short_sweep(64) and scs.pick(ki8)[2] == dict(ki8, lut=4, ki8=False)
    assert K.uniform_step(sc.kk.tables["k"]) is not None and K.uniform_step(sc.kk.tables["v"]) is not None
    assert ref.data_ptr() != sc.out.data_ptr()    # the reference survives the variant's run into the shared buffer
    assert B.rel_diff(sc.fn(lin)(), ref) < ACCEPT_REL / 2
    with pytest.raises(ValueError, match="uniform-grid"):
        scs.default.fn(lin)()
    import report
    row = dict(head_dim=64, **lin, us_b16_ctx16k=1.5, cache="uniform-grid tables", lut4_same_cache_us=2.0,
               rel_diff_vs_lut4_same_cache=1e-4, agrees=True)
    md = report.render(dict(gpu="g", copy_gbps=1.0, format="f", decode=[], seal=[], tuning=[row], not_measured=[]))
    assert "| 1.5 | 1.0e-04 vs lut 4 on a uniform-table cache (lut 4 there: 2.0 µs) |" in md
