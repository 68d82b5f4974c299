"""Batched v13 seal: many 512-token blocks of one stream (K or V) encoded at once with tensor ops.

Same math, in the same order, as the CPU reference (``kakeya_kv.codecs.v13.encode_parts``), batched over
blocks: block scale -> fp16 mean -> randomized PCA (the reference's SplitMix64 sketch, QR power iterations,
SVD, largest-entry-positive sign rule) -> axial spherical K-means (farthest-first init, up to 32 Lloyd steps
with the reference's early stop kept per block as a frozen mask) -> (seg, t, ||r||) -> sign-flipped WHT ->
Lloyd-Max codes -> outliers above the threshold, the budget keeping the largest |z| -> slot bytes laid out
by ``kakeya_kv.format.v13_stream``. Python loops run only over K-means centres/iterations and QR steps,
never over tokens or blocks, and nothing reads a GPU value on the host.

Not bit-identical to the reference on a GPU: cuSOLVER's QR/SVD and batched fp32 sums round differently, so a
few codes at decision boundaries may flip (tests bound the decoded error, see tests/test_v13_triton.py).
Serving geometry only: variance_ratio = 1 (the fixed-size slot keeps d_eff rows; rank-deficient rows are
zeroed exactly as the reference does) and no d_res.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from kakeya_kv import hadamard, lloyd_max
from kakeya_kv.codecs.v13 import _HDR, FP16_SAFE_MAX, KMEANS_ITERS, METRIC_MSE, OVERSAMPLE, POWER_ITERS, _omega
from kakeya_kv.format import V13_MAGIC, V13_REVISION, V13_SEED, StreamLayout
from kakeya_kv.prng import SplitMix64


def geometry(lay: StreamLayout) -> tuple[int, int, int, int, int, int, int, int]:
    """(n, D, d_eff, k, L, bits, seg_bits, outlier_cap) of a v13 stream layout."""
    p = lay.params
    return (lay["t"].shape[0], lay["basis"].shape[1], p["d_eff"], p["k"], p["wht_len"], lay.bits, p["seg_bits"],
            p["outlier_cap"])


@lru_cache(maxsize=None)
def _consts(seed: int, n: int, D: int, d: int, L: int, device: str):
    r = min(d + OVERSAMPLE, D)
    first = SplitMix64(seed).next_u64()
    # first K-means centre = u64 % (number of valid rows): a table over 0..n avoids u64 arithmetic on tensors.
    first_tab = torch.tensor([0] + [first % m for m in range(1, n + 1)], dtype=torch.int64)
    return (_omega(seed, n, r).to(device), hadamard.sylvester(L).float().to(device),
            hadamard.signs(L, seed).float().to(device), first_tab.to(device))


def _rsvd(a: torch.Tensor, d: int, omega: torch.Tensor) -> torch.Tensor:
    """Batched HMT randomized PCA of centred blocks a [B, n, D] -> basis rows [B, d, D] (reference ``_rsvd``)."""
    B, n, D = a.shape
    at = a.transpose(1, 2)
    z = at @ omega
    for _ in range(POWER_ITERS):
        z = torch.linalg.qr(at @ torch.linalg.qr(a @ z).Q).Q
    q = torch.linalg.qr(z).Q
    _, s, vh = torch.linalg.svd(a @ q, full_matrices=False)
    basis, s = (vh @ q.transpose(1, 2))[:, :d], s[:, :d]
    piv = basis.abs().argmax(2, keepdim=True)
    basis = basis * torch.where(basis.gather(2, piv) < 0, -1.0, 1.0)
    keep = s > s[:, :1] * max(n, D) * torch.finfo(torch.float32).eps
    return basis * keep[..., None]


def _kmeans(c: torch.Tensor, k: int, first_tab: torch.Tensor) -> torch.Tensor:
    """Batched axial spherical K-means on the directions of c [B, n, d] -> unit centres [B, k, d]."""
    B, n, d = c.shape
    nrm = c.norm(dim=2)
    valid = nrm > 0
    u = torch.where(valid[..., None], c / nrm.clamp_min(1e-30)[..., None], torch.zeros_like(c))
    nv = valid.sum(1)
    # The reference indexes the compacted valid rows: row = the (first_tab[nv])-th valid row.
    rank = valid.cumsum(1) - 1
    pick = torch.where(valid & (rank == first_tab[nv][:, None]), 0, 1).argmin(1)
    idx = [pick]
    best = (u @ u.gather(1, pick[:, None, None].expand(B, 1, d)).transpose(1, 2))[..., 0]
    inf = torch.tensor(float("inf"), device=c.device)
    for _ in range(1, k):   # farthest-first: next centre maximises 1 - max cos (over valid rows)
        i = torch.where(valid, best, inf).argmin(1)
        idx.append(i)
        best = torch.maximum(best, (u @ u.gather(1, i[:, None, None].expand(B, 1, d)).transpose(1, 2))[..., 0])
    sel = torch.stack(idx, 1)                                             # [B, k]
    live = torch.arange(k, device=c.device)[None, :] < nv[:, None]        # only min(k, valid rows) centres
    C = u.gather(1, sel[..., None].expand(B, k, d)) * live[..., None]
    assign = torch.zeros(B, n, dtype=torch.int64, device=c.device)
    done = torch.zeros(B, dtype=torch.bool, device=c.device)
    for it in range(KMEANS_ITERS):
        cos = u @ C.transpose(1, 2)
        new = torch.where(live[:, None, :], cos.abs(), -1.0).argmax(2)    # axial; dead centres never win
        if it:
            done = done | (new == assign).all(1)   # the reference stops when no assignment changes
        assign = torch.where(done[:, None], assign, new)
        sgn = torch.where(cos.gather(2, new[..., None]) < 0, -1.0, 1.0)
        sums = torch.zeros_like(C).scatter_add_(1, new[..., None].expand(B, n, d), sgn * u)
        sn = sums.norm(dim=2, keepdim=True)
        upd = torch.where(sn > 0, sums / sn.clamp_min(1e-30), C)           # empty cluster keeps its centre
        C = torch.where(done[:, None, None], C, upd)
    return C * live[..., None]


def _pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """LSB-first packing (kakeya_kv.bitpack) of idx [..., m] -> uint8 [..., ceil(m*bits/8)]."""
    m = idx.shape[-1]
    nbytes = (m * bits + 7) // 8
    sh = torch.arange(bits, device=idx.device)
    bit = ((idx.to(torch.int32)[..., None] >> sh) & 1).flatten(-2)        # [..., m*bits]
    bit = F.pad(bit, (0, nbytes * 8 - m * bits)).view(*idx.shape[:-1], nbytes, 8)
    return (bit << torch.arange(8, device=idx.device)).sum(-1).to(torch.uint8)


def _outliers(z: torch.Tensor, threshold: float, cap: int):
    """|z| > threshold, at most cap per block keeping the largest |z| (ties: lower flat index, as the reference's
    stable sort) -> (count [B, n], entries uint8 [B, cap, 4], stored [B], dropped [B])."""
    B, n, L = z.shape
    zf = z.reshape(B, n * L)
    sel = zf.abs() > threshold
    score = torch.where(sel, zf.abs(), -1.0)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n * L, device=z.device).expand(B, -1))
    kept = sel & (rank < cap)
    pos = torch.where(kept, kept.cumsum(1) - 1, cap)                      # entries in row-major (flat) order
    flat = torch.arange(n * L, device=z.device).expand(B, -1)
    ent = torch.zeros(B, cap + 1, 2, dtype=torch.int16, device=z.device)
    ent[..., 0].scatter_(1, pos, (flat % L).to(torch.int16))
    ent[..., 1].scatter_(1, pos, zf.half().view(torch.int16))
    stored = kept.sum(1)
    return (kept.view(B, n, L).sum(2), ent[:, :cap].contiguous().view(torch.uint8).view(B, cap, 4), stored,
            sel.sum(1) - stored)


@lru_cache(maxsize=None)
def _header_template(d: int, k: int, bits: int, seed: int) -> bytes:
    return _HDR.pack(V13_MAGIC, d, k, bits, 0, METRIC_MSE, seed, 0.0, V13_REVISION)


def encode_blocks(x: torch.Tensor, lay: StreamLayout, seed: int = V13_SEED,
                  outlier_threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, 512, D] (any float dtype) -> (uint8 slot bytes [B, lay.size], dropped outliers [B] int64)."""
    n, D, d, k, L, bits, seg_bits, cap = geometry(lay)
    B = x.shape[0]
    if tuple(x.shape[1:]) != (n, D):
        raise ValueError(f"v13 blocks must be [B, {n}, {D}], got {list(x.shape)}")
    dev = x.device
    omega, H, sg, first_tab = _consts(seed, n, D, d, L, str(dev))
    x = x.to(torch.float32)
    s = (x.abs().amax((1, 2)) / FP16_SAFE_MAX).clamp_min(1.0)            # exact: /256 is a power of two
    xs = x / s[:, None, None]
    mean = xs.mean(1).half()
    a = xs - mean.float()[:, None]
    basis = _rsvd(a, d, omega).half()
    c = a @ basis.float().transpose(1, 2)
    centres = _kmeans(c, k, first_tab).half()
    dots = c @ centres.float().transpose(1, 2)
    seg = dots.abs().argmax(2)
    t = dots.gather(2, seg[..., None])[..., 0].half()
    cf = centres.float()
    r = c - t.float()[..., None] * cf.gather(1, seg[..., None].expand(B, n, d))
    y = (F.pad(r, (0, L - d)) * sg) @ H
    norm = r.norm(dim=2).half()
    nf = norm.float()[..., None]
    z = torch.where(nf > 0, y / nf.clamp_min(1e-30), torch.zeros_like(y))
    codes = lloyd_max.quantize(z, lloyd_max.gaussian_table(bits).to(dev))

    out = torch.zeros(B, lay.size, dtype=torch.uint8, device=dev)

    def put(name, v):
        f = lay[name]
        v = v.contiguous().view(torch.uint8).reshape(B, -1)
        if v.shape[1] != f.nbytes:
            raise ValueError(f"v13 field {name}: {v.shape[1]} B, layout says {f.nbytes} B")
        out[:, f.offset:f.offset + f.nbytes] = v

    if cap > 0 and outlier_threshold is not None:
        cnt, ent, stored, dropped = _outliers(z, outlier_threshold, cap)
    else:
        cnt = torch.zeros(B, n, dtype=torch.int64, device=dev)
        ent = torch.zeros(B, cap, 4, dtype=torch.uint8, device=dev)
        stored = dropped = torch.zeros(B, dtype=torch.int64, device=dev)
    hdr = torch.frombuffer(bytearray(_header_template(d, k, bits, seed)), dtype=torch.uint8).to(dev)
    hdr = hdr.expand(B, -1).clone()
    hdr[:, 16:20] = stored.to(torch.int32)[:, None].view(torch.uint8)
    hdr[:, 32:36] = s.to(torch.float32)[:, None].view(torch.uint8)
    put("header", hdr)
    put("basis", basis)
    put("mean", mean)
    put("centres", centres)
    put("seg", _pack_bits(seg, seg_bits))
    put("t", t)
    put("norm", norm)
    put("residual", _pack_bits(codes, bits))
    if cap > 0:
        put("outlier_count", cnt.to(torch.int16))
        put("outliers", ent)
    return out, dropped

