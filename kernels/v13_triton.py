"""The seed ``v13`` format in the vLLM data path (layout from kakeya_kv.format.v13_layout).

* ``seal``: full 512-token blocks (many (layer-)blocks x KV heads per call) -> v13 slot bytes, with the
  batched tensor encoder of :mod:`.v13_seal` (PCA / K-means are batched torch ops, no Python loop over blocks).
* ``attention`` (default, ``attn="fused"``): one Triton kernel reads the v13 slots directly. Per sealed block
  the query is taken into the block's PCA basis once (qB = q basis^T), so a token's score is
  scale (q.mean + t (qB.centre_seg) + ||r|| ((qB s) H / L).z) — an L-wide dot with its Lloyd-Max values
  (outliers overriding) plus a centre lookup; V is accumulated in the same coefficient domain and mapped back to
  D dims once per block; then the exact bf16 tail. Same call shape and split merge as KakeyaKernels.attention.
* ``attn="scratch"`` (KAKEYA_V13_ATTENTION=scratch, the first version kept as a fallback): the blocks a phase
  attends are decoded into a bf16 scratch of exact pages (one per attended sealed block plus one per request's
  tail; one buffer per kernel object, reused every call, capped by KAKEYA_SCRATCH_MIB), then the existing
  exact-page attention kernel runs over it (kakeya_kernels.scratch, shared with the default format's prefill).
* ``decode``: v13 slots -> bf16 rows (tools, tests, the scratch path).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kakeya_kv import hadamard, lloyd_max
from kakeya_kv.format import BLOCK_TOKENS, V13_SEED, v13_layout

from . import scratch
from .kakeya_triton import _bf16_rtne
from .v13_seal import encode_blocks, geometry


@triton.jit
def _stream_z(slot, t0, t, cnt_all, tab_ptr, O_RES: tl.constexpr, RB: tl.constexpr, BITS: tl.constexpr,
              L: tl.constexpr, CAP: tl.constexpr, O_CNT: tl.constexpr, O_OUT: tl.constexpr, N: tl.constexpr,
              TT: tl.constexpr, E: tl.constexpr):
    """Rows t (= t0 + arange(TT)) of one stream -> z [TT, L]: Lloyd-Max values of the packed codes, stored
    outliers overriding theirs (cnt_all [N]: per-row outlier counts of the block, when CAP > 0)."""
    j = tl.arange(0, L)
    bitpos = j * BITS
    byte = bitpos // 8
    rowp = slot + O_RES + t[:, None] * RB
    lo = tl.load(rowp + byte[None, :]).to(tl.int32)
    hi = tl.load(rowp + byte[None, :] + 1, mask=(byte + 1 < RB)[None, :], other=0).to(tl.int32)
    code = ((lo | (hi << 8)) >> (bitpos % 8)[None, :]) & ((1 << BITS) - 1)
    z = tl.load(tab_ptr + code)
    if CAP > 0:
        # Entries are stored row-major: this tile's are [base, stop); entry e belongs to local row
        # #{tile rows whose inclusive count prefix ends at or before e}.
        base = tl.sum(tl.where(tl.arange(0, N) < t0, cnt_all, 0))
        cnt = tl.load((slot + O_CNT).to(tl.pointer_type(tl.int16)) + t).to(tl.int32) & 0xFFFF
        ends = base + tl.cumsum(cnt, 0)
        stop = base + tl.sum(cnt)
        ov = tl.zeros((TT, L), tl.float32)
        hit = tl.zeros((TT, L), tl.int32)
        for e0 in range(base, stop, E):
            e = e0 + tl.arange(0, E)
            em = e < stop
            ent = tl.load((slot + O_OUT).to(tl.pointer_type(tl.int32)) + e, mask=em, other=0)
            idx = ent & 0xFFFF
            val = ((ent >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            row = tl.sum((ends[None, :] <= e[:, None]).to(tl.int32), 1)
            m = (em[:, None, None] & (row[:, None, None] == tl.arange(0, TT)[None, :, None])
                 & (idx[:, None, None] == j[None, None, :]))
            ov += tl.sum(tl.where(m, val[:, None, None], 0.0), 0)
            hit += tl.sum(m.to(tl.int32), 0)
        z = tl.where(hit > 0, ov, z)
    return z


@triton.jit
def _stream_seg(slot, t, O_SEG: tl.constexpr, SEGB: tl.constexpr, SEG_BYTES: tl.constexpr):
    """Segment (K-means centre) ids of rows t, packed LSB-first over the whole block."""
    sp = t * SEGB
    sb = sp // 8
    s_lo = tl.load(slot + O_SEG + sb).to(tl.int32)
    s_hi = tl.load(slot + O_SEG + sb + 1, mask=sb + 1 < SEG_BYTES, other=0).to(tl.int32)
    return ((s_lo | (s_hi << 8)) >> (sp % 8)) & ((1 << SEGB) - 1)


@triton.jit
def _counts(slot, O_CNT: tl.constexpr, CAP: tl.constexpr, N: tl.constexpr):
    if CAP > 0:
        return tl.load((slot + O_CNT).to(tl.pointer_type(tl.int16)) + tl.arange(0, N)).to(tl.int32) & 0xFFFF
    else:
        return 0


@triton.jit
def _v13_decode_kernel(cache_ptr, c_page, c_head, page_ptr, dst_ptr, d_page, d_head, d_tok, dst_idx_ptr,
                       had_ptr, sgn_ptr, tab_ptr, STREAM_OFF: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                       DE: tl.constexpr, L: tl.constexpr, BITS: tl.constexpr, RB: tl.constexpr,
                       SEGB: tl.constexpr, SEG_BYTES: tl.constexpr, CAP: tl.constexpr, O_BASIS: tl.constexpr,
                       O_MEAN: tl.constexpr, O_CENT: tl.constexpr, O_SEG: tl.constexpr, O_T: tl.constexpr,
                       O_NORM: tl.constexpr, O_RES: tl.constexpr, O_CNT: tl.constexpr, O_OUT: tl.constexpr,
                       TT: tl.constexpr, E: tl.constexpr):
    """One program: one stream (K or V) of one sealed block of one KV head -> bf16 rows [N, D] of dst."""
    item = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(page_ptr + item).to(tl.int64)
    dpage = tl.load(dst_idx_ptr + item).to(tl.int64)
    slot = cache_ptr + page * c_page + h * c_head + STREAM_OFF
    j = tl.arange(0, L)
    dd = tl.arange(0, D)
    scale = tl.load((slot + 32).to(tl.pointer_type(tl.float32)))
    mean = tl.load((slot + O_MEAN).to(tl.pointer_type(tl.float16)) + dd).to(tl.float32)
    # Basis rows past d_eff read as 0, so the L-wide (padded) residual needs no slicing.
    basis = tl.load((slot + O_BASIS).to(tl.pointer_type(tl.float16)) + j[:, None] * D + dd[None, :],
                    mask=(j < DE)[:, None], other=0.0).to(tl.float32)
    had = tl.load(had_ptr + j[:, None] * L + j[None, :])
    sgn = tl.load(sgn_ptr + j)                                    # s / L (exact: L is a power of two)
    cnt_all = _counts(slot, O_CNT, CAP, N)
    for t0 in range(0, N, TT):
        t = t0 + tl.arange(0, TT)
        z = _stream_z(slot, t0, t, cnt_all, tab_ptr, O_RES, RB, BITS, L, CAP, O_CNT, O_OUT, N, TT, E)
        nrm = tl.load((slot + O_NORM).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
        tv = tl.load((slot + O_T).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
        r = tl.dot(z * nrm[:, None], had, input_precision="ieee") * sgn[None, :]
        seg = _stream_seg(slot, t, O_SEG, SEGB, SEG_BYTES)
        cent = tl.load((slot + O_CENT).to(tl.pointer_type(tl.float16)) + seg[:, None] * DE + j[None, :],
                       mask=(j < DE)[None, :], other=0.0).to(tl.float32)
        c = tv[:, None] * cent + r
        x = (tl.dot(c, basis, input_precision="ieee") + mean[None, :]) * scale
        tl.store(dst_ptr + dpage * d_page + h * d_head + t[:, None] * d_tok + dd[None, :], _bf16_rtne(x))


@triton.jit
def _mm(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _v13_attn_kernel(q_ptr, q_row, q_head, qpos_ptr, req_ptr, cache_ptr, c_page, c_head, bt_ptr, bt_req,
                     nsealed_ptr, seqlen_ptr, tail_k_ptr, tail_v_ptr, t_slot, t_head, t_tok, tslot_ptr,
                     had_ptr, sgn_ptr, ktab_ptr, vtab_ptr, out_ptr, o_row, o_head, o_split, lse_ptr, l_row, l_head,
                     scale, VOFF: tl.constexpr, N: tl.constexpr, D: tl.constexpr, DE: tl.constexpr, L: tl.constexpr,
                     KC: tl.constexpr, SEGB: tl.constexpr, SEG_BYTES: tl.constexpr, O_BASIS: tl.constexpr,
                     O_MEAN: tl.constexpr, O_CENT: tl.constexpr, O_SEG: tl.constexpr, O_T: tl.constexpr,
                     O_NORM: tl.constexpr, O_RES: tl.constexpr, KBITS: tl.constexpr, KRB: tl.constexpr,
                     KCAP: tl.constexpr, K_CNT: tl.constexpr, K_OUT: tl.constexpr, VBITS: tl.constexpr,
                     VRB: tl.constexpr, VCAP: tl.constexpr, V_CNT: tl.constexpr, V_OUT: tl.constexpr,
                     BM: tl.constexpr, TT: tl.constexpr, E: tl.constexpr, SPLITS, PRECISE: tl.constexpr):
    """One program: BM query rows (one request) of one KV head over sealed blocks b = split, split + SPLITS, ...
    read straight from their v13 slots, and (split n_sealed % SPLITS) the exact bf16 tail.

    Per block the query is taken into the block's PCA basis once: with qB = q basis^T,
    q.k_i = scale_b (q.mean + t_i (qB.centre_seg_i) + ||r_i|| ((qB s) H / L).z_i), so a token costs one
    L-wide dot with its Lloyd-Max values and a centre lookup (a one-hot dot over the k centres). V is summed in
    the same coefficient domain (p x one-hot t, p x ||r|| z, mass) and mapped back to D dims once per block.
    The two streams share d_eff, k and L (one v13_layout), the field offsets differ by VOFF.
    """
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    r = tile * BM + tl.arange(0, BM)
    req = tl.load(req_ptr + tile)
    qp = tl.load(qpos_ptr + r)                       # -1 marks padding rows
    row_ok = qp >= 0
    d = tl.arange(0, D)
    j = tl.arange(0, L)
    kc = tl.arange(0, KC)
    q = tl.load(q_ptr + r[:, None] * q_row + kvh * q_head + d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32) * (scale * 1.4426950408889634)
    n_sealed = tl.load(nsealed_ptr + req)
    seq_len = tl.load(seqlen_ptr + req)
    tslot = tl.load(tslot_ptr + req).to(tl.int64)
    m_i = tl.full((BM,), -float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    had = tl.load(had_ptr + j[:, None] * L + j[None, :])
    sgn = tl.load(sgn_ptr + j)                       # s / L
    for b in range(split, n_sealed, SPLITS):
        page = tl.load(bt_ptr + req * bt_req + b).to(tl.int64)
        ks = cache_ptr + page * c_page + kvh * c_head
        vs = ks + VOFF
        f16 = tl.pointer_type(tl.float16)
        kscale = tl.load((ks + 32).to(tl.pointer_type(tl.float32)))
        kmean = tl.load((ks + O_MEAN).to(f16) + d).to(tl.float32)
        kbasis = tl.load((ks + O_BASIS).to(f16) + j[:, None] * D + d[None, :], mask=(j < DE)[:, None],
                         other=0.0).to(tl.float32)
        kcent = tl.load((ks + O_CENT).to(f16) + kc[:, None] * DE + j[None, :], mask=(j < DE)[None, :],
                        other=0.0).to(tl.float32)
        qb = _mm(q, tl.trans(kbasis), PRECISE)                       # [BM, L], zero past d_eff
        qmu = tl.sum(q * kmean[None, :], 1)
        qc = _mm(qb, tl.trans(kcent), PRECISE)                       # [BM, KC]
        qh = _mm(qb * sgn[None, :], had, PRECISE)                    # [BM, L]
        kcnt = _counts(ks, K_CNT, KCAP, N)
        vcnt = _counts(vs, V_CNT, VCAP, N)
        acc_c = tl.zeros((BM, KC), tl.float32)
        acc_z = tl.zeros((BM, L), tl.float32)
        mass = tl.zeros((BM,), tl.float32)
        m_blk = m_i
        for t0 in range(0, N, TT):
            t = t0 + tl.arange(0, TT)
            kz = _stream_z(ks, t0, t, kcnt, ktab_ptr, O_RES, KRB, KBITS, L, KCAP, K_CNT, K_OUT, N, TT, E)
            kseg = _stream_seg(ks, t, O_SEG, SEGB, SEG_BYTES)
            kt = tl.load((ks + O_T).to(f16) + t).to(tl.float32)
            kn = tl.load((ks + O_NORM).to(f16) + t).to(tl.float32)
            onehot = (kseg[:, None] == kc[None, :]).to(tl.float32)
            s = _mm(qc, tl.trans(onehot), PRECISE) * kt[None, :] + _mm(qh, tl.trans(kz), PRECISE) * kn[None, :]
            s = (s + qmu[:, None]) * kscale
            s = tl.where((b * N + t)[None, :] <= qp[:, None], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vz = _stream_z(vs, t0, t, vcnt, vtab_ptr, O_RES, VRB, VBITS, L, VCAP, V_CNT, V_OUT, N, TT, E)
            vseg = _stream_seg(vs, t, O_SEG, SEGB, SEG_BYTES)
            vt = tl.load((vs + O_T).to(f16) + t).to(tl.float32)
            vn = tl.load((vs + O_NORM).to(f16) + t).to(tl.float32)
            voh = tl.where(vseg[:, None] == kc[None, :], vt[:, None], 0.0)
            acc_c = acc_c * alpha[:, None] + _mm(p, voh, PRECISE)
            acc_z = acc_z * alpha[:, None] + _mm(p, vz * vn[:, None], PRECISE)
            mass = mass * alpha + tl.sum(p, 1)
            m_i = m_new
        # Back to D dims once per block: coefficients c = acc_c centres + (acc_z H) s / L, x = scale (mass mean + c B)
        vscale = tl.load((vs + 32).to(tl.pointer_type(tl.float32)))
        vmean = tl.load((vs + O_MEAN).to(f16) + d).to(tl.float32)
        vbasis = tl.load((vs + O_BASIS).to(f16) + j[:, None] * D + d[None, :], mask=(j < DE)[:, None],
                         other=0.0).to(tl.float32)
        vcent = tl.load((vs + O_CENT).to(f16) + kc[:, None] * DE + j[None, :], mask=(j < DE)[None, :],
                        other=0.0).to(tl.float32)
        cc = _mm(acc_c, vcent, PRECISE) + _mm(acc_z, had, PRECISE) * sgn[None, :]
        blk = (_mm(cc, vbasis, PRECISE) + mass[:, None] * vmean[None, :]) * vscale
        m_now = tl.where(m_i == -float("inf"), 0.0, m_i)
        acc = acc * tl.exp2(tl.where(m_blk == -float("inf"), m_now, m_blk) - m_now)[:, None] + blk
    if n_sealed % SPLITS == split:
        tail_len = seq_len - n_sealed * N
        for t0 in range(0, tail_len, TT):
            t = t0 + tl.arange(0, TT)
            tm = t < tail_len
            base = tslot * t_slot + kvh * t_head + t[:, None] * t_tok + d[None, :]
            k = tl.load(tail_k_ptr + base, mask=tm[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")   # exact rows: full fp32 products
            s = tl.where(tm[None, :] & ((n_sealed * N + t)[None, :] <= qp[:, None]), s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            v = tl.load(tail_v_ptr + base, mask=tm[:, None], other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
    o = out_ptr + r[:, None] * o_row + kvh * o_head + split * o_split + d[None, :]
    tl.store(o, acc / tl.maximum(l_i, 1e-30)[:, None], mask=row_ok[:, None])
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), -float("inf"))
    tl.store(lse_ptr + r * l_row + kvh * l_head + split, lse, mask=row_ok)


def attn_warps(head_dim: int) -> int:
    """Warps of the fused attention: at D=128, 4 warps spill ~600 B/thread at 255 registers (sm_90 compile,
    benchmarks/kernels/v13_compile_check.py), 8 warps spill less at the same 8 warps per SM."""
    return 4 if head_dim <= 64 else 8


def _check_aligned(lay) -> None:
    """The decode kernel reads fp16/fp32/int32 fields in place: every field must sit on a 4-byte boundary."""
    for st, off in ((lay.k, 0), (lay.v, lay.k.size)):
        bad = [f.name for f in st.fields if (off + f.offset) % 4] + (["slot"] if lay.slot_bytes % 4 else [])
        if bad:
            raise ValueError(f"v13 layout {lay.head_dim}/{st.params}: fields {bad} are not 4-byte aligned; the Triton "
                             "decode needs aligned fields (use the default d_eff and k)")


class V13Kernels:
    """Seal / decode / attention for one v13 geometry on one device (same call shapes as KakeyaKernels)."""

    def __init__(self, head_dim: int, k_bits: int, v_bits: int, device, seed: int = V13_SEED,
                 k_outlier_threshold: float | None = 2.0, scratch_mib: int = 1024, tt: int = 32,
                 attn: str = "fused"):
        if attn not in ("fused", "scratch"):
            raise ValueError(f"v13 attention path must be 'fused' or 'scratch', got {attn!r}")
        self.attn = attn
        self.lay = v13_layout(head_dim, k_bits=k_bits, v_bits=v_bits)
        _check_aligned(self.lay)
        L = self.lay.k.params["wht_len"]
        if L < 16:
            raise ValueError(f"v13 decode needs a WHT length >= 16 (tl.dot), got {L} for head_dim {head_dim}")
        self.D, self.device, self.seed, self.thr, self.tt = head_dim, device, seed, k_outlier_threshold, tt
        # KAKEYA_SCRATCH_MIB; v13 configs may still name it KAKEYA_V13_SCRATCH_MIB (kakeya_kv.config)
        self.scratch = scratch.ScratchPages(head_dim, scratch_mib, knob="KAKEYA_SCRATCH_MIB (KAKEYA_V13_SCRATCH_MIB)")
        self.had = hadamard.sylvester(L).float().contiguous().to(device)
        self.sgn = (hadamard.signs(L, seed).float() / L).contiguous().to(device)
        self.tables = {"k": lloyd_max.gaussian_table(k_bits).to(device),
                       "v": lloyd_max.gaussian_table(v_bits).to(device)}
        from .kakeya_triton import KakeyaKernels
        self.exact = KakeyaKernels(head_dim, 4, 3, device)   # only its exact-page attention is used

    # --- seal -------------------------------------------------------------------------------------------------
    def seal(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_weight: torch.Tensor | None = None,
             stats: dict | None = None) -> None:
        """k, v [I, H, 512, D] -> slots uint8 [I, H, slot_bytes] (in place). stats (optional) gets the device
        tensor of outliers dropped by the budget (reading it is a host sync: tools only)."""
        if k_weight is not None:
            raise ValueError("v13 has no calibrated K shaping weights (KAKEYA_CALIBRATION is for the kakeya format)")
        I, H, n, D = k.shape
        ks = self.lay.k.size
        kb, dropped = encode_blocks(k.reshape(I * H, n, D), self.lay.k, self.seed, self.thr)
        vb, _ = encode_blocks(v.reshape(I * H, n, D), self.lay.v, self.seed, None)
        slots[..., :ks] = kb.view(I, H, ks)
        slots[..., ks:] = vb.view(I, H, -1)
        if stats is not None:
            stats["outliers_dropped"] = dropped.sum()

    # --- decode -----------------------------------------------------------------------------------------------
    def _launch_decode(self, cache: torch.Tensor, pages: torch.Tensor, dst: torch.Tensor, dst_idx: torch.Tensor):
        """cache uint8 [P, H, slot]; pages [I] page of each item; dst bf16 [*, H, 2, 512, D]; dst_idx [I]."""
        I, H = int(pages.shape[0]), cache.shape[1]
        if I == 0:
            return
        for kv, (name, st, off) in enumerate((("k", self.lay.k, 0), ("v", self.lay.v, self.lay.k.size))):
            n, D, d, k, L, bits, seg_bits, cap = geometry(st)
            o = dst[:, :, kv]
            _v13_decode_kernel[(I, H)](
                cache, cache.stride(0), cache.stride(1), pages, o, o.stride(0), o.stride(1), o.stride(2), dst_idx,
                self.had, self.sgn, self.tables[name], STREAM_OFF=off, N=n, D=D, DE=d, L=L, BITS=bits,
                RB=st["residual"].shape[1], SEGB=seg_bits, SEG_BYTES=st["seg"].nbytes, CAP=cap,
                O_BASIS=st["basis"].offset, O_MEAN=st["mean"].offset, O_CENT=st["centres"].offset,
                O_SEG=st["seg"].offset, O_T=st["t"].offset, O_NORM=st["norm"].offset, O_RES=st["residual"].offset,
                O_CNT=st["outlier_count"].offset if cap else 0, O_OUT=st["outliers"].offset if cap else 0,
                TT=self.tt, E=8, num_warps=4)

    def decode(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots uint8 [I, H, slot_bytes] -> bf16 k, v [I, H, 512, D]."""
        I, H = slots.shape[:2]
        out = torch.empty(I, H, 2, BLOCK_TOKENS, self.D, dtype=torch.bfloat16, device=slots.device)
        idx = torch.arange(I, dtype=torch.int32, device=slots.device)
        self._launch_decode(slots, idx, out, idx)
        return out[:, :, 0], out[:, :, 1]

    # --- attention --------------------------------------------------------------------------------------------
    def attention(self, q, q_pos, q_req, cache, block_table, n_sealed, seq_lens, tail_k, tail_v, tail_slot,
                  scale: float, plan: dict | None = None, precise: bool = False, splits: int = 8, bm: int = 16,
                  **launch) -> torch.Tensor:
        """Same arguments as KakeyaKernels.attention (cache holds v13 slots): the fused kernel, or the scratch path
        when the object was built with attn="scratch". ``launch``: the backend's decode-variant knobs for the
        default format's kernel (lut, fused, ...), accepted and not used by v13."""
        if self.attn == "scratch":
            return self.attention_scratch(q, q_pos, q_req, cache, block_table, n_sealed, seq_lens, tail_k, tail_v,
                                          tail_slot, scale, plan=plan, precise=precise, splits=splits, bm=bm,
                                          n_sealed_host=launch.get("n_sealed_host"))
        T, Hq, D = q.shape
        Hkv = cache.shape[1]
        if Hq % Hkv or D != self.D:
            raise ValueError(f"query heads {Hq} / kv heads {Hkv} / head_dim {D} do not fit this geometry ({self.D})")
        gqa = Hq // Hkv
        pl = plan or self.exact.plan(q_pos, q_req, int(n_sealed.shape[0]), gqa, bm)
        dev, nt, bm, dest = q.device, pl["nt"], pl["bm"], pl["dest"]
        qq = torch.zeros(nt * bm, Hkv, D, dtype=q.dtype, device=dev)
        qq[dest] = q.view(T, Hkv, gqa, D).permute(0, 2, 1, 3).reshape(T * gqa, Hkv, D)
        part = torch.empty(nt * bm, Hkv, splits, D, dtype=torch.float32, device=dev)
        lse = torch.empty(nt * bm, Hkv, splits, dtype=torch.float32, device=dev)
        kl, vl = self.lay.k, self.lay.v
        n, _, d, k, L, kbits, seg_bits, kcap = geometry(kl)
        vbits, vcap = vl.bits, geometry(vl)[7]
        _v13_attn_kernel[(nt, Hkv, splits)](
            qq, qq.stride(0), qq.stride(1), pl["qpos"], pl["tile_req"], cache, cache.stride(0), cache.stride(1),
            block_table, block_table.stride(0), n_sealed, seq_lens, tail_k, tail_v, tail_k.stride(0),
            tail_k.stride(1), tail_k.stride(2), tail_slot, self.had, self.sgn, self.tables["k"], self.tables["v"],
            part, part.stride(0), part.stride(1), part.stride(2), lse, lse.stride(0), lse.stride(1), scale,
            VOFF=kl.size, N=n, D=D, DE=d, L=L, KC=k, SEGB=seg_bits, SEG_BYTES=kl["seg"].nbytes,
            O_BASIS=kl["basis"].offset, O_MEAN=kl["mean"].offset, O_CENT=kl["centres"].offset, O_SEG=kl["seg"].offset,
            O_T=kl["t"].offset, O_NORM=kl["norm"].offset, O_RES=kl["residual"].offset, KBITS=kbits,
            KRB=kl["residual"].shape[1], KCAP=kcap, K_CNT=kl["outlier_count"].offset if kcap else 0,
            K_OUT=kl["outliers"].offset if kcap else 0, VBITS=vbits, VRB=vl["residual"].shape[1], VCAP=vcap,
            V_CNT=vl["outlier_count"].offset if vcap else 0, V_OUT=vl["outliers"].offset if vcap else 0,
            BM=bm, TT=self.tt, E=8, SPLITS=splits, PRECISE=bool(precise), num_warps=attn_warps(D))
        # Merge the splits' partial softmaxes (lse in log2 units), as KakeyaKernels does.
        w = torch.nan_to_num(torch.softmax(lse * math.log(2.0), -1))
        o = (part * w[..., None]).sum(2)[dest]
        return o.view(T, gqa, Hkv, D).permute(0, 2, 1, 3).reshape(T, Hq, D).to(q.dtype)

    def attention_scratch(self, q, q_pos, q_req, cache, block_table, n_sealed, seq_lens, tail_k, tail_v, tail_slot,
                          scale: float, plan: dict | None = None, precise: bool = False, n_sealed_host=None,
                          splits: int = 8, bm: int = 16) -> torch.Tensor:
        """Decode-then-attend (kakeya_kernels.scratch): the attended blocks -> bf16 scratch pages, then the exact-page
        kernel (baseline launch). The sealed-block counts size the scratch on the host: ``n_sealed_host`` or
        ``plan["n_sealed_host"]`` (the backend's planner has them); without either, n_sealed is read back (one
        host sync)."""
        return scratch.attend(self.scratch, self._launch_decode, self.exact.attention_exact, "v13", q, q_pos, q_req,
                              cache, block_table, n_sealed, seq_lens, tail_k, tail_v, tail_slot, plan=plan,
                              n_sealed_host=n_sealed_host, scale=scale, splits=splits, bm=bm, precise=precise)
