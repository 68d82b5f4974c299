"""The kernel benchmark's scenario and variant plumbing, run in the interpreter on a tiny shape (speed is GPU-only)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))


def _sm90_run(args: list[str], tool: str, timeout: int = 300):
    """Run a python command in benchmarks/kernels in a process without the interpreter (sm_90 compiles on the CPU
    with Triton's bundled CUDA tools); skip when Triton lacks `tool`."""
    import os
    import subprocess

    import pytest
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)):
        pytest.skip("Triton without its CUDA binaries")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=Path(__file__).resolve().parents[1] / "benchmarks" / "kernels",
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_bench_variants_agree_on_the_bench_scenario():
    import bench_kernels as B
    import report
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    torch.manual_seed(0)
    sc = B.OursDecode(KakeyaKernels(64, 4, 3, "cpu"), 2, 1024, 64, sms=4, device="cpu", hkv=2)
    ref = sc.fn(B.BASELINE_VARIANT)()
    assert torch.isfinite(ref.float()).all() and sc.bytes > 0
    assert sc.splits(dict(bm=4, waves=4)) >= sc.splits(dict(bm=16, waves=2)) >= 1
    # fill 4 on 4 SMs over 2 tiles x 2 heads: 4 x 4 // 4 = 4 splits, capped at 2 sealed blocks + the tail
    assert sc.n_sealed == 2 and sc.splits(dict(bm=4, waves=None, fill=4)) == 3
    for v in (B.SWEEP[-1], dict(lut=2, fused=True, tt=64, num_warps=4, maxnreg=64, bm=16, waves=2)):
        assert B.rel_diff(sc.fn(v)(), ref) < B.ACCEPT_REL / 2   # the bench's own acceptance bound, with margin
    assert all(set(v) == set(B.BASELINE_VARIANT) for v in B.SWEEP)
    assert len(B.grid_rows("full", (64, 128))) == 2 * len(B.GRID) and B.grid_rows("none", (64,)) == []
    assert [(r["context"], r["batch"]) for r in B.grid_rows("goal", (64,))] == [c for c in B.GRID if c[0] >= 16384
                                                                              and c[1] >= 16]
    # goal rows (context >= 16k, batch >= 16) are measured first
    first = [c >= 16384 and b >= 16 for c, b in B.GRID]
    assert first == sorted(first, reverse=True) and sum(first) == 6
    row = dict(format="f", head_dim=64, batch=16, context=16384, us=2.0, fa3_bf16_us=1.0, gbps=1.0, floor_us=1.0,
               **B.SWEEP[-1])
    md = report.render(dict(gpu="g", copy_gbps=1.0, format="f", decode=[row], seal=[], tuning=[], not_measured=[]))
    assert "lut2 fused tt64 w4 bm4 waves4" in md and "**missed: 0.50–0.50×**" in md


def test_bench_seal_variants_agree():
    import bench_kernels as B
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    g = torch.Generator().manual_seed(3)
    kk = KakeyaKernels(64, 4, 3, "cpu")
    x = (torch.randn(1, 1, 512, 64, generator=g) * 2 + torch.randn(64, generator=g) * 4).bfloat16()
    ref = torch.zeros(1, 1, kk.lay.slot_bytes, dtype=torch.uint8)
    kk.seal(x, x, ref, prec="ieee")
    for sv in B.SEAL_VARIANTS:
        out = torch.zeros_like(ref)
        kk.seal(x, x, out, **sv)
        assert (out == ref).float().mean().item() >= 0.999    # the bench's acceptance bound


def test_sass_proxy_counts_the_sealed_loop():
    """sm_90 compile on CPU (Triton's bundled ptxas/cuobjdump, in a process without the interpreter): the pair
    table must keep its instruction cut."""
    import json
    code = ("import json, sass_count as S; print(json.dumps([S.count(64, 4, 3, 0, 64, 8, bm=4, maxnreg=80), "
            "S.count(64, 4, 3, 2, 64, 8, bm=4, maxnreg=80)]))")
    p = _sm90_run(["-c", code], "cuobjdump")
    assert p.returncode == 0, p.stderr[-2000:]
    lut0, lut2 = json.loads(p.stdout.strip().splitlines()[-1])
    assert lut2["regs"] <= 80 and lut2["spill_instructions_in_loop"] == 0 and lut2["warps_per_sm"] == 24
    assert 0 < lut2["per_element"] < 0.85 * lut0["per_element"]


def test_fill_candidate_matches_the_compiled_occupancy():
    """A candidate with `fill` sizes the grid to one full wave of resident programs; its per-head_dim count must
    be what the sm_90 compile of that launch really allows (registers, shared memory), else the grid either leaves
    slots empty or spills into a second wave. Each carries a register cap: uncapped register counts differ between
    Triton versions (session 9: fill at D=64 assumed 4 programs/SM from this repo's Triton 3.9, 122 registers; the
    device's 3.6 took 146 -> 3/SM and the grid ran as two waves), a capped launch keeps the count."""
    import json
    code = ("import json, sass_count as S; from kakeya_kernels.variants import CANDIDATES as C; "
            "print(json.dumps({f'{n} D={d}': [S.occupancy(S.compile_attn(d, 4, 3, v['lut'], v['tt'], v['num_warps'], "
            "bm=v['bm'], maxnreg=v['maxnreg'], fused=v['fused'], pf=v.get('pf', False), swap=v.get('swap', False)), "
            "v['num_warps'])"
            "['programs_per_sm'], v['fill']] for n, c in C.items() for d, v in c.items() if v.get('fill')}))")
    p = _sm90_run(["-c", code], "cuobjdump")
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    from kakeya_kernels.variants import CANDIDATES
    fills = [v for c in CANDIDATES.values() for v in c.values() if v.get("fill")]
    assert len(got) == len(fills) >= 2 and all(v["maxnreg"] for v in fills)
    for name, (resident, fill) in got.items():
        assert resident == fill, f"{name}: sm_90 holds {resident} programs per SM, the candidate assumes {fill}"


def test_gpu_configurations_compile_for_sm90():
    """A subset of compile_check.py (every configuration the GPU session launches compiles for sm_90, within the
    shared-memory limit), in a process without the interpreter."""
    p = _sm90_run(["compile_check.py", "--quick"], "ptxas", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]


def test_graph_timing_waits_for_inputs_made_on_other_streams(monkeypatch):
    """Session 6's crash: do_bench_cudagraph runs fn on a fresh side stream that does not wait for the default
    stream, so the FA3 baseline read a block table still being written (recycled memory -> illegal address).
    graph_us must finish all queued work before handing fn over."""
    import bench_kernels as B
    calls = []
    monkeypatch.setattr(B.torch.cuda, "synchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(B, "do_bench_cudagraph", lambda fn, rep: calls.append("bench") or 1.0)
    assert B.graph_us(lambda: None) == 1e3 and calls == ["sync", "bench"]


def test_grid_rows_are_guarded():
    """A failing row is recorded and the next rows run; a sticky CUDA error stops and saves what was measured."""
    import bench_kernels as B
    saves = []

    def measure(row):
        if row["i"] == 1:
            raise RuntimeError("Triton Error [CUDA]: out of resources: shared memory")
        if row["i"] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {**row, "why": "deadline"} if row["i"] == 2 else {**row, "us": 1.0}

    res = {"decode": [], "not_measured": []}
    ok = B.run_rows([dict(i=i) for i in range(5)], measure, res, lambda: saves.append(len(res["decode"])))
    assert not ok and "sticky" in res["aborted"] and saves and saves[-1] == 1
    assert [r["i"] for r in res["decode"]] == [0]
    assert [(n["i"], n["why"]) for n in res["not_measured"]] == [(1, "error"), (2, "deadline"), (3, "error")]
    assert "shared memory" in res["not_measured"][0]["error"]
    assert B.run_rows([dict(i=0)], measure, {"decode": [], "not_measured": []}, lambda: None)


def test_short_sweep_times_the_backend_default():
    import bench_kernels as B
    from kakeya_kernels.variants import TUNED
    for d in (64, 128):
        sw = B.short_sweep(d)
        assert sw[0] == B.BASELINE_VARIANT and TUNED[d] in sw and len(sw) == len({str(v) for v in sw})
        # swap, pf, fill: only the opt-in candidates (every variant has the launch's keys, nothing unknown)
        assert all(set(v) - {"swap", "pf", "fill", "ki8"} == set(B.BASELINE_VARIANT) for v in sw)
        assert len(sw) <= 8


def test_sweep_best_picks_the_fastest_agreeing_lloyd_max_variant():
    """--grid-variant best: the grid runs the sweep's fastest variant that agreed with the baseline on the
    ordinary cache; uniform-grid-only launches (timed on their own cache), disagreeing and failed ones are skipped."""
    import bench_kernels as B
    from kakeya_kernels.variants import CANDIDATES, TUNED
    fill = CANDIDATES["fill"][128]
    tuning = [{"head_dim": 128, **TUNED[128], "us_b16_ctx16k": 396.0, "agrees": True, "rel_diff_vs_baseline": 1e-4},
              {"head_dim": 128, **fill, "us_b16_ctx16k": 363.5, "agrees": True, "rel_diff_vs_baseline": 3e-4},
              {"head_dim": 128, **CANDIDATES["linear"][128], "us_b16_ctx16k": 300.0, "agrees": True,
               "cache": "uniform-grid tables", "rel_diff_vs_lut4_same_cache": 0.0},
              {"head_dim": 128, **CANDIDATES["t128_fill4"][128], "us_b16_ctx16k": 200.0, "agrees": False},
              {"head_dim": 128, **CANDIDATES["t128_fill4"][128], "error": "out of resources"},
              {"head_dim": 64, **TUNED[64], "us_b16_ctx16k": 181.5, "agrees": True}]
    best = B.sweep_best(tuning)
    assert best == {128: fill, 64: TUNED[64]}
    assert [r["context"] for r in B.grid_rows("goal16k", (64, 128))] == [16384] * 4


def test_report_names_an_sdpa_baseline():
    """gpu_job.sh KERNEL_NO_KIT=1 times torch SDPA, not FA3: the report must say so above the FA3-labelled columns."""
    import report
    row = dict(format="f", head_dim=64, batch=16, context=16384, us=2.0, fa3_bf16_us=1.0, gbps=1.0, floor_us=1.0,
               lut=4, fused=True, tt=64, num_warps=4, bm=4)
    res = dict(gpu="g", copy_gbps=1.0, format="f", decode=[row], seal=[], tuning=[], not_measured=[])
    assert "SDPA" not in report.render(res)   # no baseline field: FA3 as before
    row["baseline"] = "sdpa"
    assert "Baseline in this run: sdpa" in report.render(res)


def test_report_renders_the_int8_rows():
    """bench --int8 rows get their own table (every launch's µs, the served default, the baseline's name), and a
    launch that failed shows as an error, not as a missing column."""
    import report
    row = dict(head_dim=128, batch=16, context=16384, us={"tuned": 300.0, "ki8": 250.0, "ki8_vi8": 225.0},
               rel_diff_vs_tuned={"ki8": 1.6e-3, "ki8_vi8": 1.7e-3}, tuned_k4v3_lloyd_us=360.0, fa3_bf16_us=330.0,
               baseline="sdpa")
    row2 = dict(row, us={"tuned": 310.0, "ki8": 260.0}, errors={"ki8_vi8": "x"})
    md = report.render(dict(gpu="g", copy_gbps=1.0, format="f", decode=[], seal=[], tuning=[], not_measured=[],
                            int8=[row, row2]))
    assert "| 128 | 16 | 16384 | 300.0 | 250.0 | 225.0 | 360.0 | 330.0 | 1.47× (sdpa) | 1.7e-03 |" in md
    assert "| 310.0 | 260.0 | error |" in md


def test_report_goals_say_met_or_by_how_much():
    """kernels.json "goals": issue 3's verdicts from the goal rows only (context >= 16k, batch >= 16, not v13),
    the floor miss with the bandwidth reached; the markdown line says the same."""
    import report

    def row(ctx, b, us, fa, fmt="kakeya_k4v3_kuni"):
        return dict(format=fmt, head_dim=128, batch=b, context=ctx, us=us, fa3_bf16_us=fa, floor_us=us / 3.5,
                    gbps=870.0, bytes=1, baseline="fa3")
    res = dict(gpu="g", copy_gbps=3040.0, format="f", tuning=[], not_measured=[],
               decode=[row(16384, 16, 100.0, 118.0), row(65536, 64, 200.0, 230.0), row(4096, 1, 50.0, 10.0),
                       row(16384, 16, 3000.0, 118.0, fmt="v13_k3v2")],
               seal=[dict(format="f", head_dim=128, us_per_block_layer=13.0, prefill_us_per_block_layer=300.0)])
    g = report.goals(res)
    assert g["fa3_speed"]["rows"] == 2 and g["fa3_speed"]["met"] and g["fa3_speed"]["min"] == 1.15
    assert not g["byte_floor"]["met"] and "870-870 GB/s of the 3040" in g["byte_floor"]["why"]
    assert g["seal"]["met"] and abs(g["seal"]["max_pct"] - 13 / 3) < 1e-9
    res["decode"][1]["fa3_bf16_us"] = 190.0
    assert not report.goals(res)["fa3_speed"]["met"]
    assert "≥ 1.0× FA3 — **missed: 0.95–1.18×**" in report.render(res)
