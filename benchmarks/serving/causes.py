"""Why a Kakeya serving row misses an issue-6 goal: arithmetic on measured numbers only (pure Python, CPU-tested).

Inputs: the serving rows (serving.json) and, for the decode and prefill models, a kernel benchmark file
(kernels.json of benchmarks/kernels). Every output says which measured numbers it comes from; the step-time and
prefill models are predictions from isolated kernel timings, to be read as hypotheses, not measurements.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .rows import MODELS

BLOCK_TOKENS = 512     # kakeya_kv.format.BLOCK_TOKENS (not imported: that module loads torch); a test checks it

_BPT = re.compile(r"([\d.]+) B/token/head")
_RATIO = re.compile(r"([\d.]+)x vs bf16")


def _logged(row: dict, pattern: re.Pattern) -> float | None:
    m = pattern.search(row.get("kakeya_log") or "")
    return float(m[1]) if m else None


def logged_ratio(row: dict) -> float | None:
    """The backend's own bytes ratio vs bf16 pages (its start-up line; covers per-layer widths and exact layers)."""
    return _logged(row, _RATIO)


def logged_bytes_per_token_head_layer(row: dict) -> float | None:
    """The backend's B/token/head/layer figure (average over layers) from its start-up line."""
    return _logged(row, _BPT)


def query_heads(row: dict) -> int | None:
    """Query heads of the row's model: recorded in the row, else the model's config.json (dummy models)."""
    if row.get("num_attention_heads"):
        return int(row["num_attention_heads"])
    p = Path(MODELS.get(row["model"], {}).get("path", "")) / "config.json"
    return json.load(open(p))["num_attention_heads"] if p.is_file() else None


def bf16_bytes_per_token(row: dict) -> int:
    """K and V, 2 bytes each, every layer and KV head."""
    return 2 * 2 * row["num_layers"] * row["num_kv_heads"] * row["head_dim"]


def capacity(k: dict, b: dict, tol: float, context: int = 32768) -> dict | None:
    """Where the Kakeya row's KV bytes went, relative to the bf16 row of the same model (same memory settings).

    Assumes the non-KV memory other than the plugin's is the same in both rows (vLLM logs the same weights,
    activation peak and non-torch memory for every backend at these settings)."""
    bpthl = logged_bytes_per_token_head_layer(k)
    if bpthl is None or not k.get("capacity_tokens") or not b.get("capacity_tokens"):
        return None
    bpt_k = bpthl * k["num_layers"] * k["num_kv_heads"]
    kv_b = b["capacity_tokens"] * bf16_bytes_per_token(b)
    kv_k = k["capacity_tokens"] * bpt_k
    pool = (k.get("kakeya_tail_pool_mib") or 0) * 2 ** 20
    seqs = k["max_num_seqs"]
    per_row = pool / seqs
    other = kv_b - kv_k - pool
    out = {"bytes_per_token_bf16": bf16_bytes_per_token(b), "bytes_per_token_kakeya": bpt_k,
           "kv_bytes_bf16": kv_b, "kv_bytes_kakeya": kv_k, "tail_pool_bytes": pool, "other_bytes": other,
           "expected_ratio": 4 * k["head_dim"] / bpthl, "measured_ratio": k["capacity_tokens"] / b["capacity_tokens"],
           "ratio_without_pool": kv_b / bpt_k / b["capacity_tokens"], "pool_share": (kv_b - kv_k) / kv_b,
           "tail_bytes_per_row": per_row, "tail_tokens_per_row": per_row / bpt_k, "context": context,
           "tail_share_of_request": per_row / bpt_k / context, "max_num_seqs": seqs}
    # Largest max_num_seqs whose pool (plus the other plugin bytes) stays within the tolerance, and the
    # max_num_seqs at which `context`-token requests fill the capacity exactly (more rows buy no concurrency).
    out["max_seqs_within_tol"] = math.floor((tol * kv_b - other) / per_row) if per_row else None
    out["balanced_seqs"] = (kv_b - other) / (per_row + context * bpt_k)
    return out


def _ns(us: float, batch: int, context: int) -> float:
    return us * 1e3 / (batch * context)


def kernel_costs(kernels: dict, head_dim: int, batch: int = 64) -> dict | None:
    """ns per cached token per layer (all KV heads) of our decode kernel and FA3 bf16, median over the kernel
    bench's rows at this head_dim and batch; the byte floor likewise; the baseline launch's cost per query tile
    (the prefill path) from the variant sweep."""
    rows = [r for r in kernels.get("decode", []) if r.get("head_dim") == head_dim and r.get("batch") == batch
            and str(r.get("format", "")).startswith("kakeya") and r.get("fa3_bf16_us")]
    if not rows:
        return None

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    out = {"ours_ns": med([_ns(r["us"], batch, r["context"]) for r in rows]),
           "fa3_ns": med([_ns(r["fa3_bf16_us"], batch, r["context"]) for r in rows]),
           "floor_ns": med([_ns(r["floor_us"], batch, r["context"]) for r in rows if r.get("floor_us")] or [0.0]),
           "batch": batch, "contexts": sorted(r["context"] for r in rows)}
    base = [t for t in kernels.get("tuning", []) if t.get("head_dim") == head_dim and t.get("lut") == 0
            and t.get("us_b16_ctx16k")]
    if base:
        # The sweep runs batch 16 at 16k: one bm-row tile per request (bm >= gqa), so us / (16 x 16384) is the
        # cost of one tile visiting one cached token in one layer.
        out["baseline_tile_ns"] = _ns(base[0]["us_b16_ctx16k"], 16, 16384)
        out["baseline_bm"] = base[0]["bm"]
    tuned = [t for t in kernels.get("tuning", []) if t.get("head_dim") == head_dim and t.get("backend_default")
             and t.get("us_b16_ctx16k")]
    if tuned:
        out["tuned_tile_ns"] = _ns(tuned[0]["us_b16_ctx16k"], 16, 16384)
        out["tuned_bm"] = tuned[0]["bm"]
    seal = [s for s in kernels.get("seal", []) if s.get("head_dim") == head_dim
            and str(s.get("format", "")).startswith("kakeya")]
    if seal:
        v = [x for x in seal[0].get("variants", []) if x.get("prec") is None]   # the backend's default seal
        out["seal_us"] = (v[0] if v else seal[0])["us_per_block_layer"]
    return out


def decode_step(row: dict, ctx_key: str, label: str, ns: float) -> dict | None:
    """Predicted attention time of one lock-step decode step = batch x mean context x layers x ns, vs the measured
    median step; and the decode rate no batch can exceed when attention dominates: 1 / (layers x context x ns)."""
    d = (row.get("details") or {}).get(ctx_key, {})
    m = d.get(label)
    if not m or not m.get("step_ms_p50"):
        return None
    ctx = d["prefix_tokens"] + d["unique_tokens"] + d["gen_tokens"] / 2
    attn_ms = m["batch"] * ctx * row["num_layers"] * ns * 1e-6
    return {"batch": m["batch"], "context": ctx, "step_ms": m["step_ms_p50"], "attn_ms": attn_ms,
            "rest_ms": m["step_ms_p50"] - attn_ms, "bound_tok_s": 1e9 / (row["num_layers"] * ctx * ns)}


def slow_small_batch(row: dict, ctx_key: str) -> tuple[float, float, int] | None:
    """(batch-16 step ms, largest-batch step ms, largest batch) when the row's batch-16 decode step was slower than
    its larger batch's: then the batch-16 rate is not a clean reference."""
    d = (row.get("details") or {}).get(ctx_key, {})
    x, y = d.get("b16"), d.get("max_batch")
    if x and y and y.get("batch", 0) > x.get("batch", 0) and x["step_ms_p50"] > y["step_ms_p50"]:
        return x["step_ms_p50"], y["step_ms_p50"], y["batch"]
    return None


def prefill(row: dict, costs: dict, tokens: int) -> dict | None:
    """Prefill through the decode kernel: each 512-token phase attends every earlier sealed block once per query
    tile of `bm` rows (gqa rows per token), so the sealed-block work grows with the square of the blocks."""
    heads = query_heads(row)
    if not heads or "baseline_tile_ns" not in costs:
        return None
    gqa = heads // row["num_kv_heads"]
    blocks = -(-tokens // BLOCK_TOKENS)
    tiles = -(-BLOCK_TOKENS * gqa // costs["baseline_bm"])
    visits = blocks * (blocks - 1) // 2                 # phase i reads the i sealed blocks before it
    attn_s = visits * tiles * BLOCK_TOKENS * row["num_layers"] * costs["baseline_tile_ns"] * 1e-9
    seal_s = (tokens // BLOCK_TOKENS) * row["num_layers"] * costs.get("seal_us", 0.0) * 1e-6
    return {"tokens": tokens, "blocks": blocks, "tiles_per_phase": tiles, "block_visits": visits,
            "attn_s": attn_s, "seal_s": seal_s}


def _prefill_times(row: dict) -> list[tuple[int, float]]:
    """(prompt tokens, seconds) a row measured: the prefill median and the prefix fills of the decode contexts."""
    det = row.get("details") or {}
    out = []
    p = det.get("prefill")
    if p and p.get("times_s"):
        ts = sorted(p["times_s"][1:] if p.get("first_dropped") else p["times_s"])
        out.append((p["prompt_tokens"], ts[len(ts) // 2] if len(ts) % 2 else (ts[len(ts) // 2 - 1] + ts[len(ts) // 2]) / 2))
    for key in sorted(k for k in det if k.endswith("k") and isinstance(det[k], dict)):
        if det[key].get("prefix_fill_s"):
            out.append((det[key]["prefix_tokens"], det[key]["prefix_fill_s"]))
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def markdown(k: dict, b: dict, kernels: dict | None, tol: float, kernels_name: str = "kernels.json") -> list[str]:
    """The 'Causes' section for one Kakeya row against its bf16 row."""
    out = [f"### {k['model']} / {k['config']} (tp {k['tp']}) vs {b['config']}", ""]
    c = capacity(k, b, tol)
    if c:
        gib = 2 ** 30
        out += ["**Capacity** (from the two rows' capacity_tokens, the backend's B/token line and its tail-pool size): "
                f"bf16 holds {b['capacity_tokens']} tokens × {c['bytes_per_token_bf16']} B = "
                f"{c['kv_bytes_bf16'] / gib:.2f} GiB of KV; Kakeya {k['capacity_tokens']} × "
                f"{c['bytes_per_token_kakeya']:.0f} B = {c['kv_bytes_kakeya'] / gib:.2f} GiB. The "
                f"{(c['kv_bytes_bf16'] - c['kv_bytes_kakeya']) / gib:.2f} GiB difference "
                f"({_pct(c['pool_share'])} of bf16's KV memory) is the exact-tail pool "
                f"({c['tail_pool_bytes'] / gib:.2f} GiB = {c['max_num_seqs']} rows × "
                f"{c['tail_bytes_per_row'] / 2 ** 20:.0f} MiB, allocated before vLLM's profiling, so it counts as "
                f"non-KV memory) plus {c['other_bytes'] / gib:.2f} GiB not itemized. Without it the capacity would be "
                f"{c['ratio_without_pool']:.2f}× bf16 (the format's {c['expected_ratio']:.2f}× up to page rounding); "
                f"with it {c['measured_ratio']:.2f}×.",
                f"Each request row's tail costs {c['tail_tokens_per_row']:.0f} compressed tokens of capacity = "
                f"{_pct(c['tail_share_of_request'])} of a {c['context']}-token request"
                + (f" — above the {_pct(tol)} tolerance: max_num_seqs ≤ {c['max_seqs_within_tol']} would meet it, "
                   f"but capacity and rows balance at {c['balanced_seqs']:.1f} rows for {c['context']}-token requests, "
                   "so a smaller pool lowers the number of such requests served at once. Meeting the goal needs "
                   f"tails that cost < {_pct(tol)} per running request (tails in the request's own pages, NOTES open "
                   "problem 2, or a smaller tail format)." if c["tail_share_of_request"] > tol else
                   f", within the {_pct(tol)} tolerance."),
                ""]
        if all(r.get(f) is not None for r in (k, b) for f in ("log_kv_cache_gib", "log_model_load_gib")):
            out[-1:-1] = [f"vLLM's log (cross-check): KV memory {b['log_kv_cache_gib']:.2f} GiB (bf16) vs "
                          f"{k['log_kv_cache_gib']:.2f} GiB (Kakeya), model loading {b['log_model_load_gib']:.2f} vs "
                          f"{k['log_model_load_gib']:.2f} GiB (the tail pool is allocated while loading)."]
    costs = kernel_costs(kernels, k["head_dim"]) if kernels else None
    if costs:
        kb, ours, fa3 = costs["batch"], costs["ours_ns"], costs["fa3_ns"]
        out += [f"**Decode** ({kernels_name}: decode rows at head_dim {k['head_dim']}, batch {kb}, contexts "
                f"{', '.join(str(x) for x in costs['contexts'])}): our kernel {ours:.3f} ns per cached token per "
                f"layer, FA3 bf16 {fa3:.3f} ns ({fa3 / ours:.2f}×); our byte floor {costs['floor_ns']:.3f} ns. "
                "Predicted attention per decode step = batch × mean context × layers × ns; the rest of the measured "
                "median step is weights, other layers and eager launches:", "",
                "| row | context | batch | measured step ms | predicted attention ms | rest ms | decode tok/s bound "
                "(attention only) |", "|---|---|---|---|---|---|---|"]
        for row, ns in ((k, ours), (b, fa3)):
            for ctx_key in ("32k", "8k"):
                for label in ("b16", "max_batch"):
                    s = decode_step(row, ctx_key, label, ns)
                    if s:
                        out.append(f"| {row['config']} | {ctx_key} | {s['batch']} | {s['step_ms']:.1f} | "
                                   f"{s['attn_ms']:.1f} | {s['rest_ms']:.1f} | {s['bound_tok_s']:.0f} |")
        if any((decode_step(r, c, lb, ns) or {}).get("rest_ms", 0) < 0 for r, ns in ((k, ours), (b, fa3))
               for c in ("32k", "8k") for lb in ("b16", "max_batch")):
            out += ["", "A negative rest: the step ran faster than the kernel bench's rate predicts. The bench reads "
                    "distinct pages per request; here every request reads the same physical prefix pages at the same "
                    "time, so part of them can come from L2 (the README's caveat)."]
        sk, sb = decode_step(k, "32k", "max_batch", ours), decode_step(b, "32k", "max_batch", fa3)
        if sk and sb:
            meas = _ratio(k.get("decode_tok_s_max_batch_32k"), b.get("decode_tok_s_max_batch_32k"))
            out += ["", f"At 32k and the largest batch, the predicted attention is {_pct(sk['attn_ms'] / sk['step_ms'])} "
                    f"(ours, batch {sk['batch']}) and {_pct(sb['attn_ms'] / sb['step_ms'])} (FA3, batch {sb['batch']}) "
                    "of the measured step. tok/s at batch B = B / (rest + B × attention per request) tends to "
                    f"1 / (layers × context × ns) whatever the batch: {sk['bound_tok_s']:.0f} tok/s for ours, "
                    f"{sb['bound_tok_s']:.0f} for FA3. Where attention dominates, the largest-batch ratio tends to "
                    f"{fa3 / ours:.2f}× (measured {'–' if meas is None else f'{meas:.2f}'}×): a larger batch cannot "
                    f"make up for a per-token cost {ours / fa3:.2f}× FA3's. 3× needs ≤ {fa3 / 3:.3f} ns per "
                    f"token-layer, {ours / (fa3 / 3):.1f}× faster than today's kernel and "
                    f"{fa3 / 3 / costs['floor_ns']:.1f}× our byte floor (today {ours / costs['floor_ns']:.1f}×)."]
        for row in (b, k):
            for ctx_key in ("32k", "8k"):
                slow = slow_small_batch(row, ctx_key)
                if slow:
                    out.append(f"- Caution: {row['config']} at {ctx_key}: the batch-16 step ({slow[0]:.1f} ms) is "
                               f"slower than the batch-{slow[2]} step ({slow[1]:.1f} ms) of the same row, so its "
                               "batch-16 number is not a clean baseline (cause not measured; a per-kernel profile, "
                               "serving_job.sh decode_step, would tell).")
        out.append("")
        pf = [(n, t, prefill(k, costs, n)) for n, t in _prefill_times(k)]
        pf = [(n, t, p) for n, t, p in pf if p]
        if pf:
            bt = dict(_prefill_times(b))
            out += [f"**Prefill** (hypothesis from {kernels_name}, not measured inside vLLM): prefill and mixed steps "
                    f"launch the baseline decode kernel ({costs['baseline_bm']}-row query tiles = "
                    f"{pf[0][2]['tiles_per_phase']} tiles per 512-token phase), and each tile decodes every earlier "
                    f"sealed block again. The variant sweep's baseline launch costs {costs['baseline_tile_ns']:.2f} ns"
                    " per tile per cached token per layer; the seal "
                    f"{costs.get('seal_us', float('nan')):.1f} µs per block-layer.", "",
                    "| prompt tokens | measured Kakeya s | measured bf16 s | predicted sealed-block attention s | "
                    "predicted seal s |", "|---|---|---|---|---|"]
            for n, t, p in pf:
                out.append(f"| {n} | {t:.3f} | {bt.get(n, float('nan')):.3f} | {p['attn_s']:.3f} | {p['seal_s']:.4f} |")
            out += ["", "Compare the predicted sealed-block attention with the measured gap to bf16 (it grows with "
                    "the square of the prompt); the seal is linear and small next to it."]
            heads = query_heads(k)
            if "tuned_tile_ns" in costs and heads:
                gqa = heads // k["num_kv_heads"]
                per_tok = {n: costs[f"{n}_tile_ns"] / max(costs[f"{n}_bm"] // gqa, 1) for n in ("baseline", "tuned")}
                out.append(f"Per query token and cached token the baseline launch costs {per_tok['baseline']:.2f} ns "
                           f"({costs['baseline_bm'] // gqa} tokens per tile) and the tuned decode launch "
                           f"{per_tok['tuned']:.2f} ns ({max(costs['tuned_bm'] // gqa, 1)} per tile): the decode "
                           "variant's speed-up does not carry over to prefill. What would: decoding each sealed block "
                           "once per phase (or per many query tokens) instead of once per query tile.")
            out.append("")
    return out
