"""Reference codec of the default ``kakeya`` block format (see kakeya_kv.format).

Design (measured on real SmolLM2 KV; numbers in docs/DESIGN.md):
* Block channel mean, stored exactly (fp32): post-RoPE K carries large
  per-channel DC offsets (|mean|/std up to 15) that a per-token rotation
  quantiser (TurboQuant) would spend its bits on. Removing them per 512-token
  block is free in bytes (0.5 B/token at D=64) and exact.
* Per-channel shaping lambda_c = (w_c / v_c)^(1/4) before a random-sign
  Hadamard rotation: with a rotation quantiser the error is white in the
  shaped domain, and this lambda minimises sum_c w_c E[e_c^2] (Cauchy-Schwarz);
  w = 1 without calibration, a RoPE-pair-averaged query energy with a bundle.
* Per-token Lloyd-Max N(0,1) codes + least-squares gain (better than storing
  the norm, which over-scales a coarse code vector).
Everything the decode needs is per block or per token, so attention kernels
can score in the rotated domain (q' = R (q / lambda)) and accumulate values
there, undoing the transform once per block.
"""
from __future__ import annotations

import torch

from .. import bitpack, lloyd_max
from ..format import BLOCK_TOKENS, ROTATION_SEED, BlockLayout, StreamLayout, kakeya_layout
from ..hadamard import rotation
from .base import Codec

_FP16_MAX = 65504.0
GRIDS = ("lloyd", "uniform", "k_uniform")   # centroid tables: Lloyd-Max N(0,1) (the default), lloyd_max.uniform_table
#                                            for both streams, or uniform for K only (what the int8 K-score path reads)


def shaping(var: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """lambda = (w / v)^(1/4), normalised to geometric mean 1, fp16-rounded."""
    v = var + 1e-6 * var.mean(-1, keepdim=True) + 1e-12
    w = torch.ones_like(v) if weight is None else weight.expand_as(v)
    lam = (w / v) ** 0.25
    lam = lam / lam.log().mean(-1, keepdim=True).exp()
    return lam.clamp(1e-3, 1e3).half().float()


def encode_stream(x: torch.Tensor, st: StreamLayout, weight: torch.Tensor | None = None,
                  shape: bool = True, center: bool = True, sink: bool = True,
                  table: torch.Tensor | None = None, return_u: bool = False):
    """x float32 [..., n, D] -> uint8 [..., st.size] (and the normalised coordinates if return_u).

    ``table``: Lloyd-Max centroids from a calibration bundle (default: the N(0,1) table);
    the decoder must be given the same table.
    """
    *lead, n, d = x.shape
    mean = x.mean(-2) if center else torch.zeros(*lead, d)
    xc = x - mean[..., None, :]
    lam = shaping(xc.pow(2).mean(-2), weight) if shape else torch.ones(*lead, d)
    # Tokens far from the block mean relative to their own norm (attention
    # sinks: small-norm, atypical, yet up to half the attention mass) are coded
    # uncentred; the gain's sign bit carries that choice.
    raw = (x * lam[..., None, :]).pow(2).sum(-1)
    cen = (xc * lam[..., None, :]).pow(2).sum(-1)
    uncentred = raw < cen if (center and sink) else torch.zeros(*lead, n, dtype=torch.bool)
    xc = torch.where(uncentred[..., None], x, xc)
    z = (xc * lam[..., None, :]) @ rotation(d, ROTATION_SEED).T
    rms = z.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    table = lloyd_max.gaussian_table(st.bits) if table is None else table
    u = z / rms
    idx = lloyd_max.quantize(u, table)
    c = table[idx.long()]
    gain = (z * c).sum(-1) / c.pow(2).sum(-1).clamp_min(1e-30)
    gain = torch.where(uncentred, -gain, gain)
    slot = torch.zeros(*lead, st.size, dtype=torch.uint8)
    _put(slot, st["mean"], mean.float())
    _put(slot, st["scale"], lam.half())
    _put(slot, st["gain"], gain.clamp(-_FP16_MAX, _FP16_MAX).half())
    _put(slot, st["codes"], bitpack.pack(idx, st.bits))
    return (slot, u) if return_u else slot


def decode_stream(slot: torch.Tensor, st: StreamLayout, table: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [..., st.size] -> float32 [..., n, D]."""
    mean = st["mean"].view(slot).float()
    lam = st["scale"].view(slot).float()
    gain16 = st["gain"].view(slot)
    uncentred = torch.signbit(gain16)
    gain = gain16.float().abs()
    d = mean.shape[-1]
    idx = bitpack.unpack(st["codes"].view(slot), st.bits, d)
    table = lloyd_max.gaussian_table(st.bits) if table is None else table
    y = table[idx] * gain[..., None]
    base = torch.where(uncentred[..., None], 0.0, mean[..., None, :])
    return base + (y @ rotation(d, ROTATION_SEED)) / lam[..., None, :]


def _put(slot: torch.Tensor, f, value: torch.Tensor) -> None:
    raw = value.contiguous().view(torch.uint8).reshape(*slot.shape[:-1], f.nbytes)
    slot[..., f.offset:f.offset + f.nbytes] = raw


class KakeyaCodec(Codec):
    family = "kakeya"
    block_tokens = BLOCK_TOKENS

    def __init__(self, k_bits: int = 4, v_bits: int = 3, shape: bool = True, center: bool = True,
                 sink: bool = True, k_weights: dict[int, torch.Tensor] | None = None,
                 k_table: torch.Tensor | None = None, v_table: torch.Tensor | None = None,
                 v_weights: dict[int, torch.Tensor] | None = None, name: str | None = None,
                 grid: str = "lloyd"):
        if grid not in GRIDS:
            raise ValueError(f"KakeyaCodec grid must be one of {GRIDS}, got {grid!r}")
        self.k_bits, self.v_bits = k_bits, v_bits
        self.grid = grid
        # grid="uniform": the same bytes decoded with a uniform centroid grid (lloyd_max.uniform_table);
        # explicit tables (calibration) still win.
        if grid in ("uniform", "k_uniform"):
            k_table = lloyd_max.uniform_table(k_bits) if k_table is None else k_table
        if grid == "uniform":
            v_table = lloyd_max.uniform_table(v_bits) if v_table is None else v_table
        self.k_table, self.v_table = k_table, v_table
        self.shape, self.center, self.sink = shape, center, sink
        self.k_weights = k_weights or {}
        self.v_weights = v_weights or {}
        suffix = ("" if shape else "_noshape") + ("" if center else "_nocenter") + ("" if sink else "_nosink")
        suffix += {"lloyd": "", "uniform": "_uni", "k_uniform": "_kuni"}[grid]
        self.name = name or f"kakeya_k{k_bits}v{v_bits}{suffix}"

    @classmethod
    def from_bundle(cls, tensors: dict, k_bits: int = 4, v_bits: int = 3, use_weights: bool = True,
                    use_tables: bool = True, name: str | None = None) -> "KakeyaCodec":
        """Codec with a calibration bundle's K shaping weights and/or fitted tables."""
        w = {int(k.split(".")[1]): t for k, t in tensors.items() if k.startswith("k_weight.")} if use_weights else None
        kt = tensors.get(f"k_table.b{k_bits}") if use_tables else None
        vt = tensors.get(f"v_table.b{v_bits}") if use_tables else None
        tag = "_cal" + ("w" if w else "") + ("t" if kt is not None or vt is not None else "")
        return cls(k_bits, v_bits, k_weights=w, k_table=kt, v_table=vt, name=name or f"kakeya_k{k_bits}v{v_bits}{tag}")

    def layout(self, head_dim: int) -> BlockLayout:
        return kakeya_layout(head_dim, self.k_bits, self.v_bits)

    def bytes_per_token_head(self, head_dim: int) -> float:
        return self.layout(head_dim).bytes_per_token_head

    def encode(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """k, v [H, T, D] with T = m * 512 -> uint8 [H, m, slot_bytes]."""
        h, t, d = k.shape
        lay = self.layout(d)
        kb = k.reshape(h, t // BLOCK_TOKENS, BLOCK_TOKENS, d)
        vb = v.reshape(h, t // BLOCK_TOKENS, BLOCK_TOKENS, d)
        w = self.k_weights.get(layer)
        ks = encode_stream(kb, lay.k, None if w is None else w[:, None, :], self.shape, self.center, self.sink,
                           self.k_table)
        wv = self.v_weights.get(layer)
        vs = encode_stream(vb, lay.v, None if wv is None else wv[:, None, :], self.shape, self.center, self.sink,
                           self.v_table)
        return torch.cat([ks, vs], -1)

    def decode(self, slots: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layout(head_dim)
        h, m, _ = slots.shape
        k = decode_stream(slots[..., :lay.k.size], lay.k, self.k_table)
        v = decode_stream(slots[..., lay.k.size:], lay.v, self.v_table)
        return k.reshape(h, m * BLOCK_TOKENS, head_dim), v.reshape(h, m * BLOCK_TOKENS, head_dim)

    def roundtrip(self, k, v, layer):
        return self.decode(self.encode(k, v, layer), k.shape[-1])
