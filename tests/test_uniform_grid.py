"""Uniform centroid grid (lloyd_max.uniform_table) and the codec option grid="uniform" (names *_uni)."""
import math

import pytest
import torch

from kakeya_kv import format as F
from kakeya_kv import formats, lloyd_max
from kakeya_kv.codecs.kakeya import KakeyaCodec, decode_stream, encode_stream
from kakeya_kv.hadamard import rotation
from kakeya_kv.format import ROTATION_SEED
from tests.test_kakeya_codec import _kv, rel as _rel

# Max (1960), Table II: MSE-optimal uniform quantiser steps for N(0, 1), 4/8/16/32 levels.
MAX_1960 = {2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881}


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_uniform_table_symmetric_uniform_ascending(bits):
    t = lloyd_max.uniform_table(bits).double()
    assert t.shape == (2 ** bits,)
    assert torch.allclose(t, -t.flip(0), atol=1e-6)
    steps = t[1:] - t[:-1]
    assert torch.allclose(steps, torch.full_like(steps, lloyd_max.uniform_delta(bits)), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_uniform_delta_is_the_mse_optimum(bits):
    d = lloyd_max.uniform_delta(bits)
    assert abs(d - MAX_1960[bits]) < 2e-4
    best = lloyd_max.uniform_mse(bits, d)
    assert best < lloyd_max.uniform_mse(bits, d * 0.99) and best < lloyd_max.uniform_mse(bits, d * 1.01)


@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_mse_closed_form_matches_quadrature(bits):
    d = lloyd_max.uniform_delta(bits)
    x = torch.linspace(-12, 12, 400001, dtype=torch.float64)
    n = 2 ** bits
    j = torch.clamp(torch.round(x / d + (n - 1) / 2), 0, n - 1)
    err = (x - (j - (n - 1) / 2) * d).pow(2) * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    assert abs(torch.trapezoid(err, x).item() - lloyd_max.uniform_mse(bits, d)) < 1e-7


def test_uniform_grid_rejects_bad_arguments():
    with pytest.raises(ValueError):
        lloyd_max.uniform_table(9)
    with pytest.raises(ValueError):
        lloyd_max.uniform_table(4, delta=0.0)
    with pytest.raises(ValueError, match="grid"):
        KakeyaCodec(4, 3, grid="companded")


def test_default_codec_keeps_the_lloyd_max_path():
    c = KakeyaCodec(4, 3)
    assert c.grid == "lloyd" and c.k_table is None and c.v_table is None and c.name == "kakeya_k4v3"
    u = KakeyaCodec(4, 3, grid="uniform")
    assert u.name == "kakeya_k4v3_uni"
    assert torch.equal(u.k_table, lloyd_max.uniform_table(4)) and torch.equal(u.v_table, lloyd_max.uniform_table(3))


@pytest.mark.parametrize("kb,vb,factor", [(4, 3, 1.35), (4, 4, 1.35), (3, 2, 1.2)])
def test_uniform_roundtrip_error_close_to_lloyd_max(kb, vb, factor):
    # Gaussian-like data: Lloyd-Max is the optimum, the uniform grid costs a bounded factor
    # (N(0,1) MSE ratio 1.22 at 4 bits, 1.08 at 3, 1.01 at 2).
    k, v = _kv()
    lk, lv = KakeyaCodec(kb, vb).roundtrip(k, v, 0)
    uk, uv = KakeyaCodec(kb, vb, grid="uniform").roundtrip(k, v, 0)
    for ref, lm, un in ((k, lk, uk), (v, lv, uv)):
        assert _rel(lm, ref) <= _rel(un, ref) * 1.02 and _rel(un, ref) < factor * _rel(lm, ref)


@pytest.mark.parametrize("d", [64, 128])
def test_uniform_slot_layout_identical(d):
    k, v = _kv(d=d)
    lm, un = KakeyaCodec(4, 3), KakeyaCodec(4, 3, grid="uniform")
    a, b = lm.encode(k, v, 0), un.encode(k, v, 0)
    assert a.shape == b.shape and a.shape[-1] == F.kakeya_layout(d, 4, 3).slot_bytes
    assert lm.layout(d) == un.layout(d)
    lay = lm.layout(d)
    for st, off in ((lay.k, 0), (lay.v, lay.k.size)):
        for field in ("mean", "scale"):   # table-independent header fields are byte-identical
            f = st[field]
            assert torch.equal(a[..., off + f.offset:off + f.offset + f.nbytes],
                               b[..., off + f.offset:off + f.offset + f.nbytes])
    assert not torch.equal(a, b)          # codes / gains do depend on the grid


def test_uniform_decode_is_affine_in_the_integer_codes():
    # What a lookup-free kernel relies on: y = gain * delta * (j - (2^b - 1)/2), so
    # q'.y = gain * delta * (q'.j - (2^b - 1)/2 * sum(q')).
    from kakeya_kv import bitpack
    k, _ = _kv(h=1, t=512, d=64)
    lay = F.kakeya_layout(64, 4, 3).k
    tab = lloyd_max.uniform_table(4)
    slot = encode_stream(k.reshape(1, 1, 512, 64), lay, table=tab)
    dec = decode_stream(slot, lay, table=tab)
    gain = lay["gain"].view(slot).float().abs()[0, 0]
    lam = lay["scale"].view(slot).float()[0, 0]
    mean = lay["mean"].view(slot).float()[0, 0]
    j = bitpack.unpack(lay["codes"].view(slot), 4, 64)[0, 0].float()
    uncentred = torch.signbit(lay["gain"].view(slot))[0, 0]
    q = torch.randn(64, generator=torch.Generator().manual_seed(1))
    qr = (q / lam) @ rotation(64, ROTATION_SEED).T          # q' = R (q / lambda)
    delta = lloyd_max.uniform_delta(4)
    base = torch.where(uncentred, 0.0, (q * mean).sum())
    fast = gain * delta * (j @ qr - 7.5 * qr.sum()) + base
    assert torch.allclose(fast, dec[0, 0] @ q, rtol=1e-4, atol=1e-3)


def test_registry_parses_uni_names():
    got = formats.by_name(30, ["kakeya_k4v3_uni", "kakeya_k3v2_uni", "kakeya_k4v3"])
    names = [f.name for f in got]
    assert names == ["bf16", "kakeya_k4v3_uni", "kakeya_k3v2_uni", "kakeya_k4v3"]
    assert got[1].codec.grid == "uniform" and got[3].codec.grid == "lloyd"
    with pytest.raises(SystemExit):
        formats.by_name(30, ["kakeya_k4v3_lm"])
