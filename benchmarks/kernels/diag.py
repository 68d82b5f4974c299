"""Where does decode-attention time go? Times variants that drop one stage (results are wrong by design).

DIAG 1 = no centroid lookup, 2 = no unpack either (lut 0 path only); compare with lut 2 (pair table)."""
import torch

from kakeya_kernels.kakeya_triton import KakeyaKernels
import bench_kernels as B

sms = torch.cuda.get_device_properties(0).multi_processor_count
for d in (64, 128):
    sc = B.OursDecode(KakeyaKernels(d, 4, 3, "cuda"), 16, 16384, d, sms)
    for tt, w in ((128, 4), (64, 8)):
        for lut, diag in ((0, 0), (0, 1), (0, 2), (2, 0)):
            v = dict(lut=lut, fused=True, tt=tt, num_warps=w, diag=diag, bm=16, waves=2)   # fn() takes bm + waves
            us = B.graph_us(sc.fn(v))   # synchronizes first (inputs made on the default stream)
            print(f"D={d} tt={tt} warps={w} lut={lut} diag={diag}: {us:8.1f} us  {sc.bytes / us / 1e3:6.0f} GB/s",
                  flush=True)
