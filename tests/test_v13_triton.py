"""v13 in the vLLM data path (kernels/v13_seal.py, kernels/v13_triton.py) against the CPU reference codec.

Tolerances, and why:
* seal: the batched encoder runs the reference's float32 ops in the same order, so on the CPU the slot bytes
  are identical (asserted). On a GPU cuSOLVER's QR/SVD and fp32 reductions round differently, which can flip
  codes at decision boundaries; that is bounded by the decode check, not by bytes (test_gpu_seal_close).
* decode: float32 math like the reference, output stored as bf16 (what the attention reads, as the bf16 tail):
  |x - ref| <= 2^-8 |ref| + 1e-5 max|ref|: bf16 round-to-nearest is <= 2^-9 relative, the rest is room for
  fp32 matmul order (~1e-6 relative).
* attention: precise mode over bf16 pages vs float64 softmax on reference-decoded K/V: rel. error < 1e-2, the
  bound test_kernels uses for exact bf16 pages (bf16 K/V/output rounding).
"""
import math

import numpy as np
import pytest
import torch

from kakeya_kv.codecs.v13 import decode_stream, encode_stream
from kakeya_kv.format import v13_layout
from tests.kernel_cases import build_paged, kv_data, ref_attention, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("one_thread")


def edge_blocks(d, g):
    """Blocks that exercise the encoder's branches: heavy tails (outlier budget overflow at low thresholds),
    constant (no valid K-means rows, zero residuals), 5 non-zero rows (< k centres), |x| >> fp16 (block scale)."""
    return torch.stack([torch.randn(512, d, generator=g) ** 3, torch.full((512, d), 3.0),
                        torch.cat([torch.randn(5, d, generator=g), torch.zeros(507, d)]),
                        torch.randn(512, d, generator=g) * 1e4]).bfloat16()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("thr", [2.0, 0.5])
def test_batched_seal_bytes_equal_reference(d, thr):
    from kakeya_kernels.v13_seal import encode_blocks
    g = torch.Generator().manual_seed(d)
    lay = v13_layout(d)
    x = torch.cat([edge_blocks(d, g), kv_data(2, 512, d, g)[0]])
    total_dropped = 0
    for st, t in ((lay.k, thr), (lay.v, None)):
        out, dropped = encode_blocks(x, st, outlier_threshold=t)
        for b in range(x.shape[0]):
            stats = {}
            ref = encode_stream(x[b], st, outlier_threshold=t, stats=stats)
            assert torch.equal(out[b], ref), f"block {b} ({st.bits}-bit): {(out[b] != ref).sum()} bytes differ"
            assert int(dropped[b]) == stats["outliers_dropped"]
        total_dropped += int(dropped.sum())
    assert (total_dropped > 0) == (thr == 0.5)   # the overflow branch ran


def _close_to_ref(got, ref):
    tol = 2.0 ** -8 * ref.abs() + 1e-5 * ref.abs().max()
    assert ((got.float() - ref).abs() <= tol).all(), float(((got.float() - ref).abs() - tol).max())


@pytest.mark.parametrize("d,kb,vb", [(64, 3, 2), (128, 3, 2), (64, 4, 1)])
def test_triton_decode_matches_reference(d, kb, vb):
    from kakeya_kernels.v13_triton import V13Kernels
    g = torch.Generator().manual_seed(7)
    kk = V13Kernels(d, kb, vb, DEV)
    k, v = kv_data(2, 512, d, g)
    k[1] = (torch.randn(512, d, generator=g) ** 3).bfloat16()     # outlier-heavy K head
    slots = torch.zeros(1, 2, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
    kk.seal(k[None].to(DEV), v[None].to(DEV), slots)
    dk, dv = kk.decode(slots)
    ks = kk.lay.k.size
    for h in range(2):
        s = slots[0, h].cpu()
        _close_to_ref(dk[0, h].cpu(), decode_stream(s[:ks], kk.lay.k))
        _close_to_ref(dv[0, h].cpu(), decode_stream(s[ks:], kk.lay.v))
    assert int(slots[0, 1, 16:20].view(torch.int32)) > 0   # the outlier override path ran


def build_v13(lens, hkv, d, g, tail_rows=512, attn="fused"):
    """Requests of given lengths: sealed blocks in shuffled pages (v13 slots), tails exact; reference K/V decoded
    from the very bytes the seal wrote, by the CPU reference decoder."""
    from kakeya_kernels.v13_triton import V13Kernels
    kk = V13Kernels(d, 3, 2, DEV, attn=attn)
    ks = kk.lay.k.size

    def ref_decode(slots):          # [ns, Hkv, slot_bytes] -> K, V [Hkv, ns * 512, D]
        dec = lambda st, lo, hi: torch.stack([torch.cat([decode_stream(slots[b, h, lo:hi], st)
                                                         for b in range(slots.shape[0])]) for h in range(hkv)])
        return dec(kk.lay.k, 0, ks), dec(kk.lay.v, ks, None)

    sc, refs = build_paged(kk, lens, hkv, d, g, ref_decode, DEV, tail_rows=tail_rows)
    return kk, sc, refs, np.array([L // 512 for L in lens])


@pytest.mark.parametrize("d,attn", [(64, "fused"), (128, "fused"), (64, "scratch"), (128, "scratch")])
def test_v13_decode_attention_parity(d, attn):
    """One query per request at its last position: 1 sealed block + 37 tail rows, none sealed, 2 sealed + 300."""
    g = torch.Generator().manual_seed(d + 1)
    lens, hkv, gqa = [549, 100, 1324], 2, 3
    kk, sc, refs, ns = build_v13(lens, hkv, d, g, attn=attn)
    q = torch.randn(len(lens), hkv * gqa, d, generator=g).bfloat16().to(DEV)
    pos = torch.tensor([L - 1 for L in lens], dtype=torch.int32, device=DEV)
    out = kk.attention(q, pos, torch.arange(len(lens), dtype=torch.int32, device=DEV), sc["cache"], sc["block_table"],
                       sc["n_sealed"], sc["seq_lens"], sc["tail_k"], sc["tail_v"], sc["tail_slot"], d ** -0.5,
                       precise=True, n_sealed_host=ns, splits=2)
    for r, L in enumerate(lens):
        assert rel_err(out[r].float(), ref_attention(q[r], L - 1, refs[r], gqa)) < 1e-2


@pytest.mark.parametrize("attn,precise", [("fused", True), ("fused", False), ("scratch", True)])
def test_v13_chunked_prefill_parity(attn, precise):
    """A chunk of queries (causal inside the tail) after sealed blocks (scratch: the read-back n_sealed path)."""
    d, hkv, gqa = 64, 1, 3
    g = torch.Generator().manual_seed(5)
    lens = [1024 + 77]
    kk, sc, refs, _ = build_v13(lens, hkv, d, g, attn=attn)
    pos = torch.arange(1024, 1024 + 77, 19, dtype=torch.int32)
    q = torch.randn(len(pos), hkv * gqa, d, generator=g).bfloat16().to(DEV)
    out = kk.attention(q, pos.to(DEV), torch.zeros(len(pos), dtype=torch.int32, device=DEV), sc["cache"],
                       sc["block_table"], sc["n_sealed"], sc["seq_lens"], sc["tail_k"], sc["tail_v"], sc["tail_slot"],
                       d ** -0.5, precise=precise, splits=3)
    for i, p in enumerate(pos.tolist()):
        assert rel_err(out[i].float(), ref_attention(q[i], p, refs[0], gqa)) < 1e-2


def test_scratch_is_bounded_and_reused():
    """The scratch holds the blocks one call attends (not the cache), is reused, and refuses past its cap."""
    from kakeya_kernels.v13_triton import V13Kernels
    g = torch.Generator().manual_seed(9)
    kk, sc, _, ns = build_v13([600, 40], 1, 64, g, attn="scratch")
    q = torch.randn(2, 3, 64, generator=g).bfloat16().to(DEV)
    args = (q, sc["seq_lens"].sub(1), torch.arange(2, dtype=torch.int32, device=DEV), sc["cache"], sc["block_table"],
            sc["n_sealed"], sc["seq_lens"], sc["tail_k"], sc["tail_v"], sc["tail_slot"], 0.125)
    kk.attention(*args, n_sealed_host=ns, splits=1)
    first = kk.scratch.buf
    assert first.shape[0] < 2 * (int(ns.sum()) + 2)    # 1 sealed + 2 tail pages (+ growth headroom)
    kk.attention(*args, n_sealed_host=ns, splits=1)
    assert kk.scratch.buf is first
    small = V13Kernels(64, 3, 2, DEV, scratch_mib=0, attn="scratch")
    with pytest.raises(RuntimeError, match="KAKEYA_V13_SCRATCH_MIB"):
        small.attention(*args, n_sealed_host=ns, splits=1)


def test_seal_refuses_calibration_weights():
    from kakeya_kernels.v13_triton import V13Kernels
    kk = V13Kernels(64, 3, 2, DEV)
    x = torch.zeros(1, 1, 512, 64, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="calibrated"):
        kk.seal(x, x, torch.zeros(1, 1, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV),
                k_weight=torch.ones(1, 64, device=DEV))


def test_v13_kernels_compile_for_sm90():
    """benchmarks/kernels/v13_compile_check.py --quick: the fused attention (D=128, 16-row tiles; D=64, 4-row
    tiles) and the decode kernel compile for sm_90 within the shared-memory limit, without a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("Triton without its CUDA binaries")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "v13_compile_check.py", "--quick"], cwd=root / "benchmarks" / "kernels",
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "3/3 compile" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_seal_close(d):
    """GPU seal (cuSOLVER, fp32 reductions in another order) decodes close to the CPU reference encoding of the
    same blocks: its reconstruction error may differ from the reference's by at most 5 % (code flips at decision
    boundaries only). Not yet run on a GPU."""
    from kakeya_kernels.v13_triton import V13Kernels
    g = torch.Generator().manual_seed(d)
    kk = V13Kernels(d, 3, 2, "cuda")
    k, v = kv_data(4, 512, d, g)
    slots = torch.zeros(1, 4, kk.lay.slot_bytes, dtype=torch.uint8, device="cuda")
    kk.seal(k[None].cuda(), v[None].cuda(), slots)
    dk, _ = kk.decode(slots)
    for h in range(4):
        ref = decode_stream(encode_stream(k[h], kk.lay.k, outlier_threshold=2.0), kk.lay.k)
        e_gpu = (dk[0, h].float().cpu() - k[h].float()).norm()
        e_ref = (ref - k[h].float()).norm()
        assert e_gpu <= 1.05 * e_ref + 1e-3 * math.sqrt(k[h].float().pow(2).sum())
