"""The kernel bench's prefill rows (bench_kernels.py --prefill, gpu_job.sh KERNEL_PREFILL=1) on the CPU: the scenario
runs the backend's phases, every candidate is agreement-checked against the baseline launch before it is timed, the
row lands in kernels.json's "prefill" list and in KERNELS.md's table (speed is GPU-only: a stub timer here)."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))


def test_prefill_rows_agree_and_render():
    import bench_kernels as B
    import report
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_kernels.variants import PREFILL_CANDIDATES
    torch.manual_seed(0)
    kk = KakeyaKernels(64, 3, 2, "cpu")
    # The scenario: phase j attends context/512 + j sealed blocks and the block's tail, causal; a chunk crossing a
    # block runs as two phases.
    sc = B.OursPrefill(kk, 2, 512, 520, 64, sms=4, device="cpu", hkv=1)
    assert [int(p["nsl"][0]) for p in sc.phases] == [1, 2] and [len(p["pos"]) for p in sc.phases] == [1024, 16]
    assert int(sc.phases[1]["pos"][-1]) == 512 + 520 - 1 and int(sc.phases[1]["sl"][0]) == 1032
    calls = []

    def timer(fn):
        calls.append(len(fn()))
        return 10.0 * (len(calls))
    B.HKV = 1          # the module's scenario constant, for a small interpreter run
    try:
        measure = B.prefill_measure({64: kk}, 4, time.time() + 600, free=1 << 40, timer=timer)
        row = measure(dict(head_dim=64, context=512, requests=1, chunk=24))
    finally:
        B.HKV = 8
    assert set(row["variants"]) == set(PREFILL_CANDIDATES)
    for r in row["variants"].values():
        assert r["agrees"] and r["rel_diff_vs_baseline"] < B.ACCEPT_REL and r["us"] > 0
    assert "baseline_us" in row and len(calls) == 1 + len(PREFILL_CANDIDATES)     # 24 tokens: the baseline is timed
    assert row["best"] == min(row["variants"], key=lambda n: row["variants"][n]["us"])
    late = B.prefill_measure({64: kk}, 4, time.time() - 1, free=1 << 40, timer=timer)(dict(row, chunk=8))
    assert late["why"] == "deadline"
    md = report.render(dict(gpu="g", copy_gbps=1.0, format="f", decode=[], seal=[], tuning=[], not_measured=[],
                            prefill=[dict(row, fa3_bf16_us=5.0, best_speedup_vs_bf16=0.5)]))
    assert "| 64 | 512 | 1 | 24 | 5 |" in md and all(f"{n} µs" in md for n in PREFILL_CANDIDATES)
    table = [ln for ln in md.splitlines() if ln.startswith("| head_dim | context | requests")]
    table = md.splitlines()[md.splitlines().index(table[0]):][:3]
    assert len({ln.count("|") for ln in table}) == 1, table          # header, separator and row line up


def test_prefill_rows_and_budget():
    """Rows in whole blocks, head_dim 128 (the serving model's) first, both chunk sizes and request counts; the
    baseline is timed only where it is cheap (it is ~4-8x slower than needed elsewhere)."""
    import bench_kernels as B
    rows = B.PREFILL_ROWS
    assert len(rows) == 16 and rows[0]["head_dim"] == 128 and {r["head_dim"] for r in rows} == {64, 128}
    assert all(r["context"] % 512 == 0 and r["chunk"] % 512 == 0 for r in rows)
    assert {(r["requests"], r["chunk"]) for r in rows} == {(1, 512), (4, 512), (1, 2048), (4, 2048)}
    assert {r["context"] for r in rows} == {16384, 32768}
    assert sum(r["requests"] * r["chunk"] <= B.PREFILL_TIME_BASELINE_TOKENS for r in rows) == 4


def test_a_failing_candidate_keeps_the_row(monkeypatch):
    """Session 9: one candidate that did not compile on the device discarded its whole row (baseline and FA3
    timings included); now the failure is recorded with that candidate and the row goes on."""
    import bench_kernels as B
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_kernels.variants import PREFILL_CANDIDATES
    torch.manual_seed(0)
    kk = KakeyaKernels(64, 3, 2, "cpu")
    broken = {"broken": {64: dict(PREFILL_CANDIDATES["q16"][64], tt=48)}, "q16": PREFILL_CANDIDATES["q16"]}
    monkeypatch.setattr(B, "PREFILL_CANDIDATES", broken)
    real_fn = B.OursPrefill.fn

    def fn(self, v):
        if v.get("tt") == 48:
            raise RuntimeError("PassManager::run failed")
        return real_fn(self, v)
    monkeypatch.setattr(B.OursPrefill, "fn", fn)
    monkeypatch.setattr(B, "HKV", 1)
    row = B.prefill_measure({64: kk}, 4, time.time() + 600, free=1 << 40, timer=lambda f: 1.0)(
        dict(head_dim=64, context=512, requests=1, chunk=8))
    assert row["variants"]["broken"]["why"] == "error" and "PassManager" in row["variants"]["broken"]["error"]
    assert row["variants"]["q16"]["agrees"] and row["best"] == "q16" and "baseline_us" in row
