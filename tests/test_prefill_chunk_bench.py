"""benchmarks/kernels/prefill_chunk_bench.py on CPU (Triton interpreter, tiny shapes, a stand-in timer): the block
phases and the chunk span it times seal the same pages, the span reads the chunk's own earlier block exact (closer to
bf16 attention than the block phases), and the row carries every field the GPU run reports."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))
import prefill_chunk_bench as B  # noqa: E402


def test_blocks_and_span_rows():
    calls = []

    def bench(fn, warmup, rep):
        fn()
        calls.append(fn)
        return 0.001
    row = B.run(64, 0, 530, torch.device("cpu"), bench=bench, hkv=1)
    assert len(calls) == 3 and row["phases"] == 2 and row["sealed_pages_equal"] is True
    assert row["span_rel_to_bf16"] < row["blocks_rel_to_bf16"] < 0.5
    assert {"blocks_us", "span_us", "sdpa_bf16_us", "span_speedup", "span_vs_sdpa", "blocks_plan_us",
            "span_plan_us"} <= set(row)
