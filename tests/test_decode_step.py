"""benchmarks/vllm/decode_step.py: the CPU-testable parts (kernel table, profiler record extraction,
report) and the orchestrator on a machine without vLLM (variants come back with reasons)."""
import json
import types

import pytest

from benchmarks.vllm import decode_step as D


def test_kernel_table_per_step_and_shares():
    recs = [("attn_decode", 40, 4000.0), ("gemm", 140, 12000.0), ("rmsnorm", 80, 800.0), ("seal", 0, 0.0)]
    t = D.kernel_table(recs, steps=4, top=2)
    assert t["device_ms_per_step"] == pytest.approx(16800 / 4 / 1e3)
    assert [k["name"] for k in t["kernels"]] == ["gemm", "attn_decode"]
    assert t["kernels"][0]["us_per_step"] == pytest.approx(3000) and t["kernels"][0]["calls_per_step"] == 35
    assert t["kernels"][0]["share"] == pytest.approx(12000 / 16800)
    with pytest.raises(ValueError):
        D.kernel_table(recs, steps=0)
    assert D.kernel_table([], 3)["kernels"] == []


def test_profile_records_keeps_gpu_kernels_only():
    ev = lambda key, dev, cpu, dt: types.SimpleNamespace(key=key, count=2, self_device_time_total=dev,  # noqa: E731
                                                         self_cpu_time_total=cpu, device_type=dt)
    prof = types.SimpleNamespace(key_averages=lambda: [
        ev("aten::mm", 50.0, 30.0, "DeviceType.CPU"),       # a CPU op's self device time would double-count
        ev("sm90_gemm", 50.0, 0.0, "DeviceType.CUDA"),
        ev("cudaLaunchKernel", 0.0, 10.0, "DeviceType.CPU")])
    assert D._profile_records(prof) == [("sm90_gemm", 2, 50.0)]
    # Older torch: no device_type on averages, cuda_time names
    old = types.SimpleNamespace(key=["k"], count=1, self_cuda_time_total=7.0, self_cpu_time_total=0)
    old.key = "k"
    prof = types.SimpleNamespace(key_averages=lambda: [old])
    assert D._profile_records(prof) == [("k", 1, 7.0)]


def test_markdown_tables():
    res = {"gpu": "1x TEST", "model": "qwen3-8b-like", "context": 32768, "batch": 16, "variants": [
        {"variant": "flash_eager", "status": "ok", "ms_step_p50": 30.0, "ms_step_p90": 31.0, "tok_s": 533.0,
         "gpu_busy": 0.8, "init_s": 40.0, "method": "engine step log", "profile": D.kernel_table([("gemm", 10, 100.0)], 5)},
        {"variant": "kakeya_full_graphs", "status": "partial", "reason": "time limit 150s"}]}
    md = D.markdown(res)
    assert "| flash_eager | 30.00 | 31.00 | 533 | 80% | 40 | engine step log | ok |" in md
    assert "kakeya_full_graphs" in md and "time limit 150s" in md
    assert "| `gemm` | 2.0 | 20.0 | 100.0% |" in md


def test_run_without_vllm_reports_each_variant(tmp_path):
    out = tmp_path / "ds.json"
    assert D.main(["run", "--variants", "flash_eager,kakeya_eager", "--deadline-s", "120", "--min-variant-s", "1",
                   "--log-dir", str(tmp_path), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [v["variant"] for v in res["variants"]] == ["flash_eager", "kakeya_eager"]
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        assert all(v["status"] == "partial" and "vllm" in v["reason"] for v in res["variants"])
    assert (tmp_path / "ds.md").exists()
    with pytest.raises(SystemExit):
        D.main(["run", "--variants", "nope", "--out", str(out), "--log-dir", str(tmp_path)])
