"""Triton kernels for the ``kakeya`` block format (layout from kakeya_kv.format).

* ``seal``: encode full 512-token blocks (K and V, every head, many blocks per
  launch) from bf16 rows into their slots.
* ``attention``: queries (decode or chunked prefill) against sealed blocks,
  read compressed, plus the exact bf16 tail, causal, split over the KV axis.
  Scores are computed in the format's rotated domain: per block the query is
  turned once into q' = R (q / lambda), values are accumulated as rotated code
  vectors and un-rotated once per block, so no token is ever decoded to D-dim.
* ``decode``: sealed blocks -> bf16 (tests and tools); ``decode_into``: the same kernel, indirect, for the
  decode-once-then-attend prefill launch (``attention(..., scratch=True)``, kakeya_kernels.scratch).

Attention variants (``KakeyaKernels(..., lut, fused, tt, num_warps, maxnreg)`` or per call; defaults = the path
measured in sessions 2-3): ``lut=2`` looks centroids up two codes at a time in a pair table (a 4-bit byte is its
own index: no unpack); ``lut=3`` / ``lut=4`` take codes of <= 3 / <= 4 bits from the table held in registers as
byte planes, 8 codes per few ``prmt`` byte permutes (no memory access; wider codes keep the pair table); ``fused``
gathers query rows in the kernel and merges splits in one combine kernel that writes the caller's output; ``bm``
(the plan's rows per tile) may be the GQA group (Triton pads M < 16 inside the MMA; ``swap`` makes the codes the
MMA's M operand so the rows pad to N = 8 instead); ``maxnreg`` caps registers for occupancy. benchmarks/kernels/sass_count.py counts their loop instructions.

Bit packing is LSB-first (kakeya_kv.bitpack): indices are handled in groups of
G = lcm(8, b) / b that fill exactly NB = G * b / 8 bytes.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kakeya_kv import lloyd_max
from kakeya_kv.format import BLOCK_TOKENS, ROTATION_SEED, exact_layout, kakeya_layout
from kakeya_kv.hadamard import sylvester, signs

from kakeya_kernels import scratch as _scratch_mod


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _group(bits: int) -> tuple[int, int]:
    g = math.lcm(8, bits) // bits
    return g, g * bits // 8


@triton.jit
def _unpack_codes(row_ptr, t_off, t_mask, ROW_BYTES: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                  G: tl.constexpr, NB: tl.constexpr, TT: tl.constexpr):
    """Codes of TT tokens -> int32 [TT, D]."""
    grp = tl.arange(0, D // G)
    WT: tl.constexpr = tl.int64 if NB > 3 else tl.int32   # 40-bit groups (b=5) need int64
    word = tl.zeros((TT, D // G), dtype=WT)
    for m in tl.static_range(NB):
        p = row_ptr + t_off[:, None] * ROW_BYTES + grp[None, :] * NB + m
        byte = tl.load(p, mask=t_mask[:, None], other=0).to(WT)
        word = word | (byte << (8 * m))
    shifts = (tl.arange(0, G) * BITS).to(WT)
    idx = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(idx, (TT, D)).to(tl.int32)


@triton.jit
def _seal_kernel(src_ptr, s_item, s_head, s_tok, dst_ptr, d_item, d_head, rot_ptr, mids_ptr, table_ptr, w_ptr,
                 sidx_ptr, didx_ptr, flag_ptr, hada_ptr, sgn_ptr,
                 HAS_W: tl.constexpr, STREAM_OFF: tl.constexpr, OFF_MEAN: tl.constexpr, OFF_SCALE: tl.constexpr,
                 OFF_GAIN: tl.constexpr, OFF_CODES: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                 G: tl.constexpr, NB: tl.constexpr, N: tl.constexpr, TT: tl.constexpr, PREC: tl.constexpr,
                 INDIRECT: tl.constexpr = 0, BF16DOT: tl.constexpr = 1, SNS: tl.constexpr = None):
    item = tl.program_id(0)
    head = tl.program_id(1)
    if INDIRECT:
        # Fixed grid over all requests (CUDA-graph friendly): only flagged items seal, source = their
        # tail slot, destination = their page.
        if tl.load(flag_ptr + item) == 0:
            return
        src = src_ptr + tl.load(sidx_ptr + item).to(tl.int64) * s_item + head * s_head
        dst = dst_ptr + tl.load(didx_ptr + item).to(tl.int64) * d_item + head * d_head + STREAM_OFF
    else:
        src = src_ptr + item * s_item + head * s_head
        dst = dst_ptr + item * d_item + head * d_head + STREAM_OFF
    d = tl.arange(0, D)
    # Pass 1: channel mean and centred variance (two-pass for exactness on
    # K channels whose mean is many times their std).
    acc = tl.zeros((D,), dtype=tl.float32)
    for t0 in tl.range(0, N, TT, num_stages=SNS):
        t = t0 + tl.arange(0, TT)
        acc += tl.sum(tl.load(src + t[:, None] * s_tok + d[None, :]).to(tl.float32), 0)
    mean = acc / N
    var = tl.zeros((D,), dtype=tl.float32)
    for t0 in tl.range(0, N, TT, num_stages=SNS):
        t = t0 + tl.arange(0, TT)
        xc = tl.load(src + t[:, None] * s_tok + d[None, :]).to(tl.float32) - mean[None, :]
        var += tl.sum(xc * xc, 0)
    var = var / N
    v = var + 1e-6 * (tl.sum(var, 0) / D) + 1e-12
    if HAS_W:
        lam = tl.sqrt(tl.sqrt(tl.load(w_ptr + head * D + d) / v))
    else:
        lam = tl.sqrt(tl.sqrt(1.0 / v))
    lam = lam / tl.exp(tl.sum(tl.log(lam), 0) / D)
    lam = tl.minimum(tl.maximum(lam, 1e-3), 1e3).to(tl.float16).to(tl.float32)
    tl.store((dst + OFF_MEAN).to(tl.pointer_type(tl.float32)) + d, mean)
    tl.store((dst + OFF_SCALE).to(tl.pointer_type(tl.float16)) + d, lam.to(tl.float16))
    if PREC == "bf16x3":
        # z = x R^T = (x s/sqrt(D)) H: exact +-1 bf16 H (half the shared memory of fp32 R^T), x split in 3 bf16
        # parts (24 mantissa bits, products exact) -> fp32-level z from bf16 MMAs.
        hd = tl.load(hada_ptr + d[:, None] * D + d[None, :])
        sg = tl.load(sgn_ptr + d)
    else:
        rot_t = tl.load(rot_ptr + d[:, None] + d[None, :] * D)  # R^T (R row-major [D, D])
    gain_ptr = (dst + OFF_GAIN).to(tl.pointer_type(tl.float16))
    grp = tl.arange(0, D // G)
    shifts = (tl.arange(0, G) * BITS).to(tl.int64)
    for t0 in tl.range(0, N, TT, num_stages=SNS):
        t = t0 + tl.arange(0, TT)
        x = tl.load(src + t[:, None] * s_tok + d[None, :]).to(tl.float32)
        xc = x - mean[None, :]
        raw = tl.sum((x * lam[None, :]) * (x * lam[None, :]), 1)
        cen = tl.sum((xc * lam[None, :]) * (xc * lam[None, :]), 1)
        unc = raw < cen
        xs = tl.where(unc[:, None], x, xc) * lam[None, :]
        if PREC == "bf16x3":
            z = _hada3(xs * sg[None, :], hd, BF16DOT)
        else:
            z = tl.dot(xs, rot_t, input_precision=PREC)
        rms = tl.maximum(tl.sqrt(tl.sum(z * z, 1) / D), 1e-30)
        u = z / rms[:, None]
        idx = tl.zeros((TT, D), dtype=tl.int32)
        for k in tl.static_range((1 << BITS) - 1):
            idx += (u > tl.load(mids_ptr + k)).to(tl.int32)
        c = tl.load(table_ptr + idx)
        gain = tl.sum(z * c, 1) / tl.maximum(tl.sum(c * c, 1), 1e-30)
        gain = tl.minimum(gain, 65504.0)
        gain = tl.where(unc, -gain, gain)
        tl.store(gain_ptr + t, gain.to(tl.float16))
        idx3 = tl.reshape(idx.to(tl.int64), (TT, D // G, G))
        word = tl.sum(idx3 << shifts[None, None, :], 2)
        for m in tl.static_range(NB):
            p = dst + OFF_CODES + t[:, None] * (D * BITS // 8) + grp[None, :] * NB + m
            tl.store(p, ((word >> (8 * m)) & 255).to(tl.uint8))


@triton.jit
def _hada3(x, hd, BF16DOT: tl.constexpr):
    """x fp32 times the +-1 bf16 matrix hd with x = a1 + a2 + a3 in bf16: three exact-product MMAs."""
    a1 = x.to(tl.bfloat16)
    r = x - a1.to(tl.float32)
    a2 = r.to(tl.bfloat16)
    a3 = (r - a2.to(tl.float32)).to(tl.bfloat16)
    return _dot16(a3, hd, BF16DOT) + _dot16(a2, hd, BF16DOT) + _dot16(a1, hd, BF16DOT)


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16, round to nearest even, by bit arithmetic: the interpreter's cast truncates (twice the error of
    the GPU's rounding, and biased), so explicit rounding gives the same bytes on both (finite inputs)."""
    b = x.to(tl.int32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _decode_kernel(cache_ptr, c_item, c_head, out_ptr, o_item, o_head, o_tok, rot_ptr, table_ptr, page_ptr, dst_ptr,
                   hada_ptr, sgn_ptr, ptab_ptr, rtab_ptr,
                   STREAM_OFF: tl.constexpr, OFF_MEAN: tl.constexpr, OFF_SCALE: tl.constexpr,
                   OFF_GAIN: tl.constexpr, OFF_CODES: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                   G: tl.constexpr, NB: tl.constexpr, N: tl.constexpr, TT: tl.constexpr,
                   INDIRECT: tl.constexpr = 0, PRECISE: tl.constexpr = 1, BF16DOT: tl.constexpr = 1,
                   CHUNK: tl.constexpr = 512, LUT: tl.constexpr = 0, ASM: tl.constexpr = 0):
    """One program: CHUNK tokens (program_id 2 picks which) of one stream of one sealed block of one KV head ->
    bf16 rows. INDIRECT (the scratch prefill path, kakeya_kernels.scratch): item i reads page page_ptr[i] and writes
    output block dst_ptr[i].
    PRECISE 0: the rotation as the attention kernel does it (_hada: bf16 hi/lo MMAs on the exact +-1 H_{D/2}, ~16
    mantissa bits, ample for a bf16 output) instead of an fp32 D x D product (the debug decode). LUT >= 2 (fast
    mode): the fp16 centroids through the attention kernel's decoder (_codes16: register table for codes of <= 4
    bits, pair table above) instead of a gather from the fp32 table in global memory."""
    item = tl.program_id(0)
    head = tl.program_id(1)
    if INDIRECT:
        src = tl.load(page_ptr + item).to(tl.int64)
        dst = tl.load(dst_ptr + item).to(tl.int64)
    else:
        src = item
        dst = item
    slot = cache_ptr + src * c_item + head * c_head + STREAM_OFF
    d = tl.arange(0, D)
    mean = tl.load((slot + OFF_MEAN).to(tl.pointer_type(tl.float32)) + d)
    lam = tl.load((slot + OFF_SCALE).to(tl.pointer_type(tl.float16)) + d).to(tl.float32)
    if PRECISE:
        rot = tl.load(rot_ptr + d[:, None] * D + d[None, :])
    else:
        dh = tl.arange(0, D // 2)
        hd = tl.load(hada_ptr + dh[:, None] * (D // 2) + dh[None, :])
        rsl = tl.load(sgn_ptr + d) / lam                      # s / (sqrt(D) lambda)
    if LUT >= 2:
        rt = _rtab(rtab_ptr, ASM)                             # the register table, loaded once per program
    c0 = tl.program_id(2) * CHUNK
    for t0 in range(c0, c0 + CHUNK, TT):
        t = t0 + tl.arange(0, TT)
        g = tl.load((slot + OFF_GAIN).to(tl.pointer_type(tl.float16)) + t)
        unc = (g.to(tl.int16, bitcast=True) < 0)
        if LUT >= 2:
            c = _codes16(slot + OFF_CODES, t, t < N, ptab_ptr, rt, D * BITS // 8, D, BITS, G, NB, TT, LUT, ASM)
            y = c.to(tl.float32) * tl.abs(g.to(tl.float32))[:, None]
        else:
            idx = _unpack_codes(slot + OFF_CODES, t, t < N, D * BITS // 8, D, BITS, G, NB, TT)
            y = tl.load(table_ptr + idx) * tl.abs(g.to(tl.float32))[:, None]
        if PRECISE:
            x = tl.dot(y, rot, input_precision="ieee") / lam[None, :]
        else:
            x = _hada(y, hd, TT, D, 0, BF16DOT) * rsl[None, :]
        x = x + tl.where(unc[:, None], 0.0, mean[None, :])
        tl.store(out_ptr + dst * o_item + head * o_head + t[:, None] * o_tok + d[None, :], _bf16_rtne(x))


@triton.jit
def _lookup(tab_ptr, idx, BITS: tl.constexpr, D: tl.constexpr, LUT: tl.constexpr):
    """Centroid values of codes idx [TT, D]: LUT 0 = global (L1) gather, 1 = register gather (tl.gather)."""
    if LUT == 1:
        k = tl.arange(0, 1 << BITS)
        tab = tl.load(tab_ptr + k[:, None] + 0 * tl.arange(0, D)[None, :])
        return tl.gather(tab, idx, 0)
    else:
        return tl.load(tab_ptr + idx)


@triton.jit
def _pair_lookup(ptab_ptr, pair, I16: tl.constexpr = 0):
    """Pair codes -> [.., 2] fp16 centroids (low code first): one 32-bit load from the pair table
    (entry = fp16 c[lo] | fp16 c[hi] << 16) gives two centroids. I16: their int16 bit patterns (see _dec16's FLAT)."""
    w = tl.load(ptab_ptr + pair)
    if I16:
        return tl.join(w.to(tl.int16), (w >> 16).to(tl.int16))
    else:
        lo = w.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.join(lo, hi)


@triton.jit
def _prmt(a, b, sel, ASM: tl.constexpr):
    """PTX prmt.b32 (byte permute, default mode) on int32 tensors: output byte k = byte (nibble k of sel) & 7 of
    the 8 bytes b:a, or that byte's sign bit replicated when the nibble's bit 3 is set. One SASS instruction on the
    GPU; the interpreter (no inline PTX) runs the same semantics in integer ops, so the callers' bit tricks are
    tested on the CPU."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        r = tl.zeros_like(sel)
        for k in tl.static_range(4):
            nib = (sel >> (4 * k)) & 15
            sh = 8 * (nib & 3)
            byte = tl.where((nib & 4) == 0, a >> sh, b >> sh) & 255
            byte = tl.where(nib >= 8, tl.where(byte >= 128, 255, 0), byte)
            r = r | (byte << (8 * k))
        return r


_PRMT8_ASM = tl.constexpr("""{
.reg .b32 xb, lo0, hi0, lo1, hi1;
shr.b32 xb, $4, 16;
prmt.b32 lo0, $5, $6, $4;
prmt.b32 hi0, $7, $8, $4;
prmt.b32 lo1, $5, $6, xb;
prmt.b32 hi1, $7, $8, xb;
prmt.b32 $0, lo0, hi0, 0x5140;
prmt.b32 $1, lo0, hi0, 0x7362;
prmt.b32 $2, lo1, hi1, 0x5140;
prmt.b32 $3, lo1, hi1, 0x7362;
}""")


@triton.jit
def _rtab(ptr, ASM: tl.constexpr):
    """The 8 byte-plane words of a register table as [1, 1] per-thread values, loaded once per program from the
    lane's own copy (the host stores 32 copies): a uniform load would sit in uniform registers, which ptxas copies
    into ordinary ones again before every prmt (sm_90 compile of lut 4: 880 -> 804 loop instructions at D=128)."""
    o = tl.zeros((1, 1), tl.int32)
    if ASM:
        o = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [o], dtype=tl.int32, is_pure=True, pack=1) * 8
    return (tl.load(ptr + o), tl.load(ptr + 1 + o), tl.load(ptr + 2 + o), tl.load(ptr + 3 + o),
            tl.load(ptr + 4 + o), tl.load(ptr + 5 + o), tl.load(ptr + 6 + o), tl.load(ptr + 7 + o))


@triton.jit
def _reg_lookup8(x, rt, ASM: tl.constexpr):
    """8 codes of <= 3 bits, one per nibble of x (int32, code k in bits 4k..4k+2) -> 4 int32 fp16 pairs (codes
    2i, 2i+1), with no memory access: the centroid table lives in 4 registers as byte planes (reg_table: lo bytes
    of entries 0-3, 4-7, then the hi bytes), prmt picks 4 bytes at once and 4 more interleave lo/hi: 9
    instructions per 8 codes (one asm block on the GPU; _prmt semantics in the interpreter)."""
    z = tl.zeros_like(x)
    l0 = z + rt[0]
    l1 = z + rt[1]
    h0 = z + rt[4]
    h1 = z + rt[5]
    if ASM:
        return tl.inline_asm_elementwise(_PRMT8_ASM, "=r,=r,=r,=r,r,r,r,r,r", [x, l0, l1, h0, h1],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        xb = x >> 16                                  # nibble bit 3 is 0: no sign mode, x >= 0
        lo0 = _prmt(l0, l1, x, ASM)
        hi0 = _prmt(h0, h1, x, ASM)
        lo1 = _prmt(l0, l1, xb, ASM)
        hi1 = _prmt(h0, h1, xb, ASM)
        return (_prmt(lo0, hi0, z + 0x5140, ASM), _prmt(lo0, hi0, z + 0x7362, ASM),
                _prmt(lo1, hi1, z + 0x5140, ASM), _prmt(lo1, hi1, z + 0x7362, ASM))


_PRMT16_ASM = tl.constexpr("""{
.reg .b32 xs, m0, m1, xa, xb, a, b, lo0, hi0, lo1, hi1;
shl.b32 xs, $4, 4;
prmt.b32 m0, xs, $4, 0xD9C8;
prmt.b32 m1, xs, $4, 0xFBEA;
and.b32 xa, $4, 0x77777777;
shr.b32 xb, xa, 16;
prmt.b32 a, $5, $6, xa;
prmt.b32 b, $7, $8, xa;
lop3.b32 lo0, m0, b, a, 0xCA;
prmt.b32 a, $9, $10, xa;
prmt.b32 b, $11, $12, xa;
lop3.b32 hi0, m0, b, a, 0xCA;
prmt.b32 a, $5, $6, xb;
prmt.b32 b, $7, $8, xb;
lop3.b32 lo1, m1, b, a, 0xCA;
prmt.b32 a, $9, $10, xb;
prmt.b32 b, $11, $12, xb;
lop3.b32 hi1, m1, b, a, 0xCA;
prmt.b32 $0, lo0, hi0, 0x5140;
prmt.b32 $1, lo0, hi0, 0x7362;
prmt.b32 $2, lo1, hi1, 0x5140;
prmt.b32 $3, lo1, hi1, 0x7362;
}""")   # lop3 0xCA = (m & b) | (~m & a)
_PRMT16_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 8)


@triton.jit
def _reg_lookup16(x, rt, ASM: tl.constexpr):
    """8 4-bit codes, the nibbles of x (int32) -> 4 int32 fp16 pairs (codes 2i, 2i+1) from the 16-entry table in 8
    registers (reg_table byte planes). prmt sees 8 bytes, so entries 0-7 and 8-15 are looked up apart and merged
    by a byte mask made from each code's bit 3 (prmt's sign-replicate mode on the code bytes): 21 instructions per
    8 codes, no memory access."""
    z = tl.zeros_like(x)
    l0 = z + rt[0]
    l1 = z + rt[1]
    l2 = z + rt[2]
    l3 = z + rt[3]
    h0 = z + rt[4]
    h1 = z + rt[5]
    h2 = z + rt[6]
    h3 = z + rt[7]
    if ASM:
        return tl.inline_asm_elementwise(_PRMT16_ASM, _PRMT16_CONSTRAINTS, [x, l0, l1, l2, l3, h0, h1, h2, h3],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        xs = x << 4                                   # even codes' bit 3 -> their byte's sign bit (odd: x itself)
        m0 = _prmt(xs, x, z + 0xD9C8, ASM)            # 0xFF bytes where codes 0-3 are >= 8
        m1 = _prmt(xs, x, z + 0xFBEA, ASM)            # same for codes 4-7
        xa = x & 0x77777777
        xb = xa >> 16
        lo0 = (m0 & _prmt(l2, l3, xa, ASM)) | (~m0 & _prmt(l0, l1, xa, ASM))
        hi0 = (m0 & _prmt(h2, h3, xa, ASM)) | (~m0 & _prmt(h0, h1, xa, ASM))
        lo1 = (m1 & _prmt(l2, l3, xb, ASM)) | (~m1 & _prmt(l0, l1, xb, ASM))
        hi1 = (m1 & _prmt(h2, h3, xb, ASM)) | (~m1 & _prmt(h0, h1, xb, ASM))
        return (_prmt(lo0, hi0, z + 0x5140, ASM), _prmt(lo0, hi0, z + 0x7362, ASM),
                _prmt(lo1, hi1, z + 0x5140, ASM), _prmt(lo1, hi1, z + 0x7362, ASM))


@triton.jit
def _halves(w):
    """int32 fp16 pairs [..] -> [.., 2] fp16 (low half first)."""
    return tl.join(w.to(tl.int16).to(tl.float16, bitcast=True), (w >> 16).to(tl.int16).to(tl.float16, bitcast=True))


@triton.jit
def _nib8(x, ASM: tl.constexpr):
    """4-bit codes, two per byte (uint8 [TT, D/2], LSB-first) -> int8 low / high nibbles [TT, D/2] (the codes of
    dims 2j / 2j+1), the int8 MMA operands of the KI8 K scores. On the GPU one lop3 + one shift + one lop3 per 4
    bytes (the bytes stay packed 4 to a register); Triton's own i8 ops would unpack every byte."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ and.b32 $0, $2, 0x0F0F0F0F; shr.u32 $1, $2, 4; and.b32 $1, $1, 0x0F0F0F0F; }", "=r,=r,r", [x],
            dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        return (x & 15).to(tl.int8), (x >> 4).to(tl.int8)


@triton.jit
def _kbytes(row_ptr, t_off, t_mask, D: tl.constexpr):
    """The 4-bit K code bytes of TT tokens: uint8 [TT, D/2] (KI8)."""
    jb = tl.arange(0, D // 2)
    return tl.load(row_ptr + t_off[:, None] * (D // 2) + jb[None, :], mask=t_mask[:, None], other=0)


@triton.jit
def _i8_hilo(x, amax):
    """x [ROWS, W] fp32 with per-row max |x| = amax -> int8 hi, lo [ROWS, W] and a = max(amax, 1e-30): x ~ (a / 127)
    (hi + lo / 254) (lo: the residual x 254, ~15 bits in all). The caller gives amax (max(x) when x >= 0) and applies
    a / 127 where it fits its own scaling."""
    a = tl.maximum(amax, 1e-30)
    n = x * (127.0 / a)[:, None]
    h = tl.floor(n + 0.5)
    lo = tl.floor((n - h) * 254.0 + 0.5)
    return h.to(tl.int8), lo.to(tl.int8), a


@triton.jit
def _i8_split(x, amax, ROWS: tl.constexpr, W: tl.constexpr):
    """_i8_hilo's parts split into even and odd columns (the operands against the low / high code nibbles): the KI8
    query and the VI8 p |g| operand."""
    h, lo, a = _i8_hilo(x, amax)
    eh, oh = tl.split(tl.reshape(h, (ROWS, W // 2, 2)))
    el, ol = tl.split(tl.reshape(lo, (ROWS, W // 2, 2)))
    return eh, oh, el, ol, a


@triton.jit
def _i8_dots(eh, oh, el, ol, lo, hi):
    """sum over the shared dim of _i8_split's parts against int8 code nibbles (lo: the even-column codes, hi: the odd,
    both [*, W/2]): int8 MMAs, as fp32 in units of the split's step (hi + lo / 254)."""
    lo_t = tl.trans(lo)
    hi_t = tl.trans(hi)
    sh = tl.dot(eh, lo_t, out_dtype=tl.int32)
    sh = tl.dot(oh, hi_t, sh, out_dtype=tl.int32)
    sl = tl.dot(el, lo_t, out_dtype=tl.int32)
    sl = tl.dot(ol, hi_t, sl, out_dtype=tl.int32)
    return sh.to(tl.float32) + sl.to(tl.float32) * (1.0 / 254.0)


@triton.jit
def _i8_scores(qeh, qoh, qel, qol, kb8, ASM: tl.constexpr):
    """q'.j for uniform 4-bit K codes j (0..15) of kb8 (uint8 [TT, D/2], dims 2j / 2j+1 in the low / high nibble),
    in units of the query's int8 step (_i8_split of q')."""
    klo, khi = _nib8(kb8, ASM)
    return _i8_dots(qeh, qoh, qel, qol, klo, khi)


@triton.jit
def _i8_pv(pg, vt_ptr, t0, D: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, TT: tl.constexpr,
           ASM: tl.constexpr):
    """sum_t pg[:, t] j[t, :] (fp32 [BM, D]) for TT tokens from t0 of TOKEN-MAJOR 4-bit V codes j (VI8; per dim,
    the block's tokens two to a byte, even token in the low nibble: format.v_codes_token_major): pg (>= 0) split
    like KI8's query, even / odd tokens against the low / high nibbles."""
    he, ho, le, lq, a = _i8_split(pg, tl.max(pg, 1), BM, TT)
    dd = tl.arange(0, D)
    tb = t0 // 2 + tl.arange(0, TT // 2)
    vlo, vhi = _nib8(tl.load(vt_ptr + dd[:, None] * (N // 2) + tb[None, :]), ASM)
    return _i8_dots(he, ho, le, lq, vlo, vhi) * (a * (1.0 / 127.0))[:, None]


@triton.jit
def _raw16(row_ptr, t_off, t_mask, ROW_BYTES: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
           NB: tl.constexpr, TT: tl.constexpr, LUT: tl.constexpr):
    """The packed code words of TT tokens, as the LUT >= 2 decoders take them: [TT, D/8] int32 (8 codes per
    word, LSB-first) for the register table, [TT, D/G] groups for the pair table. Split from _dec16 so that a
    caller can load the next tile's words before decoding this one's (register prefetch). LUT 5-7 (linear) take
    the register table's words."""
    if ((LUT == 3 and BITS <= 3) or (LUT >= 4 and BITS <= 4)) and BITS >= 2:   # register table / linear
        grp = tl.arange(0, D // 8)
        if BITS == 4:
            x = tl.load(row_ptr.to(tl.pointer_type(tl.int32)) + t_off[:, None] * (ROW_BYTES // 4) + grp[None, :],
                        mask=t_mask[:, None], other=0)
        else:
            x = tl.zeros((TT, D // 8), dtype=tl.int32)
            for m in tl.static_range(BITS):
                byte = tl.load(row_ptr + t_off[:, None] * ROW_BYTES + grp[None, :] * BITS + m, mask=t_mask[:, None],
                               other=0)
                x = x | (byte.to(tl.int32) << (8 * m))
        return x
    else:
        grp = tl.arange(0, D // G)
        if NB == 1:
            word = tl.load(row_ptr + t_off[:, None] * ROW_BYTES + grp[None, :], mask=t_mask[:, None],
                           other=0).to(tl.int32)
        else:
            WT: tl.constexpr = tl.int64 if NB > 3 else tl.int32
            word = tl.zeros((TT, D // G), dtype=WT)
            for m in tl.static_range(NB):
                byte = tl.load(row_ptr + t_off[:, None] * ROW_BYTES + grp[None, :] * NB + m, mask=t_mask[:, None],
                               other=0)
                word = word | (byte.to(WT) << (8 * m))
        return word


@triton.jit
def _nibbles(raw, BITS: tl.constexpr):
    """8 packed codes of <= 4 bits (int32, LSB-first) -> one per nibble (code k in bits 4k..4k+3)."""
    if BITS == 4:
        x = raw
    elif BITS == 3:   # fields at 3k -> 4k: halves apart by 4, then pairs by 2, then singles by 1
        x = (raw & 0xFFF) | ((raw & 0xFFF000) << 4)
        x = (x & 0x003F003F) | ((x & 0x0FC00FC0) << 2)
        x = (x & 0x07070707) | ((x & 0x38383838) << 1)
    else:             # 2-bit: fields at 2k -> 4k
        x = (raw & 0xFF) | ((raw & 0xFF00) << 8)
        x = (x & 0x000F000F) | ((x & 0x00F000F0) << 4)
        x = (x & 0x03030303) | ((x & 0x0C0C0C0C) << 2)
    return x


@triton.jit
def _linear16(x, D: tl.constexpr, BITS: tl.constexpr, TT: tl.constexpr, LUT: tl.constexpr, ASM: tl.constexpr):
    """Uniform-grid codes, one per nibble of x [TT, D/8] -> fp16 [TT, D] of 2 j - (2^b - 1) = 2 (j - mid), exact
    (odd integers, |.| <= 15); the caller folds the step Delta / 2 into the per-token gains. No table at all.
    LUT 5: codes 2i, 2i+1 go to the two halves of one word as fp16 1024 + 2 j + 1 (the bit pattern 0x6400 | (2 j + 1)
    is that number: one prmt of x << 1 and x >> 3 + one masking lop3 per pair), then one packed fp16 subtract of
    1024 + 2^b per pair. The pairs are the lut-4 lookup's (same join / permute), i.e. already the MMA operand's
    packing; pairing codes k, k + 4 instead (shifts only) cost as many repacking PRMT/MOV as it saved (sm_90
    compile). (A mid-centred 1024 + j - mid is not exact: fp16's step at 1024 is 1 and mid is a half-integer.)
    LUT 7: LUT 5 without the subtract: 1024 + 2 j + 1 + 2^b - 2^b, the kernel takes (1024 + 2^b) x the sum of the
    MMA's other operand off the product once per block (K: the query row sums; V: the p x gain sums), see
    _attn_kernel. Exact values, but the fp32 accumulators then carry ~1040x larger terms (relative error ~1e-7 x
    1040 of the row sums: ~1e-4, far below the bf16 output rounding).
    LUT 6: per-code integer 2 j - (2^b - 1) converted by .to(tl.float16) (I2F per element), for comparison."""
    if LUT == 5 or LUT == 7:
        OFF: tl.constexpr = 1024.0 + (1 << BITS)
        x2 = x << 1           # byte i: bits 1-4 = code 2i
        y2 = x >> 3           # byte i: bits 1-4 = code 2i + 1
        w0 = (_prmt(x2, y2, x2 * 0 + 0x4400, ASM) & 0x001E001E) | 0x64016401
        w1 = (_prmt(x2, y2, x2 * 0 + 0x5511, ASM) & 0x001E001E) | 0x64016401
        w2 = (_prmt(x2, y2, x2 * 0 + 0x6622, ASM) & 0x001E001E) | 0x64016401
        w3 = (_prmt(x2, y2, x2 * 0 + 0x7733, ASM) & 0x001E001E) | 0x64016401
        # as in the lut-4 lookup: [TT, D/8, e, f] = pair e + 2f -> [TT, D/2] pairs in order, then the fp16 halves
        w = tl.reshape(tl.permute(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (0, 1, 3, 2)), (TT, D // 2))
        if LUT == 7:
            return tl.reshape(_halves(w), (TT, D))
        else:
            return tl.reshape(_halves(w), (TT, D)) - OFF
    else:
        sh = tl.arange(0, 8) * 4
        j = (x[:, :, None] >> sh[None, None, :]) & 15
        return tl.reshape((2 * j - ((1 << BITS) - 1)).to(tl.float16), (TT, D))


@triton.jit
def _dec16(raw, ptab_ptr, rt, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, TT: tl.constexpr,
           LUT: tl.constexpr, ASM: tl.constexpr, FLAT: tl.constexpr = 0):
    """fp16 centroids [TT, D] of _raw16's words (LUT 5-7: 2 (j - mid), see _linear16).
    FLAT (the PREFILL path: its tiles of 64+ rows make the MMAs Hopper wgmma, which read the codes from shared
    memory): the halves are joined as int16 and bitcast to fp16 after the last reshape, so the tensor stored to
    shared memory comes from a bitcast, not straight from join -> reshape (-> trans). Triton 3.6 (torch 2.11's, the
    H200 image's) failed there in TritonGPUOptimizeDotOperands ("Illegal shared layout ... collapsedTmaShape
    [2, TT*D/2]": by that message, it moved the shared-memory store above the reshape and gave the join's
    [TT, D/2, 2] tensor an NVMMA layout); 3.9 compiled it. Same bits, same values."""
    if LUT >= 5 and BITS <= 4 and BITS >= 2:
        return _linear16(_nibbles(raw, BITS), D, BITS, TT, LUT, ASM)
    elif ((LUT == 3 and BITS <= 3) or (LUT == 4 and BITS <= 4)) and BITS >= 2:   # register table
        if BITS == 4:
            w0, w1, w2, w3 = _reg_lookup16(raw, rt, ASM)
        else:
            w0, w1, w2, w3 = _reg_lookup8(_nibbles(raw, BITS), rt, ASM)
        # [TT, D/8, e, f] = pair e + 2f -> [TT, D/2] pairs in order (int32 joins), then the fp16 halves: 8g + 2i + h
        w = tl.reshape(tl.permute(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (0, 1, 3, 2)), (TT, D // 2))
        if FLAT:
            return tl.reshape(tl.join(w.to(tl.int16), (w >> 16).to(tl.int16)), (TT, D)).to(tl.float16, bitcast=True)
        else:
            return tl.reshape(_halves(w), (TT, D))
    else:
        P: tl.constexpr = G // 2
        PM: tl.constexpr = (1 << (2 * BITS)) - 1
        if P == 1:
            c = tl.reshape(_pair_lookup(ptab_ptr, raw, FLAT), (TT, D))
        elif P == 2:
            x0 = _pair_lookup(ptab_ptr, (raw & PM).to(tl.int32), FLAT)
            x1 = _pair_lookup(ptab_ptr, ((raw >> (2 * BITS)) & PM).to(tl.int32), FLAT)
            # [TT, D/4, e, i] -> dims g*4 + 2i + e
            c = tl.reshape(tl.permute(tl.join(x0, x1), (0, 1, 3, 2)), (TT, D))
        else:
            x0 = _pair_lookup(ptab_ptr, (raw & PM).to(tl.int32), FLAT)
            x1 = _pair_lookup(ptab_ptr, ((raw >> (2 * BITS)) & PM).to(tl.int32), FLAT)
            x2 = _pair_lookup(ptab_ptr, ((raw >> (4 * BITS)) & PM).to(tl.int32), FLAT)
            x3 = _pair_lookup(ptab_ptr, ((raw >> (6 * BITS)) & PM).to(tl.int32), FLAT)
            # [TT, D/8, e, i%2, i//2] -> dims g*8 + 2i + e
            c = tl.reshape(tl.permute(tl.join(tl.join(x0, x1), tl.join(x2, x3)), (0, 1, 4, 3, 2)), (TT, D))
        if FLAT:
            c = c.to(tl.float16, bitcast=True)
        return c


@triton.jit
def _codes16(row_ptr, t_off, t_mask, ptab_ptr, rt, ROW_BYTES: tl.constexpr, D: tl.constexpr,
             BITS: tl.constexpr, G: tl.constexpr, NB: tl.constexpr, TT: tl.constexpr, LUT: tl.constexpr,
             ASM: tl.constexpr, FLAT: tl.constexpr = 0):
    """fp16 centroids of TT tokens for LUT >= 2: register table where the variant covers this width (LUT 3: codes
    of <= 3 bits, LUT 4: <= 4 bits), else the pair table."""
    return _dec16(_raw16(row_ptr, t_off, t_mask, ROW_BYTES, D, BITS, G, NB, TT, LUT), ptab_ptr, rt, D, BITS, G, TT,
                  LUT, ASM, FLAT)


@triton.jit
def _hada_half(x, hd, PRECISE: tl.constexpr, BF16DOT: tl.constexpr):
    if PRECISE:
        return tl.dot(x, hd, input_precision="ieee")
    else:
        hi = x.to(tl.bfloat16)
        return _dot16(hi, hd, BF16DOT) + _dot16((x - hi.to(tl.float32)).to(tl.bfloat16), hd, BF16DOT)


@triton.jit
def _hada(x, hd, BM: tl.constexpr, D: tl.constexpr, PRECISE: tl.constexpr, BF16DOT: tl.constexpr):
    """x [BM, D] fp32 times the Sylvester matrix H_D = [[H', H'], [H', -H']] (hd = H', +-1, [D/2, D/2]): one
    butterfly, then two D/2 products; fp32 "ieee" when precise, else two exact-B bf16 dots on the high and low
    bf16 parts (~16 mantissa bits, more than the tf32 dot this replaced). H' costs 8 KB of shared memory at
    D=128 and a quarter of H_D's shared-memory reads."""
    x1, x2 = tl.split(tl.permute(tl.reshape(x, (BM, 2, D // 2)), (0, 2, 1)))
    y1 = _hada_half(x1 + x2, hd, PRECISE, BF16DOT)
    y2 = _hada_half(x1 - x2, hd, PRECISE, BF16DOT)
    return tl.reshape(tl.permute(tl.join(y1, y2), (0, 2, 1)), (BM, D))


@triton.jit
def _dot16(a, b, BF16DOT: tl.constexpr):
    """bf16 x bf16 -> fp32 dot; the interpreter's bf16 dot is wrong, so there it runs in fp32 (same values)."""
    if BF16DOT:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _attn_kernel(q_ptr, q_row, q_head, src_ptr, qpos_ptr, req_ptr, cache_ptr, c_page, c_head, bt_ptr, bt_req,
                 nsealed_ptr, seqlen_ptr, tail_k_ptr, tail_v_ptr, t_slot, t_head, t_tok, tslot_ptr,
                 hada_ptr, sgn_ptr, ktab_ptr, vtab_ptr, kptab_ptr, vptab_ptr, krtab_ptr, vrtab_ptr, out_ptr, o_row,
                 o_head, o_split,
                 lse_ptr, l_row, l_head, scale,
                 KV_OFF: tl.constexpr, K_MEAN: tl.constexpr, K_SCALE: tl.constexpr, K_GAIN: tl.constexpr,
                 K_CODES: tl.constexpr, V_MEAN: tl.constexpr, V_SCALE: tl.constexpr, V_GAIN: tl.constexpr,
                 V_CODES: tl.constexpr, KBITS: tl.constexpr, KG: tl.constexpr, KNB: tl.constexpr,
                 VBITS: tl.constexpr, VG: tl.constexpr, VNB: tl.constexpr, D: tl.constexpr,
                 BM: tl.constexpr, N: tl.constexpr, TT: tl.constexpr, SPLITS,
                 PRECISE: tl.constexpr, DIAG: tl.constexpr = 0, LUT: tl.constexpr = 0,
                 NS: tl.constexpr = 1, EXACT: tl.constexpr = 0, BF16DOT: tl.constexpr = 1,
                 GATHER: tl.constexpr = 0, GQA: tl.constexpr = 1, ASM: tl.constexpr = 1,
                 SWAP: tl.constexpr = 0, PF: tl.constexpr = 0, PREFILL: tl.constexpr = 0,
                 KSTEP: tl.constexpr = 1.0, VSTEP: tl.constexpr = 1.0, KI8: tl.constexpr = 0,
                 VI8: tl.constexpr = 0, TPP: tl.constexpr = 0, SUB: tl.constexpr = 1):
    """One program: BM query rows (token x head-of-group, one request) of one KV head, over the sealed
    blocks b = split, split + SPLITS, ... and, for split n_sealed % SPLITS, the exact tail.
    SUB > 1 (small batches, where the blocks alone cannot fill the GPU): the work items are the SUB parts of N / SUB
    tokens of each sealed block (item i = part i % SUB of block i // SUB), items split, split + SPLITS, ...; each
    item rotates the query and undoes the V transform itself; the tail goes to split (n_sealed * SUB) % SPLITS.
    PREFILL (tiles of many tokens): the query rows are re-read per block instead of held in registers across the
    loops (a [BM, D] fp32 q would cost 32 registers/thread at BM 64, D 128, 8 warps), and the tail loop stops at the
    tile's last query position (later tail keys are causally masked for every row of the tile).
    LUT 5-7 (linear, uniform-grid tables only): codes decode to 2 j - (2^b - 1) and KSTEP / VSTEP (Delta / 2 of
    each stream, 1.0 for streams that keep a table) scale the per-token K / V gains.
    KI8 (fast mode, 4-bit K on a uniform grid only; KSTEP = Delta / 2 of K): the K scores come from int8 MMAs of the
    raw code nibbles (j = 0..15) with the rotated query split into int8 hi + lo parts per row (|q'| / 127 steps, the
    lo part the residual x 254: ~15 bits, finer than the fp16 q' of the other paths): no per-code decode at all.
    s = |g| KSTEP (2 q'.j - 15 sum(q')) + q.mean.
    VI8 (experimental, fast mode, 4-bit V on a uniform grid, V codes TOKEN-MAJOR: format.v_codes_token_major; the
    served caches are not): acc' += VSTEP (2 (p |g|).j - 15 sum(p |g|)) by int8 MMAs (_i8_pv), no V decode.
    TPP > 0 (KAKEYA_TAIL_STORAGE=pages): the exact tail lives in the request's own pages after its sealed ones,
    TPP tokens per page (kakeya_v1_3_ppl.tailpages): tail token t is row t % TPP of the page at block-table position
    n_sealed + t // TPP; tail_k / tail_v are bf16 views of those rows [pages, Hkv, TPP, D] and tslot is unused."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    r = tile * BM + tl.arange(0, BM)
    req = tl.load(req_ptr + tile)
    qp = tl.load(qpos_ptr + r)                      # -1 marks padding rows
    row_ok = qp >= 0
    d = tl.arange(0, D)
    if GATHER:
        # Rows read straight from q [T, Hq, D]: tile row r is query row src = token * GQA + head-in-group.
        src = tl.maximum(tl.load(src_ptr + r), 0)
        qh = kvh * GQA + src % GQA
        q_raw = tl.load(q_ptr + (src // GQA)[:, None] * q_row + qh[:, None] * q_head + d[None, :],
                        mask=row_ok[:, None], other=0.0)
    else:
        q_raw = tl.load(q_ptr + r[:, None] * q_row + kvh * q_head + d[None, :], mask=row_ok[:, None], other=0.0)
    sc = scale * 1.4426950408889634
    q = q_raw.to(tl.float32) * sc
    # Exact rows (tail, exact pages) in fast mode: bf16 x bf16 products are exact in fp32 accumulation
    # (as in FlashAttention); pre-scaling q in fp32 and rounding it to tf32 (10-bit mantissa) would not be.
    q16 = q_raw.to(tl.bfloat16)
    n_sealed = tl.load(nsealed_ptr + req)
    seq_len = tl.load(seqlen_ptr + req)
    tslot = tl.load(tslot_ptr + req).to(tl.int64)
    m_i = tl.full((BM,), -float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    # R = H diag(s) / sqrt(D) with H the (symmetric, +-1) Sylvester matrix: one exact bf16 H_{D/2} (8 KB of
    # shared memory at D=128, fp32 when precise) serves both q' = (q/lambda) R^T = ((q/lambda) s/sqrt(D)) H and
    # acc R = (acc H) s/sqrt(D); an fp32 R and its transpose took 128 KB and capped occupancy at 1 program/SM.
    dh = tl.arange(0, D // 2)
    hd = tl.load(hada_ptr + dh[:, None] * (D // 2) + dh[None, :])
    rsg = tl.load(sgn_ptr + d)                                # s / sqrt(D)
    krt = _rtab(krtab_ptr, ASM)                               # LUT 3/4 register tables (unused otherwise)
    vrt = _rtab(vrtab_ptr, ASM)
    if SUB == 1:
        n_items = n_sealed
    else:
        n_items = n_sealed * SUB
    for item in range(split, n_items, SPLITS):
        if SUB == 1:                             # compile-time: the loops keep their constant bounds
            b = item
            lo = 0
            hi = N
        else:
            b = item // SUB
            lo = (item % SUB) * (N // SUB)       # this item's tokens of block b: lo .. hi - 1
            hi = lo + N // SUB
        page = tl.load(bt_ptr + req * bt_req + b).to(tl.int64)
        slot = cache_ptr + page * c_page + kvh * c_head
        if EXACT:
            # Exact (bf16) pages: K rows [N, D] then V rows at KV_OFF; positions past qp are masked.
            for t0 in range(lo, hi, TT):
                t = t0 + tl.arange(0, TT)
                live = (b * N + t) < seq_len      # rows past seq_len may hold a recycled page's bytes
                kx = tl.load(slot.to(tl.pointer_type(tl.bfloat16)) + t[:, None] * D + d[None, :],
                             mask=live[:, None], other=0.0)
                if PRECISE:
                    s = tl.dot(q, tl.trans(kx.to(tl.float32)), input_precision="ieee")
                else:
                    s = _dot16(q16, tl.trans(kx), BF16DOT) * sc
                s = tl.where((b * N + t)[None, :] <= qp[:, None], s, -float("inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                vx = tl.load((slot + KV_OFF).to(tl.pointer_type(tl.bfloat16)) + t[:, None] * D + d[None, :],
                             mask=live[:, None], other=0.0)
                l_i = l_i * alpha + tl.sum(p, 1)
                if PRECISE:
                    acc = acc * alpha[:, None] + tl.dot(p, vx.to(tl.float32), input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + _dot16(p.to(tl.bfloat16), vx, BF16DOT)
                m_i = m_new
        else:
            kmean = tl.load((slot + K_MEAN).to(tl.pointer_type(tl.float32)) + d)
            klam = tl.load((slot + K_SCALE).to(tl.pointer_type(tl.float16)) + d).to(tl.float32)
            if PREFILL:
                if GATHER:
                    qb = tl.load(q_ptr + (src // GQA)[:, None] * q_row + qh[:, None] * q_head + d[None, :],
                                 mask=row_ok[:, None], other=0.0).to(tl.float32) * sc
                else:
                    qb = tl.load(q_ptr + r[:, None] * q_row + kvh * q_head + d[None, :], mask=row_ok[:, None],
                                 other=0.0).to(tl.float32) * sc
            else:
                qb = q
            # Rotate the query once per block: q.k = q.mean + |g| (R(q/lambda)).code
            qr = _hada(qb * (rsg / klam)[None, :], hd, BM, D, PRECISE, BF16DOT)
            if KI8 and not PRECISE:
                qeh, qoh, qel, qol, qa = _i8_split(qr, tl.max(tl.abs(qr), 1), BM, D)
                kq = qa * (2.0 / 127.0)
                koff = tl.sum(qr, 1) * ((1 << KBITS) - 1)
            if not PRECISE:
                qr = qr.to(tl.float16)
            qmu = tl.sum(qb * kmean[None, :], 1)
            if LUT == 7 and KBITS <= 4 and KBITS >= 2:   # linear codes off by 1024 + 2^b: q'.(c + o) - o sum(q')
                qoff = tl.sum(qr.to(tl.float32), 1) * (1024.0 + (1 << KBITS))
            if LUT == 7 and VBITS <= 4 and VBITS >= 2:
                psum = tl.zeros((BM,), tl.float32)          # sum of the V MMA's p x gain operand (as rounded)
            if SWAP:
                acc_rt = tl.zeros((D, BM), tl.float32)      # acc_rot transposed
            acc_rot = tl.zeros((BM, D), tl.float32)
            cmass = tl.zeros((BM,), tl.float32)
            m_blk = m_i         # acc is rescaled once after the block, not per tile
            if PF:
                # Register prefetch (LUT >= 2): tile t+1's code words and gains are loaded before tile t is
                # decoded, so their latency hides behind this tile's work; the first tile's loads are issued here,
                # ahead of the query rotation below.
                if SUB == 1:
                    t = tl.arange(0, TT)
                else:
                    t = lo + tl.arange(0, TT)
                if KI8 and not PRECISE:
                    k_nxt = _kbytes(slot + K_CODES, t, t < N, D)
                else:
                    k_nxt = _raw16(slot + K_CODES, t, t < N, D * KBITS // 8, D, KBITS, KG, KNB, TT, LUT)
                kg_nxt = tl.load((slot + K_GAIN).to(tl.pointer_type(tl.float16)) + t)
                v_nxt = _raw16(slot + KV_OFF + V_CODES, t, t < N, D * VBITS // 8, D, VBITS, VG, VNB, TT, LUT)
                vg_nxt = tl.load((slot + KV_OFF + V_GAIN).to(tl.pointer_type(tl.float16)) + t)
            for t0 in tl.range(lo, hi, TT, num_stages=NS):
                t = t0 + tl.arange(0, TT)
                if PF:
                    k_raw, kg, v_raw, vg = k_nxt, kg_nxt, v_nxt, vg_nxt
                    tn = t + TT
                    nm = tn < hi
                    if KI8 and not PRECISE:
                        k_nxt = _kbytes(slot + K_CODES, tn, nm, D)
                    else:
                        k_nxt = _raw16(slot + K_CODES, tn, nm, D * KBITS // 8, D, KBITS, KG, KNB, TT, LUT)
                    kg_nxt = tl.load((slot + K_GAIN).to(tl.pointer_type(tl.float16)) + tn, mask=nm, other=0.0)
                    v_nxt = _raw16(slot + KV_OFF + V_CODES, tn, nm, D * VBITS // 8, D, VBITS, VG, VNB, TT, LUT)
                    vg_nxt = tl.load((slot + KV_OFF + V_GAIN).to(tl.pointer_type(tl.float16)) + tn, mask=nm,
                                     other=0.0)
                else:
                    kg = tl.load((slot + K_GAIN).to(tl.pointer_type(tl.float16)) + t)
                kunc = kg.to(tl.int16, bitcast=True) < 0
                if KI8 and not PRECISE:
                    if PF:
                        kb8 = k_raw
                    else:
                        kb8 = _kbytes(slot + K_CODES, t, t < N, D)
                    s = _i8_scores(qeh, qoh, qel, qol, kb8, ASM) * kq[:, None] - koff[:, None]
                    s = s * (tl.abs(kg.to(tl.float32)) * KSTEP)[None, :]
                else:
                    if LUT >= 2:     # (PF implies LUT >= 2: the launcher refuses pf with lut < 2)
                        if PF:
                            kc = _dec16(k_raw, kptab_ptr, krt, D, KBITS, KG, TT, LUT, ASM, PREFILL)
                        else:
                            kc = _codes16(slot + K_CODES, t, t < N, kptab_ptr, krt, D * KBITS // 8, D, KBITS, KG, KNB,
                                          TT, LUT, ASM, PREFILL)
                        if PRECISE:
                            kc = kc.to(tl.float32)
                    else:
                        if DIAG == 2:   # diagnostics: no unpack (time the rest)
                            kidx = tl.zeros((TT, D), tl.int32) + t[:, None] % 16
                        else:
                            kidx = _unpack_codes(slot + K_CODES, t, t < N, D * KBITS // 8, D, KBITS, KG, KNB, TT)
                        if DIAG >= 1:   # diagnostics: no table lookup
                            kc = kidx.to(tl.float32)
                        else:
                            kc = _lookup(ktab_ptr, kidx, KBITS, D, LUT)   # fp16 table in fast mode: no convert
                    if PRECISE:
                        s = tl.dot(qr, tl.trans(kc), input_precision="ieee")
                    else:
                        if SWAP:   # codes as the MMA's M operand: the query rows pad to 8 (N), not 16 (M)
                            s = tl.trans(tl.dot(kc.to(tl.float16), tl.trans(qr)))
                        else:
                            s = tl.dot(qr, tl.trans(kc.to(tl.float16)))
                    if LUT == 7 and KBITS <= 4 and KBITS >= 2:
                        s = s - qoff[:, None]
                    if LUT >= 5:
                        s = s * (tl.abs(kg.to(tl.float32)) * KSTEP)[None, :]
                    else:
                        s = s * tl.abs(kg.to(tl.float32))[None, :]
                s = s + tl.where(kunc[None, :], 0.0, qmu[:, None])
                s = tl.where((b * N + t)[None, :] <= qp[:, None], s, -float("inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                if not PF:
                    vg = tl.load((slot + KV_OFF + V_GAIN).to(tl.pointer_type(tl.float16)) + t)
                vunc = vg.to(tl.int16, bitcast=True) < 0
                if VI8 and not PRECISE:
                    pg = p * tl.abs(vg.to(tl.float32))[None, :]
                    l_i = l_i * alpha + tl.sum(p, 1)
                    pj = _i8_pv(pg, slot + KV_OFF + V_CODES, t0, D, N, BM, TT, ASM)
                    acc_rot = acc_rot * alpha[:, None] + (2.0 * VSTEP) * pj - ((1 << VBITS) - 1) * VSTEP * \
                        tl.sum(pg, 1)[:, None]
                    cmass = cmass * alpha + tl.sum(tl.where(vunc[None, :], 0.0, p), 1)
                else:
                    if LUT >= 2:
                        if PF:
                            vc = _dec16(v_raw, vptab_ptr, vrt, D, VBITS, VG, TT, LUT, ASM, PREFILL)
                        else:
                            vc = _codes16(slot + KV_OFF + V_CODES, t, t < N, vptab_ptr, vrt, D * VBITS // 8, D, VBITS,
                                          VG, VNB, TT, LUT, ASM, PREFILL)
                        if PRECISE:
                            vc = vc.to(tl.float32)
                    else:
                        if DIAG == 2:
                            vidx = tl.zeros((TT, D), tl.int32) + t[:, None] % 8
                        else:
                            vidx = _unpack_codes(slot + KV_OFF + V_CODES, t, t < N, D * VBITS // 8, D, VBITS, VG, VNB,
                                                 TT)
                        if DIAG >= 1:
                            vc = vidx.to(tl.float32)
                        else:
                            vc = _lookup(vtab_ptr, vidx, VBITS, D, LUT)
                    # The per-token V gain is folded into p ([BM, TT]) instead of the codes ([TT, D]).
                    if LUT >= 5:
                        pg = p * (tl.abs(vg.to(tl.float32)) * VSTEP)[None, :]
                    else:
                        pg = p * tl.abs(vg.to(tl.float32))[None, :]
                    l_i = l_i * alpha + tl.sum(p, 1)
                    if PRECISE:
                        acc_rot = acc_rot * alpha[:, None] + tl.dot(pg, vc, input_precision="ieee")
                    else:
                        if SWAP:
                            acc_rt = acc_rt * alpha[None, :] + tl.dot(tl.trans(vc.to(tl.float16)),
                                                                      tl.trans(pg.to(tl.float16)))
                        else:
                            acc_rot = acc_rot * alpha[:, None] + tl.dot(pg.to(tl.float16), vc.to(tl.float16))
                    cmass = cmass * alpha + tl.sum(tl.where(vunc[None, :], 0.0, p), 1)
                    if LUT == 7 and VBITS <= 4 and VBITS >= 2:
                        if PRECISE:
                            psum = psum * alpha + tl.sum(pg, 1)
                        else:
                            psum = psum * alpha + tl.sum(pg.to(tl.float16).to(tl.float32), 1)
                m_i = m_new
            # Undo the V transform once per block: o += (acc_rot R) / lambda + mass * mean
            vmean = tl.load((slot + KV_OFF + V_MEAN).to(tl.pointer_type(tl.float32)) + d)
            vlam = tl.load((slot + KV_OFF + V_SCALE).to(tl.pointer_type(tl.float16)) + d).to(tl.float32)
            # acc is still 0 while m = -inf: factor 1 there (written without -inf - -inf)
            m_now = tl.where(m_i == -float("inf"), 0.0, m_i)
            acc = acc * tl.exp2(tl.where(m_blk == -float("inf"), m_now, m_blk) - m_now)[:, None]
            if SWAP:
                acc_rot = tl.trans(acc_rt)
            if LUT == 7 and VBITS <= 4 and VBITS >= 2:
                acc_rot = acc_rot - psum[:, None] * (1024.0 + (1 << VBITS))
            acc += (_hada(acc_rot, hd, BM, D, PRECISE, BF16DOT) * (rsg / vlam)[None, :]
                    + cmass[:, None] * vmean[None, :])
    if (not EXACT) and (n_items % SPLITS == split):
        tail_len = seq_len - n_sealed * N
        tail_end = tail_len
        if PREFILL:
            tail_end = tl.minimum(tail_len, tl.max(qp, 0) - n_sealed * N + 1)
            if GATHER:
                q_raw = tl.load(q_ptr + (src // GQA)[:, None] * q_row + qh[:, None] * q_head + d[None, :],
                                mask=row_ok[:, None], other=0.0)
            else:
                q_raw = tl.load(q_ptr + r[:, None] * q_row + kvh * q_head + d[None, :], mask=row_ok[:, None],
                                other=0.0)
            q = q_raw.to(tl.float32) * sc
            q16 = q_raw.to(tl.bfloat16)
        # num_stages=1: a pipelined tail would hold 2 stages of K and V tiles in shared memory for the whole kernel
        for t0 in tl.range(0, tail_end, TT, num_stages=1):
            t = t0 + tl.arange(0, TT)
            tm = t < tail_len
            if TPP > 0:
                tpg = tl.load(bt_ptr + req * bt_req + n_sealed + t // TPP, mask=tm, other=0).to(tl.int64)
                base = tpg[:, None] * t_slot + kvh * t_head + (t % TPP)[:, None] * t_tok + d[None, :]
            else:
                base = tslot * t_slot + kvh * t_head + t[:, None] * t_tok + d[None, :]
            k = tl.load(tail_k_ptr + base, mask=tm[:, None], other=0.0)
            # precise: fp32 "ieee"; fast: bf16 x bf16 with fp32 accumulation, like FlashAttention.
            if PRECISE:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = _dot16(q16, tl.trans(k.to(tl.bfloat16)), BF16DOT) * sc
            s = tl.where(tm[None, :] & ((n_sealed * N + t)[None, :] <= qp[:, None]), s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            v = tl.load(tail_v_ptr + base, mask=tm[:, None], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            if PRECISE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + _dot16(p.to(tl.bfloat16), v.to(tl.bfloat16), BF16DOT)
            m_i = m_new
    o = out_ptr + r[:, None] * o_row + kvh * o_head + split * o_split + d[None, :]
    tl.store(o, acc / tl.maximum(l_i, 1e-30)[:, None], mask=row_ok[:, None])
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), -float("inf"))
    tl.store(lse_ptr + r * l_row + kvh * l_head + split, lse, mask=row_ok)


@triton.jit
def _tail_page(bt_ptr, bt_row, bt_w, item, first, t, TPP: tl.constexpr):
    """Page id of tail token t of block-table row ``item`` whose tail starts at block-table position ``first``
    (clamped into the table, as runtime._tail_ids does)."""
    col = tl.minimum(first + t // TPP, bt_w - 1)
    return tl.load(bt_ptr + item.to(tl.int64) * bt_row + col).to(tl.int64)


@triton.jit
def _tail_gather_kernel(src_k, src_v, s_page, s_head, s_tok, ids_ptr, ids_row, flag_ptr, dst_k, dst_v, d_item,
                        d_head, d_tok, didx_ptr, bt_w, pos_ptr, TPP: tl.constexpr, D: tl.constexpr,
                        N: tl.constexpr, TT: tl.constexpr, BT: tl.constexpr):
    """For flagged items: a whole block's tail (N tokens) from its tail pages (ids [items, pages]; token t = row
    t % TPP of page ids[t // TPP]) into the scratch row didx[item]. Fixed grid (CUDA-graph friendly).
    BT: ids is the block table itself (row = item, width bt_w) and the tail starts at position pos[item] // N, so a
    decode step needs no per-layer page-id tensor."""
    item = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(flag_ptr + item) == 0:
        return
    d = tl.arange(0, D)
    drow = tl.load(didx_ptr + item).to(tl.int64) * d_item + head * d_head
    if BT:
        first = tl.load(pos_ptr + item) // N
    for t0 in range(0, N, TT):
        t = t0 + tl.arange(0, TT)
        if BT:
            pg = _tail_page(ids_ptr, ids_row, bt_w, item, first, t, TPP)
        else:
            pg = tl.load(ids_ptr + item * ids_row + t // TPP).to(tl.int64)
        src = pg[:, None] * s_page + head * s_head + (t % TPP)[:, None] * s_tok + d[None, :]
        dst = drow + t[:, None] * d_tok + d[None, :]
        tl.store(dst_k + dst, tl.load(src_k + src))
        tl.store(dst_v + dst, tl.load(src_v + src))


def gather_tail_blocks(tail_k_pages: torch.Tensor, tail_v_pages: torch.Tensor, ids: torch.Tensor,
                       flag: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor, dst_idx: torch.Tensor,
                       q_pos: torch.Tensor | None = None) -> None:
    """KAKEYA_TAIL_STORAGE=pages, before a seal: dst_k / dst_v [slots, Hkv, 512, D] rows dst_idx[i] <- the 512 tail
    tokens in pages ids[i] (tail_*_pages: bf16 [pages, Hkv, tokens_per_page, D] views, tailpages.tail_view) for
    every i with flag[i] != 0. One launch over all items, no host sync; the seal then reads the copy, because it
    writes the block into the first of those pages.
    ``q_pos`` given: ids is the block table (rows = items) and item i's tail pages start at position
    q_pos[i] // 512 (a decode step: the page ids are looked up in the kernel, clamped into the table)."""
    hkv, tpp, d = tail_k_pages.shape[1], tail_k_pages.shape[2], tail_k_pages.shape[3]
    items = int(ids.shape[0]) if q_pos is None else int(q_pos.shape[0])
    if items == 0:
        return
    if tail_k_pages.stride() != tail_v_pages.stride() or dst_k.stride() != dst_v.stride():
        raise ValueError("the K and V views (and the K and V scratch) must share strides")
    if ids.stride(1) != 1 or tail_k_pages.stride(3) != 1 or dst_k.stride(3) != 1:
        raise ValueError("ids rows, tail rows and scratch rows must be contiguous in their last dim")
    if q_pos is None and ids.shape[1] * tpp < BLOCK_TOKENS:
        raise ValueError(f"{ids.shape[1]} pages of {tpp} tokens cannot hold a {BLOCK_TOKENS}-token block")
    if q_pos is not None and ids.shape[0] < items:
        raise ValueError(f"block table of {ids.shape[0]} rows for {items} items")
    _tail_gather_kernel[(items, hkv)](
        tail_k_pages, tail_v_pages, tail_k_pages.stride(0), tail_k_pages.stride(1), tail_k_pages.stride(2), ids,
        ids.stride(0), flag, dst_k, dst_v, dst_k.stride(0), dst_k.stride(1), dst_k.stride(2), dst_idx,
        int(ids.shape[1]), flag if q_pos is None else q_pos, TPP=tpp, D=d, N=BLOCK_TOKENS, TT=64,
        BT=int(q_pos is not None), num_warps=4)


@triton.jit
def _tail_write_kernel(k_ptr, v_ptr, k_tok, k_head, v_tok, v_head, dst_k, dst_v, s_page, s_head, s_tok, bt_ptr,
                       bt_row, bt_w, pos_ptr, slot_ptr, skip_slot, TPP: tl.constexpr, D: tl.constexpr,
                       N: tl.constexpr):
    """Decode token of request row r (position pos[r]) -> its tail page, row (pos % N) % TPP, unless its slot is
    ``skip_slot`` (padding and read-only rows write nothing)."""
    r = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(slot_ptr + r) == skip_slot:
        return
    pos = tl.load(pos_ptr + r)
    off = pos % N
    pg = _tail_page(bt_ptr, bt_row, bt_w, r, pos // N, off, TPP)
    d = tl.arange(0, D)
    dst = pg * s_page + head * s_head + (off % TPP) * s_tok + d
    r64 = r.to(tl.int64)
    tl.store(dst_k + dst, tl.load(k_ptr + r64 * k_tok + head * k_head + d).to(dst_k.dtype.element_ty))
    tl.store(dst_v + dst, tl.load(v_ptr + r64 * v_tok + head * v_head + d).to(dst_v.dtype.element_ty))


def write_tail_tokens(tail_k_pages: torch.Tensor, tail_v_pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      block_table: torch.Tensor, q_pos: torch.Tensor, slot: torch.Tensor, skip_slot: int) -> None:
    """KAKEYA_TAIL_STORAGE=pages, a decode step: key / value [B, Hkv, D] (token r = request row r at position
    q_pos[r]) into the tail pages of block-table row r — position q_pos // 512 + (q_pos % 512) // tokens_per_page,
    row (q_pos % 512) % tokens_per_page — except rows whose slot[r] == skip_slot. One launch, fixed grid."""
    B = int(q_pos.shape[0])
    hkv, tpp, d = tail_k_pages.shape[1], tail_k_pages.shape[2], tail_k_pages.shape[3]
    if B == 0:
        return
    if tail_k_pages.stride() != tail_v_pages.stride() or tail_k_pages.stride(3) != 1:
        raise ValueError("the K and V views must share strides, unit stride in the last dim")
    # key and value may differ in strides (e.g. K normalised into a new tensor, V still a view of the qkv output)
    for x in (key, value):
        if x.shape[0] < B or tuple(x.shape[1:]) != (hkv, d) or x.stride(2) != 1:
            raise ValueError(f"key / value must be [>= {B}, {hkv}, {d}] with unit stride in the last dim, got "
                             f"{tuple(x.shape)}")
    if block_table.shape[0] < B or block_table.stride(1) != 1:
        raise ValueError(f"block table of {block_table.shape[0]} rows for {B} requests (or not row-contiguous)")
    _tail_write_kernel[(B, hkv)](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1), tail_k_pages, tail_v_pages,
        tail_k_pages.stride(0),
        tail_k_pages.stride(1), tail_k_pages.stride(2), block_table, block_table.stride(0), int(block_table.shape[1]),
        q_pos, slot, int(skip_slot), TPP=tpp, D=d, N=BLOCK_TOKENS, num_warps=1)


@triton.jit
def _combine_kernel(part_ptr, p_row, p_head, p_split, lse_ptr, l_row, l_head, dest_ptr, o_ptr, o_tok, o_head, n_rows,
                    SPLITS, SP: tl.constexpr, D: tl.constexpr, RB: tl.constexpr, GQA: tl.constexpr):
    """Merge the splits' partial softmaxes of RB query rows (token x head-in-group) of one KV head and write
    them in o's dtype at o[token, kvh * GQA + g] (o may be the caller's output tensor)."""
    i = tl.program_id(0) * RB + tl.arange(0, RB)
    kvh = tl.program_id(1)
    ok = i < n_rows
    row = tl.load(dest_ptr + i, mask=ok, other=0).to(tl.int64)
    sp = tl.arange(0, SP)
    d = tl.arange(0, D)
    lse = tl.load(lse_ptr + row[:, None] * l_row + kvh * l_head + sp[None, :],
                  mask=ok[:, None] & (sp[None, :] < SPLITS), other=-float("inf"))
    m = tl.max(lse, 1)
    w = tl.exp2(lse - tl.where(m == -float("inf"), 0.0, m)[:, None])      # log2 units, as the kernel writes
    w = w / tl.maximum(tl.sum(w, 1), 1e-30)[:, None]
    part = tl.load(part_ptr + row[:, None, None] * p_row + kvh * p_head + sp[None, :, None] * p_split
                   + d[None, None, :], mask=ok[:, None, None] & (sp[None, :, None] < SPLITS), other=0.0)
    o = tl.sum(part * w[:, :, None], 1)
    dst = o_ptr + (i // GQA).to(tl.int64)[:, None] * o_tok + (kvh * GQA + i % GQA)[:, None] * o_head + d[None, :]
    tl.store(dst, o.to(o_ptr.dtype.element_ty), mask=ok[:, None])


def gqa_plan(q_pos, q_req, num_reqs: int, gqa: int, bm: int) -> dict:
    """Query rows (token x head-in-group) packed in tiles of bm rows that never straddle two requests
    (the kernel's tile -> request map). numpy in, numpy out: a metadata builder computes it on the host."""
    import numpy as np
    T = len(q_pos)
    req_rows = np.repeat(np.asarray(q_req).astype(np.int64), gqa)
    counts = np.bincount(req_rows, minlength=num_reqs)
    tiles_per_req = (counts + bm - 1) // bm
    tile_req = np.repeat(np.arange(num_reqs), tiles_per_req).astype(np.int32)
    first_tile = np.cumsum(tiles_per_req) - tiles_per_req
    first_row = np.cumsum(counts) - counts
    rank = np.arange(T * gqa) - first_row[req_rows]
    dest = (first_tile[req_rows] + rank // bm) * bm + rank % bm
    nt = len(tile_req)
    qpos = np.full(nt * bm, -1, dtype=np.int32)
    qpos[dest] = np.repeat(np.asarray(q_pos).astype(np.int32), gqa)
    src = np.full(nt * bm, -1, dtype=np.int32)      # inverse of dest: tile row -> query row (-1 = padding)
    src[dest] = np.arange(T * gqa, dtype=np.int32)
    return dict(dest=dest, src=src, qpos=qpos, tile_req=tile_req, nt=nt, bm=bm, gqa=gqa, T=T)


def pair_table(table16: torch.Tensor) -> torch.Tensor:
    """fp16 centroids [2^b] -> int32 [4^b]: entry j packs c[j % 2^b] (low half) and c[j >> b] (high half),
    i.e. the two LSB-first codes of a 2b-bit pair (the kernels' LUT 2)."""
    n = table16.shape[0]
    bits16 = table16.view(torch.int16).to(torch.int32) & 0xFFFF
    j = torch.arange(n * n, device=table16.device)
    return (bits16[j % n] | (bits16[j // n] << 16)).to(torch.int32).contiguous()


def reg_table(table16: torch.Tensor) -> torch.Tensor:
    """fp16 centroids [<= 16] -> int32 [8] byte planes for LUT 3/4 (prmt operands): words 0-3 hold the low bytes of
    entries 0-3, 4-7, 8-11, 12-15 (LSB = lowest entry), words 4-7 the high bytes; missing entries are 0."""
    n = table16.shape[0]
    if n > 16:
        raise ValueError(f"a register table holds at most 16 entries, got {n}")
    b = torch.zeros(16, dtype=torch.int64, device=table16.device)
    b[:n] = table16.view(torch.int16).to(torch.int64) & 0xFFFF
    planes = torch.stack([b & 0xFF, b >> 8]).view(2, 4, 4)             # [lo/hi, word, byte]
    words = (planes << (8 * torch.arange(4, device=b.device))).sum(-1).view(8)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


SEAL_PRECS = ("tf32x3", "tf32", "ieee", "bf16x3")   # seal rotation: Triton dot precisions or exact-H bf16 x3


def _seal_prec(prec: str | None) -> str:
    if prec is not None and prec not in SEAL_PRECS:
        raise ValueError(f"seal prec must be one of {SEAL_PRECS}, got {prec!r}")
    if prec == "bf16x3":
        return prec            # runs in the interpreter too (bf16 operands, fp32 dots there)
    return "ieee" if _INTERPRET else (prec or "tf32x3")


SCRATCH_CHUNK = 128    # tokens per program of the scratch path's block decode (decode_into)


def scratch_decode_warps(head_dim: int) -> int:
    """Warps of decode_into: at D=128 4 warps spill (sm_90 compile, 255 registers), 8 do not."""
    return 4 if head_dim <= 64 else 8


def _regs(maxnreg: int | None) -> dict:
    """Launch option capping registers per thread (more programs per SM); the interpreter has no registers."""
    if maxnreg is not None and not 24 <= maxnreg <= 255:
        raise ValueError(f"maxnreg must be in [24, 255] registers per thread, got {maxnreg}")
    return {} if maxnreg is None or _INTERPRET else {"maxnreg": maxnreg}


# Centroid lookup: 0 global gather, 1 register gather (tl.gather), 2 pair table (2 codes/lookup), 3 = 2 + codes of
# <= 3 bits from byte planes in registers (prmt, no memory access), 4 = 3 for codes of <= 4 bits too; 5 / 6 =
# "linear": no table for codes of 2-4 bits (value = (j - mid) * Delta, Delta folded into the gains; 5 fp16 bit trick,
# 6 integer convert, 7 = 5 with the fp16 offset taken off once per block: interpreter / precise only, biased on the
# tensor cores), only for uniform-grid tables (lloyd_max.uniform_table); 5-bit codes keep the pair table.
LUTS = (0, 1, 2, 3, 4, 5, 6, 7)
LINEAR_LUTS = (5, 6, 7)


def _check_variant(lut, fused) -> None:
    if lut not in LUTS:
        raise ValueError(f"lut must be one of {LUTS} (0 global gather, 1 register gather, 2 pair table, 3/4 register "
                         f"byte-plane table for codes of <= 3/4 bits, 5-7 linear: uniform-grid tables), got {lut!r}")
    if fused not in (True, False, 0, 1):
        raise ValueError(f"fused must be a bool, got {fused!r}")


def uniform_step(table: torch.Tensor, rel_tol: float = 1e-5) -> float | None:
    """The step Delta if table[j] = (j - (n - 1) / 2) * Delta for all j (equal steps, symmetric about 0; within
    rel_tol of the largest level, float32 tables), else None."""
    t = table.detach().double().cpu()
    n = t.numel()
    delta = (t[-1] - t[0]).item() / (n - 1)
    if not delta > 0:
        return None
    ideal = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * delta
    return delta if (t - ideal).abs().max().item() <= rel_tol * t.abs().max().item() else None


def linear_steps(tables: dict, bits: dict) -> tuple[float, float]:
    """(KSTEP, VSTEP) of the linear lookup (LUT 5-7): Delta / 2 for the streams of 2-4 bits (their codes decode to
    2 j - (2^b - 1)), 1.0 for the others (they keep the pair table). Raises ValueError on a non-uniform table."""
    out = []
    for name in ("k", "v"):
        if not 2 <= bits[name] <= 4:
            out.append(1.0)
            continue
        delta = uniform_step(tables[name])
        if delta is None:
            raise ValueError(f"lut 5-7 (linear) needs a uniform-grid {name.upper()} table (equal steps, symmetric: "
                             f"lloyd_max.uniform_table({bits[name]})), got {tables[name].tolist()}")
        out.append(delta / 2)
    return out[0], out[1]


class KakeyaKernels:
    """Per-geometry constants (rotation, tables, layout offsets) on one device."""

    def __init__(self, head_dim: int, k_bits: int, v_bits: int, device, k_table: torch.Tensor | None = None,
                 v_table: torch.Tensor | None = None, lut: int = 0, fused: bool = False, tt: int = 64,
                 num_warps: int = 8, maxnreg: int | None = None, scratch_mib: int = 512):
        """k_table / v_table: fitted centroids from a calibration bundle (default: Lloyd-Max for N(0,1)).
        lut, fused, tt, num_warps, maxnreg: the default decode-attention variant (see LUTS and :meth:`_launch`);
        the defaults are the path measured in sessions 2-3. scratch_mib: cap of the decode scratch of
        ``attention(..., scratch=True)`` (KAKEYA_SCRATCH_MIB; allocated on first use only)."""
        _check_variant(lut, fused)
        _regs(maxnreg)
        if tt not in (16, 32, 64, 128, 256) or num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"tt must be a power of two in [16, 256] and num_warps in 1..16, got {tt}, {num_warps}")
        self.lut, self.fused, self.tt, self.num_warps, self.maxnreg = lut, bool(fused), tt, num_warps, maxnreg
        self.lay = kakeya_layout(head_dim, k_bits, v_bits)
        self.D, self.device = head_dim, device
        self._no_tail = None
        self.scratch = _scratch_mod.ScratchPages(head_dim, scratch_mib)
        h = sylvester(head_dim) * signs(head_dim, ROTATION_SEED)[None, :] / head_dim ** 0.5
        self.rot = h.to(torch.float32).contiguous().to(device)
        # +-1 Sylvester matrices: R = H diag(s) / sqrt(D); the seal's bf16x3 rotation uses H_D, attention H_{D/2}
        self.hada_full = sylvester(head_dim).to(torch.bfloat16).contiguous().to(device)
        hs = sylvester(head_dim // 2).to(torch.float32)
        self.hada = {True: hs.contiguous().to(device), False: hs.to(torch.bfloat16).contiguous().to(device)}
        self.sgn = (signs(head_dim, ROTATION_SEED).to(torch.float32) / head_dim ** 0.5).contiguous().to(device)
        # Per stream ("k", "v"), so K and V may carry different fitted tables at the same bit width.
        self.tables = {"k": (lloyd_max.gaussian_table(k_bits) if k_table is None else k_table).float().to(device),
                       "v": (lloyd_max.gaussian_table(v_bits) if v_table is None else v_table).float().to(device)}
        for name, bits in (("k", k_bits), ("v", v_bits)):
            if self.tables[name].shape != (1 << bits,):
                raise ValueError(f"{name}_table must have {1 << bits} entries for {bits}-bit codes")
        self.tables16 = {n: t.half() for n, t in self.tables.items()}
        self.pair_tables = {n: pair_table(t) for n, t in self.tables16.items()}
        # LUT 3/4 byte planes, one copy per lane (_rtab); 5-bit streams (32 entries) always take the pair table,
        # their planes are never read.
        self.reg_tables = {n: (reg_table(t) if t.numel() <= 16 else torch.zeros(8, dtype=torch.int32, device=device))
                           .repeat(32).contiguous() for n, t in self.tables16.items()}
        self.mids = {n: ((t[1:] + t[:-1]) / 2).contiguous() for n, t in self.tables.items()}
        # (KSTEP, VSTEP) of the linear lookup (LUT 5-7), or why it cannot serve these tables; found here, on the
        # host, so that a launch (possibly under CUDA-graph capture) never syncs.
        try:
            self._steps = linear_steps(self.tables, {"k": k_bits, "v": v_bits})
        except ValueError as e:
            self._steps = str(e)
        if lut in LINEAR_LUTS and isinstance(self._steps, str):
            raise ValueError(self._steps)
        # ki8 (int8 K scores): Delta / 2 of a uniform 4-bit K table, else None (found here: launches never sync).
        k_delta = uniform_step(self.tables["k"]) if k_bits == 4 else None
        self._ki8_step = None if k_delta is None else k_delta / 2
        v_delta = uniform_step(self.tables["v"]) if v_bits == 4 else None
        self._vi8_step = None if v_delta is None else v_delta / 2                 # vi8: the same for 4-bit V

    def _consts(self, st, off):
        g, nb = _group(st.bits)
        return dict(STREAM_OFF=off, OFF_MEAN=st["mean"].offset, OFF_SCALE=st["scale"].offset,
                    OFF_GAIN=st["gain"].offset, OFF_CODES=st["codes"].offset, D=self.D, BITS=st.bits, G=g, NB=nb,
                    N=BLOCK_TOKENS)

    def seal(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, tt: int = 64, num_warps: int | None = None,
             prec: str | None = None, k_weight: torch.Tensor | None = None, num_stages: int | None = None,
             maxnreg: int | None = None) -> None:
        """k, v [I, H, 512, D] (bf16/fp32, token stride may vary) -> slots uint8 [I, H, slot_bytes] (in place).

        k_weight [H, D]: calibrated K shaping weights of this layer (lambda = (w / var)^(1/4)).
        prec (SEAL_PRECS), num_stages (token-loop pipelining, None = Triton's default), maxnreg: seal variants."""
        I, H = k.shape[:2]
        if k_weight is not None and tuple(k_weight.shape) != (H, self.D):
            raise ValueError(f"k_weight must be [{H}, {self.D}], got {tuple(k_weight.shape)}")
        # Launch defaults from benchmarks/results/seal_sweep_h200.txt.
        num_warps = num_warps or (4 if self.D <= 64 else 8)
        for name, x, st, off, w in (("k", k, self.lay.k, 0, k_weight), ("v", v, self.lay.v, self.lay.k.size, None)):
            wt = self.rot if w is None else w.float().contiguous()   # any pointer when HAS_W = 0
            _seal_kernel[(I, H)](x, x.stride(0), x.stride(1), x.stride(2), slots, slots.stride(0), slots.stride(1),
                                 self.rot, self.mids[name], self.tables[name], wt, wt, wt, wt,
                                 self.hada_full, self.sgn, HAS_W=int(w is not None), TT=tt, num_warps=num_warps,
                                 PREC=_seal_prec(prec), BF16DOT=int(not _INTERPRET), SNS=num_stages,
                                 **_regs(maxnreg), **self._consts(st, off))

    def seal_indirect(self, tail_k: torch.Tensor, tail_v: torch.Tensor, slot_idx: torch.Tensor, cache: torch.Tensor,
                      page_idx: torch.Tensor, flag: torch.Tensor, k_weight: torch.Tensor | None = None, tt: int = 64,
                      num_warps: int | None = None, prec: str | None = None, num_stages: int | None = None,
                      maxnreg: int | None = None) -> None:
        """For every item r with flag[r] != 0: seal tail[slot_idx[r]] ([H, 512, D]) into cache[page_idx[r]].
        One launch over all items, no host sync (what a captured decode step needs)."""
        I, H = int(flag.shape[0]), tail_k.shape[1]
        num_warps = num_warps or (4 if self.D <= 64 else 8)
        for name, x, st, off, w in (("k", tail_k, self.lay.k, 0, k_weight), ("v", tail_v, self.lay.v, self.lay.k.size, None)):
            wt = self.rot if w is None else w.float().contiguous()
            _seal_kernel[(I, H)](x, x.stride(0), x.stride(1), x.stride(2), cache, cache.stride(0), cache.stride(1),
                                 self.rot, self.mids[name], self.tables[name], wt, slot_idx, page_idx, flag,
                                 self.hada_full, self.sgn, HAS_W=int(w is not None), INDIRECT=1, TT=tt,
                                 num_warps=num_warps, PREC=_seal_prec(prec), BF16DOT=int(not _INTERPRET),
                                 SNS=num_stages, **_regs(maxnreg), **self._consts(st, off))

    def decode(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots uint8 [I, H, slot_bytes] -> bf16 k, v [I, H, 512, D] (debug decode)."""
        I, H = slots.shape[:2]
        outs = []
        for name, st, off in (("k", self.lay.k, 0), ("v", self.lay.v, self.lay.k.size)):
            o = torch.empty(I, H, BLOCK_TOKENS, self.D, dtype=torch.bfloat16, device=slots.device)
            _decode_kernel[(I, H)](slots, slots.stride(0), slots.stride(1), o, o.stride(0), o.stride(1), o.stride(2),
                                   self.rot, self.tables[name], self.rot, self.rot, self.rot, self.rot,
                                   self.pair_tables[name], self.reg_tables[name], TT=32,
                                   num_warps=4, **self._consts(st, off))
            outs.append(o)
        return outs[0], outs[1]

    def decode_into(self, cache: torch.Tensor, pages: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor,
                    precise: bool = False) -> None:
        """The scratch path's block decoder: sealed slots cache[pages[i]] (uint8 [P, H, slot_bytes]) -> bf16 exact
        pages dst[dst_idx[i]] (dst [*, H, 2, 512, D]: per head K rows then V rows, the exact layout). pages, dst_idx:
        int32 [I] on the device. Fast mode rotates with bf16 hi/lo MMAs (_hada), precise with the fp32 product."""
        I, H = int(pages.shape[0]), cache.shape[1]
        if I == 0:
            return
        # SCRATCH_CHUNK tokens per program: 4 programs per block x head instead of one walking all 512 tokens (the
        # loop is latency-bound; session 11's H100 bench left ~420 µs of scratch_fa's 640 to this decode at D=128,
        # 16k context, by difference). Same arithmetic per token. Not yet timed.
        for kv, (name, st, off) in enumerate((("k", self.lay.k, 0), ("v", self.lay.v, self.lay.k.size))):
            o = dst[:, :, kv]
            _decode_kernel[(I, H, BLOCK_TOKENS // SCRATCH_CHUNK)](
                cache, cache.stride(0), cache.stride(1), o, o.stride(0), o.stride(1), o.stride(2), self.rot,
                self.tables[name], pages, dst_idx, self.hada[False], self.sgn, self.pair_tables[name],
                self.reg_tables[name], TT=32, num_warps=scratch_decode_warps(self.D), INDIRECT=1,
                PRECISE=int(bool(precise)), BF16DOT=int(not _INTERPRET), CHUNK=SCRATCH_CHUNK,
                LUT=0 if precise else 4, ASM=int(not _INTERPRET), **self._consts(st, off))

    def plan(self, q_pos, q_req, num_reqs: int, gqa: int, bm: int = 16) -> dict:
        """Row/tile bookkeeping for a batch (what a metadata builder does once per step).

        Rows = (token, head-in-group); tiles of bm rows never straddle two requests.
        """
        dev = q_pos.device
        pl = gqa_plan(q_pos.cpu().numpy(), q_req.cpu().numpy(), num_reqs, gqa, bm)
        return dict(pl, dest=torch.from_numpy(pl["dest"]).to(dev), qpos=torch.from_numpy(pl["qpos"]).to(dev),
                    tile_req=torch.from_numpy(pl["tile_req"]).to(dev), src=torch.from_numpy(pl["src"]).to(dev))

    def attention(self, q, q_pos, q_req, cache, block_table, n_sealed, seq_lens, tail_k, tail_v, tail_slot,
                  scale: float, splits: int = 8, bm: int = 16, precise: bool = False,
                  out_dtype: torch.dtype | None = None, plan: dict | None = None, tt: int | None = None,
                  num_warps: int | None = None, diag: int = 0, lut: int | None = None, num_stages: int = 1,
                  fused: bool | None = None, out: torch.Tensor | None = None,
                  maxnreg: int | None = None, swap: bool = False, pf: bool = False,
                  prefill: bool = False, scratch: bool | str = False, ki8: bool = False,
                  vi8: bool = False, tail_tpp: int = 0, sub: int = 1) -> torch.Tensor:
        """lut / fused / tt / num_warps / maxnreg: kernel variant (None: the constructor's). out: optional
        [T, Hq, D] destination (fused path: the combine kernel writes it in place, in its dtype). maxnreg: register
        cap per thread (more programs per SM). bm (query rows per tile) only applies when no plan is given.
        swap (opt-in, fast mode only): sealed-block MMAs with the codes as the M operand (s^T = codes q'^T,
        acc^T += codes^T p^T), so a 4-row query tile pads to the MMA's N of 8 instead of its M of 16.
        pf (opt-in, lut >= 2): register prefetch of the next tile's code words and gains in the sealed-block loop.
        ki8 (opt-in, fast mode, 4-bit K on a uniform grid only): K scores by int8 MMAs of the raw code nibbles with
        an int8 hi + lo split of the rotated query (see _attn_kernel's KI8); V as ``lut`` says.
        vi8 (EXPERIMENTAL, fast mode, 4-bit V on a uniform grid): the cache's V codes are token-major
        (format.v_codes_token_major, e.g. via token_major_cache; sealed caches are not) and P.V runs as int8 MMAs.
        prefill (opt-in, for tiles of many tokens, kakeya_kernels.variants.PREFILL_CANDIDATES): query rows re-read per
        block instead of held in registers, tail loop bounded by the tile's last query position.
        scratch (opt-in, for prefill chunks: PREFILL_CANDIDATES["scratch"]): decode the sealed blocks the launch
        reads ONCE into bf16 exact pages (kakeya_kernels.scratch, sized from plan["n_sealed_host"]; without it
        n_sealed is read back, a host sync), then the exact-page kernel over them and each request's exact tail with
        this call's tiles (bm / plan), tt, num_warps, maxnreg, fused (lut, swap, pf, prefill: sealed-block knobs,
        not used there). scratch="flash": vLLM's FlashAttention varlen over those pages instead of the exact-page
        kernel (PREFILL_CANDIDATES["scratch_fa"]; needs vLLM's FlashAttention).
        tail_tpp > 0 (KAKEYA_TAIL_STORAGE=pages): tail_k / tail_v are bf16 views [pages, Hkv, tail_tpp, D] of the
        tail rows of ``cache`` (tailpages.tail_view), the tails sit in each request's pages at block-table positions
        n_sealed .. and tail_slot is not read (see _attn_kernel's TPP).
        sub (opt-in, 1 / 2 / 4): each sealed block is SUB work items of 512 / sub tokens, so a small batch can spread
        over more programs (splits up to sub x blocks; see _attn_kernel's SUB); 512 / sub must be a multiple of tt."""
        pick = lambda v, default: default if v is None else v   # noqa: E731
        if scratch not in (True, False, 0, 1, "flash"):
            raise ValueError(f"scratch must be a bool or 'flash', got {scratch!r}")
        if scratch and tail_tpp:
            raise ValueError("the scratch prefill launches read tails from per-request rows, not from pages "
                             "(tail_tpp); use the tuned launches with KAKEYA_TAIL_STORAGE=pages")
        if scratch:
            return _scratch_mod.attend(
                self.scratch, lambda *a: self.decode_into(*a, precise=precise), self.attention_exact, "kakeya", q,
                q_pos, q_req, cache, block_table, n_sealed, seq_lens, tail_k, tail_v, tail_slot, plan=plan,
                flash=scratch == "flash",
                scale=scale, splits=splits, bm=bm, precise=precise, tt=pick(tt, self.tt),
                num_warps=pick(num_warps, self.num_warps), fused=pick(fused, self.fused), out_dtype=out_dtype,
                out=out, maxnreg=pick(maxnreg, self.maxnreg))
        return self._launch(q, q_pos, q_req, cache, block_table, n_sealed, seq_lens, tail_k, tail_v, tail_slot, scale,
                            splits, bm, precise, out_dtype, plan, pick(tt, self.tt), pick(num_warps, self.num_warps),
                            diag, pick(lut, self.lut), num_stages, pick(fused, self.fused), out,
                            pick(maxnreg, self.maxnreg), swap=swap, pf=pf, prefill=prefill, ki8=ki8, vi8=vi8,
                            tail_tpp=tail_tpp, sub=sub)

    def _launch(self, q, q_pos, q_req, cache, block_table, n_sealed, seq_lens, tail_k, tail_v, tail_slot, scale,
                splits, bm, precise, out_dtype, plan, tt, num_warps, diag, lut, num_stages, fused, out,
                maxnreg=None, exact_kv_off: int = 0, swap: bool = False, pf: bool = False, prefill: bool = False,
                ki8: bool = False, vi8: bool = False, tail_tpp: int = 0, sub: int = 1):
        """Causal attention of packed query tokens against sealed blocks + exact tail.

        q [T, Hq, D]; q_pos [T] absolute positions; q_req [T] request of each token (tokens of one request are
        contiguous); cache uint8 [pages, Hkv, slot_bytes]; block_table [R, max_blocks] int32; n_sealed, seq_lens,
        tail_slot [R] int32; tail_k/v [slots, Hkv, T_max, D] bf16 hold positions n_sealed*512 .. seq_len-1.
        Returns [T, Hq, D] in ``out_dtype`` (default q's dtype), or ``out``.

        fused = False: query rows packed into tiles and the splits merged by torch ops (~10 launches);
        fused = True: the kernel gathers its query rows itself and one combine kernel writes the output (2).
        """
        T, Hq, D = q.shape
        Hkv = cache.shape[1]
        if Hq % Hkv or D != self.D:
            raise ValueError(f"query heads {Hq} / kv heads {Hkv} / head_dim {D} do not fit this geometry ({self.D})")
        _check_variant(lut, fused)
        if swap not in (True, False, 0, 1):
            raise ValueError(f"swap must be a bool, got {swap!r}")
        if pf not in (True, False, 0, 1):
            raise ValueError(f"pf must be a bool, got {pf!r}")
        if prefill not in (True, False, 0, 1):
            raise ValueError(f"prefill must be a bool, got {prefill!r}")
        if pf and lut < 2:
            raise ValueError(f"pf (register prefetch of packed codes) needs lut >= 2, got lut={lut}")
        if ki8 not in (True, False, 0, 1):
            raise ValueError(f"ki8 must be a bool, got {ki8!r}")
        if ki8 and swap:
            raise ValueError("ki8 (int8 K scores) does not combine with swap")
        steps = {}
        if lut == 7 and not _INTERPRET and not precise:
            raise ValueError("lut 7 (linear codes, offset taken off after the MMA) is biased on the GPU: the tensor "
                             "cores' truncating fp32 accumulation of the offset products misses the float64 bound "
                             "(session 13, H100); use lut 5 (same decode, exact subtract first)")
        if lut in LINEAR_LUTS:
            if isinstance(self._steps, str):
                raise ValueError(self._steps)
            steps = dict(KSTEP=self._steps[0], VSTEP=self._steps[1])
        if tail_tpp and (tail_k.dim() != 4 or tail_k.shape[2] != tail_tpp or tail_k.stride() != tail_v.stride()):
            raise ValueError(f"tail_tpp={tail_tpp}: tail_k / tail_v must be page views [pages, Hkv, {tail_tpp}, D] "
                             f"with equal strides, got {tuple(tail_k.shape)}")
        if sub not in (1, 2, 4) or (BLOCK_TOKENS // sub) % tt:
            raise ValueError(f"sub must be 1, 2 or 4 with {BLOCK_TOKENS} / sub a multiple of tt={tt}, got sub={sub!r}")
        ki8 = bool(ki8) and not precise and not exact_kv_off   # precise / exact pages: the ordinary path
        if ki8:
            if self._ki8_step is None:
                raise ValueError(f"ki8 (int8 K scores) needs 4-bit K codes on a uniform grid "
                                 f"(lloyd_max.uniform_table(4)); this geometry has {self.lay.k.bits}-bit K with "
                                 f"table {self.tables['k'].tolist()}")
            steps["KSTEP"] = self._ki8_step
        if vi8 not in (True, False, 0, 1):
            raise ValueError(f"vi8 must be a bool, got {vi8!r}")
        if vi8:
            # The cache itself is token-major: no other path may read it, so refuse instead of falling back.
            if precise or swap or pf or exact_kv_off:
                raise ValueError("vi8 reads token-major V codes: it needs the fast mode without swap / pf")
            if self._vi8_step is None:
                raise ValueError(f"vi8 (int8 P.V) needs 4-bit V codes on a uniform grid; this geometry has "
                                 f"{self.lay.v.bits}-bit V with table {self.tables['v'].tolist()}")
            steps["VSTEP"] = self._vi8_step
        gqa = Hq // Hkv
        pl = plan or self.plan(q_pos, q_req, int(n_sealed.shape[0]), gqa, bm)
        dev, nt, bm, dest = q.device, pl["nt"], pl["bm"], pl["dest"]
        if fused:
            src = pl.get("src")
            if src is None:   # plans built without the inverse map (e.g. older callers)
                src = torch.full((nt * bm,), -1, dtype=torch.int32, device=dev)
                src[dest] = torch.arange(T * gqa, dtype=torch.int32, device=dev)
            qq, src_arg, g_arg = q, src, gqa
        else:
            qq = torch.zeros(nt * bm, Hkv, D, dtype=q.dtype, device=dev)
            qq[dest] = q.view(T, Hkv, gqa, D).permute(0, 2, 1, 3).reshape(T * gqa, Hkv, D)
            src_arg, g_arg = pl["qpos"], 1
        if qq.stride(2) != 1:
            qq = qq.contiguous()
        part = torch.empty(nt * bm, Hkv, splits, D, dtype=torch.float32, device=dev)
        lse = torch.empty(nt * bm, Hkv, splits, dtype=torch.float32, device=dev)
        kl, vl = self.lay.k, self.lay.v
        kg, knb = _group(kl.bits)
        vg, vnb = _group(vl.bits)
        tabs = self.tables if precise else self.tables16
        _attn_kernel[(nt, Hkv, splits)](
            qq, qq.stride(0), qq.stride(1), src_arg, pl["qpos"], pl["tile_req"], cache, cache.stride(0),
            cache.stride(1), block_table, block_table.stride(0), n_sealed, seq_lens, tail_k, tail_v, tail_k.stride(0),
            tail_k.stride(1), tail_k.stride(2), tail_slot, self.hada[bool(precise)], self.sgn, tabs["k"], tabs["v"],
            self.pair_tables["k"], self.pair_tables["v"], self.reg_tables["k"], self.reg_tables["v"],
            part, part.stride(0), part.stride(1), part.stride(2), lse, lse.stride(0), lse.stride(1), scale,
            KV_OFF=exact_kv_off or kl.size, EXACT=int(exact_kv_off > 0), BF16DOT=int(not _INTERPRET),
            K_MEAN=kl["mean"].offset, K_SCALE=kl["scale"].offset, K_GAIN=kl["gain"].offset,
            K_CODES=kl["codes"].offset, V_MEAN=vl["mean"].offset, V_SCALE=vl["scale"].offset,
            V_GAIN=vl["gain"].offset, V_CODES=vl["codes"].offset, KBITS=kl.bits, KG=kg, KNB=knb, VBITS=vl.bits,
            VG=vg, VNB=vnb, D=self.D, BM=bm, N=BLOCK_TOKENS, TT=tt, SPLITS=splits,
            PRECISE=precise, DIAG=diag, LUT=lut,
            NS=num_stages, GATHER=int(fused), GQA=g_arg, ASM=int(not _INTERPRET),
            SWAP=int(bool(swap) and not precise), PF=int(bool(pf) and not diag), PREFILL=int(bool(prefill)),
            KI8=int(ki8), VI8=int(bool(vi8)), TPP=int(tail_tpp), SUB=int(sub), num_warps=num_warps, **steps,
            **_regs(maxnreg))
        if fused:
            if out is None:
                out = torch.empty(T, Hq, D, dtype=out_dtype or q.dtype, device=dev)
            elif tuple(out.shape) != (T, Hq, D) or out.stride(2) != 1:
                raise ValueError(f"out must be [{T}, {Hq}, {D}] with unit stride in the last dim")
            rb = 16
            _combine_kernel[(triton.cdiv(T * gqa, rb), Hkv)](
                part, part.stride(0), part.stride(1), part.stride(2), lse, lse.stride(0), lse.stride(1), dest,
                out, out.stride(0), out.stride(1), T * gqa, SPLITS=splits, SP=triton.next_power_of_2(splits),
                D=self.D, RB=rb, GQA=gqa, num_warps=4)
            return out
        # Merge the splits' partial softmaxes (lse in log2 units).
        w = torch.nan_to_num(torch.softmax(lse * math.log(2.0), -1))
        o = (part * w[..., None]).sum(2)[dest]  # [T*gqa, Hkv, D]
        o = o.view(T, gqa, Hkv, D).permute(0, 2, 1, 3).reshape(T, Hq, D).to(out_dtype or q.dtype)
        if out is not None:
            out.copy_(o)
            return out
        return o

    def attention_exact(self, q, q_pos, q_req, cache, block_table, seq_lens, scale: float, splits: int = 8,
                        bm: int = 16, precise: bool = False, plan: dict | None = None, tt: int = 64,
                        num_warps: int = 4, fused: bool | None = None, out_dtype: torch.dtype | None = None,
                        out: torch.Tensor | None = None, maxnreg: int | None = None) -> torch.Tensor:
        """Causal attention over exact bf16 pages (layout ``exact``: per head K rows then V rows), the
        partial last page included. Same query packing as :meth:`attention`."""
        n_blocks = ((seq_lens + BLOCK_TOKENS - 1) // BLOCK_TOKENS).to(torch.int32)
        if self._no_tail is None or self._no_tail.device != q.device:
            self._no_tail = torch.zeros(1, 1, 1, self.D, dtype=torch.bfloat16, device=q.device)
        # EXACT skips the tail loop: the tail tensors are placeholders, seq_lens serves as the slot array.
        return self._launch(q, q_pos, q_req, cache, block_table, n_blocks, seq_lens, self._no_tail, self._no_tail,
                            seq_lens, scale, splits, bm, precise, out_dtype, plan, tt, num_warps, 0, 0, 1,
                            self.fused if fused is None else fused, out, maxnreg,
                            exact_kv_off=exact_layout(self.D).k.size)
