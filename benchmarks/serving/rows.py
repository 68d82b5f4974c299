"""Configurations, job plans and the serving.json row schema (pure Python, CPU-tested).

Schema (issue 6), one row per (model, config, tp): every SCHEMA field is present; a field that was
not measured is None and `not_measured[field]` says why. Extra fields are allowed.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

SCHEMA = ("model", "config", "tp", "capacity_tokens", "decode_tok_s_b16_32k", "decode_tok_s_max_batch_32k",
          "max_batch_32k", "tpot_p50_ms", "ttft_p50_ms", "prefill_tok_s")

# Every measured field the offline child may produce (schema fields and extras).
MEASURED = ("capacity_tokens", "prefill_tok_s", "decode_tok_s_b16_32k", "decode_tok_s_max_batch_32k",
            "max_batch_32k", "decode_tok_s_b16_8k", "decode_tok_s_max_batch_8k", "max_batch_8k")
LATENCY = ("tpot_p50_ms", "ttft_p50_ms")

# name: (family, LLM kwargs, env). Rows run eager unless the kwargs say otherwise (same mode for all).
CONFIGS: dict[str, tuple[str, dict, dict]] = {
    "flash_bf16": ("bf16", {"attention_backend": "FLASH_ATTN"}, {}),
    "flash_bf16_graphs": ("bf16", {"attention_backend": "FLASH_ATTN", "enforce_eager": False}, {}),
    "kakeya": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_FORMAT": "default"}),
    # The decode-then-attend prefill launch (kakeya_kernels.variants.PREFILL_CANDIDATES["scratch"]; not yet default).
    "kakeya_scratch": ("kakeya", {"attention_backend": "KAKEYA"},
                       {"KAKEYA_FORMAT": "default", "KAKEYA_PREFILL_VARIANT": "candidate:scratch"}),
    "kakeya_scratch_fa": ("kakeya", {"attention_backend": "KAKEYA"},
                          {"KAKEYA_FORMAT": "default", "KAKEYA_PREFILL_VARIANT": "candidate:scratch_fa"}),
    # K on the uniform grid and the int8 K-score decode launch (variants.CANDIDATES["ki8"]; opt-in in session 12, the
    # default's launch since session 13).
    "kakeya_ki8": ("kakeya", {"attention_backend": "KAKEYA"},
                   {"KAKEYA_FORMAT": "default", "KAKEYA_K_GRID": "uniform", "KAKEYA_DECODE_VARIANT": "candidate:ki8"}),
    "kakeya_graphs": ("kakeya", {"attention_backend": "KAKEYA", "enforce_eager": False},
                      {"KAKEYA_FORMAT": "default", "KAKEYA_CUDA_GRAPHS": "1"}),
    # Session 13: the default (KAKEYA_K_GRID=auto) is the int8 K-score launch above; these keep the Lloyd-Max K grid
    # and the decoded-K launch (the default of sessions 9-12) for side-by-side rows.
    # Exact tails in the requests' own pages (KAKEYA_TAIL_STORAGE=pages, experimental): capacity without the pool.
    "kakeya_tailpages": ("kakeya", {"attention_backend": "KAKEYA"},
                         {"KAKEYA_FORMAT": "default", "KAKEYA_TAIL_STORAGE": "pages"}),
    "kakeya_graphs_tailpages": ("kakeya", {"attention_backend": "KAKEYA", "enforce_eager": False},
                                {"KAKEYA_FORMAT": "default", "KAKEYA_CUDA_GRAPHS": "1", "KAKEYA_TAIL_STORAGE": "pages"}),
    # Prefill chunks attending their own tokens exact in one launch per step (KAKEYA_PREFILL_ATTEND=chunk, opt-in,
    # session 16): the prefill row (8192-token prompt) against kakeya_graphs.
    "kakeya_graphs_chunk": ("kakeya", {"attention_backend": "KAKEYA", "enforce_eager": False},
                            {"KAKEYA_FORMAT": "default", "KAKEYA_CUDA_GRAPHS": "1", "KAKEYA_PREFILL_ATTEND": "chunk"}),
    # Both candidates for the default together (session 17): tails in pages + chunk prefill.
    "kakeya_graphs_pages_chunk": ("kakeya", {"attention_backend": "KAKEYA", "enforce_eager": False},
                                  {"KAKEYA_FORMAT": "default", "KAKEYA_CUDA_GRAPHS": "1",
                                   "KAKEYA_TAIL_STORAGE": "pages", "KAKEYA_PREFILL_ATTEND": "chunk"}),
    "kakeya_lloyd": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_FORMAT": "default", "KAKEYA_K_GRID": "lloyd"}),
    "kakeya_graphs_lloyd": ("kakeya", {"attention_backend": "KAKEYA", "enforce_eager": False},
                            {"KAKEYA_FORMAT": "default", "KAKEYA_CUDA_GRAPHS": "1", "KAKEYA_K_GRID": "lloyd"}),
    "kakeya_k3v2": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2"}),
    "kakeya_v13": ("kakeya", {"attention_backend": "KAKEYA"}, {"KAKEYA_FORMAT": "v13"}),
    "fp8": ("fp8", {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "fp8"}, {}),
    "int4_per_token_head": ("int4_per_token_head",
                            {"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "int4_per_token_head"}, {}),
    # TurboQuant picks its own backend (and FLASH_ATTN for its forced boundary layers); needs FA2.
    "turboquant_4bit_nc": ("turboquant", {"kv_cache_dtype": "turboquant_4bit_nc"}, {}),
    "turboquant_3bit_nc": ("turboquant", {"kv_cache_dtype": "turboquant_3bit_nc"}, {}),
}
# vLLM's own formats in the mode users get by default (no --enforce-eager: compiled + CUDA graphs), so that every
# row of a one-run comparison runs in the same execution mode as flash_bf16_graphs and the Kakeya default.
for _rival in ("fp8", "int4_per_token_head", "turboquant_4bit_nc", "turboquant_3bit_nc"):
    _fam, _kw, _env = CONFIGS[_rival]
    CONFIGS[_rival + "_graphs"] = (_fam, {**_kw, "enforce_eager": False}, dict(_env))
BASELINE = "flash_bf16"
# The bf16 reference of a row is the bf16 row run in the same execution mode: CUDA-graph rows against
# flash_bf16_graphs (H200, Qwen3-8B-like, b16 32k: eager bf16 430 tok/s in session 8's call, graphs bf16 1039 in
# session 9's, serving.json; an eager reference would flatter a graphs row).
REFERENCE = {c: "flash_bf16_graphs" for c, (_, kw, _) in CONFIGS.items()
             if kw.get("enforce_eager") is False and c != "flash_bf16_graphs"}
BASELINES = (BASELINE, *sorted(set(REFERENCE.values())))


def reference_config(config: str) -> str:
    """The bf16 config a row's ratios and goals are measured against."""
    return REFERENCE.get(config, BASELINE)

# Configs that run only up to a context, and why (the cut fields get this as their reason). v13 is served
# (kernels/v13_*.py, eager, no CUDA graphs) but session 7's H200 bench timed its fused decode at 8.0 ms per
# layer for batch 16 at 16k, head_dim 128 (0.031x FA3) and its seal at 34 ms per 512-token block-layer
# (head_dim 64): a 32k prefix (63 blocks x 36 layers) and 35-step decode passes at batch 16 and at the largest
# batch do not fit one row's time limit after an 8B init; 8k does.
CONTEXT_CAP: dict[str, tuple[int, str]] = {
    "kakeya_v13": (8192, "v13 runs at 8k only here: its decode is 0.031x FA3 at head_dim 128 and its seal "
                         "34 ms per block-layer (session 7 kernel bench), a 32k row does not fit the row time limit"),
}

# model name -> directory with config.json (dummy weights) or a real HF folder on the device.
MODELS = {
    "qwen3-8b-like": {"path": str(HERE / "models" / "qwen3-8b-like"), "dummy": True},
    "llama3.1-8b-like": {"path": str(HERE / "models" / "llama3.1-8b-like"), "dummy": True},
    "smollm2-135m": {"path": "/tmp/models/SmolLM2-135M-Instruct", "dummy": False},
}

# Device-call plans: rows in priority order (the most decisive first; a call deadline cuts the tail).
# TurboQuant goes last: on a fresh machine vLLM's model warm-up took 119 s of its 148 s start-up and the row then
# hit session 8's 205 s limit in our warm-up, measuring nothing but capacity (serving_main.json) — in that call's
# order (5th of 14) it took the time of the 9 rows after it.
_QWEN = [("qwen3-8b-like", c) for c in ("flash_bf16", "kakeya", "kakeya_scratch_fa", "kakeya_scratch", "fp8",
                                         "int4_per_token_head")]
_TQ = [("qwen3-8b-like", c) for c in ("turboquant_4bit_nc", "turboquant_3bit_nc")]
_V13 = [("qwen3-8b-like", "kakeya_v13")]
_MORE = ([("qwen3-8b-like", "kakeya_k3v2")]
         + [("llama3.1-8b-like", c) for c in ("flash_bf16", "kakeya")]
         + [("qwen3-8b-like", c) for c in ("flash_bf16_graphs", "kakeya_graphs")]
         + [("smollm2-135m", c) for c in ("flash_bf16", "kakeya")])
# Issue 6 in one run per card, every row in vLLM's default execution mode (CUDA graphs), 32k only (the schema's
# contexts): Qwen3-8B-like bf16 / Kakeya default / tails in pages + chunk prefill (the default candidates) / fp8 /
# int4, Llama-3.1-8B-like and SmolLM2 bf16 / Kakeya, v13 (eager: the seed format takes no graphs) with its eager bf16
# reference, TurboQuant last (slow start).
_ISSUE6 = ([("qwen3-8b-like", c) for c in ("flash_bf16_graphs", "kakeya_graphs", "kakeya_graphs_pages_chunk",
                                           "fp8_graphs", "int4_per_token_head_graphs")]
           + [(m, c) for m in ("llama3.1-8b-like", "smollm2-135m") for c in ("flash_bf16_graphs", "kakeya_graphs")]
           + [("qwen3-8b-like", c) for c in ("flash_bf16", "kakeya_v13",
                                             "turboquant_4bit_nc_graphs", "turboquant_3bit_nc_graphs")])
PLANS = {
    "issue6": _ISSUE6,
    "main": _QWEN + _MORE + _V13 + _TQ,  # every row; a deadline cuts the tail, `more`/`rest`/`tq` pick it up later
    "more": _QWEN[2:] + _MORE + _V13 + _TQ,   # all but main's two decisive rows (--rows to skip measured ones)
    # After session 8's main call (bf16, kakeya, fp8, int4 measured; TurboQuant 4bit_nc capacity only): the rows it
    # had no time for, TurboQuant excepted (its own call, `tq`, so that its start-up cannot starve these).
    "rest": [("qwen3-8b-like", c) for c in ("kakeya_scratch_fa", "kakeya_scratch")] + _MORE + _V13,   # + session 11's
    "tq": _TQ,
    "tp2": [("qwen3-8b-like", c) for c in ("flash_bf16", "kakeya")],
    "smoke": [("smollm2-135m", c) for c in ("flash_bf16", "kakeya")],
}
# Per-config (row limit s, least time left to start the row s), overriding the call's --row-limit-s/--min-row-s:
# TurboQuant needed more than 205 s before its first measurement in session 8, so a shorter slot is wasted.
ROW_TIME = {c: (330.0, 240.0) for c in CONFIGS if c.startswith("turboquant")}


def row_time(config: str, limit_s: float, min_s: float) -> tuple[float, float]:
    """(row limit, least time left to start it) for a config: ROW_TIME's values, else the call's."""
    return ROW_TIME.get(config, (limit_s, min_s))


_STATUS_RANK = {"ok": 2, "partial": 1, "not_run": 0}


def pick_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, config, tp) from several calls: the most complete status wins, then the later call;
    the first occurrence keeps its position."""
    best: dict = {}
    order = []
    for r in rows:
        key = (r["model"], r["config"], r["tp"])
        if key not in best:
            order.append(key)
            best[key] = r
        elif _STATUS_RANK.get(r.get("status"), 0) >= _STATUS_RANK.get(best[key].get("status"), 0):
            best[key] = r
    return [best[k] for k in order]


def parse_rows(spec: str) -> list[tuple[str, str]]:
    """A plan name, or "model:config,model:config,..."; validated against MODELS and CONFIGS."""
    if spec in PLANS:
        return list(PLANS[spec])
    out = []
    for item in spec.split(","):
        model, sep, config = item.strip().partition(":")
        if not sep or model not in MODELS or config not in CONFIGS:
            raise ValueError(f"row {item!r}: expected MODEL:CONFIG with MODEL in {sorted(MODELS)} and CONFIG in "
                             f"{sorted(CONFIGS)}, or a plan name {sorted(PLANS)}")
        out.append((model, config))
    return out


def refusal(config: str, env_settings=None) -> str | None:
    """Why the Kakeya backend refuses a config before any GPU work (asked from its own start-up checks)."""
    family, _, env = CONFIGS[config]
    if family != "kakeya":
        return None
    if env_settings is None:
        from kakeya_v1_3_ppl.checks import settings as env_settings
    try:
        env_settings(env=dict(env))
    except ValueError as e:
        return f"refused by the Kakeya backend: {e}"
    return None


def row_contexts(config: str, contexts: list[int]) -> tuple[list[int], dict[str, str]]:
    """The contexts a config runs at, and a reason for each field of the contexts it skips (CONTEXT_CAP)."""
    cap = CONTEXT_CAP.get(config)
    if cap is None:
        return list(contexts), {}
    limit, why = cap
    skipped = {field_name(m, c): why for c in contexts if c > limit
               for m in ("decode_tok_s_b16", "decode_tok_s_max_batch", "max_batch")}
    return [c for c in contexts if c <= limit], skipped


def field_name(measure: str, context: int) -> str:
    """decode_tok_s_b16 + 32768 -> decode_tok_s_b16_32k."""
    return f"{measure}_{context // 1024}k"


def assemble_row(model: str, config: str, tp: int, data: dict, *, status: str, reason: str | None = None,
                 skipped: dict | None = None) -> dict:
    """A schema row from what a child reported.

    status: "ok" (child finished), "partial" (killed or failed after some measurements), "not_run".
    `reason` explains every schema/measured field still missing; `skipped` holds the child's own
    per-field reasons (e.g. "does not fit"), which win over the generic one.
    """
    row = {k: v for k, v in data.items() if k not in ("not_measured",)}
    row.update(model=model, config=config, tp=tp, family=CONFIGS[config][0], status=status)
    nm = dict(data.get("not_measured") or {})
    nm.update(skipped or {})
    for f in SCHEMA + MEASURED:
        row.setdefault(f, None)
        if row[f] is None and f not in nm:
            if f in LATENCY:
                nm[f] = "latency sweep not run for this row (serve_bench.py sweep, separate call)"
            else:
                nm[f] = reason or "not reported by the benchmark child"
    row["not_measured"] = {k: v for k, v in nm.items() if row.get(k) is None}
    return row


def check_row(row: dict) -> None:
    """Raise if a row breaks the schema: a missing field, a wrong type, a None without a reason."""
    for f in SCHEMA:
        if f not in row:
            raise ValueError(f"row {row.get('model')}/{row.get('config')}: missing field {f!r}")
    if not isinstance(row["model"], str) or not isinstance(row["config"], str) or not isinstance(row["tp"], int):
        raise ValueError("model/config must be str and tp int")
    for f in SCHEMA[3:]:
        v = row[f]
        if v is None:
            if f not in row.get("not_measured", {}):
                raise ValueError(f"row {row['model']}/{row['config']}: {f} is None without a reason")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"row {row['model']}/{row['config']}: {f}={v!r} is not a non-negative number")
    for f in ("capacity_tokens", "max_batch_32k"):
        if row[f] is not None and not isinstance(row[f], int):
            raise ValueError(f"{f} must be an int")


def merge_latency(rows: list[dict], sweep_rows: list[dict], ref_rate: float | None) -> list[dict]:
    """Copy TPOT/TTFT p50 at the reference request rate from sweep rows into matching offline rows."""
    by_key = {(s["model"], s["config"], s["tp"]): s for s in sweep_rows}
    out = []
    for r in rows:
        r = dict(r, not_measured=dict(r.get("not_measured", {})))
        s = by_key.get((r["model"], r["config"], r["tp"]))
        if s is not None:
            r["sweep"] = s.get("sweep", [])
            pts = [p for p in r["sweep"] if p.get("completed")]
            pick = [p for p in pts if p.get("request_rate") == ref_rate] if ref_rate is not None else pts[:1]
            if pick:
                r["latency_request_rate"] = pick[0]["request_rate"]
                for f in LATENCY:
                    r[f] = pick[0].get(f)
                    if r[f] is not None:
                        r["not_measured"].pop(f, None)
            elif s.get("error"):
                for f in LATENCY:
                    r["not_measured"][f] = f"sweep failed: {s['error'][:200]}"
        out.append(r)
    return out
