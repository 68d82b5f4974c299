"""Decode candidates and the register-table lookups (kakeya_kernels.variants: TUNED uses lut=4 since session 7):
lut=3 / lut=4 (centroid table held in registers as byte planes, looked up with prmt) and swap (codes as the MMA's
M operand). The GPU-only PTX blocks are checked by a small PTX evaluator against the plain table lookup; the kernels
(interpreter: prmt emulated with the same semantics) agree with the pair table (lut=2; bit for bit without swap),
with the baseline launch and with the CPU reference codec, and stay inside guarded buffers."""
import numpy as np
import pytest
import torch

from kakeya_kernels import kakeya_triton as K
from kakeya_kernels.variants import (ACCEPT_REL, BASELINE, CANDIDATES, GRID_ONLY, REG4, TUNED, kernel_args,
                                     num_splits)
from kakeya_kv import lloyd_max
from tests.kernel_cases import build, ref_attention, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
M32 = 0xFFFFFFFF


def _prmt(a, b, sel):
    """PTX prmt.b32 default mode: byte k of the result = byte (nibble k of sel) & 7 of b:a, or its sign replicated."""
    src = (a & M32) | ((b & M32) << 32)
    out = 0
    for k in range(4):
        nib = (sel >> (4 * k)) & 15
        byte = (src >> (8 * (nib & 7))) & 255
        if nib & 8:
            byte = 255 if byte & 128 else 0
        out |= byte << (8 * k)
    return out


def _run_ptx(asm: str, ops: list[int]) -> list[int]:
    """Evaluates the straight-line PTX of an inline-asm block ($i operands; shl/shr/and/prmt/lop3 on b32)."""
    regs = dict(enumerate(ops))
    env = {}

    def val(tok):
        tok = tok.strip()
        if tok.startswith("$"):
            return regs[int(tok[1:])]
        if tok[0].isdigit():
            return int(tok, 0)
        return env[tok]

    def put(tok, v):
        tok = tok.strip()
        if tok.startswith("$"):
            regs[int(tok[1:])] = v & M32
        else:
            env[tok] = v & M32

    for line in asm.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [x.strip() for x in rest.split(",")]
        v = [val(x) for x in args[1:]]
        if op == "shl.b32":
            put(args[0], v[0] << v[1])
        elif op == "shr.b32":
            put(args[0], v[0] >> v[1])
        elif op == "and.b32":
            put(args[0], v[0] & v[1])
        elif op == "prmt.b32":
            put(args[0], _prmt(v[0], v[1], v[2]))
        elif op == "lop3.b32":
            lut, r = v[3], 0
            for bit in range(32):
                i = (((v[0] >> bit) & 1) << 2) | (((v[1] >> bit) & 1) << 1) | ((v[2] >> bit) & 1)
                r |= ((lut >> i) & 1) << bit
            put(args[0], r)
        else:
            raise AssertionError(f"unexpected PTX op {op}")
    return regs


def _words(table16):
    return [int(w) & M32 for w in K.reg_table(table16).tolist()]


def _fp16_bits(table16):
    return [int(x) & 0xFFFF for x in table16.view(torch.int16).tolist()]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ptx_blocks_look_up_eight_codes(bits):
    """The asm the GPU runs (K._PRMT8_ASM for <= 3-bit codes, K._PRMT16_ASM for 4-bit) returns, for 8 codes in
    nibbles, the fp16 pairs (c[2i], c[2i+1]) of the table: Lloyd-Max tables and random asymmetric ones (fitted
    tables need not be symmetric), every code value in every position."""
    g = torch.Generator().manual_seed(bits)
    rng = np.random.default_rng(bits)
    tables = [lloyd_max.gaussian_table(bits).half(), (torch.randn(1 << bits, generator=g) * 3).half()]
    asm = (K._PRMT16_ASM if bits == 4 else K._PRMT8_ASM).value
    nt = 8 if bits == 4 else 4           # table words the block takes after $4: all 8, or lo 0-1 + hi 0-1
    for tab in tables:
        w, c = _words(tab), _fp16_bits(tab)
        tw = w if bits == 4 else [w[0], w[1], w[4], w[5]]
        codes = np.concatenate([np.tile(np.arange(1 << bits), (8, 1)).T, rng.integers(0, 1 << bits, (200, 8))])
        for row in codes:
            x = sum(int(v) << (4 * k) for k, v in enumerate(row))
            regs = _run_ptx(asm, [0, 0, 0, 0, x] + tw)
            assert len(tw) == nt
            for i in range(4):
                assert regs[i] == c[row[2 * i]] | (c[row[2 * i + 1]] << 16), (row, i)


def test_reg_table_byte_planes():
    t = torch.tensor([1.5, -2.25, 0.0, 65504.0, -0.001, 3.0, 7.0, -7.0], dtype=torch.float16)
    w = [int(x) & M32 for x in K.reg_table(t).tolist()]
    b = _fp16_bits(t)
    for e in range(8):
        assert (w[e // 4] >> (8 * (e % 4))) & 255 == b[e] & 255
        assert (w[4 + e // 4] >> (8 * (e % 4))) & 255 == b[e] >> 8
    assert w[2] == w[3] == w[6] == w[7] == 0          # entries 8-15 absent
    with pytest.raises(ValueError, match="at most 16"):
        K.reg_table(torch.zeros(32, dtype=torch.float16))
    assert K.reg_table(lloyd_max.gaussian_table(4).half()).dtype == torch.int32


@pytest.mark.parametrize("lut,swap,tt,kb,vb,gqa", [
    (4, False, 64, 4, 3, 1), (4, False, 64, 3, 2, 3), (4, False, 64, 5, 4, 4),
    (3, False, 64, 4, 3, 3), (3, True, 128, 3, 2, 4), (2, True, 64, 4, 3, 3), (2, True, 128, 5, 4, 1),
    (4, True, 64, 4, 3, 4)])
def test_candidate_attention(lut, swap, tt, kb, vb, gqa):
    """Fast mode, as served, the tuned launch with lut 3/4 and/or swap (and 128-token tiles): within ACCEPT_REL of the
    pair table without swap (lut 2; bit for bit in the interpreter when only the lookup differs: the same fp16
    centroids enter the same MMAs) and of the baseline launch, and within 5e-3 of float64 attention on the
    reference codec's decode. Ragged lengths (tails 53 / 1 / 77 / 76), k4v3 / k3v2 / k5v4."""
    lens, d = [1077, 1, 77, 1100][: 3 + (gqa == 3)], 64
    hkv = 3 if gqa == 3 else 2
    kk, sc, refs = build(lens, hkv, gqa, d, kb, vb, device=DEV, seed=7 * kb + gqa)
    q = torch.randn(len(lens), hkv * gqa, d, generator=torch.Generator().manual_seed(gqa)).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    req = torch.arange(len(lens), device=DEV)
    outs = {}
    for name, v in (("reg", dict(TUNED[d], lut=lut, swap=swap, tt=tt)), ("pair", dict(TUNED[d], lut=2, tt=tt)),
                    ("baseline", BASELINE)):
        plan = kk.plan(pos, req, len(lens), gqa, bm=v["bm"])
        splits = num_splits(v, plan["nt"], hkv, sc["block_table"].shape[1], sms=4)
        outs[name] = kk.attention(q, pos, req, scale=d ** -0.5, plan=plan, out_dtype=torch.float32, splits=splits,
                                  **kernel_args(v), **sc)
    if DEV == "cpu" and not swap and tt == 64:
        assert torch.equal(outs["reg"], outs["pair"])
    assert rel_err(outs["reg"], outs["pair"].double().cpu()) < ACCEPT_REL
    assert rel_err(outs["reg"], outs["baseline"].double().cpu()) < ACCEPT_REL
    for i in range(len(lens)):
        assert rel_err(outs["reg"][i], ref_attention(q[i], lens[i] - 1, refs[i], gqa)) < 5e-3


@pytest.mark.parametrize("lut,kb,vb,tt", [(4, 4, 3, 64), (4, 5, 4, 64), (2, 3, 2, 64), (3, 4, 3, 128)])
def test_register_prefetch_is_the_same_math(lut, kb, vb, tt):
    """pf (the next tile's code words and gains loaded before this tile is decoded) changes when bytes are loaded,
    not what is computed: bit for bit the non-prefetch launch in the interpreter (on a GPU within ACCEPT_REL: the
    compiler may schedule the arithmetic differently), at every width path (register table, pair table, 5-bit K)
    and with ragged tails; and within 5e-3 of float64 attention on the reference decode."""
    lens, d, gqa, hkv = [1077, 1, 600], 64, 4, 2
    kk, sc, refs = build(lens, hkv, gqa, d, kb, vb, device=DEV, seed=kb + 10 * vb)
    q = torch.randn(len(lens), hkv * gqa, d, generator=torch.Generator().manual_seed(3)).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], device=DEV)
    req = torch.arange(len(lens), device=DEV)
    v = dict(REG4[d], lut=lut, tt=tt)        # the launch without prefetch; pf is set per run below
    plan = kk.plan(pos, req, len(lens), gqa, bm=v["bm"])
    outs = [kk.attention(q, pos, req, scale=d ** -0.5, plan=plan, out_dtype=torch.float32, splits=2, pf=pf,
                         **kernel_args(v), **sc) for pf in (False, True)]
    if DEV == "cpu":
        assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], outs[0].double().cpu()) < ACCEPT_REL
    for i in range(len(lens)):
        assert rel_err(outs[1][i], ref_attention(q[i], lens[i] - 1, refs[i], gqa)) < 5e-3
    with pytest.raises(ValueError, match="pf .* needs lut >= 2"):
        kk.attention(q, pos, req, scale=0.1, plan=plan, pf=True, lut=0, **sc)


def test_candidates_are_opt_in_and_in_the_short_sweep():
    """The backend default is session 8's measured winner per head_dim (register tables, no swap: its launch carries
    no swap key);
    the bench's short sweep times every candidate next to it with <= 8 variants per head_dim (compile time on the
    device)."""
    import importlib.util
    import pathlib
    assert all(v["lut"] == 4 and "swap" not in v for v in TUNED.values())
    assert all("swap" not in kernel_args(v) for v in TUNED.values()) and kernel_args(dict(TUNED[64], swap=True))["swap"]
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "kernels" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_t", path)
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)
    for d in (64, 128):
        sw = B.short_sweep(d)
        assert len(sw) <= 8 and TUNED[d] in sw and B.BASELINE_VARIANT in sw
        assert all(c[d] in sw for name, c in CANDIDATES.items() if name not in GRID_ONLY)
        assert not any(CANDIDATES[name][d] in sw for name in GRID_ONLY)
        assert len({tuple(sorted(v.items())) for v in sw}) == len(sw)


@pytest.mark.parametrize("name", ["t128_reg4"])
def test_candidate_stays_in_bounds(monkeypatch, name):
    """test_decode_variants' debug bounds check (poisoned guard rows around every input, canaries around the output,
    ragged lengths, tails not multiples of tt) run with a candidate in place of the tuned launch."""
    import tests.test_decode_variants as tdv
    monkeypatch.setitem(tdv.TUNED, 64, CANDIDATES[name][64])
    tdv.test_tuned_launch_stays_in_bounds(64, 4)


_SWEEP_CASE = {}


def _sweep_case(d: int):
    """One scenario per head_dim for test_sweep_candidate_launch (3 requests, 2 KV heads, GQA 4, ragged tails) and
    its baseline-launch output, built once."""
    if d not in _SWEEP_CASE:
        lens, hkv, gqa = [1077, 1, 600], 2, 4
        kk, sc, refs = build(lens, hkv, gqa, d, device=DEV, seed=d + 5)
        q = torch.randn(len(lens), hkv * gqa, d, generator=torch.Generator().manual_seed(11)).bfloat16().to(DEV)
        pos, req = torch.tensor([L - 1 for L in lens], device=DEV), torch.arange(len(lens), device=DEV)
        case = dict(lens=lens, hkv=hkv, gqa=gqa, kk=kk, sc=sc, refs=refs, q=q, pos=pos, req=req)
        case["base"] = _run_launch(case, BASELINE, d)
        _SWEEP_CASE[d] = case
    return _SWEEP_CASE[d]


def _run_launch(c: dict, v: dict, d: int) -> torch.Tensor:
    """v as served (kernel knobs + its split rule on 4 SMs) into an output between canary rows, which must survive."""
    plan = c["kk"].plan(c["pos"], c["req"], len(c["lens"]), c["gqa"], bm=v["bm"])
    splits = num_splits(v, plan["nt"], c["hkv"], c["sc"]["block_table"].shape[1], sms=4)
    buf = torch.full((len(c["lens"]) + 2, c["hkv"] * c["gqa"], d), 7.0, device=DEV)
    res = c["kk"].attention(c["q"], c["pos"], c["req"], scale=d ** -0.5, plan=plan, splits=splits,
                            out_dtype=torch.float32, out=buf[1:-1] if v["fused"] else None, **kernel_args(v),
                            **c["sc"])
    assert (buf[0] == 7).all() and (buf[-1] == 7).all()
    return res


@pytest.mark.parametrize("d", (64, 128) if DEV == "cuda" else (64,))
@pytest.mark.parametrize("name", sorted(set(CANDIDATES) - {"linear", "t128_reg4", "ki8", *GRID_ONLY}))
def test_sweep_candidate_launch(name, d):
    """The grid-changing sweep candidates as served (kernel knobs + fill split rule, 2-3 splits over 3 tiles x 2 heads
    on 4 SMs): within ACCEPT_REL of the baseline launch and 5e-3 of float64 attention on the reference decode,
    nothing written outside the output. On a GPU this also checks the register caps (80-128: spills) and 8-warp
    layouts the interpreter ignores. (pf = TUNED[64], t128_reg4 = TUNED[128]: test_decode_variants; linear:
    test_linear_decode; ki8, uniform-grid K only: test_ki8_decode.)"""
    c = _sweep_case(d)
    out = _run_launch(c, CANDIDATES[name][d], d)
    assert rel_err(out, c["base"].double().cpu()) < ACCEPT_REL
    for i, L in enumerate(c["lens"]):
        assert rel_err(out[i], ref_attention(c["q"][i], L - 1, c["refs"][i], c["gqa"])) < 5e-3


def test_candidate_values_validated():
    with pytest.raises(ValueError, match="lut must be one of"):
        K.KakeyaKernels(64, 4, 3, DEV, lut=9)
    kk, sc, _ = build([600], 1, 1, 64, device=DEV)
    q = torch.zeros(1, 1, 64, dtype=torch.bfloat16, device=DEV)
    pos, req = torch.tensor([599], device=DEV), torch.zeros(1, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="swap must be a bool"):
        kk.attention(q, pos, req, scale=0.1, swap="yes", **sc)
    # the precise (float32) path ignores swap: same kernel, same result
    q = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0)).bfloat16().to(DEV)
    a, b = (kk.attention(q, pos, req, scale=0.125, precise=True, lut=2, fused=True, swap=sw, out_dtype=torch.float32,
                         **sc) for sw in (False, True))
    assert torch.equal(a, b)
    kk = K.KakeyaKernels(64, 5, 4, DEV, lut=4)        # 5-bit K keeps the pair table; its planes are placeholders
    assert kk.reg_tables["k"].shape == (256,) and not kk.reg_tables["k"].any()
    planes = K.reg_table(kk.tables16["v"])                # one copy per lane (the kernel reads its lane's)
    assert torch.equal(kk.reg_tables["v"].view(32, 8).cpu(), planes.cpu().expand(32, 8))
