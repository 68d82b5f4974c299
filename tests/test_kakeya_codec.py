import torch
import pytest
from hypothesis import given, settings, strategies as st

from kakeya_kv import format as F
from kakeya_kv.codecs.exact import ExactCodec
from kakeya_kv.codecs.kakeya import KakeyaCodec, decode_stream, encode_stream


def _kv(h=2, t=1024, d=64, seed=0, offset=5.0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(d, generator=g) * 3 + 0.1
    k = torch.randn(h, t, d, generator=g) * scales + torch.randn(d, generator=g) * offset
    v = torch.randn(h, t, d, generator=g)
    return k.bfloat16().float(), v.bfloat16().float()


def rel(a, b):
    return ((a - b).pow(2).sum() / (b - b.mean(-2, keepdim=True)).pow(2).sum()).item()


def test_exact_mode_is_bit_exact():
    k, v = _kv(d=128)
    c = ExactCodec()
    slots = c.encode(k, v, 0)
    assert slots.shape == (2, 2, F.exact_layout(128).slot_bytes)
    kh, vh = c.decode(slots, 128)
    assert torch.equal(kh, k) and torch.equal(vh, v)


@pytest.mark.parametrize("kb,bound", [(2, 0.15), (3, 0.045), (4, 0.013), (5, 0.004), (6, 0.0012)])
def test_kakeya_error_bounds_follow_lloyd_max(kb, bound):
    k, v = _kv()
    kh, vh = KakeyaCodec(kb, kb).roundtrip(k, v, 0)
    assert rel(kh, k) < bound and rel(vh, v) < bound


def test_centering_removes_dc_offsets():
    # Large per-channel offsets: centred coding must be much better than uncentred.
    k, v = _kv(offset=20.0)
    on = rel(KakeyaCodec(4, 4).roundtrip(k, v, 0)[0], k)
    off = rel(KakeyaCodec(4, 4, center=False).roundtrip(k, v, 0)[0], k)
    assert on * 5 < off


def test_shaping_helps_unequal_channels():
    k, v = _kv(offset=0.0)
    on = rel(KakeyaCodec(3, 3).roundtrip(k, v, 0)[0], k)
    off = rel(KakeyaCodec(3, 3, shape=False).roundtrip(k, v, 0)[0], k)
    assert on < off


def test_encode_is_deterministic_and_sized():
    k, v = _kv()
    c = KakeyaCodec(4, 3)
    a, b = c.encode(k, v, 0), c.encode(k, v, 0)
    assert torch.equal(a, b)
    assert a.shape[-1] == F.kakeya_layout(64, 4, 3).slot_bytes


def test_decode_reencode_is_stable():
    # Re-encoding a decoded block must not drift far (idempotence up to fp16 gains).
    k, v = _kv()
    st = F.kakeya_layout(64, 4, 3).k
    x = k[0, :512]
    x1 = decode_stream(encode_stream(x, st), st)
    x2 = decode_stream(encode_stream(x1, st), st)
    assert rel(x2, x1) < 0.02


def test_fp16_range_large_magnitude():
    k, v = _kv()
    k = k * 3000  # |k| up to ~1e5: mean is fp32, gains stay in fp16 range
    kh, _ = KakeyaCodec(4, 3).roundtrip(k, v, 0)
    assert torch.isfinite(kh).all() and rel(kh, k) < 0.013


@given(d=st.sampled_from([64, 128, 256]), h=st.integers(1, 3), scale=st.floats(1e-3, 1e3),
       kb=st.integers(2, 6), vb=st.integers(2, 6), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_kakeya_property_random_shapes(d, h, scale, kb, vb, seed):
    k, v = _kv(h=h, t=512, d=d, seed=seed)
    k, v = k * scale, v * scale
    kh, vh = KakeyaCodec(kb, vb).roundtrip(k, v, 0)
    assert kh.shape == k.shape and torch.isfinite(kh).all() and torch.isfinite(vh).all()
    assert rel(kh, k) < 0.2 and rel(vh, v) < 0.2


def test_constant_block_is_exact():
    x = torch.full((1, 512, 64), 3.0)
    kh, vh = KakeyaCodec(4, 3).roundtrip(x, x, 0)
    assert torch.allclose(kh, x) and torch.allclose(vh, x)
