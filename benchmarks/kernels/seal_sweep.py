"""Seal-kernel launch sweep (tile, warps, rotation precision, pipelining) with byte agreement vs the fp32 rotation."""
import torch
from triton.testing import do_bench

from kakeya_kernels.kakeya_triton import KakeyaKernels

for d in (64, 128):
    kk = KakeyaKernels(d, 4, 3, "cuda")
    x = (torch.randn(64, 8, 512, d, device="cuda") * 2 + torch.randn(d, device="cuda") * 4).bfloat16()
    ref = torch.zeros(64, 8, kk.lay.slot_bytes, dtype=torch.uint8, device="cuda")
    kk.seal(x, x, ref, prec="ieee")
    for tt in (32, 64, 128):
        for w in (4, 8):
            for prec, ns in (("tf32x3", None), ("tf32", None), ("bf16x3", None), ("bf16x3", 1)):
                out = torch.zeros_like(ref)
                try:
                    us = do_bench(lambda: kk.seal(x, x, out, tt, w, prec, num_stages=ns)) * 1e3 / 64
                except Exception as e:  # noqa: BLE001
                    print(d, tt, w, prec, ns, "failed", repr(e)[:80])
                    continue
                agree = (out == ref).float().mean().item()
                print(f"D={d} tt={tt} warps={w} {prec} stages={ns}: {us:.1f} us/block-layer, bytes equal to ieee "
                      f"{agree:.5f}", flush=True)
