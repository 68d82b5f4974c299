"""Quality of KV-cache configurations inside vLLM (GPU, gpu-kit): PPL, top-k KLD, NIAH, capacity.

    python -m kakeya_kv.vllm_eval prep                     # CPU: windows + NIAH prompts -> .gpudata/windows.json
    kakeya-kv eval --backend vllm --configs flash_bf16,turboquant_4bit_nc,kakeya_k4v3,recipe:deploy/recipes/x.env
        (= python -m kakeya_kv.vllm_eval run)              # GPU -> quality.{json,md,png}, vllm_quality.{json,md}
    python -m kakeya_kv.vllm_eval merge A.raw.json B.raw.json --out ...   # rows of several calls -> one result

Protocol. Windows of 2048 tokens (the HF harness's evaluation windows), second half scored through
prompt_logprobs=k (NLL of the text + the top-k for KLD vs the FLASH_ATTN bf16 row). Every request is
prefilled in chunks of `chunk` = 256 tokens: long_prefill_token_threshold caps each request's tokens
per step, while max_num_seqs requests share a step (max_num_batched_tokens = chunk x max_num_seqs), so
a scored token (position >= 1024 = 4 chunks) attends earlier chunks only through the KV cache. With
16 windows per generate call in flight, 32 windows take 16 steps instead of 256 (session 3 ran one
window per step). TurboQuant's continuation prefill is a per-request Python loop, so its cost per
chunk stays; the per-step overhead goes. Proof in the output: TurboQuant presets must differ from bf16 and from each other
(`protocol_check`), and every row records the scheduler settings vLLM reports.

Each config runs in its own process (fresh GPU memory, same gpu_memory_utilization; capacity = KV
tokens vLLM reports), which prints `PHASE name` on entering a phase and `PART {json}` when a part is
measured (load, each group of windows, NIAH per context, greedy). The parent bounds each config's wall
time and the whole call's (--budget-s): a config it kills, or never starts, keeps what it measured and
lists the rest under not_measured with the reason; nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

MODEL = "/tmp/models/SmolLM2-135M-Instruct"
BASELINE = "flash_bf16"
NIAH_PHASES = ("niah_4k", "niah_8k")


# ---------------------------------------------------------------- CPU: inputs
def prep(a) -> int:
    from transformers import AutoTokenizer

    from . import data, niah
    from .cli import _windows
    tok = AutoTokenizer.from_pretrained(data.smollm2_dir())
    wins = _windows(tok, a.n, 2048)
    ctxs = [int(c) for c in a.niah_contexts.split(",")]
    hay = data.corpus_tokens(tok, data.EVAL_BOOKS)[:max(ctxs)]
    trials = niah.trials(tok, hay, ctxs, niah.depths(a.niah_depths), a.max_model_len)
    meta = {"corpus": "Jane Austen (Debian r-cran-janeaustenr): " + ", ".join(data.EVAL_BOOKS),
            "window_tokens": 2048, "niah_contexts": ctxs, "niah_depths": list(niah.depths(a.niah_depths)),
            "niah_max_new": niah.MAX_NEW, "max_model_len": a.max_model_len}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "windows": [w.tolist() for w in wins], "niah": trials}))
    print(f"wrote {len(wins)} windows and {len(trials)} NIAH prompts to {a.out}")
    return 0


# ---------------------------------------------------------------- GPU: one config (child process)
def emit(kind: str, obj=None) -> None:
    print(kind if obj is None else f"{kind} {json.dumps(obj)}", flush=True)


def topk_arrays(prompt_logprobs, ids: list[int], start: int, k: int):
    """(target log-probs [P], top-k token ids [P, k], top-k log-probs [P, k]) for positions start.. of a
    prompt, from vLLM's per-position {token: Logprob} dicts (top-k plus the prompt token itself)."""
    import numpy as np
    n = len(ids) - start
    tgt = np.empty(n, np.float64)
    tid = np.full((n, k), -1, np.int64)
    tlp = np.full((n, k), -np.inf, np.float64)
    for j, p in enumerate(range(start, len(ids))):
        d = prompt_logprobs[p]
        tgt[j] = d[ids[p]].logprob
        best = sorted(d.items(), key=lambda kv: -kv[1].logprob)[:k]
        tid[j, :len(best)] = [t for t, _ in best]
        tlp[j, :len(best)] = [lp.logprob for _, lp in best]
    return tgt, tid, tlp


def one(a) -> int:
    """Measure one config in this process (its KAKEYA_* environment is set by the parent)."""
    import numpy as np
    emit("PHASE", "load")
    from vllm import LLM, SamplingParams

    from . import niah
    d = json.loads(Path(a.windows).read_text())
    wins = d["windows"][:a.n]
    t0 = time.time()
    args = dict(model=a.model, enforce_eager=True, gpu_memory_utilization=a.gpu_util, max_model_len=a.max_model_len,
                max_num_seqs=a.max_seqs, max_num_batched_tokens=a.chunk * a.max_seqs,
                long_prefill_token_threshold=a.chunk, enable_prefix_caching=False, max_logprobs=a.topk)
    llm = LLM(**{**args, **json.loads(a.llm)})     # a config may override (e.g. enforce_eager=False)
    cfg = llm.llm_engine.vllm_config
    sc, cc = cfg.scheduler_config, cfg.cache_config
    import torch
    emit("PART", {"phase": "load", "capacity_tokens": (cc.num_gpu_blocks or 0) * cc.block_size,
                  "block_size": cc.block_size, "gpu": torch.cuda.get_device_name(0), "load_s": time.time() - t0,
                  "scheduler": {"max_num_seqs": sc.max_num_seqs, "max_num_batched_tokens": sc.max_num_batched_tokens,
                                "long_prefill_token_threshold": sc.long_prefill_token_threshold,
                                "enable_chunked_prefill": sc.enable_chunked_prefill}})
    emit("PHASE", "ppl")
    sp = SamplingParams(max_tokens=1, prompt_logprobs=a.topk, temperature=0.0)
    os.makedirs(a.topk_dir, exist_ok=True)
    for g0 in range(0, len(wins), a.group):
        t0 = time.time()
        idx = list(range(g0, min(g0 + a.group, len(wins))))
        outs = llm.generate([{"prompt_token_ids": wins[i]} for i in idx], sp, use_tqdm=False)
        nll, tids, tlps = [], [], []
        for i, o in zip(idx, outs):
            tgt, tid, tlp = topk_arrays(o.prompt_logprobs, wins[i], len(wins[i]) // 2, a.topk)
            nll.append(float(-tgt.mean()))
            tids.append(tid)
            tlps.append(tlp)
        path = os.path.join(a.topk_dir, f"{a.name.replace(':', '_').replace('/', '_')}.w{g0}.npz")
        np.savez(path, window_ids=np.array(idx), ids=np.stack(tids).astype(np.int32), lp=np.stack(tlps).astype(np.float32))
        emit("PART", {"phase": "ppl", "window_ids": idx, "window_nll": nll, "topk_files": [path],
                      "ppl_s": time.time() - t0})
    trials = d.get("niah", [])
    for phase in NIAH_PHASES:
        tl = [t for t in trials if f"niah_{t['context'] // 1024}k" == phase]
        if not tl or not a.niah:
            continue
        emit("PHASE", phase)
        t0 = time.time()
        outs = llm.generate([{"prompt_token_ids": t["ids"]} for t in tl],
                            SamplingParams(max_tokens=niah.MAX_NEW, temperature=0.0), use_tqdm=False)
        emit("PART", {"phase": phase, **niah.score(tl, [o.outputs[0].text for o in outs]),
                      phase + "_s": time.time() - t0})
    if a.gen_tokens:
        emit("PHASE", "greedy")
        gen = llm.generate([{"prompt_token_ids": w[:a.gen_prompt]} for w in wins[:8]],
                           SamplingParams(max_tokens=a.gen_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
        emit("PART", {"phase": "greedy", "greedy": [list(g.outputs[0].token_ids) for g in gen]})
    emit("DONE")
    return 0


# ---------------------------------------------------------------- parent: configs under a deadline
class Collector:
    """Builds one config's raw row from the child's PHASE/PART lines (thread-safe enough: one child
    per collector)."""

    def __init__(self, c):
        self.row = {"name": c.name, "family": c.family, "env": c.env, "llm": c.llm, "timing": {}}
        self.phase, self.done, self.completed = None, set(), False
        self.t_phase = time.monotonic()

    def log(self, line: str) -> None:
        """vLLM's capacity lines (ours and vLLM's own), wherever the child's logger writes them."""
        if "Kakeya KV:" in line or "GPU KV cache size" in line:
            self.row.setdefault("log", []).append(line[-400:])

    def __call__(self, line: str) -> None:
        self.log(line)
        kind, _, rest = line.partition(" ")
        if kind == "PHASE":
            self.phase, self.t_phase = json.loads(rest), time.monotonic()
        elif kind == "PART":
            part = json.loads(rest)
            ph = part.pop("phase")
            if ph == "ppl":
                for k in ("window_ids", "window_nll", "topk_files"):
                    self.row.setdefault(k, []).extend(part[k])
                self.row["timing"]["ppl_s"] = self.row["timing"].get("ppl_s", 0.0) + part.pop("ppl_s")
            else:
                self.row.update(part)
                self.done.add(ph)
            self.row["timing"][ph + "_end_s"] = time.monotonic() - self.t0
        elif kind == "DONE":
            self.completed = True

    def start(self):
        self.t0 = time.monotonic()


def finish_row(col: Collector, res, limit_s: float, n_windows: int, want_niah: bool) -> dict:
    """The raw row, with a not_measured entry for everything the child did not deliver and why."""
    r = col.row
    r["timing"]["wall_s"] = res.elapsed_s
    r["timing"]["exit"] = "timeout" if res.timed_out else f"rc {res.rc}"
    if col.completed:           # everything delivered (a hang in vLLM's teardown is cut, not counted)
        why = None
    elif res.timed_out:
        why = f"killed at the {limit_s:.0f} s limit in phase {col.phase!r}"
    else:
        tail = [l for l in res.stderr_tail.splitlines() if l.strip()]
        why = f"process failed (rc {res.rc}) in phase {col.phase!r}: {tail[-1][:300] if tail else 'no stderr'}"
        r["error_tail"] = res.stderr_tail[-1500:]
    if why is None:
        return r
    miss = r.setdefault("not_measured", [])
    if "load" not in col.done:
        miss.append({"what": "config", "reason": why})
        return r
    got = len(r.get("window_ids", []))
    if got < n_windows:
        miss.append({"what": "windows", "reason": f"{got} of {n_windows} windows measured; {why}"})
    for ph in NIAH_PHASES if want_niah else ():
        if ph not in col.done:
            miss.append({"what": ph, "reason": why})
    return r


def not_started(c, reason: str) -> dict:
    return {"name": c.name, "family": c.family, "env": c.env, "llm": c.llm,
            "not_measured": [{"what": "config", "reason": reason}]}


def child_env(c, gpu: int | None, base_env=None) -> dict:
    """The parent's environment without any KAKEYA_* (a sourced recipe must not leak into other
    configs) + the config's own, pinned to one GPU when lanes are used."""
    env = {k: v for k, v in (os.environ if base_env is None else base_env).items() if not k.startswith("KAKEYA_")}
    env.update(c.env)
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def child_cmd(c, a) -> list[str]:
    cmd = [sys.executable, "-m", "kakeya_kv.vllm_eval", "one", "--name", c.name, "--llm", json.dumps(c.llm),
           "--windows", a.windows, "--n", str(a.n), "--chunk", str(a.chunk), "--max-seqs", str(a.max_seqs),
           "--group", str(a.group), "--gpu-util", str(a.gpu_util), "--topk", str(a.topk),
           "--topk-dir", a.topk_dir, "--max-model-len", str(a.max_model_len), "--model", a.model,
           "--gen-tokens", str(a.gen_tokens), "--gen-prompt", str(a.gen_prompt)]
    return cmd + ([] if a.niah else ["--no-niah"])


def run_all(configs, a, make_cmd=None, on_row=None) -> list[dict]:
    """Run configs in order over a.gpus lanes (one GPU each), bounded by a.timeout per config and
    a.budget_s for the whole run (0 = none). Returns the raw rows in config order."""
    from .subproc import run_streaming
    t0 = time.monotonic()
    queue, rows, lock = list(configs), {}, threading.Lock()

    def lane(gpu):
        while True:
            with lock:
                if not queue:
                    return
                c = queue.pop(0)
            left = a.budget_s - (time.monotonic() - t0) - a.reserve_s if a.budget_s else float("inf")
            if left < a.min_config_s:
                r = not_started(c, f"not started: {max(left, 0):.0f} s of the call's budget left "
                                   f"(< {a.min_config_s:.0f} s needed)")
            else:
                limit = min(a.timeout, left)
                col = Collector(c)
                col.start()
                res = run_streaming((make_cmd or child_cmd)(c, a), limit, env=child_env(c, gpu if a.gpus > 1 else None),
                                    on_line=col, on_err=col.log, finished=lambda: col.completed,
                                    grace_s=a.exit_grace_s)
                r = finish_row(col, res, limit, a.n, a.niah)
                print(f"[{c.name}] {'ok' if not r.get('not_measured') else r['not_measured']} "
                      f"({res.elapsed_s:.0f} s, last phase {col.phase})", flush=True)
            with lock:
                rows[c.name] = r
                if on_row is not None:
                    on_row([rows[x.name] for x in configs if x.name in rows])

    threads = [threading.Thread(target=lane, args=(g,)) for g in range(max(a.gpus, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [rows[c.name] for c in configs]


# ---------------------------------------------------------------- results
def add_ratios_and_kld(rows: list[dict]) -> None:
    """ratio_vs_bf16 from capacities; per-window top-k KLD vs the baseline (computed once per row)."""
    import numpy as np

    from .quality import kld_topk
    base = next((r for r in rows if r["name"] == BASELINE and r.get("window_nll")), None)
    bcap = base.get("capacity_tokens") if base else None
    bmaps = {}
    if base:
        for f in base.get("topk_files", []):
            if os.path.exists(f):
                z = np.load(f, allow_pickle=False)
                for j, w in enumerate(z["window_ids"].tolist()):
                    bmaps[w] = (z["ids"][j], z["lp"][j])
    for r in rows:
        if r.get("capacity_tokens") and bcap:
            r["ratio_vs_bf16"] = r["capacity_tokens"] / bcap
        if "window_kld" in r or not r.get("window_nll"):
            continue
        if r is base:
            r["window_kld"] = [0.0] * len(r["window_nll"])
            continue
        mine = {}
        for f in r.get("topk_files", []):
            if os.path.exists(f):
                z = np.load(f, allow_pickle=False)
                for j, w in enumerate(z["window_ids"].tolist()):
                    mine[w] = (z["ids"][j], z["lp"][j])
        if not bmaps or any(w not in mine or w not in bmaps for w in r["window_ids"]):
            r["kld_missing_reason"] = "top-k log-probabilities of this config or of the baseline not available"
            continue
        r["window_kld"] = [float(kld_topk(bmaps[w][0], bmaps[w][1], mine[w][0], mine[w][1]).mean())
                           for w in r["window_ids"]]


def add_greedy(rows: list[dict]) -> None:
    base = next((r for r in rows if r["name"] == BASELINE and r.get("greedy")), None)
    for r in rows:
        if base and r.get("greedy"):
            first = [next((i for i, (x, y) in enumerate(zip(g, h)) if x != y), len(h))
                     for g, h in zip(r["greedy"], base["greedy"])]
            r["greedy_identical_prompts"] = sum(f == len(h) for f, h in zip(first, base["greedy"]))
            r["greedy_first_divergence"] = first


def header(rows: list[dict], a, meta: dict) -> dict:
    gpus = sorted({r["gpu"] for r in rows if r.get("gpu")})
    gpu = " / ".join(gpus) or "unknown (no config loaded)"
    if a.gpus > 1:
        gpu += f" ({a.gpus} GPUs of one host, configs spread over them)"
    sched = {json.dumps(r["scheduler"], sort_keys=True) for r in rows if r.get("scheduler")}
    return {"gpu": gpu, "model": "SmolLM2-135M-Instruct (gpu-kit bf16)", "corpus": meta.get("corpus", "?"),
            "windows": a.n, "backend": "vllm 0.26",
            "protocol": {"window_tokens": meta.get("window_tokens", 2048), "scored": "second half of each window",
                         "chunk": a.chunk, "max_num_seqs": a.max_seqs, "max_num_batched_tokens": a.chunk * a.max_seqs,
                         "long_prefill_token_threshold": a.chunk, "enforce_eager": True,
                         "gpu_memory_utilization": a.gpu_util, "max_model_len": a.max_model_len,
                         "prompt_logprobs_topk": a.topk, "per_config_limit_s": a.timeout, "budget_s": a.budget_s,
                         "scheduler_as_vllm_reports": [json.loads(s) for s in sorted(sched)],
                         "niah": {"contexts": meta.get("niah_contexts"), "depths": meta.get("niah_depths"),
                                  "max_new_tokens": meta.get("niah_max_new")}},
            **({"runs": meta["merged_runs"], "baseline_check": meta["baseline_check"]}
               if meta.get("merged_runs") else {}),
            "kld_method": f"top-{a.topk} prompt logprobs, baseline's top-{a.topk} + rest bucket (quality.kld_topk)",
            "ratio_method": "KV capacity tokens vLLM reports / FLASH_ATTN bf16's, same gpu_memory_utilization"}


def finish(rows: list[dict], a, meta: dict, aliases: dict | None = None) -> dict:
    from . import quality, report
    from .vllm_configs import VllmConfig
    add_ratios_and_kld(rows)
    add_greedy(rows)
    if meta.get("niah_missing_reason"):
        for r in rows:
            for k in NIAH_PHASES:
                if r.get(k) is None and not any(m["what"] in (k, "config") for m in r.get("not_measured", [])):
                    r.setdefault("not_measured", []).append({"what": k, "reason": meta["niah_missing_reason"]})
    by = {r["name"]: r for r in rows}
    full = list(rows)
    for alias, target in (aliases or {}).items():     # a recipe equal to a measured setting: not re-run
        t = by.get(target) or not_started(VllmConfig(target, "kakeya"), "its setting's config is missing from these rows")
        full.append({**{k: v for k, v in t.items() if k not in ("env", "llm")}, "name": alias, "same_setting_as": target})
    doc = quality.document(header(rows, a, meta), full, BASELINE)
    sched = [r["scheduler"] for r in rows if r.get("scheduler")]
    pc = doc["protocol_check"]        # the chunking the protocol relies on, as vLLM itself reports it
    pc["scheduler_ok"] = bool(sched) and all(s.get("long_prefill_token_threshold") == a.chunk
                                             and s.get("enable_chunked_prefill", True) for s in sched)
    if not pc["scheduler_ok"] and sched:
        pc["ok"] = False
    quality.validate(doc)
    out = Path(a.out)
    report.write_json(out, doc)
    report.write_json(out.with_suffix(".raw.json"), {"meta": meta, "rows": rows, "aliases": aliases or {}})
    out.with_suffix(".md").write_text(report.quality_markdown(doc))
    report.plot_quality(doc, out.with_suffix(".png"))
    v4 = report.issue4_doc(doc)
    # Issue 4's file compares the default format with fp8 and int4_per_token_head of the same run: a run without
    # all three must not replace a complete one, so it is written under another name.
    stem = "vllm_quality" if report.issue4_complete(v4) else "vllm_quality.partial"
    report.write_json(out.parent / f"{stem}.json", v4)
    (out.parent / f"{stem}.md").write_text(report.issue4_markdown(v4))
    if a.hf_json and Path(a.hf_json).exists():
        hf = json.loads(Path(a.hf_json).read_text())
        (out.parent / "HF_VS_VLLM.md").write_text(report.gap_markdown(hf, doc))
    return doc


def run(a) -> int:
    from .vllm_configs import dedupe, resolve
    names = [n for n in a.configs.split(",") if n]
    if BASELINE not in names:
        names.insert(0, BASELINE)        # ΔPPL, KLD and ratios are against it
    configs, aliases = dedupe([resolve(n) for n in names])
    d = json.loads(Path(a.windows).read_text())
    meta = d.get("meta", {})
    if a.niah and not d.get("niah"):      # a windows file made before NIAH existed: say so in every row
        print(f"{a.windows} has no NIAH prompts: NIAH not run (re-run `python -m kakeya_kv.vllm_eval prep`)")
        a.niah = False
        meta = {**meta, "niah_missing_reason": f"{a.windows} has no NIAH prompts (made before NIAH: re-run prep)"}
    if not a.niah:
        meta = {**meta, "niah_contexts": None,
                "niah_missing_reason": meta.get("niah_missing_reason") or a.no_niah_reason}
    a.n = min(a.n, len(d["windows"]))

    def write_partial(done: list[dict]):
        """Results so far, the configs still to run listed as such (a killed call leaves valid files)."""
        names_done = {r["name"] for r in done}
        rest = [not_started(c, "not run: the call ended first (partial results written during the run)")
                for c in configs if c.name not in names_done]
        try:
            finish(done + rest, a, meta, aliases)
        except Exception as e:      # a partial write must never stop the run itself
            print(f"partial results not written: {type(e).__name__}: {e}", flush=True)

    rows = run_all(configs, a, on_row=write_partial if a.write_partial else None)
    doc = finish(rows, a, meta, aliases)
    print(Path(a.out).with_suffix(".md").read_text())
    return 0 if all(r["ppl"] is not None for r in doc["configs"]) else 1


def better_measured(new: dict, old: dict) -> bool:
    """Whether `new` may replace `old` (same config name) in a merge: it measured the windows if `old` did, and
    left no more phases unmeasured (the baseline re-run without NIAH must not drop the NIAH one's results)."""
    if bool(new.get("window_nll")) != bool(old.get("window_nll")):
        return bool(new.get("window_nll"))
    return len(new.get("not_measured") or []) <= len(old.get("not_measured") or [])


def merge_rows(docs: list[tuple[str, dict]], tol: float = 0.0) -> tuple[list[dict], dict, dict]:
    """Rows of several raw results of one protocol -> one set (later files win per config name, but a row is
    never replaced by one that measured less, see better_measured). Runs are only comparable when each re-measured the
    baseline with the same per-window NLL (ΔPPL, KLD and ratios are taken against it in each run): otherwise
    refuse, naming the run and the largest difference."""
    import numpy as np
    rows, meta, aliases, runs, ref = {}, {}, {}, [], None
    for name, d in docs:
        meta = meta or d["meta"]
        aliases.update(d.get("aliases", {}))
        base = next((r for r in d["rows"] if r["name"] == BASELINE and r.get("window_nll")), None)
        if base is None:
            raise ValueError(f"{name}: no measured {BASELINE} row; runs without their own baseline cannot be merged")
        nll = np.asarray(base["window_nll"], dtype=float)
        if ref is None:
            ref = (name, base["window_ids"], nll, base.get("capacity_tokens"))
        else:
            if base["window_ids"] != ref[1]:
                raise ValueError(f"{name}: baseline windows differ from {ref[0]}'s")
            diff = float(np.abs(nll - ref[2]).max())
            if diff > tol:
                raise ValueError(f"{name}: baseline per-window NLL differs from {ref[0]}'s by up to {diff:.3g} "
                                 f"(> {tol}): not the same measurement conditions")
            if base.get("capacity_tokens") != ref[3]:
                raise ValueError(f"{name}: baseline KV capacity {base.get('capacity_tokens')} != {ref[3]} in {ref[0]}")
        measured = []
        for r in d["rows"]:
            if r["name"] not in rows or better_measured(r, rows[r["name"]]):
                rows[r["name"]] = r
            if r.get("window_nll") and r["name"] != BASELINE:
                measured.append(r["name"])
        runs.append({"file": name, "measured": measured})
    meta = {**meta, "merged_runs": runs, "baseline_check": f"{BASELINE} per-window NLL and KV capacity identical "
            f"in every run (max |difference| <= {tol})"}
    return list(rows.values()), meta, aliases


def merge(a) -> int:
    """Several raw files of the same protocol on the same card -> one result (see merge_rows)."""
    rows, meta, aliases = merge_rows([(f, json.loads(Path(f).read_text())) for f in a.inputs])
    if a.recipes:
        aliases.update(recipe_aliases(rows, [n if n.startswith("recipe:") else f"recipe:{n}"
                                             for n in a.recipes.split(",") if n]))
    finish(rows, a, meta, aliases)
    return 0


def recipe_aliases(rows: list[dict], recipes: list[str]) -> dict[str, str]:
    """Recipes written after the runs, named onto the measured row whose setting they equal (the same rule a run
    uses to skip re-running them); a recipe whose setting no row measured is an error, never a borrowed row."""
    from .config import ConfigError
    from .vllm_configs import dedupe, resolve
    measured = []
    for r in rows:
        if r.get("window_nll") and r["name"] != BASELINE and not r["name"].startswith("recipe:"):
            try:
                measured.append(resolve(r["name"]))
            except ConfigError:
                continue            # a row this checkout no longer knows by name cannot carry an alias
    wanted = [resolve(n) for n in recipes]
    _, alias = dedupe(measured + wanted)
    missing = [c.name for c in wanted if c.name not in alias]
    if missing:
        raise ValueError(f"{', '.join(missing)}: setting not measured in the merged runs (run it on the device)")
    return {c.name: alias[c.name] for c in wanted}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kakeya-kv eval --backend vllm")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prep", help="CPU: evaluation windows + NIAH prompts for the device")
    pp.add_argument("--out", default=".gpudata/windows.json")
    pp.add_argument("--n", type=int, default=32)
    pp.add_argument("--niah-contexts", default="4096,8192")
    pp.add_argument("--niah-depths", type=int, default=10, help="needle depths per context")
    pp.add_argument("--max-model-len", type=int, default=8192, help="SmolLM2's max_position_embeddings")
    pp.set_defaults(fn=prep)
    for name, fn in (("one", one), ("run", run), ("merge", merge)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        s.add_argument("--windows", default=".gpudata/windows.json")
        s.add_argument("--n", type=int, default=32)
        s.add_argument("--chunk", type=int, default=256, help="prefill tokens per request per step")
        s.add_argument("--max-seqs", type=int, default=32, help="requests in flight per step")
        s.add_argument("--group", type=int, default=16, help="windows per generate call (one PART each)")
        s.add_argument("--gpu-util", type=float, default=0.3)
        s.add_argument("--topk", type=int, default=20, help="prompt_logprobs k for the KLD")
        s.add_argument("--topk-dir", default=".gpudata/topk")
        s.add_argument("--max-model-len", type=int, default=8192)
        s.add_argument("--model", default=MODEL)
        s.add_argument("--gen-tokens", type=int, default=0, help="greedy parity tokens (issue 4; 0 = skip)")
        s.add_argument("--gen-prompt", type=int, default=1000)
        s.add_argument("--no-niah", dest="niah", action="store_false")
        s.add_argument("--no-niah-reason", default="NIAH not run in this call (--no-niah)",
                       help="what the results say about the skipped NIAH")
        if name == "one":
            s.add_argument("--name", required=True)
            s.add_argument("--llm", default="{}", help="JSON of extra LLM(...) arguments")
            continue
        s.add_argument("--out", default="benchmarks/results/quality.json")
        s.add_argument("--hf-json", default="benchmarks/results/quality_hf.json",
                       help="HF/CPU quality.json: HF_VS_VLLM.md is written next to --out when it exists")
        s.add_argument("--gpus", type=int, default=1, help="lanes, one GPU each (CUDA_VISIBLE_DEVICES)")
        s.add_argument("--timeout", type=float, default=240, help="wall seconds per config")
        s.add_argument("--budget-s", type=float, default=0, help="wall seconds for the whole run (0 = none)")
        s.add_argument("--reserve-s", type=float, default=15, help="kept for writing results at the end")
        s.add_argument("--min-config-s", type=float, default=45, help="no config is started with less left")
        s.add_argument("--exit-grace-s", type=float, default=20, help="a child that delivered DONE is killed after this")
        s.add_argument("--write-partial", action="store_true", help="rewrite the results after every config")
        if name == "run":
            s.add_argument("--configs", default="flash_bf16,kakeya_k4v3")
        else:
            s.add_argument("inputs", nargs="+")
            s.add_argument("--recipes", default="", help="recipe files (comma-separated) written after the runs: "
                           "each is reported as the measured row with the same setting, or refused")
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
