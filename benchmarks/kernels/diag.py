"""Where does decode-attention time go? Times variants that drop one stage (results are wrong by design)."""
import torch
from triton.testing import do_bench

from kakeya_kernels.kakeya_triton import KakeyaKernels
import bench_kernels as B

sms = torch.cuda.get_device_properties(0).multi_processor_count
for d in (128,):
    kk = KakeyaKernels(d, 4, 3, "cuda")
    for tt, w in ((128, 8), (64, 4)):
        fn, bytes_, splits = B.ours_decode_fn(kk, 16, 16384, d, sms, tt, w)
        base = fn.__closure__  # reuse the prepared tensors through a wrapper
        for diag in (0, 1, 2):
            orig = kk.attention
            kk.attention = lambda *a, _o=orig, **k: _o(*a, diag=diag, **k)
            us = do_bench(fn) * 1e3
            kk.attention = orig
            print(f"D={d} tt={tt} warps={w} diag={diag}: {us:8.1f} us  {bytes_ / us / 1e3:6.0f} GB/s", flush=True)
