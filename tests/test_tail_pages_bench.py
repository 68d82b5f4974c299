"""benchmarks/kernels/tail_pages_bench.py on CPU (Triton interpreter, tiny shapes, a stand-in timer): the pool and
the pages launches it times give identical outputs, and the row carries every field the GPU run reports (the decode
step's write and block-table copy included)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))
import tail_pages_bench as B  # noqa: E402


def test_pool_and_pages_rows_agree_bit_for_bit():
    calls = []

    def bench(fn, warmup, rep):
        fn()
        calls.append(fn)
        return 0.001
    row = B.run(64, 2, 512 + 130, torch.device("cpu"), bench=bench, sms=4)
    assert row["outputs_identical"] is True and row["tail_tokens"] == 130 and row["tokens_per_page"] == 123
    assert len(calls) == 7 and row["pages_vs_pool"] == 1.0
    assert {"attn_pool_us", "attn_pages_us", "copy_all_rows_us", "copy_no_row_us", "copy_bt_no_row_us",
            "write_pages_us", "write_pool_us"} <= set(row)
