"""One decode launch of the backend's TUNED variant under Nsight Compute (issue 3: stall reasons, issue rate and
occupancy of the decode kernel). Run by gpu_job.sh when the image has `ncu` (KERNEL_NCU=1):
  ncu --kernel-name regex:_attn_kernel --launch-skip 3 --launch-count 1 --section ... python3 profile_decode.py --d 128
The script itself only prepares the bench's decode scenario (batch 16, context 16k, k4v3 sealed pages in shuffled
order + a 100-token exact tail, 8 KV heads, GQA 4) and launches it 5 times; ncu picks the 4th launch."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import OursDecode  # noqa: E402  (the bench's scenario: the same inputs the grid times)

from kakeya_kernels.kakeya_triton import KakeyaKernels  # noqa: E402
from kakeya_kernels.variants import TUNED  # noqa: E402

BATCH, CONTEXT, K_BITS, V_BITS = 16, 16384, 4, 3   # the profiled shape (ncu_summary.py reads these too)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--context", type=int, default=CONTEXT)
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kk = KakeyaKernels(a.d, K_BITS, V_BITS, "cuda")
    sc = OursDecode(kk, a.batch, a.context, a.d, sms)
    fn = sc.fn(TUNED[a.d])
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    print(f"profiled TUNED d={a.d} batch={a.batch} context={a.context} splits={sc.splits(TUNED[a.d])}")


if __name__ == "__main__":
    main()
