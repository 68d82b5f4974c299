"""The quality.json document (issue 5) from raw per-config measurements, for both backends.

A *raw row* is what one configuration measured, with nothing derived yet:
    {"name", "family", "ratio_vs_bf16",            # ratio: vLLM capacity or block-format bytes
     "window_ids": [int], "window_nll": [float],    # per evaluation window, second half scored
     "window_kld": [float] | absent,                # per window, vs the baseline (same window ids)
     "niah_4k": float, "niah_8k": float, ...        # NIAH fractions (+ hits/answers, kept as they are)
     "not_measured": [{"what": str, "reason": str}], ...extra fields kept}
`row()` turns it into the schema's fields; `document()` adds the header, the protocol check and the
top-level not_measured list. A missing measurement is None plus a reason, never a dropped row.
"""
from __future__ import annotations

import math

import numpy as np

SCHEMA_FIELDS = ("name", "family", "ratio_vs_bf16", "ppl", "ppl_ci95", "delta_ppl_pct", "kld", "niah_4k", "niah_8k")
NIAH_KEYS = ("niah_4k", "niah_8k")


def _t95(dof: int) -> float:
    from .harness import t95     # one t table for the whole package
    return t95(dof)


def mean_ci(xs: list[float]) -> tuple[float, list[float] | None]:
    """Mean and 95 % t-interval of the mean (None with fewer than 2 values)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = _t95(n - 1) * sd / math.sqrt(n)
    return m, [m - h, m + h]


def ppl_with_ci(nll: list[float]) -> tuple[float, list[float] | None]:
    """PPL = exp(mean per-window NLL); its interval from the windows' spread (text variation included)."""
    m, ci = mean_ci(nll)
    return math.exp(m), None if ci is None else [math.exp(ci[0]), math.exp(ci[1])]


def paired_delta_pct(nll: list[float], base_nll: list[float]) -> tuple[float, list[float] | None]:
    """ΔPPL % vs the baseline on the same windows, with the 95 % interval of the paired NLL difference
    (the text's own difficulty cancels, so this interval is the one that says "different")."""
    m, ci = mean_ci([a - b for a, b in zip(nll, base_nll)])
    pct = lambda x: 100 * (math.exp(x) - 1)
    return pct(m), None if ci is None else [pct(ci[0]), pct(ci[1])]


def kld_topk(base_ids, base_lp, cfg_ids, cfg_lp) -> np.ndarray:
    """Per-position KL(baseline ‖ config) from top-k log-probabilities (vLLM's prompt_logprobs=k).

    Both distributions are coarse-grained to the baseline's k tokens + one "rest" bucket (a proper
    KL >= 0, exact when k is the whole vocabulary). A baseline token absent from the config's top-k
    gets an equal share of the config's mass outside its top-k, at most the config's k-th probability.
    Arrays [N, k]: token ids (int) and natural-log probabilities (float), any order.
    """
    base_ids, cfg_ids = np.asarray(base_ids), np.asarray(cfg_ids)
    base_lp, cfg_lp = np.asarray(base_lp, np.float64), np.asarray(cfg_lp, np.float64)
    match = base_ids[:, :, None] == cfg_ids[:, None, :]                       # [N, k, k]
    found = match.any(-1)
    outside = np.clip(1.0 - np.exp(cfg_lp).sum(-1, keepdims=True), 1e-30, 1.0)
    share = np.log(outside / np.maximum((~found).sum(-1, keepdims=True), 1))
    fill = np.minimum(cfg_lp.min(-1, keepdims=True), share)
    q_lp = np.where(found, np.where(match, cfg_lp[:, None, :], -np.inf).max(-1), fill)
    p = np.exp(base_lp)
    kl = (p * (base_lp - q_lp)).sum(-1)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(q_lp).sum(-1), 1e-12, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    return kl + rest


def _miss(r: dict, what: str, reason: str) -> None:
    r.setdefault("not_measured", [])
    if not any(m["what"] == what for m in r["not_measured"]):
        r["not_measured"].append({"what": what, "reason": reason})


def row(raw: dict, base: dict | None) -> dict:
    """Schema fields for one config. `base` is the baseline's raw row (None: baseline not measured).
    Every schema field left None gets a not_measured entry with its reason."""
    r = dict(raw)
    r["not_measured"] = list(raw.get("not_measured", []))
    ids, nll = raw.get("window_ids") or [], raw.get("window_nll") or []
    r.setdefault("ratio_vs_bf16", None)
    r.update(ppl=None, ppl_ci95=None, delta_ppl_pct=None, delta_ppl_pct_ci95=None, kld=None, kld_ci95=None)
    if nll:
        r["windows"] = len(nll)
        r["ppl"], r["ppl_ci95"] = ppl_with_ci(nll)
        if r["ppl_ci95"] is None:
            _miss(r, "ppl_ci95", "fewer than 2 windows measured")
    bmap = dict(zip(base.get("window_ids") or [], base.get("window_nll") or [])) if base else {}
    common = [i for i in ids if i in bmap]
    if nll and common:
        mine = dict(zip(ids, nll))
        r["delta_ppl_pct"], r["delta_ppl_pct_ci95"] = paired_delta_pct([mine[i] for i in common],
                                                                       [bmap[i] for i in common])
        r["delta_windows"] = len(common)
    elif nll:
        _miss(r, "delta_ppl_pct", "baseline not measured on these windows")
    kld = raw.get("window_kld")
    if kld:
        r["kld"], r["kld_ci95"] = mean_ci([float(x) for x in kld])
    elif nll:
        _miss(r, "kld", raw.get("kld_missing_reason", "baseline log-probabilities not available"))
    for k in NIAH_KEYS:
        r.setdefault(k, None)
    # Whatever is still None: the config-level reason (it never ran / failed) or the phase that did not finish.
    whole = next((m["reason"] for m in r["not_measured"] if m["what"] == "config"), None)
    for k in SCHEMA_FIELDS:
        if r.get(k) is None:
            _miss(r, k, whole or ("capacity of this config or of the baseline not measured" if k == "ratio_vs_bf16"
                                  else "no window measured" if k in ("ppl", "ppl_ci95", "delta_ppl_pct", "kld")
                                  else "not run"))
    return r


def protocol_check(rows: list[dict], base_name: str, tol: float = 1e-6) -> dict:
    """Proof that scored tokens read the compressed cache: every TurboQuant preset's per-window NLL
    differs from the bf16 baseline's and from every other preset's (in one unchunked prefill vLLM's
    TurboQuant attends raw K/V and all presets come out identical)."""
    by = {r["name"]: dict(zip(r.get("window_ids") or [], r.get("window_nll") or [])) for r in rows}
    tq = [r["name"] for r in rows if r.get("family") == "turboquant" and by[r["name"]]]

    def differs(a: str, b: str) -> bool | None:
        common = set(by[a]) & set(by[b])
        return None if not common else max(abs(by[a][i] - by[b][i]) for i in common) > tol

    vs_base = {n: differs(n, base_name) if by.get(base_name) else None for n in tq}
    pairs = {f"{a}|{b}": differs(a, b) for i, a in enumerate(tq) for b in tq[i + 1:]}
    verdicts = list(vs_base.values()) + list(pairs.values())
    ok = None if not tq or None in verdicts else all(verdicts)
    return {"turboquant_measured": tq, "differs_from_baseline": vs_base, "pairwise_differ": pairs, "ok": ok,
            "rule": f"max |per-window NLL difference| > {tol} on common windows"}


def document(header: dict, raw_rows: list[dict], base_name: str) -> dict:
    """The quality.json document: header (gpu, model, corpus, windows, protocol...) + rows."""
    base = next((r for r in raw_rows if r["name"] == base_name and r.get("window_nll")), None)
    rows = [row(r, base) for r in raw_rows]
    missing = [{"name": r["name"], **m} for r in rows for m in r["not_measured"]]
    return {**header, "baseline": base_name, "configs": rows, "not_measured": missing,
            "protocol_check": protocol_check(rows, base_name)}


def validate(doc: dict) -> None:
    """Raise ValueError when the document breaks the issue's schema (types; None only when listed as
    not measured)."""
    for k, typ in (("gpu", str), ("model", str), ("corpus", str), ("windows", int), ("configs", list)):
        if not isinstance(doc.get(k), typ):
            raise ValueError(f"quality.json: {k!r} must be {typ.__name__}, got {doc.get(k)!r}")
    for r in doc["configs"]:
        missing = {m["what"] for m in r.get("not_measured", [])}
        for k in SCHEMA_FIELDS:
            if k not in r:
                raise ValueError(f"quality.json: config {r.get('name')!r} lacks {k!r}")
            v = r[k]
            if v is None:
                if k not in missing:
                    raise ValueError(f"quality.json: {r['name']}.{k} is null but not listed as not measured")
            elif k == "ppl_ci95":
                if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v)):
                    raise ValueError(f"quality.json: {r['name']}.ppl_ci95 must be [float, float], got {v!r}")
            elif k in ("name", "family"):
                if not isinstance(v, str):
                    raise ValueError(f"quality.json: {r['name']}.{k} must be a string")
            elif not isinstance(v, float) or not math.isfinite(v):
                raise ValueError(f"quality.json: {r['name']}.{k} must be a finite float, got {v!r}")


# ---------------------------------------------------------------- results written before this schema
HF_TO_VLLM = {"bf16": "flash_bf16", "fp8_e4m3": "triton_fp8"}     # harness format -> vLLM config name


def from_codec_compare(*docs: dict) -> dict:
    """A quality document from `kakeya-kv compare` results (codec_compare*.json; a later document's
    row replaces an earlier one of the same name). Those files keep no per-window NLL and ran no NIAH."""
    rows = {}
    for d in docs:
        for f in d["formats"]:
            name = HF_TO_VLLM.get(f["name"], f["name"])
            rows[name] = {"name": name, "family": f["family"], "hf_format": f["name"],
                          "ratio_vs_bf16": float(f["ratio_vs_bf16"]), "ppl": float(f["ppl"]), "ppl_ci95": None,
                          "delta_ppl_pct": float(f["delta_ppl_pct"]), "delta_ppl_pct_ci95": f.get("delta_ppl_pct_ci95"),
                          "kld": float(f["kld"]), "niah_4k": None, "niah_8k": None, "windows": d["windows"],
                          "source_command": d.get("command"),
                          "not_measured": [{"what": "ppl_ci95", "reason": "per-window NLL not kept by compare"}]
                          + [{"what": k, "reason": "compare runs no NIAH"} for k in NIAH_KEYS]}
    last = docs[-1]
    doc = {"gpu": "cpu (HF harness)", "model": last["model"], "corpus": last["corpus"],
           "windows": min(d["windows"] for d in docs), "backend": "HF/CPU harness (kakeya-kv compare)",
           "kld_method": "full vocabulary", "ratio_method": "whole-model block-format bytes per token vs bf16",
           "baseline": "flash_bf16", "configs": list(rows.values())}
    doc["not_measured"] = [{"name": r["name"], **m} for r in doc["configs"] for m in r["not_measured"]]
    return doc


def from_vllm_quality(old: dict) -> dict:
    """A quality document from a vllm_quality.json written before quality.json existed (session 3:
    one window per step, no top-k log-probabilities, no NIAH)."""
    rows = [r for r in old["configs"] if r.get("window_nll")]
    base = next(r for r in rows if r["name"] == "flash_bf16")
    raw = [{"name": r["name"], "family": r["family"], "capacity_tokens": r["capacity_tokens"],
            "ratio_vs_bf16": r["capacity_tokens"] / base["capacity_tokens"],
            "window_ids": list(range(len(r["window_nll"]))), "window_nll": r["window_nll"],
            "window_kld": [0.0] * len(r["window_nll"]) if r is base else None,
            "kld_missing_reason": "top-k log-probabilities not recorded in that run",
            "not_measured": [{"what": k, "reason": "NIAH not run in that call"} for k in NIAH_KEYS]} for r in rows]
    head = {"gpu": old["gpu"], "model": old["model"], "corpus": "Jane Austen evaluation books (the harness's windows)",
            "windows": old["windows"], "backend": "vllm 0.26 (vllm_quality.json, before quality.json)",
            "protocol": {"chunk": old.get("chunk"), "max_num_batched_tokens": old.get("chunk"), "max_num_seqs": 8},
            "ratio_method": "KV capacity tokens vLLM reports / FLASH_ATTN bf16's"}
    return document(head, raw, "flash_bf16")


def load_any(path) -> dict:
    """quality.json, or a codec_compare.json / legacy vllm_quality.json converted to its schema."""
    import json
    from pathlib import Path
    d = json.loads(Path(path).read_text())
    if "formats" in d:
        return from_codec_compare(d)
    if d.get("configs") and "ppl_ci95" not in d["configs"][0]:
        return from_vllm_quality(d)
    return d
