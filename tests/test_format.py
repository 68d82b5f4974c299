import pytest
import torch
from hypothesis import given, settings, strategies as st

from kakeya_kv import bitpack, format as F, lloyd_max
from kakeya_kv.prng import SplitMix64
from kakeya_kv.hadamard import rotation


def test_splitmix64_reference_values():
    # Published SplitMix64 outputs for seed 0 (Vigna's reference implementation).
    g = SplitMix64(0)
    assert [g.next_u64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_lloyd_max_constants_match_solver():
    for b in range(1, 5):
        ref = torch.tensor(lloyd_max.solve(b), dtype=torch.float32)
        assert torch.allclose(lloyd_max.gaussian_table(b), ref, atol=2e-6)


def test_rotation_orthonormal():
    for d in (64, 128, 256):
        r = rotation(d, F.ROTATION_SEED)
        assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-5)


@given(bits=st.integers(1, 8), rows=st.integers(1, 5), m=st.sampled_from([8, 16, 64, 128]), seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_bitpack_roundtrip_bit_exact(bits, rows, m, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << bits, (rows, m), generator=g)
    packed = bitpack.pack(idx, bits)
    assert packed.shape[-1] == bitpack.packed_bytes(m, bits)
    assert torch.equal(bitpack.unpack(packed, bits, m), idx)


def test_bitpack_lsb_first_layout():
    # index j at bits [j*b, j*b+b): 3-bit values 1,2,3 -> bits 001 010 011 -> 0b011_010_001
    assert bitpack.pack(torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]]), 3)[0, :2].tolist() == [0b11010001, 0]
    with pytest.raises(ValueError):
        bitpack.pack(torch.tensor([[8]]), 3)


def test_v13_layout_matches_seed_bytes():
    # Seed spec §5: K slot 20 012 / V 11 696 B at D=64; 44 840 / 29 232 at D=128.
    assert (F.v13_layout(64).k.size, F.v13_layout(64).v.size) == (20012, 11696)
    assert (F.v13_layout(128).k.size, F.v13_layout(128).v.size) == (44840, 29232)
    assert F.v13_layout(128).k.offsets()["residual"] == 21040
    assert F.v13_layout(64).k.offsets()["outlier_count"] == 13744


@pytest.mark.parametrize("d", F.SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("kb,vb", [(4, 3), (3, 3), (4, 4), (2, 2), (6, 5)])
def test_kakeya_layout_fields_tile_the_slot(d, kb, vb):
    lay = F.kakeya_layout(d, kb, vb)
    for stl in (lay.k, lay.v):
        end = 0
        for f in stl.fields:
            assert f.offset == end and f.offset % 4 == 0
            end += f.nbytes
        assert stl.size >= end and stl.size % F.ALIGN == 0
    assert lay.k["codes"].nbytes == F.BLOCK_TOKENS * d * kb // 8
    assert lay.page_bytes(8) == 8 * lay.slot_bytes
    assert lay.bytes_per_token_head == lay.slot_bytes / 512


def test_layout_rejects_bad_parameters():
    with pytest.raises(ValueError, match="head_dim"):
        F.kakeya_layout(96)
    with pytest.raises(ValueError, match="bit width"):
        F.kakeya_layout(64, 7, 3)
    with pytest.raises(ValueError, match="unknown block format"):
        F.layout("zip", 64)


def test_exact_layout_is_bf16():
    assert F.exact_layout(128).bytes_per_token_head == 4 * 128
