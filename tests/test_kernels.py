"""Triton kernel parity against the CPU reference codec and a float64 attention.

On CPU these run in Triton's interpreter on small shapes; the `gpu`-marked cases
cover the full matrix (lengths 1..4097, GQA 1/3/8, head_dim 64/128) on CUDA.
"""
import pytest
import torch

from kakeya_kv.codecs.kakeya import KakeyaCodec
from tests.kernel_cases import build, ref_attention, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("d,kb,vb,prec", [(64, 4, 3, None), (64, 3, 2, None), (128, 4, 4, None),
                                          (128, 4, 3, "bf16x3")])
def test_seal_matches_reference_bytes(d, kb, vb, prec):
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(1, 2, 512, d, generator=g) * 2 + torch.randn(d, generator=g) * 5).bfloat16()
    v = torch.randn(1, 2, 512, d, generator=g).bfloat16()
    k[0, :, 0] *= 0.02  # a sink-like token takes the uncentred path
    kk = KakeyaKernels(d, kb, vb, DEV)
    slots = torch.zeros(1, 2, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
    kk.seal(k.to(DEV), v.to(DEV), slots, prec=prec)
    ref = KakeyaCodec(kb, vb).encode(k[0].float(), v[0].float(), 0)[:, 0]
    got = slots[0].cpu()
    # Float reductions differ in order: a code may flip at a decision boundary; the
    # documented tolerance is 1e-3 of the bytes and decoded blocks within 1e-4 relative.
    assert (got != ref).float().mean().item() < 1e-3
    rk, rv = KakeyaCodec(kb, vb).decode(ref[:, None], d)
    gk, gv = KakeyaCodec(kb, vb).decode(got[:, None], d)
    assert ((gk - rk).norm() / rk.norm()).item() < 1e-4 and ((gv - rv).norm() / rv.norm()).item() < 1e-4
    assert torch.signbit(kk.lay.k["gain"].view(got)[0, 0]).item()  # the sink token is flagged


def test_debug_decode_matches_reference():
    kk, sc, refs = build([1024], 2, 1, 64, device=DEV)
    kd, vd = kk.decode(sc["cache"][sc["block_table"][0, :2].long()])
    ref_k = refs[0][0][:, :1024].view(2, 2, 512, 64).transpose(0, 1)
    assert rel_err(kd.float(), ref_k) < 4e-3  # bf16 output rounding


@pytest.mark.parametrize("lens,gqa,d", [([1, 511, 512, 513], 3, 64), ([700, 40], 1, 128)])
def test_decode_attention_parity(lens, gqa, d):
    kk, sc, refs = build(lens, 2, gqa, d, device=DEV)
    q = torch.randn(len(lens), 2 * gqa, d, generator=torch.Generator().manual_seed(5)).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    out = kk.attention(q, pos, torch.arange(len(lens), device=DEV), scale=d ** -0.5, splits=3, precise=True,
                       out_dtype=torch.float32, **sc)
    assert torch.isfinite(out).all()
    for r, L in enumerate(lens):
        assert rel_err(out[r], ref_attention(q[r], L - 1, refs[r], gqa)) < 1e-3


def test_chunked_prefill_attention_parity():
    lens = [1100]
    kk, sc, refs = build(lens, 1, 2, 64, device=DEV)
    nq = 20
    q = torch.randn(nq, 2, 64, generator=torch.Generator().manual_seed(6)).bfloat16().to(DEV)
    pos = torch.arange(lens[0] - nq, lens[0], device=DEV)
    out = kk.attention(q, pos, torch.zeros(nq, dtype=torch.long, device=DEV), scale=0.125, splits=2,
                       precise=True, out_dtype=torch.float32, **sc)
    errs = [rel_err(out[i], ref_attention(q[i], int(pos[i]), refs[0], 2)) for i in range(nq)]
    assert max(errs) < 1e-3


def test_fast_mode_close_to_precise():
    kk, sc, refs = build([1030], 2, 3, 64, device=DEV)
    q = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(7)).bfloat16().to(DEV)
    pos = torch.tensor([1029], device=DEV)
    out = kk.attention(q, pos, torch.zeros(1, dtype=torch.long, device=DEV), scale=0.125, splits=4,
                       out_dtype=torch.float32, **sc)
    assert rel_err(out[0], ref_attention(q[0], 1029, refs[0], 3)) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("gqa", [1, 3, 8])
@pytest.mark.parametrize("lut,fused,maxnreg,small_bm", [(0, False, None, False), (2, True, 80, True)])
def test_gpu_decode_parity_matrix(d, gqa, lut, fused, maxnreg, small_bm):
    bm = 1 << (gqa - 1).bit_length() if small_bm else 16    # tiles of exactly the GQA group (padded to 2^k)
    lens = [1, 511, 512, 513, 4097]
    kk, sc, refs = build(lens, 2, gqa, d, device=DEV, seed=d + gqa)
    q = torch.randn(len(lens), 2 * gqa, d, generator=torch.Generator().manual_seed(9)).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    # precise and fast at the default tile; the pair-table variant also at a second tile (compiles cost ~3 s each)
    for precise, bound, tt, warps in [(True, 1e-3, 64, 8), (False, 5e-3, 64, 8)] + [(False, 5e-3, 128, 4)] * (lut == 2):
        out = kk.attention(q, pos, torch.arange(len(lens), device=DEV), scale=d ** -0.5, splits=8,
                           precise=precise, out_dtype=torch.float32, lut=lut, fused=fused, tt=tt,
                           num_warps=warps, maxnreg=maxnreg, bm=bm, **sc)
        assert not torch.isnan(out).any()
        for r, L in enumerate(lens):
            assert rel_err(out[r], ref_attention(q[r], L - 1, refs[r], gqa)) < bound


def test_pair_table_packs_two_codes():
    from kakeya_kernels.kakeya_triton import pair_table
    from kakeya_kv import lloyd_max
    t16 = lloyd_max.gaussian_table(3).half()
    pt = pair_table(t16)
    assert pt.shape == (64,) and pt.dtype == torch.int32
    lo = (pt & 0xFFFF).to(torch.int16).view(torch.float16)
    hi = ((pt >> 16) & 0xFFFF).to(torch.int16).view(torch.float16)
    j = torch.arange(64)
    assert torch.equal(lo, t16[j % 8]) and torch.equal(hi, t16[j // 8])   # LSB-first: low code = lower dim


@pytest.mark.parametrize("kb,vb", [(4, 3), (2, 5), (6, 2)])
def test_pair_lookup_matches_global_gather(kb, vb):
    """LUT 2 (two codes per lookup) for every group shape: 1, 2 and 4 pairs per group."""
    kk, sc, refs = build([1030], 2, 3, 64, kb=kb, vb=vb, device=DEV)
    q = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(8)).bfloat16().to(DEV)
    pos = torch.tensor([1029], device=DEV)
    req = torch.zeros(1, dtype=torch.long, device=DEV)
    args = dict(scale=0.125, splits=2, out_dtype=torch.float32, **sc)
    # fast mode: the same fp16 centroids either way
    assert torch.allclose(kk.attention(q, pos, req, lut=0, **args), kk.attention(q, pos, req, lut=2, **args),
                          atol=1e-6, rtol=1e-5)
    out = kk.attention(q, pos, req, lut=2, precise=True, **args)     # fp16 centroids in the precise path
    assert rel_err(out[0], ref_attention(q[0], 1029, refs[0], 3)) < 1e-3


@pytest.mark.parametrize("gqa,bm", [(3, 4), (4, 2)])
def test_small_query_tiles(gqa, bm):
    """Tiles of fewer than 16 query rows (Triton pads M inside the MMA): a padded row, and a group over 2 tiles."""
    lens = [1, 513, 40]
    kk, sc, refs = build(lens, 2, gqa, 64, device=DEV)
    q = torch.randn(len(lens), 2 * gqa, 64, generator=torch.Generator().manual_seed(2)).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    out = kk.attention(q, pos, torch.arange(len(lens), device=DEV), scale=0.125, splits=2, precise=True, bm=bm,
                       lut=2, fused=True, out_dtype=torch.float32, **sc)
    for r, L in enumerate(lens):
        assert rel_err(out[r], ref_attention(q[r], L - 1, refs[r], gqa)) < 1e-3


def test_fused_launch_matches_torch_combine():
    """In-kernel query gather + combine kernel == packed queries + torch merge; writes a given output in place;
    a plan without the inverse row map still works."""
    lens, gqa = [1, 513, 40], 3
    kk, sc, refs = build(lens, 2, gqa, 64, device=DEV)
    q = torch.randn(len(lens), 2 * gqa, 64, generator=torch.Generator().manual_seed(4)).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    req = torch.arange(len(lens), device=DEV)
    args = dict(scale=0.125, splits=3, precise=True, **sc)
    ref = kk.attention(q, pos, req, out_dtype=torch.float32, fused=False, **args)
    plan = kk.plan(pos, req, len(lens), gqa)
    plan.pop("src")
    got = kk.attention(q, pos, req, out_dtype=torch.float32, fused=True, plan=plan, **args)
    assert torch.allclose(ref, got, atol=1e-5, rtol=1e-5)
    out = torch.full((len(lens), 2 * gqa, 64), float("nan"), dtype=torch.bfloat16, device=DEV)
    assert kk.attention(q, pos, req, fused=True, out=out, **args) is out
    assert torch.allclose(out.float(), ref, atol=2e-2, rtol=1e-2)
    for r, L in enumerate(lens):
        assert rel_err(got[r], ref_attention(q[r], L - 1, refs[r], gqa)) < 1e-3


def test_kernel_variant_validated():
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    with pytest.raises(ValueError, match="lut must be one of"):
        KakeyaKernels(64, 4, 3, DEV, lut=9)
    kk, sc, _ = build([600], 1, 1, 64, device=DEV)
    q = torch.zeros(1, 1, 64, dtype=torch.bfloat16, device=DEV)
    pos, req = torch.tensor([599], device=DEV), torch.zeros(1, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="lut must be one of"):
        kk.attention(q, pos, req, scale=0.1, lut=-1, **sc)
    with pytest.raises(ValueError, match="maxnreg must be in"):
        kk.attention(q, pos, req, scale=0.1, maxnreg=8, **sc)
    with pytest.raises(ValueError, match="tt must be a power of two"):
        KakeyaKernels(64, 4, 3, DEV, tt=48)
    # constructor defaults = the variant the backend gets without passing anything
    q = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1)).bfloat16().to(DEV)
    var = KakeyaKernels(64, 4, 3, DEV, lut=2, fused=True, tt=32, num_warps=4, maxnreg=96)
    assert torch.equal(var.attention(q, pos, req, scale=0.1, **sc),
                       kk.attention(q, pos, req, scale=0.1, lut=2, fused=True, tt=32, num_warps=4, **sc))


def test_register_lookup_matches_global_gather():
    kk, sc, refs = build([1030], 2, 3, 64, device=DEV)
    q = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(8)).bfloat16().to(DEV)
    pos = torch.tensor([1029], device=DEV)
    args = dict(scale=0.125, splits=2, precise=True, out_dtype=torch.float32, **sc)
    a = kk.attention(q, pos, torch.zeros(1, dtype=torch.long, device=DEV), lut=0, **args)
    b = kk.attention(q, pos, torch.zeros(1, dtype=torch.long, device=DEV), lut=1, **args)
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lens,gqa,fused", [([1, 513, 40], 3, False), ([1, 513, 40], 3, True)])
def test_exact_page_attention_parity(lens, gqa, fused):
    """Exact (bf16) pages, partial last page included; NaN bytes past seq_len must not leak in."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_kv.format import exact_layout
    d, hkv = 64, 2
    g = torch.Generator().manual_seed(3)
    lay = exact_layout(d)
    kk = KakeyaKernels(d, 4, 3, DEV)
    maxb = max((L + 511) // 512 for L in lens)
    bt = torch.randperm(len(lens) * maxb, generator=g).view(len(lens), maxb).to(torch.int32)
    cache = torch.full((len(lens) * maxb, hkv, lay.slot_bytes), 0xFF, dtype=torch.uint8)  # bf16 0xFFFF = NaN
    view = cache.view(-1, hkv, 2, 512, d * 2).view(torch.bfloat16)
    refs = []
    for r, L in enumerate(lens):
        K = torch.randn(hkv, L, d, generator=g).bfloat16()
        V = torch.randn(hkv, L, d, generator=g).bfloat16()
        for p in range(L):
            view[bt[r, p // 512], :, 0, p % 512] = K[:, p]
            view[bt[r, p // 512], :, 1, p % 512] = V[:, p]
        refs.append((K.double(), V.double()))
    q = torch.randn(len(lens), hkv * gqa, d, generator=g).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    out = kk.attention_exact(q, pos, torch.arange(len(lens), device=DEV), cache.to(DEV), bt.to(DEV),
                             torch.tensor(lens, dtype=torch.int32, device=DEV), scale=d ** -0.5, splits=2,
                             precise=True, fused=fused)
    assert torch.isfinite(out.float()).all()
    for r, L in enumerate(lens):
        assert rel_err(out[r].float(), ref_attention(q[r], L - 1, refs[r], gqa)) < 1e-2  # bf16 output


def test_seal_with_calibration_matches_reference():
    """Bundle weights (K shaping) and fitted tables go through the kernel exactly as through the CPU codec."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_kv import lloyd_max
    d, kb, vb = 64, 4, 3
    g = torch.Generator().manual_seed(11)
    k = (torch.randn(1, 2, 512, d, generator=g) * 2 + torch.randn(d, generator=g) * 5).bfloat16()
    v = torch.randn(1, 2, 512, d, generator=g).bfloat16()
    w = torch.rand(2, d, generator=g) + 0.2
    kt = lloyd_max.gaussian_table(kb) * 1.1
    vt = lloyd_max.gaussian_table(vb) * 0.9
    codec = KakeyaCodec(kb, vb, k_weights={5: w}, k_table=kt, v_table=vt)
    kk = KakeyaKernels(d, kb, vb, DEV, k_table=kt, v_table=vt)
    slots = torch.zeros(1, 2, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
    kk.seal(k.to(DEV), v.to(DEV), slots, k_weight=w.to(DEV))
    ref = codec.encode(k[0].float(), v[0].float(), 5)[:, 0]
    got = slots[0].cpu()
    assert (got != ref).float().mean().item() < 1e-3
    plain = KakeyaCodec(kb, vb).encode(k[0].float(), v[0].float(), 5)[:, 0]
    assert (plain != ref).float().mean().item() > 0.1   # the calibration really changes the bytes
    # and the kernel's attention reads those tables
    rk, rv = codec.decode(ref[:, None], d)
    dk, dv = kk.decode(slots)
    assert ((dk[0].float().cpu() - rk).norm() / rk.norm()).item() < 4e-3
