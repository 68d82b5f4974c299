"""Seal-kernel launch sweep (tile, warps, dot precision) with byte agreement vs the tf32x3 default."""
import torch
from triton.testing import do_bench

from kakeya_kernels.kakeya_triton import KakeyaKernels

for d in (64, 128):
    kk = KakeyaKernels(d, 4, 3, "cuda")
    x = (torch.randn(64, 8, 512, d, device="cuda") * 2 + torch.randn(d, device="cuda") * 4).bfloat16()
    ref = torch.zeros(64, 8, kk.lay.slot_bytes, dtype=torch.uint8, device="cuda")
    kk.seal(x, x, ref)
    for tt in (32, 64, 128):
        for w in (4, 8):
            for prec in ("tf32x3", "tf32"):
                out = torch.zeros_like(ref)
                try:
                    us = do_bench(lambda: kk.seal(x, x, out, tt, w, prec)) * 1e3 / 64
                except Exception as e:  # noqa: BLE001
                    print(d, tt, w, prec, "failed", repr(e)[:80])
                    continue
                agree = (out == ref).float().mean().item()
                print(f"D={d} tt={tt} warps={w} {prec}: {us:.1f} us/block-layer, bytes equal to default {agree:.5f}")
