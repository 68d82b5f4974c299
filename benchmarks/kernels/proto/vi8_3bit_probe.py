"""Design probe for issue 3 (CPU proxy only, like vi8_probe.py): int8 P.V for 3-bit V in a hypothetical token-major
layout of two bit planes per dim — plane A the low 2 bits (4 tokens per byte, token 4i+j at bits 2j..2j+1 of byte i),
plane B the high bit (8 tokens per byte, token 8i+j at bit j). Triton's inline asm maps packed bytes to as many
same-shape outputs (4 int8 classes of plane A, 8 of plane B: tokens by residue mod 4 / mod 8), P's columns are split
into the same classes (reshape + split, in registers), and the value 2-bit + 4 x 1-bit is summed over 12 int8 dots
per hi / lo part (K-dims 64 and 32: tt 256). Garbage data; only the instruction stream counts:

    PYTHONPATH=/tmp/tri36 python benchmarks/kernels/proto/vi8_3bit_probe.py

Session 12 (Triton 3.6, sm_90, rows 4, tt 256): D=128 4 warps cap 168: 3.41 loop SASS per code element (88 B stack),
cap 128: 3.60 (spills), 8 warps cap 128: 4.09; D=64 4 warps cap 128: 4.78. (4-bit token-major, vi8_probe.py: D=128
2.25 at tt 256; served kernel k4v3: TUNED 7.70, ki8 5.67.) Caveat from the same session's H100 timings: the SASS
proxy overstates gains at this level — ki8 cut loop SASS 26 % (19 % vs TUNED without pf) and time 18 %; vi8 on
k4v4 cut SASS 22 % and time ~10 %.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import triton
import triton.language as tl
from kakeya_kernels.kakeya_triton import _i8_hilo, _i8_scores, _i8_split, _kbytes  # noqa: E402
from vi8_probe import loop_sass  # noqa: E402


@triton.jit
def _planes2(x, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(
        "{ and.b32 $0, $4, 0x03030303; shr.u32 $1, $4, 2; and.b32 $1, $1, 0x03030303; "
        "shr.u32 $2, $4, 4; and.b32 $2, $2, 0x03030303; shr.u32 $3, $4, 6; and.b32 $3, $3, 0x03030303; }",
        "=r,=r,=r,=r,r", [x], dtype=(tl.int8, tl.int8, tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def _bits8(x, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(
        "{ and.b32 $0, $8, 0x01010101; shr.u32 $1, $8, 1; and.b32 $1, $1, 0x01010101; "
        "shr.u32 $2, $8, 2; and.b32 $2, $2, 0x01010101; shr.u32 $3, $8, 3; and.b32 $3, $3, 0x01010101; "
        "shr.u32 $4, $8, 4; and.b32 $4, $4, 0x01010101; shr.u32 $5, $8, 5; and.b32 $5, $5, 0x01010101; "
        "shr.u32 $6, $8, 6; and.b32 $6, $6, 0x01010101; shr.u32 $7, $8, 7; and.b32 $7, $7, 0x01010101; }",
        "=r,=r,=r,=r,=r,=r,=r,=r,r", [x], dtype=(tl.int8,) * 8, is_pure=True, pack=4)


@triton.jit
def _cls4(x, BM: tl.constexpr, W: tl.constexpr):
    a, b = tl.split(tl.reshape(x, (BM, W // 4, 2, 2)))      # a: j in {0, 2}, b: j in {1, 3}
    a0, a2 = tl.split(a)
    b1, b3 = tl.split(b)
    return a0, b1, a2, b3


@triton.jit
def _pv_dot(p8, v8):
    return tl.dot(p8, tl.trans(v8), out_dtype=tl.int32)


@triton.jit
def proto3(q_ptr, cache_ptr, out_ptr, nblk, D: tl.constexpr, BM: tl.constexpr, TT: tl.constexpr, ASM: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, D)
    r = tl.arange(0, BM)
    q = tl.load(q_ptr + r[:, None] * D + d[None, :]).to(tl.float32)
    qeh, qoh, qel, qol, qa = _i8_split(q, tl.max(tl.abs(q), 1), BM, D)
    kq = qa / 127.0
    m_i = tl.full((BM,), -float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    for b in range(pid, nblk, 64):
        slot = cache_ptr + b * 65536
        for t0 in tl.range(0, 512, TT, num_stages=1):
            t = t0 + tl.arange(0, TT)
            kg = tl.load((slot + 60000).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
            s = _i8_scores(qeh, qoh, qel, qol, _kbytes(slot, t, t < 512, D), ASM) * kq[:, None]
            s = s * tl.abs(kg)[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vg = tl.load((slot + 61000).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
            pg = p * tl.abs(vg)[None, :]
            h8, l8, a = _i8_hilo(pg, tl.max(pg, 1))
            # plane A (low 2 bits): per dim, 4 tokens per byte; plane B (high bit): 8 tokens per byte
            ia = t0 // 4 + tl.arange(0, TT // 4)
            pa = tl.load(slot + 30000 + d[:, None] * 128 + ia[None, :])
            a0, a1, a2, a3 = _planes2(pa, ASM)
            ib = t0 // 8 + tl.arange(0, TT // 8)
            pb = tl.load(slot + 50000 + d[:, None] * 64 + ib[None, :])
            b0, b1, b2, b3, b4, b5, b6, b7 = _bits8(pb, ASM)
            # P classes mod 4 (plane A) and mod 8 (plane B)
            h0, h1, h2, h3 = _cls4(h8, BM, TT)
            l0, l1, l2, l3 = _cls4(l8, BM, TT)
            hA = _pv_dot(h0, a0) + _pv_dot(h1, a1) + _pv_dot(h2, a2) + _pv_dot(h3, a3)
            lA = _pv_dot(l0, a0) + _pv_dot(l1, a1) + _pv_dot(l2, a2) + _pv_dot(l3, a3)
            h00, h04 = tl.split(tl.reshape(h0, (BM, TT // 8, 2)))
            h01, h05 = tl.split(tl.reshape(h1, (BM, TT // 8, 2)))
            h02, h06 = tl.split(tl.reshape(h2, (BM, TT // 8, 2)))
            h03, h07 = tl.split(tl.reshape(h3, (BM, TT // 8, 2)))
            l00, l04 = tl.split(tl.reshape(l0, (BM, TT // 8, 2)))
            l01, l05 = tl.split(tl.reshape(l1, (BM, TT // 8, 2)))
            l02, l06 = tl.split(tl.reshape(l2, (BM, TT // 8, 2)))
            l03, l07 = tl.split(tl.reshape(l3, (BM, TT // 8, 2)))
            hB = (_pv_dot(h00, b0) + _pv_dot(h01, b1) + _pv_dot(h02, b2) + _pv_dot(h03, b3) + _pv_dot(h04, b4)
                  + _pv_dot(h05, b5) + _pv_dot(h06, b6) + _pv_dot(h07, b7))
            lB = (_pv_dot(l00, b0) + _pv_dot(l01, b1) + _pv_dot(l02, b2) + _pv_dot(l03, b3) + _pv_dot(l04, b4)
                  + _pv_dot(l05, b5) + _pv_dot(l06, b6) + _pv_dot(l07, b7))
            hv = hA + 4 * hB
            lv = lA + 4 * lB
            acc = acc * alpha[:, None] + (hv.to(tl.float32) + lv.to(tl.float32) * (1.0 / 254.0)) * (a / 127.0)[:, None]
            m_i = m_new
    tl.store(out_ptr + pid * BM * D + r[:, None] * D + d[None, :], acc / l_i[:, None])


def main():
    for D, BM, TT, nw, reg in [(128, 4, 256, 4, 168), (128, 4, 256, 4, 128), (128, 4, 256, 8, 128), (64, 4, 256, 4, 128)]:
        per, occ, top = loop_sass(proto3, D, BM, TT, nw, reg)
        print(f"D={D} rows={BM} tt={TT} warps={nw} cap={reg}: {per:.2f} loop SASS/elem; {occ}; {top}", flush=True)


if __name__ == "__main__":
    main()
