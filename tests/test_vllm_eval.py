"""vLLM evaluation driver without vLLM: config names and recipes, the per-config/whole-call time limits
(fake child processes), top-k extraction, and the result files."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kakeya_kv import vllm_eval
from kakeya_kv.config import ConfigError
from kakeya_kv.vllm_configs import VllmConfig, dedupe, resolve

RECIPES = Path(__file__).parent.parent / "deploy" / "recipes"


def test_resolve_names_and_recipes(tmp_path):
    assert resolve("turboquant_3bit_nc").llm == {"kv_cache_dtype": "turboquant_3bit_nc"}
    c = resolve("kakeya_k5v4")
    assert c.env["KAKEYA_K_BITS"] == "5" and c.llm == {"attention_backend": "KAKEYA"} and c.hf_format == "kakeya_k5v4"
    with pytest.raises(ConfigError):
        resolve("kakeya_k9v4")
    with pytest.raises(ConfigError, match="unknown vLLM config"):
        resolve("nope")
    f = tmp_path / "mine.env"
    f.write_text("# NOT MEASURED\nKAKEYA_K_BITS=3\nKAKEYA_V_BITS=2\nKAKEYA_LAYER_BITS=17-18:4/3\n")
    r = resolve(f"recipe:{f}")
    assert r.name == "recipe:mine" and r.env["KAKEYA_LAYER_BITS"] == "17-18:4/3" and r.family == "kakeya"
    f.write_text("KAKEYA_K_BITS=11\n")
    with pytest.raises(ConfigError):
        resolve(f"recipe:{f}")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("smollm2-*.env")), ids=lambda p: p.name)
def test_every_smollm2_recipe_resolves(path):
    assert resolve(f"recipe:{path}").env


def test_dedupe_merges_equal_settings_only(tmp_path):
    f = tmp_path / "same.env"
    f.write_text("KAKEYA_FORMAT=default\nKAKEYA_K_BITS=3\nKAKEYA_V_BITS=2\nKAKEYA_BOUNDARY_SKIP_LAYERS=\n")
    g = tmp_path / "other.env"
    g.write_text("KAKEYA_K_BITS=3\nKAKEYA_V_BITS=2\nKAKEYA_BOUNDARY_SKIP_LAYERS=0\n")
    run, alias = dedupe([resolve(n) for n in ("flash_bf16", "kakeya_k3v2", f"recipe:{f}", f"recipe:{g}",
                                               "turboquant_k8v4", "triton_bf16")])
    assert [c.name for c in run] == ["flash_bf16", "kakeya_k3v2", "recipe:other", "turboquant_k8v4", "triton_bf16"]
    assert alias == {"recipe:same": "kakeya_k3v2"}


def test_child_env_isolates_kakeya_knobs():
    env = vllm_eval.child_env(resolve("kakeya_k3v2"), 1, {"PATH": "/bin", "KAKEYA_LAYER_BITS": "1:4/3"})
    assert env["KAKEYA_K_BITS"] == "3" and "KAKEYA_LAYER_BITS" not in env and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in vllm_eval.child_env(resolve("flash_bf16"), None, {})


class _LP:
    def __init__(self, lp):
        self.logprob = lp


def test_topk_arrays_from_prompt_logprobs():
    ids = [5, 1, 2, 3]
    plp = [None] + [{t: _LP(-0.1 * (t + 1)) for t in range(4)} | {ids[p]: _LP(-9.0 - p)} for p in range(1, 4)]
    plp[3] = {t: _LP(-0.1 * (t + 1)) for t in range(4)}       # the prompt token 3 is inside the top-k here
    tgt, tid, tlp = vllm_eval.topk_arrays(plp, ids, 2, 2)
    assert tgt.tolist() == pytest.approx([-11.0, -0.4]) and tid.tolist() == [[0, 1], [0, 1]]
    assert tlp[0].tolist() == pytest.approx([-0.1, -0.2])


FAKE_CHILD = r'''
import json, sys, time
name = sys.argv[1]
def emit(k, o=None):
    print(k if o is None else k + " " + json.dumps(o), flush=True)
if name == "broken":
    emit("PHASE", "load")
    sys.stderr.write("ValueError: Selected backend is not valid\n")
    sys.exit(1)
emit("PHASE", "load")
sys.stderr.write("(EngineCore pid=1) WARNING Kakeya KV: format kakeya k4v3, KV capacity 4150 tokens\n")
emit("PART", {"phase": "load", "capacity_tokens": {"flash_bf16": 1000, "slow": 2700}.get(name, 4150),
              "gpu": "Fake GPU", "scheduler": {"long_prefill_token_threshold": 256}})
emit("PHASE", "ppl")
for g in (0, 2):
    emit("PART", {"phase": "ppl", "window_ids": [g, g + 1], "window_nll": [3.0 + g / 10, 3.1 + g / 10],
                  "topk_files": [], "ppl_s": 0.1})
    if name == "slow":
        time.sleep(60)
for ph in ("niah_4k", "niah_8k") if "--no-niah" not in sys.argv else ():
    emit("PHASE", ph)
    emit("PART", {"phase": ph, ph: 1.0})
emit("DONE")
if name == "hangs":
    time.sleep(60)      # everything delivered, stuck in teardown
'''


def _args(tmp_path, **kw):
    a = dict(n=4, gpus=1, timeout=5.0, budget_s=0, reserve_s=0, min_config_s=1.0, niah=True, chunk=256, max_seqs=32,
             gpu_util=0.3, topk=20, max_model_len=8192, out=str(tmp_path / "quality.json"), hf_json="",
             exit_grace_s=0.5)
    a.update(kw)
    return argparse.Namespace(**a)


def test_run_all_bounds_each_config_and_reports_why(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    cmd = lambda c, a: [sys.executable, str(script), c.name]
    cfgs = [resolve("flash_bf16")] + [VllmConfig(n, "kakeya") for n in ("slow", "broken", "hangs")]
    t0 = time.monotonic()
    rows = vllm_eval.run_all(cfgs, _args(tmp_path), make_cmd=cmd)
    assert time.monotonic() - t0 < 30                     # the sleeping children were killed, not waited for
    ok, slow, broken, hangs = rows
    assert not hangs.get("not_measured") and hangs["timing"]["exit"] != "rc 0"    # cut after DONE, all kept
    rows = rows[:3]
    assert ok["window_ids"] == [0, 1, 2, 3] and ok["niah_8k"] == 1.0 and not ok.get("not_measured")
    assert "KV capacity 4150" in ok["log"][0]             # the backend's startup line, read from stderr
    assert slow["window_ids"] == [0, 1]                   # the group measured before the kill is kept
    why = {m["what"]: m["reason"] for m in slow["not_measured"]}
    assert "2 of 4 windows" in why["windows"] and "limit in phase 'ppl'" in why["niah_4k"]
    assert broken["not_measured"][0]["what"] == "config" and "Selected backend" in broken["not_measured"][0]["reason"]
    doc = vllm_eval.finish(rows, _args(tmp_path), {"corpus": "c"})
    by = {r["name"]: r for r in doc["configs"]}
    assert by["slow"]["ratio_vs_bf16"] == 2.7 and by["slow"]["ppl"] is not None and by["broken"]["ppl"] is None
    assert by["flash_bf16"]["kld"] == 0.0 and by["slow"]["kld"] is None         # no top-k files in this fake
    assert doc["protocol_check"]["scheduler_ok"] is True
    rows[0]["scheduler"] = {"long_prefill_token_threshold": 0, "enable_chunked_prefill": True}   # unchunked
    bad = vllm_eval.finish(rows, _args(tmp_path), {"corpus": "c"})["protocol_check"]
    assert bad["scheduler_ok"] is False and bad["ok"] is False
    for f in ("quality.json", "quality.md", "quality.png", "vllm_quality.partial.json", "vllm_quality.partial.md",
              "quality.raw.json"):
        assert (tmp_path / f).exists(), f
    # No fp8 / int4 / default-format rows in this run: issue 4's file (a complete same-run comparison) is not touched.
    assert not (tmp_path / "vllm_quality.json").exists()


def test_issue4_file_needs_every_compared_row():
    from kakeya_kv import report
    rows = [{"name": n} for n in report.ISSUE4_REQUIRED]
    assert report.issue4_complete({"configs": rows})
    assert not report.issue4_complete({"configs": rows[1:]})


def test_budget_stops_launching_configs(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    cmd = lambda c, a: [sys.executable, str(script), c.name]
    cfgs = [resolve("flash_bf16"), VllmConfig("slow", "kakeya"), VllmConfig("late", "kakeya")]
    rows = vllm_eval.run_all(cfgs, _args(tmp_path, timeout=60, budget_s=7.0, min_config_s=3.0), make_cmd=cmd)
    assert rows[0]["window_ids"] == [0, 1, 2, 3]
    assert "limit in phase 'ppl'" in rows[1]["not_measured"][-1]["reason"]      # cut to what the budget left
    assert rows[2]["not_measured"] == [{"what": "config", "reason": rows[2]["not_measured"][0]["reason"]}]
    assert rows[2]["not_measured"][0]["reason"].startswith("not started")


def test_finish_kld_from_topk_files_and_aliases(tmp_path):
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(30) * 0.3, (2, 8)))
    ids = np.argsort(-lp, -1)[..., :5]

    def save(name, noise):
        q = lp + noise * rng.normal(size=lp.shape)
        q = q - np.log(np.exp(q).sum(-1, keepdims=True))
        qi = np.argsort(-q, -1)[..., :5]
        f = tmp_path / f"{name}.npz"
        np.savez(f, window_ids=np.array([0, 1]), ids=qi.astype(np.int32),
                 lp=np.take_along_axis(q, qi, -1).astype(np.float32))
        return str(f)

    assert ids.shape == (2, 8, 5)
    base = {"name": "flash_bf16", "family": "bf16", "capacity_tokens": 100, "gpu": "G", "window_ids": [0, 1],
            "window_nll": [3.0, 3.1], "topk_files": [save("b", 0.0)], "niah_4k": 1.0, "niah_8k": 1.0}
    ours = {"name": "kakeya_k3v2", "family": "kakeya", "capacity_tokens": 561, "gpu": "G", "window_ids": [0, 1],
            "window_nll": [3.02, 3.13], "topk_files": [save("k", 0.5)], "niah_4k": 1.0, "niah_8k": 0.5}
    doc = vllm_eval.finish([base, ours], _args(tmp_path, n=2), {"corpus": "c"}, {"recipe:x": "kakeya_k3v2"})
    by = {r["name"]: r for r in doc["configs"]}
    assert by["kakeya_k3v2"]["kld"] > 0 and by["kakeya_k3v2"]["ratio_vs_bf16"] == 5.61
    assert by["recipe:x"]["same_setting_as"] == "kakeya_k3v2" and by["recipe:x"]["kld"] == by["kakeya_k3v2"]["kld"]
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["gpu"] == "G" and saved["protocol"]["long_prefill_token_threshold"] == 256
    assert "= kakeya_k3v2 (same setting, not re-run)" in (tmp_path / "quality.md").read_text()


def test_run_writes_partial_results_and_recipe_aliases(tmp_path, monkeypatch):
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    monkeypatch.setattr(vllm_eval, "child_cmd", lambda c, a: [sys.executable, str(script), c.name])
    (tmp_path / "w.json").write_text(json.dumps({"meta": {"corpus": "c"}, "windows": [[1] * 8] * 4}))
    seen = []
    real = vllm_eval.finish
    monkeypatch.setattr(vllm_eval, "finish", lambda rows, *x: seen.append([r["name"] for r in rows]) or real(rows, *x))
    rc = vllm_eval.main(["run", "--configs", f"kakeya_k3v2,recipe:{RECIPES / 'smollm2-135m-instruct.env'}",
                         "--windows", str(tmp_path / "w.json"), "--write-partial", "--timeout", "20",
                         "--out", str(tmp_path / "quality.json"), "--hf-json", ""])
    assert rc == 0
    assert seen[0] == ["flash_bf16", "kakeya_k3v2"]          # partial: the config still to run is listed
    doc = json.loads((tmp_path / "quality.json").read_text())
    assert [r["name"] for r in doc["configs"]] == ["flash_bf16", "kakeya_k3v2", "recipe:smollm2-135m-instruct"]
    assert doc["configs"][2]["same_setting_as"] == "kakeya_k3v2" and doc["windows"] == 4
    raw = json.loads((tmp_path / "quality.raw.json").read_text())
    assert "has no NIAH prompts" in raw["meta"]["niah_missing_reason"]       # w.json was made without NIAH
    rows = [{k: v for k, v in r.items() if not k.startswith("niah")} for r in raw["rows"]]
    miss = vllm_eval.finish(rows, _args(tmp_path), raw["meta"])["not_measured"]
    assert {m["reason"] for m in miss if m["what"] == "niah_8k"} == {raw["meta"]["niah_missing_reason"]}


class _FakeOut:
    def __init__(self, ids, k, text=""):
        rng = np.random.default_rng(len(ids))
        self.prompt_logprobs = [None] + [
            {**{int(t): _LP(float(-1 - j)) for j, t in enumerate(rng.choice(50, k, replace=False))}, ids[p]: _LP(-2.5)}
            for p in range(1, len(ids))]
        self.outputs = [type("C", (), {"text": text, "token_ids": [1, 2]})()]


def test_child_measures_every_phase_with_a_fake_vllm(tmp_path, monkeypatch, capsys):
    """The child's use of vLLM's API (LLM, SamplingParams, outputs) on a stand-in module."""
    import types
    calls = []

    class LLM:
        def __init__(self, **kw):
            calls.append(kw)
            sc = types.SimpleNamespace(max_num_seqs=kw["max_num_seqs"], max_num_batched_tokens=kw["max_num_batched_tokens"],
                                       long_prefill_token_threshold=kw["long_prefill_token_threshold"],
                                       enable_chunked_prefill=True)
            cc = types.SimpleNamespace(num_gpu_blocks=10, block_size=16)
            self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(scheduler_config=sc, cache_config=cc))

        def generate(self, prompts, sp, use_tqdm=False):
            k = sp.prompt_logprobs or 0
            return [_FakeOut(p["prompt_token_ids"], k, text=" 48213." if not k else "") for p in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**{"prompt_logprobs": None, **kw})
    monkeypatch.setitem(sys.modules, "vllm", fake)
    import torch
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    trial = {"context": 4096, "depth": 0.5, "number": 48213, "ids": [3] * 20}
    (tmp_path / "w.json").write_text(json.dumps({"windows": [list(range(1, 17))] * 3, "niah": [trial]}))
    rc = vllm_eval.main(["one", "--name", "recipe:x", "--llm", '{"attention_backend": "KAKEYA"}', "--windows",
                         str(tmp_path / "w.json"), "--n", "3", "--group", "2", "--topk", "4", "--topk-dir",
                         str(tmp_path / "topk"), "--gen-tokens", "2"])
    assert rc == 0 and calls[0]["attention_backend"] == "KAKEYA" and calls[0]["long_prefill_token_threshold"] == 256
    col = vllm_eval.Collector(resolve("flash_bf16"))
    col.start()
    for line in capsys.readouterr().out.splitlines():
        col(line)
    r = col.row
    assert col.completed and r["capacity_tokens"] == 160 and r["window_ids"] == [0, 1, 2]
    assert r["window_nll"] == pytest.approx([2.5] * 3) and len(r["topk_files"]) == 2
    assert r["niah_4k"] == 1.0 and "niah_8k" not in r and r["greedy"] == [[1, 2]] * 3
    z = np.load(r["topk_files"][0], allow_pickle=False)
    assert z["ids"].shape == (2, 8, 4) and (np.diff(z["lp"], axis=-1) <= 0).all()


def _raw(base_nll, others, cap=1000):
    base = {"name": "flash_bf16", "family": "bf16", "window_ids": [0, 1], "window_nll": base_nll,
            "capacity_tokens": cap}
    return {"meta": {"corpus": "c"}, "rows": [base, *others], "aliases": {}}


def test_merge_needs_identical_baselines_and_keeps_measured_rows():
    from kakeya_kv.vllm_eval import merge_rows
    a_row = {"name": "a", "window_ids": [0, 1], "window_nll": [1.0, 2.0]}
    a_lost = {"name": "a", "not_measured": [{"what": "config", "reason": "killed"}]}
    b_row = {"name": "b", "window_ids": [0, 1], "window_nll": [1.5, 2.5]}
    rows, meta, _ = merge_rows([("r1", _raw([1.0, 2.0], [a_row])), ("r2", _raw([1.0, 2.0], [a_lost, b_row]))])
    by = {r["name"]: r for r in rows}
    assert by["a"] is a_row and by["b"] is b_row          # a later "not measured" never hides a measurement
    assert [r["measured"] for r in meta["merged_runs"]] == [["a"], ["b"]]
    with pytest.raises(ValueError, match="differs from r1"):
        merge_rows([("r1", _raw([1.0, 2.0], [a_row])), ("r2", _raw([1.0, 2.0 + 1e-6], [b_row]))])
    with pytest.raises(ValueError, match="KV capacity"):
        merge_rows([("r1", _raw([1.0, 2.0], [a_row])), ("r2", _raw([1.0, 2.0], [b_row], cap=999))])
    with pytest.raises(ValueError, match="no measured flash_bf16"):
        merge_rows([("r1", {"meta": {}, "rows": [a_row]})])


def test_merge_keeps_the_baseline_run_that_measured_niah():
    from kakeya_kv.vllm_eval import merge_rows
    with_niah = _raw([1.0, 2.0], [])
    with_niah["rows"][0]["niah_4k"] = 0.9
    without = _raw([1.0, 2.0], [])
    without["rows"][0]["not_measured"] = [{"what": "niah_4k", "reason": "--no-niah"}]
    for order in ((with_niah, without), (without, with_niah)):
        rows, _, _ = merge_rows([(f"r{i}", d) for i, d in enumerate(order)])
        assert rows[0]["niah_4k"] == 0.9


def test_beats_pairs_windows_against_the_rival():
    from kakeya_kv.report import beats
    rng = np.random.default_rng(0)
    text = rng.normal(3.0, 0.3, 32)             # per-window difficulty, shared by every config
    row = lambda name, fam, ratio, off, noise: {
        "name": name, "family": fam, "ratio_vs_bf16": ratio, "window_ids": list(range(32)),
        "window_nll": list(text + off + rng.normal(0, noise, 32)), "delta_ppl_pct": 100 * (np.exp(off) - 1),
        "delta_ppl_pct_ci95": [100 * (np.exp(off - 0.01) - 1), 100 * (np.exp(off + 0.01) - 1)]}
    rival = row("tq", "turboquant", 2.0, 0.0015, 1e-4)
    close = row("ours_close", "kakeya", 3.0, 0.0010, 1e-4)     # CIs vs bf16 overlap, paired gap clearly < 0
    noisy = row("ours_noisy", "kakeya", 3.0, 0.0010, 1e-2)     # same mean, pairing cannot separate it
    (b,) = beats([rival, close, noisy])
    assert {m["name"] for m in b["beaten_by"]} == {"ours_close", "ours_noisy"} and b["ci_separated"] == []
    assert [m["name"] for m, _ in b["paired_separated"]] == ["ours_close"]


def test_no_niah_call_says_why_in_every_row(tmp_path, monkeypatch):
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    real_cmd = vllm_eval.child_cmd      # the fake child gets the real flags after its name
    monkeypatch.setattr(vllm_eval, "child_cmd", lambda c, a: [sys.executable, str(script), c.name]
                        + real_cmd(c, a)[1:])
    trial = {"context": 4096, "depth": 0.5, "ids": [1, 2], "answer": "1"}
    (tmp_path / "w.json").write_text(json.dumps({"meta": {"corpus": "c"}, "windows": [[1] * 8] * 4,
                                                 "niah": [trial]}))
    rc = vllm_eval.main(["run", "--configs", "kakeya_k3v2", "--windows", str(tmp_path / "w.json"), "--no-niah",
                         "--no-niah-reason", "skipped: compile time", "--timeout", "20",
                         "--out", str(tmp_path / "quality.json"), "--hf-json", ""])
    assert rc == 0
    doc = json.loads((tmp_path / "quality.json").read_text())
    for r in doc["configs"]:
        why = {m["what"]: m["reason"] for m in r["not_measured"]}
        assert r["niah_4k"] is None and why["niah_4k"] == why["niah_8k"] == "skipped: compile time"


@pytest.mark.parametrize("qset", ["tq", "ours", "all"])
def test_quality_job_config_sets_resolve(qset, tmp_path):
    """Every config a device call of quality_job.sh would run resolves here (a typo would waste the call); the
    'ours' call holds every row issue 4's vllm_quality.json compares, and the two calls together every rival."""
    import subprocess
    from kakeya_kv import report
    from kakeya_kv.vllm_configs import resolve
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PRINT_CONFIGS": "1", "QSET": qset, "OUT": str(tmp_path)}
    env.pop("CONFIGS", None)
    run = lambda q: subprocess.run(["bash", "benchmarks/vllm/quality_job.sh"], cwd=root, capture_output=True,
                                   text=True, env={**env, "QSET": q}, timeout=60)
    r = run(qset)
    assert r.returncode == 0, r.stderr
    names = r.stdout.strip().split(",")
    old = os.getcwd()
    os.chdir(root)                          # recipe paths are relative to the repository
    try:
        assert names[0] == "flash_bf16" and all(resolve(n) for n in names)
    finally:
        os.chdir(old)
    if qset == "ours":
        assert set(report.ISSUE4_REQUIRED) <= set(names)
    if qset == "tq":
        both = set(names) | set(run("ours").stdout.strip().split(","))
        rivals = {"turboquant_4bit_nc", "turboquant_3bit_nc", "turboquant_k8v4", "turboquant_k3v4_nc",
                  "int4_per_token_head", "triton_fp8"}
        assert rivals <= both


def test_merge_names_a_later_recipe_only_onto_a_measured_equal_setting(tmp_path):
    from kakeya_kv.vllm_eval import recipe_aliases
    rows = [{"name": "flash_bf16", "window_nll": [1.0]}, {"name": "kakeya_k4v4", "window_nll": [1.1]},
            {"name": "kakeya_k3v2", "not_measured": [{"what": "config", "reason": "killed"}]}]
    (tmp_path / "same.env").write_text("KAKEYA_FORMAT=default\nKAKEYA_K_BITS=4\nKAKEYA_V_BITS=4\n")
    (tmp_path / "k3v2.env").write_text("KAKEYA_FORMAT=default\nKAKEYA_K_BITS=3\nKAKEYA_V_BITS=2\n")
    assert recipe_aliases(rows, [f"recipe:{tmp_path / 'same.env'}"]) == {"recipe:same": "kakeya_k4v4"}
    with pytest.raises(ValueError, match="recipe:k3v2: setting not measured"):   # its row was never measured
        recipe_aliases(rows, [f"recipe:{tmp_path / 'k3v2.env'}"])
