"""Codec-level CPU re-implementations of the KV-cache formats Kakeya is compared against.

Each codec reproduces what the product stores for one (token, KV head) and what
its attention kernel effectively reads back, in float32 PyTorch:

* vLLM 0.26 TurboQuant presets (``turboquant_k8v4``, ``turboquant_4bit_nc``,
  ``turboquant_k3v4_nc``, ``turboquant_3bit_nc``),
* vLLM ``int4_per_token_head`` (randomized Hadamard + asymmetric int4),
* vLLM ``fp8_e4m3`` with the default per-tensor scale 1.0,
* TurboQuant+ (llama.cpp fork) ``turbo2`` / ``turbo3`` / ``turbo4``.

Kernels that attend in a rotated domain (TurboQuant MSE keys, int4, turbo*) are
modelled by rotate -> quantize -> dequantize -> inverse rotate: attention is
invariant to an orthogonal rotation applied to both q and k (and to v with the
output rotated back), so the decoded K/V here give the same attention output.
Every choice that the sources leave open is listed in docs/COMPETITORS.md.
"""
from __future__ import annotations

import math

import torch

from ..hadamard import rotation, signs, sylvester
from ..lloyd_max import gaussian_table, quantize
from .base import Codec

# SplitMix64 seeds for the sign flips. The products use their own generators
# (vLLM int4: torch.bernoulli seeded 0x9E3779B9; TurboQuant+: fixed seed-42
# arrays); any fixed ±1 vector is statistically equivalent, so we derive ours
# from the project PRNG and document the seeds.
INT4_RHT_SEED = 0x9E3779B9
TURBO_SEED_PRE = 42  # D2, applied before the Hadamard
TURBO_SEED_POST = 43  # D1, applied after it

FP8_E4M3_MAX = 448.0


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    # vLLM converts with saturation (CUDA __NV_SATFINITE, Triton satfinite); clamp
    # explicitly so we do not depend on torch's out-of-range cast behaviour.
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def _nearest_ties_up(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest centroid, a value exactly on a midpoint going to the upper one.

    Both vLLM's binary search (``y >= mid``) and the TurboQuant+ kernels
    (``idx += rv >= M[i]``) break ties upward; the shared ``quantize`` breaks
    them downward. Tables are exactly symmetric, so mirroring swaps the rule.
    """
    return (len(table) - 1) - quantize(-x, table).long()


def _vllm_asym_minmax(v: torch.Tensor, bits: int) -> torch.Tensor:
    """TurboQuant value path (triton_turboquant_store._store_quantized_value).

    Indices use the fp32 min/scale; the slot stores them as fp16 and decode
    reads the fp16 copies (idx * scale16 + zero16).
    """
    vmin = v.amin(-1, keepdim=True)
    vmax = v.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((vmax - vmin) / levels).clamp_min(1e-8)  # kernel floor; max == min gives idx 0
    idx = torch.floor((v - vmin) / scale + 0.5).clamp(0, levels)  # int(x + 0.5), x >= 0
    return idx * _fp16(scale) + _fp16(vmin)


def pack_scale_zp(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """int4_per_token_head store: the 4-bit zero point replaces the low 4 mantissa bits of the fp32 scale."""
    bits = scale.float().contiguous().view(torch.int32)
    return ((bits & -16) | (zp.to(torch.int32) & 0xF)).view(torch.float32)


def unpack_scale_zp(stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_per_token_head read: zp = low 4 bits; the scale used is the stored float with them cleared."""
    bits = stored.contiguous().view(torch.int32)
    return (bits & -16).view(torch.float32), (bits & 0xF).float()


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # The int4 kernel rounds with where(x >= 0, int(x + .5), int(x - .5)), int() truncating.
    return torch.where(x >= 0, torch.trunc(x + 0.5), torch.trunc(x - 0.5))


def _int4_asym(y: torch.Tensor) -> torch.Tensor:
    """int4_per_token_head write (_reshape_cache_int4_kernel) then dequant as the read kernel sees it."""
    ymin = y.amin(-1, keepdim=True)
    ymax = y.amax(-1, keepdim=True)
    scale = ((ymax - ymin) / 15.0).clamp_min(1e-6)
    zp = _round_half_away(-ymin / scale).clamp(0, 15)
    q = _round_half_away(y * (1.0 / scale) + zp).clamp(0, 15)  # indices use the unpacked scale
    scale_read, zp_read = unpack_scale_zp(pack_scale_zp(scale, zp))
    return (q - zp_read) * scale_read


class VLLMTurboQuant(Codec):
    """vLLM 0.26 ``turboquant_*`` presets (integration notes B1/B2).

    K: fp8 e4m3 cast without scale (k8v4), or MSE mode: fp16 ‖k‖, plain
    orthonormal Sylvester Hadamard, Lloyd-Max centroids for N(0, 1/D), optional
    norm correction (centroid vector rescaled to unit norm at decode).
    V: per (token, head) asymmetric min/max uniform quantisation, fp16 scale/zero.
    """

    family = "turboquant"
    block_tokens = 1

    def __init__(self, name: str, key_bits: int, value_bits: int, norm_correction: bool):
        self.name, self.key_bits, self.value_bits = name, key_bits, value_bits
        self.key_fp8 = key_bits == 8
        self.norm_correction = norm_correction

    def bytes_per_token_head(self, head_dim: int) -> float:
        key = head_dim if self.key_fp8 else math.ceil(head_dim * self.key_bits / 8) + 2
        value = math.ceil(head_dim * self.value_bits / 8) + 4
        slot = key + value
        return float(slot + (slot & 1))  # slot rounded up to an even byte count

    def _mse_key(self, k: torch.Tensor) -> torch.Tensor:
        d = k.shape[-1]
        r = rotation(d, None)  # symmetric, one matrix for all layers, no sign flips
        norm = k.norm(dim=-1, keepdim=True)
        y = (k / (norm + 1e-8)) @ r.T  # store launcher: x_hat = k / (norms + 1e-8)
        table = gaussian_table(self.key_bits) / math.sqrt(d)
        c = table[_nearest_ties_up(y, table)]
        if self.norm_correction:
            c = c / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16)
        return (_fp16(norm) * c) @ r

    def roundtrip(self, k, v, layer):
        k_hat = _fp8_e4m3(k) if self.key_fp8 else self._mse_key(k)
        return k_hat, _vllm_asym_minmax(v, self.value_bits)


class Int4PerTokenHead(Codec):
    """vLLM ``int4_per_token_head``: RHT (signs, then unnormalised Hadamard) on K and V,
    asymmetric int4 per (token, head), fp32 scale carrying the 4-bit zero point."""

    name = family = "int4_per_token_head"
    block_tokens = 1
    self_exact = False   # TRITON_ATTN: written to the cache before attention

    def bytes_per_token_head(self, head_dim: int) -> float:
        return 2.0 * (head_dim / 2 + 4)  # nibbles + fp32 scale, for K and for V

    @staticmethod
    def _one(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        h = sylvester(d).float()
        s = signs(d, INT4_RHT_SEED).float()
        # single_rht(x.float()).to(x.dtype): y = H (s * x), norm sqrt(d), rounded to
        # the model dtype (bf16) before the write kernel reads it back as fp32.
        y = ((x * s) @ h).to(torch.bfloat16).float()
        # Attention runs in the rotated domain; the output is inverse-RHT'd and divided by d.
        return (_int4_asym(y) @ h) * s / d

    def roundtrip(self, k, v, layer):
        return self._one(k), self._one(v)


class FP8E4M3(Codec):
    """vLLM ``fp8_e4m3`` with no checkpoint scales: per-tensor scale 1.0, saturating cast."""

    name = "fp8_e4m3"
    family = "fp8"
    block_tokens = 1
    self_exact = False   # TRITON_ATTN: written to the cache before attention
    query_quant = staticmethod(lambda q: _fp8_e4m3(q))   # static per-tensor q_scale 1.0 (attention.py query_quant)

    def bytes_per_token_head(self, head_dim: int) -> float:
        return 2.0 * head_dim

    def roundtrip(self, k, v, layer):
        return _fp8_e4m3(k), _fp8_e4m3(v)


class TurboQuantPlus(Codec):
    """TurboQuant+ ``turboN`` (llama.cpp fork), PolarQuant on K and V, no QJL.

    Per rotation group (= head_dim): norm, normalise, WHT with random signs
    (D1 H D2), nearest Lloyd-Max centroid for N(0, 1/d), store
    fp16(‖x‖ / ‖centroid vector‖), decode centroid × stored norm, inverse rotate.
    """

    family = "turboquant_plus"
    block_tokens = 1
    BITS_PER_VALUE = {2: 2.125, 3: 3.125, 4: 4.25}  # production block-128 layouts

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"turbo{bits}"

    def bytes_per_token_head(self, head_dim: int) -> float:
        return 2 * head_dim * self.BITS_PER_VALUE[self.bits] / 8

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        r = rotation(d, TURBO_SEED_PRE)  # H D2 / sqrt(d)
        s1 = signs(d, TURBO_SEED_POST).float()  # D1
        norm = x.norm(dim=-1, keepdim=True)
        unit = x * torch.where(norm > 1e-10, 1.0 / norm, torch.zeros_like(norm))
        z = (unit @ r.T) * s1
        table = gaussian_table(self.bits) / math.sqrt(d)
        c = table[_nearest_ties_up(z, table)]
        recon = c.norm(dim=-1, keepdim=True)
        stored = _fp16(torch.where(recon > 1e-10, norm / recon, norm))
        return ((c * stored) * s1) @ r

    def roundtrip(self, k, v, layer):
        return self._one(k), self._one(v)


def competitor_codecs() -> list[Codec]:
    """All re-implemented competitor formats (11 codecs)."""
    return [
        VLLMTurboQuant("turboquant_k8v4", 8, 4, norm_correction=False),
        VLLMTurboQuant("turboquant_4bit_nc", 4, 4, norm_correction=True),
        VLLMTurboQuant("turboquant_k3v4_nc", 3, 4, norm_correction=True),
        VLLMTurboQuant("turboquant_3bit_nc", 3, 3, norm_correction=True),
        Int4PerTokenHead(),
        FP8E4M3(),
        TurboQuantPlus(2),
        TurboQuantPlus(3),
        TurboQuantPlus(4),
    ]
