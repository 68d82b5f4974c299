"""The seed ``v13`` format in the vLLM data path (layout from kakeya_kv.format.v13_layout).

* ``seal``: full 512-token blocks (many (layer-)blocks x KV heads per call) -> v13 slot bytes, with the
  batched tensor encoder of :mod:`.v13_seal` (PCA / K-means are batched torch ops, no host sync).
* ``decode``: a Triton kernel that turns v13 slots into bf16 rows (codes -> Lloyd-Max z, outlier overrides,
  ``* ||r||``, sign-flipped inverse WHT, ``t * centre[seg] +``, ``@ basis + mean``, ``* block_scale``).
* ``attention``: **first version, not fused**: the blocks the call attends are decoded into a bf16 scratch of
  exact pages (one page per attended sealed block plus one for each request's bf16 tail), then the existing
  exact-page attention kernel (``KakeyaKernels.attention_exact``) runs over the scratch. The scratch is one
  buffer per kernel object, shared by all layers of that geometry and reused every call; its size is the number
  of blocks one phase attends (sum of sealed blocks + one tail page per request), never the whole cache, and it
  is capped by KAKEYA_V13_SCRATCH_MIB. A fused kernel (query rotated into each block's PCA basis:
  q.k = q.mean + t (qB).centre + ||r||/L (H s (qB)).z) is the next step.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kakeya_kv import hadamard, lloyd_max
from kakeya_kv.format import BLOCK_TOKENS, V13_SEED, exact_layout, v13_layout

from .v13_seal import encode_blocks, geometry


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16, round to nearest even, by bit arithmetic: the interpreter's cast truncates, the GPU's
    rounds; doing it explicitly gives the same bytes on both (finite inputs)."""
    b = x.to(tl.int32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


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
    bitpos = j * BITS
    byte = bitpos // 8
    if CAP > 0:
        cnt_all = tl.load((slot + O_CNT).to(tl.pointer_type(tl.int16)) + tl.arange(0, N)).to(tl.int32) & 0xFFFF
    for t0 in range(0, N, TT):
        t = t0 + tl.arange(0, TT)
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
        nrm = tl.load((slot + O_NORM).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
        tv = tl.load((slot + O_T).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
        r = tl.dot(z * nrm[:, None], had, input_precision="ieee") * sgn[None, :]
        sp = t * SEGB
        sb = sp // 8
        s_lo = tl.load(slot + O_SEG + sb).to(tl.int32)
        s_hi = tl.load(slot + O_SEG + sb + 1, mask=sb + 1 < SEG_BYTES, other=0).to(tl.int32)
        seg = ((s_lo | (s_hi << 8)) >> (sp % 8)) & ((1 << SEGB) - 1)
        cent = tl.load((slot + O_CENT).to(tl.pointer_type(tl.float16)) + seg[:, None] * DE + j[None, :],
                       mask=(j < DE)[None, :], other=0.0).to(tl.float32)
        c = tv[:, None] * cent + r
        x = (tl.dot(c, basis, input_precision="ieee") + mean[None, :]) * scale
        tl.store(dst_ptr + dpage * d_page + h * d_head + t[:, None] * d_tok + dd[None, :], _bf16_rtne(x))


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
                 k_outlier_threshold: float | None = 2.0, scratch_mib: int = 1024, tt: int = 32):
        self.lay = v13_layout(head_dim, k_bits=k_bits, v_bits=v_bits)
        _check_aligned(self.lay)
        L = self.lay.k.params["wht_len"]
        if L < 16:
            raise ValueError(f"v13 decode needs a WHT length >= 16 (tl.dot), got {L} for head_dim {head_dim}")
        self.D, self.device, self.seed, self.thr, self.tt = head_dim, device, seed, k_outlier_threshold, tt
        self.scratch_bytes_max = scratch_mib << 20
        self.had = hadamard.sylvester(L).float().contiguous().to(device)
        self.sgn = (hadamard.signs(L, seed).float() / L).contiguous().to(device)
        self.tables = {"k": lloyd_max.gaussian_table(k_bits).to(device),
                       "v": lloyd_max.gaussian_table(v_bits).to(device)}
        from .kakeya_triton import KakeyaKernels
        self.exact = KakeyaKernels(head_dim, 4, 3, device)   # only its exact-page attention is used
        self.page_bytes_per_head = exact_layout(head_dim).slot_bytes
        self._scratch: torch.Tensor | None = None

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
    def _scratch_pages(self, pages: int, H: int, device) -> torch.Tensor:
        need = pages * H * self.page_bytes_per_head
        if need > self.scratch_bytes_max:
            raise RuntimeError(f"kakeya v13: one attention phase needs a {need / 2**20:.0f} MiB decode scratch "
                               f"({pages} pages), over KAKEYA_V13_SCRATCH_MIB={self.scratch_bytes_max >> 20}; raise it "
                               "or lower --max-num-seqs / --max-num-batched-tokens")
        s = self._scratch
        if s is None or s.shape[0] < pages or s.shape[1] != H or s.device != torch.device(device):
            # Grow with headroom so a slowly growing context does not reallocate every step.
            cap = min(max(pages, int(pages * 1.25) + 1), self.scratch_bytes_max // (H * self.page_bytes_per_head))
            self._scratch = s = torch.empty(cap, H, 2, BLOCK_TOKENS, self.D, dtype=torch.bfloat16, device=device)
        return s

    def attention(self, q, q_pos, q_req, cache, block_table, n_sealed, seq_lens, tail_k, tail_v, tail_slot,
                  scale: float, plan: dict | None = None, precise: bool = False, n_sealed_host=None,
                  splits: int = 8, bm: int = 16, **launch) -> torch.Tensor:
        """Same arguments as KakeyaKernels.attention (cache holds v13 slots). The sealed-block counts are needed
        on the host to size the scratch: ``n_sealed_host`` or ``plan["n_sealed_host"]`` (the backend's planner
        has them); without either, n_sealed is read back (one host sync). ``launch``: the backend's decode-variant
        knobs for compressed pages (lut, fused, ...); the scratch is exact pages, read by the exact-page launch
        of the session-5 baseline, so they are accepted and not used."""
        R, H, dev = int(n_sealed.shape[0]), cache.shape[1], q.device
        host = n_sealed_host if n_sealed_host is not None else (plan or {}).get("n_sealed_host")
        ns = np.asarray(n_sealed.cpu() if host is None else host, dtype=np.int64).reshape(R)
        per = ns + 1                                           # sealed pages + one tail page per request
        base = np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64)
        P = int(per.sum())
        r_idx = np.repeat(np.arange(R), ns)
        b_idx = np.arange(int(ns.sum())) - np.repeat(np.cumsum(ns) - ns, ns)   # block index within its request
        width = int(ns.max(initial=0)) + 1
        sbt = base[:, None] + np.minimum(np.arange(width)[None, :], ns[:, None])   # column ns[r] = tail page
        def to(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=torch.int32, non_blocking=True)
        scratch = self._scratch_pages(P, H, dev)
        if len(r_idx):
            src = block_table[to(r_idx).long(), to(b_idx).long()].to(torch.int32)
            self._launch_decode(cache, src, scratch, to(base[r_idx] + b_idx))
        tail_pages = to(base + ns).long()
        slots = tail_slot.long()
        n_t = tail_k.shape[2]
        scratch[tail_pages, :, 0, :n_t] = tail_k[slots].to(torch.bfloat16)
        scratch[tail_pages, :, 1, :n_t] = tail_v[slots].to(torch.bfloat16)
        pages_u8 = scratch.view(torch.uint8).view(scratch.shape[0], H, -1)
        return self.exact.attention_exact(q, q_pos, q_req, pages_u8, to(sbt), seq_lens, scale, splits=splits, bm=bm,
                                          precise=precise, plan=plan)
