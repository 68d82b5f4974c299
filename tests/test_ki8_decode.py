"""The int8 K-score path (kakeya_triton KI8, variants.CANDIDATES["ki8"]): for 4-bit K sealed with the uniform grid,
the K scores come from int8 MMAs of the raw code nibbles with an int8 hi + lo split of the rotated query. It must
compute the same attention as the same launch without it (lut 4 decode of K) on that cache, and as float64 attention
on the reference decode; other K tables and widths are refused on the host."""
import pytest
import torch

from kakeya_kernels import kakeya_triton as K
from kakeya_kernels.variants import ACCEPT_REL, CANDIDATES
from kakeya_kv import lloyd_max
from kakeya_kv.codecs.kakeya import KakeyaCodec
from tests.kernel_cases import build_paged, ref_attention, rel_err
from tests.test_linear_decode import _run

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _build(lens, hkv, d, vb, v_uniform, seed):
    """K on the uniform grid (4 bits); V uniform or Lloyd-Max. References decoded by the CPU codec."""
    kt = lloyd_max.uniform_table(4)
    vt = lloyd_max.uniform_table(vb) if v_uniform else lloyd_max.gaussian_table(vb)
    kk = K.KakeyaKernels(d, 4, vb, DEV, k_table=kt, v_table=vt)
    codec = KakeyaCodec(4, vb, k_table=kt, v_table=vt)
    sc, refs = build_paged(kk, lens, hkv, d, torch.Generator().manual_seed(seed),
                           (lambda slots: codec.decode(slots.transpose(0, 1), d)), DEV)
    return kk, sc, refs


@pytest.mark.parametrize("d,vb,gqa,v_uniform", [(64, 3, 4, False), (128, 3, 4, True), (64, 4, 1, True)])
def test_ki8_matches_the_decoded_path_and_float64(d, vb, gqa, v_uniform):
    """Ragged lengths (tails 53 / 1 / 88, one request inside its first block): ki8 (as served, with and without the
    register prefetch) within ACCEPT_REL of the same launch without ki8 on the same cache, and within 5e-3 of float64
    attention on the reference decode (the lut-4 path's own bound in test_linear_decode). (Not combined with the
    linear V decode: its lut 7 is biased on the tensor cores and refused on the GPU, session 13; lut 5 is tested in
    test_linear_decode.)"""
    lens, hkv = [1077, 1, 600], 2
    kk, sc, refs = _build(lens, hkv, d, vb, v_uniform, seed=d + vb)
    q = torch.randn(len(lens), hkv * gqa, d, generator=torch.Generator().manual_seed(vb)).bfloat16().to(DEV)
    base = CANDIDATES["ki8"][d]
    assert base["ki8"] is True
    ref4 = _run(kk, sc, lens, hkv, gqa, d, dict(base, ki8=False), q).double().cpu()
    variants = [base, dict(base, pf=not base.get("pf", False))]
    for v in variants:
        out = _run(kk, sc, lens, hkv, gqa, d, v, q)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref4) < ACCEPT_REL, v
        for i in range(len(lens)):
            assert rel_err(out[i], ref_attention(q[i], lens[i] - 1, refs[i], gqa)) < 5e-3, (v, i)


def test_ki8_query_split_is_finer_than_fp16():
    """The int8 hi + lo split of a query row, as the kernel rounds it, reconstructs the row to ~1e-5 of its largest
    element (fp16 rounding of q' is ~2^-12 relative per element): the split is not where the error comes from."""
    g = torch.Generator().manual_seed(3)
    qr = torch.randn(64, 128, generator=g, dtype=torch.float64) * torch.rand(64, 1, generator=g, dtype=torch.float64)
    qa = qr.abs().amax(1, keepdim=True)
    qn = qr * (127.0 / qa)
    hi = torch.floor(qn + 0.5)
    lo = torch.floor((qn - hi) * 254.0 + 0.5)
    assert hi.abs().max() <= 127 and lo.abs().max() <= 127
    back = (hi + lo / 254.0) * qa / 127.0
    assert ((back - qr).abs() / qa).max() < 0.5 / 254 / 127 + 1e-12


def test_ki8_refuses_other_k_tables():
    """Lloyd-Max K, or K of other widths, cannot take the int8 path: a clear error on the host, before any launch."""
    lens, hkv, d = [600], 1, 64
    for kb, kt in ((4, lloyd_max.gaussian_table(4)), (3, lloyd_max.uniform_table(3))):
        kk = K.KakeyaKernels(d, kb, 3, DEV, k_table=kt)
        sc, _ = build_paged(kk, lens, hkv, d, torch.Generator().manual_seed(0),
                            lambda slots: (torch.zeros(hkv, 512, d),) * 2, DEV)
        q = torch.randn(1, 4, d).bfloat16().to(DEV)
        with pytest.raises(ValueError, match="ki8"):
            _run(kk, sc, lens, hkv, 4, d, CANDIDATES["ki8"][d], q)


def test_k_grid_knob_and_ki8_need_each_other():
    """KAKEYA_K_GRID: auto (the default) resolves to uniform for 4-bit K without a calibration bundle, where the tuned
    decode launch then takes the int8 K scores; lloyd elsewhere. candidate:ki8 is refused at config time unless K
    is 4-bit on the uniform grid in every layer (a clear error instead of a failed launch at the first step)."""
    from kakeya_kernels.variants import TUNED, TUNED_KI8, decode_variant
    from kakeya_kv.config import ConfigError, KakeyaConfig
    cfg = KakeyaConfig.from_env({})
    assert (cfg.k_grid, cfg.int8_k_scores) == ("uniform", True)
    assert decode_variant(cfg.decode_variant, 128, cfg.int8_k_scores) == TUNED_KI8[128] != TUNED[128]
    assert TUNED_KI8[128]["ki8"] and decode_variant("tuned", 64) == TUNED[64]
    assert decode_variant("baseline", 64, True)["lut"] == 0          # only the tuned launch changes
    for env in ({"KAKEYA_K_GRID": "lloyd"}, {"KAKEYA_K_BITS": "3"}, {"KAKEYA_CALIBRATION": "/some/bundle"},
                {"KAKEYA_FORMAT": "v13"}, {"KAKEYA_FORMAT": "exact"}):
        c = KakeyaConfig.from_env(env)
        assert (c.k_grid, c.int8_k_scores) == ("lloyd", False), env
    # per-layer widths: one 3-bit K layer keeps every layer on Lloyd-Max (one K grid per engine)
    assert KakeyaConfig.from_env({"KAKEYA_LAYER_BITS": "3:3/2"}, num_layers=8).k_grid == "lloyd"
    cfg = KakeyaConfig.from_env({"KAKEYA_K_GRID": "uniform", "KAKEYA_DECODE_VARIANT": "candidate:ki8"})
    assert (cfg.k_grid, cfg.decode_variant) == ("uniform", "candidate:ki8")
    assert KakeyaConfig.from_env({"KAKEYA_DECODE_VARIANT": "candidate:ki8"}).k_grid == "uniform"   # auto
    with pytest.raises(ConfigError, match="KAKEYA_K_GRID"):
        KakeyaConfig.from_env({"KAKEYA_K_GRID": "gauss"})
    with pytest.raises(ConfigError, match="KAKEYA_K_GRID=uniform or auto"):
        KakeyaConfig.from_env({"KAKEYA_K_GRID": "lloyd", "KAKEYA_DECODE_VARIANT": "candidate:ki8"})
    with pytest.raises(ConfigError, match="4-bit K in every layer"):
        KakeyaConfig.from_env({"KAKEYA_K_GRID": "uniform", "KAKEYA_DECODE_VARIANT": "candidate:ki8",
                               "KAKEYA_LAYER_BITS": "3:3/2"}, num_layers=8)
    with pytest.raises(ConfigError, match="KAKEYA_FORMAT=kakeya only"):
        KakeyaConfig.from_env({"KAKEYA_K_GRID": "uniform", "KAKEYA_FORMAT": "v13"})


def test_token_major_v_codes_are_a_transpose():
    """format.v_codes_token_major: per dim, the block's tokens two to a byte (token 2i low nibble); every code lands
    where the definition says, and token_major_cache changes the V codes region only."""
    from kakeya_kv.format import kakeya_layout, token_major_cache, v_codes_token_major
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 512, 64), generator=g)              # [blocks, token, dim]
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # the stream's per-token rows
    tm = v_codes_token_major(packed, 64)
    assert tm.shape == (3, 64, 256)
    assert torch.equal((tm & 15).long(), codes[:, 0::2, :].transpose(1, 2))
    assert torch.equal((tm >> 4).long(), codes[:, 1::2, :].transpose(1, 2))
    with pytest.raises(ValueError, match="4-bit"):
        v_codes_token_major(packed, 64, bits=3)
    lay = kakeya_layout(64, 4, 4)
    slots = torch.randint(0, 256, (2, 3, lay.slot_bytes), generator=g, dtype=torch.int32).to(torch.uint8)
    out = token_major_cache(slots, lay)
    lo = lay.k.size + lay.v["codes"].offset
    hi = lo + lay.v["codes"].nbytes
    assert torch.equal(out[..., :lo], slots[..., :lo]) and torch.equal(out[..., hi:], slots[..., hi:])
    assert not torch.equal(out[..., lo:hi], slots[..., lo:hi])


@pytest.mark.parametrize("d,gqa", [(64, 4), (128, 1)])
def test_vi8_on_a_token_major_cache_matches_float64(d, gqa):
    """The experimental int8 P.V launch (vi8, with and without ki8) on the token-major copy of a k4v4 uniform-grid
    cache: within ACCEPT_REL of the lut-4 launch on the ordinary cache and within 5e-3 of float64 attention on the
    reference decode; on the ordinary cache it is wrong (the layout is really read); refused with pf / precise or
    a Lloyd-Max V table."""
    from kakeya_kv.format import token_major_cache
    lens, hkv = [1077, 1, 600], 2
    kk, sc, refs = _build(lens, hkv, d, 4, True, seed=d)
    q = torch.randn(len(lens), hkv * gqa, d, generator=torch.Generator().manual_seed(7)).bfloat16().to(DEV)
    base = dict(CANDIDATES["ki8"][d], pf=False)
    ref4 = _run(kk, sc, lens, hkv, gqa, d, dict(base, ki8=False), q).double().cpu()
    tsc = dict(sc, cache=token_major_cache(sc["cache"], kk.lay))
    for v in (dict(base, vi8=True), dict(base, ki8=False, vi8=True)):
        out = _run(kk, tsc, lens, hkv, gqa, d, v, q)
        assert rel_err(out, ref4) < ACCEPT_REL, v
        for i in range(len(lens)):
            assert rel_err(out[i], ref_attention(q[i], lens[i] - 1, refs[i], gqa)) < 5e-3, (v, i)
    assert rel_err(_run(kk, sc, lens, hkv, gqa, d, dict(base, vi8=True), q), ref4) > 0.05
    with pytest.raises(ValueError, match="vi8"):
        _run(kk, tsc, lens, hkv, gqa, d, dict(base, vi8=True, pf=True), q)
    kl, scl, _ = _build([600], 1, d, 4, False, seed=1)
    with pytest.raises(ValueError, match="vi8"):
        _run(kl, scl, [600], 1, 4, d, dict(base, vi8=True), torch.randn(1, 4, d).bfloat16().to(DEV))


def test_fast_recipe_is_the_uniform_k_codec_in_the_hf_harness():
    """The recipe serving ki8 (KAKEYA_K_GRID=uniform) maps to the HF harness's K-uniform codec (its quality twin),
    not to the Lloyd-Max default."""
    from pathlib import Path
    from kakeya_kv.formats import from_recipe
    root = Path(__file__).resolve().parents[1]
    f = from_recipe(str(root / "deploy" / "recipes" / "smollm2-135m-instruct-fast.env"), 30)
    assert torch.equal(f.codec.k_table, lloyd_max.uniform_table(4)) and f.codec.v_table is None
    assert "K grid uniform" in f.notes
    g = from_recipe(str(root / "deploy" / "recipes" / "smollm2-135m-instruct-quality.env"), 30)
    assert g.codec.k_table is None


@pytest.mark.parametrize("d,sub,splits", [(64, 4, (1, 7)), (128, 2, (3,))])
def test_sub_block_items_give_the_same_attention(d, sub, splits):
    """The small-batch split (attention sub: each sealed block = sub work items of 512 / sub tokens, candidate
    ki8_sub4): on one cache, ragged lengths (a request with no sealed block, one ending exactly on a block), any split
    count (the tail goes to split n_items % splits), within ACCEPT_REL of sub 1 and 5e-3 of float64."""
    from kakeya_kernels.variants import kernel_args
    lens, hkv, gqa = [1077, 1, 1024], 2, 4
    kk, sc, refs = _build(lens, hkv, d, 3, True, seed=d + sub)
    q = torch.randn(len(lens), hkv * gqa, d, generator=torch.Generator().manual_seed(sub)).bfloat16().to(DEV)
    pos = torch.tensor([n - 1 for n in lens], device=DEV)
    req = torch.arange(len(lens), device=DEV)
    v = CANDIDATES[f"ki8_sub{sub}"][d] if f"ki8_sub{sub}" in CANDIDATES else dict(CANDIDATES["ki8"][d], sub=sub)
    assert v["sub"] == sub
    plan = kk.plan(pos, req, len(lens), gqa, bm=v["bm"])
    run = lambda w, n: kk.attention(q, pos, req, scale=d ** -0.5, plan=plan, out_dtype=torch.float32,  # noqa: E731
                                    splits=n, **kernel_args(w), **sc).double().cpu()
    ref = run(dict(v, sub=1), 5)
    for n in splits:
        out = run(v, n)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < ACCEPT_REL, n
        for i in range(len(lens)):
            assert rel_err(out[i], ref_attention(q[i], lens[i] - 1, refs[i], gqa)) < 5e-3, (n, i)


def test_sub_is_validated_and_widens_the_split_bound():
    from kakeya_kernels.variants import num_splits
    kk, sc, _ = _build([600], 1, 64, 3, True, seed=1)
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16, device=DEV)
    pos, req = torch.tensor([599], device=DEV), torch.tensor([0], device=DEV)
    for bad in (3, 8, 0):
        with pytest.raises(ValueError, match="sub must be"):
            kk.attention(q, pos, req, scale=0.125, sub=bad, tt=64, **sc)
    with pytest.raises(ValueError, match="sub must be"):
        kk.attention(q, pos, req, scale=0.125, sub=4, tt=256, **sc)    # 128-token items, 256-token tiles
    v = dict(CANDIDATES["ki8"][64])
    assert num_splits(dict(v, sub=4), 1, 8, 32, 132) == min(32 * 4 + 1, v["fill"] * 132 // 8)
    assert num_splits(v, 1, 8, 32, 132) == 33


def test_sub_candidates_need_the_uniform_k_grid_too():
    from kakeya_kv.config import ConfigError, KakeyaConfig
    for name in ("candidate:ki8_sub4", "candidate:ki8_sub2"):
        assert KakeyaConfig.from_env({"KAKEYA_DECODE_VARIANT": name}).decode_variant == name     # auto -> uniform
        with pytest.raises(ConfigError, match="uniform"):
            KakeyaConfig.from_env({"KAKEYA_DECODE_VARIANT": name, "KAKEYA_K_GRID": "lloyd"})
