"""CPU reference codec of the seed "v1.3" format, revision 2 (seed spec §1 math, §5 slot bytes).

Per 512-token block of one KV head and one stream (K or V), float32 math:
block scale -> fp16 mean -> randomized PCA to d_eff -> axial spherical K-means
(k centres) -> per-row (seg, t) -> residual r in PCA space, sign-flipped WHT,
Lloyd-Max codes of z = y / ||r|| -> optional (idx, z) outliers.

Seed defects fixed here (spec §9): ||r|| is always stored and applied (#10,
metric is always mse); z is unit-variance (the sqrt(L) bug, §1.5); a per-block
scale keeps every fp16 field in range (#12); all randomness is SplitMix64 (#13);
outlier-budget overflow drops the smallest |z| instead of crashing (#7).
Sizes and offsets come only from :func:`kakeya_kv.format.v13_stream`.
"""
from __future__ import annotations

import struct
from functools import lru_cache

import torch
import torch.nn.functional as F

from .. import bitpack, hadamard, lloyd_max
from ..format import BLOCK_TOKENS, SUPPORTED_HEAD_DIMS, V13_MAGIC, V13_REVISION, V13_SEED, StreamLayout, v13_layout
from ..prng import GOLDEN, SplitMix64
from .base import Codec

# After scaling |x| <= 256, so ||x - mu|| <= 512 sqrt(256) = 8192: mean, basis, t, norm all fit fp16 (max 65504).
FP16_SAFE_MAX = 256.0
OVERSAMPLE, POWER_ITERS, KMEANS_ITERS = 8, 2, 32
METRIC_MSE = 0
# magic, d_eff, k, bits, stored outliers, metric, seed, block_scale, revision, 8 zero bytes = 48 B.
_HDR = struct.Struct("<4sIIIIIQfI8x")


@lru_cache(maxsize=None)
def _omega(seed: int, n: int, r: int) -> torch.Tensor:
    # Pure-Python Box-Muller is slow (~40k draws); the sketch only depends on (seed, n, r), so cache it.
    g = SplitMix64(seed ^ GOLDEN).gaussians(n * r)
    return torch.from_numpy(g).to(torch.float32).reshape(n, r)


@lru_cache(maxsize=None)
def _wht(L: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return hadamard.sylvester(L).float(), hadamard.signs(L, seed).float()


def _geom(lay: StreamLayout):
    p = lay.params
    return (lay["t"].shape[0], lay["basis"].shape[1], p["d_eff"], p["k"], p["wht_len"], lay.bits,
            p["seg_bits"], p["outlier_cap"])


def _rsvd(a: torch.Tensor, d: int, seed: int, variance_ratio: float) -> torch.Tensor:
    """HMT randomized PCA of centred rows a [n, D] -> basis rows [d, D]; rows past the kept rank are zero."""
    n, D = a.shape
    r = min(d + OVERSAMPLE, D)
    z = a.T @ _omega(seed, n, r)
    for _ in range(POWER_ITERS):  # re-orthonormalise every half-step: plain power iteration is ill-conditioned
        z = torch.linalg.qr(a.T @ torch.linalg.qr(a @ z).Q).Q
    q = torch.linalg.qr(z).Q
    _, s, vh = torch.linalg.svd(a @ q, full_matrices=False)
    basis, s = (vh @ q.T)[:d], s[:d]
    # Fix each vector's sign (largest-magnitude entry positive) so the stored basis does not depend on LAPACK.
    piv = basis.abs().argmax(1, keepdim=True)
    basis = basis * torch.where(basis.gather(1, piv) < 0, -1.0, 1.0)
    keep = s > s[0] * max(n, D) * torch.finfo(torch.float32).eps  # numerical rank; zero-pad the rest
    if variance_ratio < 1.0:
        ev = s.double() ** 2
        share = ev.cumsum(0) / ev.sum().clamp_min(1e-300)
        d_used = min(int((share < variance_ratio).sum()) + 1, d)
        keep &= torch.arange(d) < d_used
    return basis * keep[:, None]


def _kmeans(c: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Axial spherical K-means on the directions of c [n, d] -> unit centres [k, d] (zero rows if too few rows)."""
    nrm = c.norm(dim=1)
    valid = nrm > 0
    u = c[valid] / nrm[valid, None]
    nv, ke = u.shape[0], min(k, int(valid.sum()))
    cent = torch.zeros(k, c.shape[1])
    if ke == 0:
        return cent
    idx = [SplitMix64(seed).next_u64() % nv]
    best = u @ u[idx[0]]  # max signed cos to the chosen centres
    for _ in range(1, ke):  # farthest-first: next centre maximises 1 - max cos
        i = int(best.argmin())
        idx.append(i)
        best = torch.maximum(best, u @ u[i])
    C, assign = u[idx].clone(), None
    for _ in range(KMEANS_ITERS):
        cos = u @ C.T
        new = cos.abs().argmax(1)  # axial: u and -u belong to the same cluster
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sgn = torch.where(cos.gather(1, new[:, None]) < 0, -1.0, 1.0)
        sums = torch.zeros_like(C).index_add_(0, new, sgn * u)
        sn = sums.norm(dim=1, keepdim=True)
        C = torch.where(sn > 0, sums / sn.clamp_min(1e-30), C)  # empty cluster keeps its centre
    cent[:ke] = C
    return cent


def encode_parts(x: torch.Tensor, layout: StreamLayout, seed: int = V13_SEED,
                 outlier_threshold: float | None = None, variance_ratio: float = 1.0, d_res: int = 0) -> dict:
    """Encode one block [n, D] into its fields, each in storage dtype (see :func:`pack_stream`).

    ``d_res`` (the seed's legacy ablation knob): additionally store the d_res
    largest-|z| residual coordinates of every row exactly (as outliers).
    """
    n, D, d, k, L, bits, seg_bits, cap = _geom(layout)
    x = x.detach().to(torch.float32)
    if tuple(x.shape) != (n, D):
        raise ValueError(f"v13 block must be [{n}, {D}], got {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("v13 encode: non-finite input")
    if not 0.0 < variance_ratio <= 1.0:
        raise ValueError(f"variance_ratio {variance_ratio} must be in (0, 1]")
    s = float(torch.tensor(max(1.0, float(x.abs().max()) / FP16_SAFE_MAX), dtype=torch.float32))  # as stored
    xs = x / s
    mean = xs.mean(0).half()
    a = xs - mean.float()  # fp16-rounded mean, as decode will add back
    basis = _rsvd(a, d, seed, variance_ratio).half()
    c = a @ basis.float().T
    centres = _kmeans(c, k, seed).half()
    dots = c @ centres.float().T
    seg = dots.abs().argmax(1)  # unnormalised: equivalent to minimising ||r||
    t = dots.gather(1, seg[:, None])[:, 0].half()
    r = c - t.float()[:, None] * centres.float()[seg]  # stored (fp16) t and centre: decode matches exactly
    H, sg = _wht(L, seed)
    y = (F.pad(r, (0, L - d)) * sg) @ H  # H symmetric: row form of H (s * r)
    norm = r.norm(dim=1).half()
    nf = norm.float()[:, None]
    z = torch.where(nf > 0, y / nf.clamp_min(1e-30), torch.zeros_like(y))  # unit variance (not sqrt(L))
    codes = lloyd_max.quantize(z, lloyd_max.gaussian_table(bits))
    flat = torch.zeros(0, dtype=torch.int64)
    dropped = 0
    if cap > 0 and (outlier_threshold is not None or d_res > 0):
        zf = z.flatten()
        sel = zf.abs() > outlier_threshold if outlier_threshold is not None else torch.zeros_like(zf, dtype=torch.bool)
        if d_res > 0:
            top = z.abs().topk(min(d_res, L), dim=1).indices + torch.arange(n)[:, None] * L
            sel[top.flatten()] = True
        flat = sel.nonzero()[:, 0]  # row-major = row order
        dropped = max(0, flat.numel() - cap)
        if dropped:  # over budget: keep the largest |z|, degrade instead of failing the seal
            keep = torch.sort(zf[flat].abs(), descending=True, stable=True).indices[:cap]
            flat = flat[keep].sort().values
    return dict(d_eff=d, k=k, bits=bits, outliers=flat.numel(), metric=METRIC_MSE, seed=seed, block_scale=s,
                revision=V13_REVISION, basis=basis, mean=mean, centres=centres, seg=seg, t=t, norm=norm,
                codes=codes, out_count=torch.bincount(flat // L, minlength=n), out_idx=flat % L,
                out_val=z.flatten()[flat].half(), dropped=dropped)


def pack_stream(p: dict, layout: StreamLayout) -> torch.Tensor:
    """Fields (as from :func:`encode_parts`) -> uint8 [layout.size]."""
    n, D, d, k, L, bits, seg_bits, cap = _geom(layout)
    slot = torch.zeros(layout.size, dtype=torch.uint8)

    def put(name, t):
        f, b = layout[name], t.contiguous().view(torch.uint8).flatten()
        if b.numel() != f.nbytes:
            raise ValueError(f"v13 field {name}: {b.numel()} B, layout says {f.nbytes} B")
        slot[f.offset:f.offset + f.nbytes] = b

    hdr = _HDR.pack(V13_MAGIC, p["d_eff"], p["k"], p["bits"], p["outliers"], p["metric"], p["seed"],
                    p["block_scale"], p["revision"])
    put("header", torch.frombuffer(bytearray(hdr), dtype=torch.uint8))
    for name in ("basis", "mean", "centres", "t", "norm"):
        put(name, p[name])
    put("seg", bitpack.pack(p["seg"][None], seg_bits))
    put("residual", bitpack.pack(p["codes"], bits))
    if cap > 0:
        m = p["out_idx"].numel()
        ent = torch.zeros(cap, 2, dtype=torch.int16)  # little-endian (u16 idx, f16 z) pairs
        ent[:m, 0] = p["out_idx"].to(torch.int16)
        ent[:m, 1] = p["out_val"].view(torch.int16)
        put("outlier_count", p["out_count"].to(torch.int16))
        put("outliers", ent)
    elif p["outliers"]:
        raise ValueError("v13: outliers given but the stream has no outlier budget")
    return slot


def unpack_stream(slot: torch.Tensor, layout: StreamLayout) -> dict:
    """uint8 [layout.size] -> fields (inverse of :func:`pack_stream`), validating the header."""
    n, D, d, k, L, bits, seg_bits, cap = _geom(layout)
    if slot.dtype != torch.uint8 or tuple(slot.shape) != (layout.size,):
        raise ValueError(f"v13 slot must be uint8 [{layout.size}], got {slot.dtype} {list(slot.shape)}")
    hf = layout["header"]
    magic, *vals = _HDR.unpack(slot[hf.offset:hf.offset + hf.nbytes].numpy().tobytes())
    p = dict(zip(("d_eff", "k", "bits", "outliers", "metric", "seed", "block_scale", "revision"), vals))
    want = dict(d_eff=d, k=k, bits=bits, metric=METRIC_MSE, revision=V13_REVISION)
    bad = {kk: p[kk] for kk, v in want.items() if p[kk] != v}
    if magic != V13_MAGIC or bad or p["outliers"] > cap:
        raise ValueError(f"v13 slot header mismatch: magic={magic!r} {bad} outliers={p['outliers']} (cap {cap})")
    for name in ("basis", "mean", "centres", "t", "norm"):
        p[name] = layout[name].view(slot)
    p["seg"] = bitpack.unpack(layout["seg"].view(slot)[None], seg_bits, n)[0]
    p["codes"] = bitpack.unpack(layout["residual"].view(slot), bits, L).to(torch.uint8)
    if cap > 0:
        p["out_count"] = layout["outlier_count"].view(slot).to(torch.int64) & 0xFFFF
        ent = layout["outliers"].view(slot).view(torch.int16)[:p["outliers"]]
        p["out_idx"], p["out_val"] = ent[:, 0].to(torch.int64) & 0xFFFF, ent[:, 1].view(torch.float16)
    else:
        p["out_count"] = torch.zeros(n, dtype=torch.int64)
        p["out_idx"], p["out_val"] = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float16)
    if int(p["out_count"].sum()) != p["outliers"] or (p["out_idx"] >= L).any() or (p["seg"] >= k).any():
        raise ValueError("v13 slot corrupt: outlier counts/indices or segment ids out of range")
    return p


def decode_parts(p: dict, layout: StreamLayout) -> torch.Tensor:
    n, D, d, k, L, bits, seg_bits, cap = _geom(layout)
    H, sg = _wht(L, p["seed"])
    q = lloyd_max.gaussian_table(bits)[p["codes"].long()]
    q[torch.repeat_interleave(torch.arange(n), p["out_count"]), p["out_idx"]] = p["out_val"].float()
    q = q * p["norm"].float()[:, None]  # always rescale by ||r|| (the seed's inner_product path dropped it)
    r = ((q @ H) * sg)[:, :d] / L
    c = p["t"].float()[:, None] * p["centres"].float()[p["seg"]] + r
    return p["block_scale"] * (p["mean"].float() + c @ p["basis"].float())


def encode_stream(x: torch.Tensor, layout: StreamLayout, seed: int = V13_SEED,
                  outlier_threshold: float | None = None, variance_ratio: float = 1.0,
                  stats: dict | None = None, d_res: int = 0) -> torch.Tensor:
    """One block [n, D] -> uint8 [layout.size]. ``stats`` (if given) receives stored/dropped outlier counts."""
    p = encode_parts(x, layout, seed, outlier_threshold, variance_ratio, d_res)
    if stats is not None:
        stats["outliers"] = stats.get("outliers", 0) + p["outliers"]
        stats["outliers_dropped"] = stats.get("outliers_dropped", 0) + p["dropped"]
    return pack_stream(p, layout)


def decode_stream(slot: torch.Tensor, layout: StreamLayout) -> torch.Tensor:
    """uint8 [layout.size] -> float32 [n, D]."""
    return decode_parts(unpack_stream(slot, layout), layout)


class V13Codec(Codec):
    """Seed v1.3 format (revision 2) on whole 512-token blocks, per KV head; K slot then V slot."""

    family = "v13"
    block_tokens = BLOCK_TOKENS

    def __init__(self, d_eff: int | None = None, k: int = 16, k_bits: int = 3, v_bits: int = 2,
                 k_outlier_frac: float = 0.08, k_outlier_threshold: float | None = 2.0,
                 variance_ratio: float = 1.0, seed: int = V13_SEED, d_res: int = 0):
        if not 0.0 < variance_ratio <= 1.0:
            raise ValueError(f"variance_ratio {variance_ratio} must be in (0, 1]")
        self.d_eff, self.k, self.k_bits, self.v_bits = d_eff, k, k_bits, v_bits
        self.k_outlier_frac, self.k_outlier_threshold = k_outlier_frac, k_outlier_threshold
        self.variance_ratio, self.seed, self.d_res = variance_ratio, seed, d_res
        v13_layout(max(SUPPORTED_HEAD_DIMS), d_eff, k, k_bits, v_bits, k_outlier_frac)  # validate early
        tags = [f"k{k_bits}v{v_bits}"] if (k_bits, v_bits) != (3, 2) else []
        tags += [f"d{d_eff}"] * (d_eff is not None) + [f"c{k}"] * (k != 16)
        if (k_outlier_frac, k_outlier_threshold) != (0.08, 2.0):
            tags.append(f"o{k_outlier_frac:g}t{k_outlier_threshold}")
        tags += [f"vr{variance_ratio:g}"] * (variance_ratio < 1.0) + [f"dres{d_res}"] * (d_res > 0)
        self.name = "_".join(["v13", *tags])
        self.outliers_stored = self.outliers_dropped = 0  # running totals (budget overflow is not an error)

    def layout(self, head_dim: int):
        return v13_layout(head_dim, self.d_eff, self.k, self.k_bits, self.v_bits, self.k_outlier_frac)

    def bytes_per_token_head(self, head_dim: int) -> float:
        return self.layout(head_dim).bytes_per_token_head

    def encode(self, k: torch.Tensor, v: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """One block: k, v [H, 512, D] -> uint8 [H, slot_bytes]. ``layer`` is unused (one global seed)."""
        H, T, D = k.shape
        if T != self.block_tokens or v.shape != k.shape:
            raise ValueError(f"encode takes one {self.block_tokens}-token block, got k {list(k.shape)} v {list(v.shape)}")
        lay, st = self.layout(D), {}
        out = torch.empty(H, lay.slot_bytes, dtype=torch.uint8)
        for h in range(H):
            out[h, :lay.k.size] = encode_stream(k[h], lay.k, self.seed, self.k_outlier_threshold,
                                                self.variance_ratio, st, self.d_res)
            out[h, lay.k.size:] = encode_stream(v[h], lay.v, self.seed, None, self.variance_ratio, st)
        self.outliers_stored += st["outliers"]
        self.outliers_dropped += st["outliers_dropped"]
        return out

    def decode(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [H, slot_bytes] -> (k, v) float32 [H, 512, D]; D is inferred from the slot size."""
        lays = [lay for lay in map(self.layout, SUPPORTED_HEAD_DIMS) if lay.slot_bytes == slots.shape[-1]]
        if not lays:
            raise ValueError(f"no v13 layout of {self.name} has a {slots.shape[-1]} B slot")
        lay = lays[0]
        ks = [decode_stream(s[:lay.k.size], lay.k) for s in slots]
        vs = [decode_stream(s[lay.k.size:], lay.v) for s in slots]
        return torch.stack(ks), torch.stack(vs)

    def roundtrip(self, k, v, layer):
        H, T, D = k.shape
        if T % self.block_tokens:
            raise ValueError(f"T={T} is not a multiple of {self.block_tokens}")
        ok, ov = torch.empty_like(k, dtype=torch.float32), torch.empty_like(v, dtype=torch.float32)
        for b in range(0, T, self.block_tokens):
            sl = slice(b, b + self.block_tokens)
            ok[:, sl], ov[:, sl] = self.decode(self.encode(k[:, sl], v[:, sl], layer))
        return ok, ov
