"""serving.json -> serving.md (tables, ratios vs FLASH_ATTN bf16, issue-6 goal verdicts) and a plot."""
from __future__ import annotations

import re

from . import causes
from .causes import logged_ratio
from .rows import BASELINES, CONFIGS, reference_config


def _ratio(a, b):
    return a / b if a is not None and b else None


CAPACITY_TOL = 0.05     # issue 6: capacity >= the format's ratio x bf16 capacity "within 5 %"


def expected_capacity(row: dict) -> tuple[float, str] | None:
    """Kakeya rows: (bytes ratio vs bf16, where it comes from). The backend's own start-up line is preferred (it
    covers per-layer widths and exact layers); else the layout of the config's K/V bits, every layer compressed."""
    if row.get("family") != "kakeya" or not row.get("head_dim"):
        return None
    bpt = causes.logged_bytes_per_token_head_layer(row)
    logged = 4 * row["head_dim"] / bpt if bpt else logged_ratio(row)     # bf16 K+V: 2 x 2 bytes per channel
    if logged:
        fmt = re.search(r"layers (k\d+v\d+)", row.get("kakeya_log") or "")
        return logged, f"the served format's ratio ({fmt[1] + ', ' if fmt else ''}backend log)"
    from kakeya_kv.format import kakeya_layout
    _, _, env = CONFIGS[row["config"]]
    k, v = int(env.get("KAKEYA_K_BITS", 4)), int(env.get("KAKEYA_V_BITS", 3))
    try:
        lay = kakeya_layout(row["head_dim"], k, v)
    except (ValueError, KeyError):
        return None
    return lay.ratio_vs_bf16, f"the served format's ratio (k{k}v{v} layout at head_dim {row['head_dim']}, all layers)"


def expected_capacity_ratio(row: dict) -> float | None:
    e = expected_capacity(row)
    return e[0] if e else None


def capacity_verdict(x: float | None, expected: float | None, source: str = "", tol: float = CAPACITY_TOL) -> str:
    """"met"/"met within 5 %"/"missed", the measured and expected ratios, the shortfall in % and the threshold."""
    if expected is None:
        return "no expected ratio for this row"
    if x is None:
        return "not measured (capacity)"
    dev = x / expected - 1
    need = (1 - tol) * expected
    head = "met" if dev >= 0 else f"met within {100 * tol:.0f} %" if x >= need else "missed"
    return (f"{head}: {x:.2f}x vs {expected:.2f}x expected ({100 * dev:+.1f} %; goal >= {need:.2f}x = "
            f"{1 - tol:.2f} x {expected:.2f}x{', ' + source if source else ''})")


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios vs the FLASH_ATTN bf16 row of the same model, tp and execution mode (rows.reference_config);
    goal verdicts on Kakeya rows."""
    base = {(r["model"], r["tp"], r["config"]): r for r in rows if r["config"] in BASELINES}
    out = []
    for r in rows:
        r = dict(r)
        b = base.get((r["model"], r["tp"], reference_config(r["config"])))
        if b is not None and r is not b:
            r["capacity_ratio"] = _ratio(r.get("capacity_tokens"), b.get("capacity_tokens"))
            for f in ("decode_tok_s_b16_32k", "decode_tok_s_max_batch_32k", "decode_tok_s_b16_8k",
                      "decode_tok_s_max_batch_8k", "prefill_tok_s"):
                r[f + "_ratio"] = _ratio(r.get(f), b.get(f))
        if r.get("family") == "kakeya" and b is not None and r.get("status") != "not_run":
            r["goals"] = goals(r)
            slow = causes.slow_small_batch(b, "32k")
            if slow and r.get("decode_tok_s_b16_32k_ratio") is not None:
                r["goals"]["decode_b16_32k"] += (f" — caution: bf16's batch-16 step ({slow[0]:.1f} ms) was slower than "
                                                 f"its batch-{slow[2]} step ({slow[1]:.1f} ms), see Causes")
        out.append(r)
    return out


def goals(r: dict) -> dict:
    """Issue 6: decode at 32k >= 1.0x bf16 at batch 16 and >= 3x at each one's largest batch;
    capacity >= the format's ratio x bf16 capacity within 5 %."""
    def verdict(x, goal, label):
        if x is None:
            return f"not measured ({label})"
        return f"{'met' if x >= goal else 'missed'}: {x:.2f}x (goal {goal:.2f}x)"
    exp = expected_capacity(r)
    return {"decode_b16_32k": verdict(r.get("decode_tok_s_b16_32k_ratio"), 1.0, "decode at batch 16, 32k"),
            "decode_max_batch_32k": verdict(r.get("decode_tok_s_max_batch_32k_ratio"), 3.0,
                                            "decode at the largest batch, 32k"),
            "capacity": capacity_verdict(r.get("capacity_ratio"), *(exp or (None, "")))}


def _f(v, fmt="{:.0f}"):
    return "–" if v is None else fmt.format(v)


def markdown(res: dict, kernels: dict | None = None, kernels_name: str = "kernels.json") -> str:
    """kernels: a kernel benchmark result (benchmarks/kernels) for the decode/prefill cause models, optional."""
    rows = add_ratios(res["rows"])
    meta = res.get("settings", {})
    lines = [f"# Serving benchmark ({res.get('gpu', 'GPU not recorded')})", "",
             "vLLM 0.26, one subprocess per row, same settings for every row: "
             + ", ".join(f"{k} {v}" for k, v in sorted(meta.items())) + ".",
             "Dummy weights for the 8B-like models (speed and memory only). Decode at context C: a shared prefix of "
             "C-512 tokens prefilled once (prefix cache), each request adds a unique 64-token suffix and decodes; "
             "tok/s = batch / median step time over lock-step decode steps (after a warm-up pass). Prefix pages are "
             "physically shared, so max batch is computed from capacity (capacity // (C + the tail-page tokens each "
             "running request holds with KAKEYA_TAIL_STORAGE=pages, else 0), capped by max_num_seqs), "
             "not from memory actually filled.", "",
             "| model | config | tp | capacity tokens | × bf16 | max batch 32k | decode tok/s b16 32k | × | "
             "decode tok/s max batch 32k | × | decode tok/s b16 8k | max batch 8k | decode max 8k | prefill tok/s | "
             "TPOT p50 ms | TTFT p50 ms |", "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['config']} | {r['tp']} | {_f(r.get('capacity_tokens'))} | "
            f"{_f(r.get('capacity_ratio'), '{:.2f}')} | {_f(r.get('max_batch_32k'))} | "
            f"{_f(r.get('decode_tok_s_b16_32k'))} | {_f(r.get('decode_tok_s_b16_32k_ratio'), '{:.2f}')} | "
            f"{_f(r.get('decode_tok_s_max_batch_32k'))} | {_f(r.get('decode_tok_s_max_batch_32k_ratio'), '{:.2f}')} | "
            f"{_f(r.get('decode_tok_s_b16_8k'))} | {_f(r.get('max_batch_8k'))} | "
            f"{_f(r.get('decode_tok_s_max_batch_8k'))} | {_f(r.get('prefill_tok_s'))} | "
            f"{_f(r.get('tpot_p50_ms'), '{:.1f}')} | {_f(r.get('ttft_p50_ms'), '{:.0f}')} |")
    lines += ["", "## Concurrency at 32k and start-up", "",
              "| model | config | tp | max batch 32k (capacity) | vLLM's max concurrency (log) | ran together | "
              "Kakeya tail pool MiB | init s | mode |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") == "not_run":
            continue
        lines.append(f"| {r['model']} | {r['config']} | {r['tp']} | {_f(r.get('max_batch_32k'))} | "
                     f"{_f(r.get('log_max_concurrency'), '{:.2f}')} | {_f(r.get('max_batch_32k_ran'))} | "
                     f"{_f(r.get('kakeya_tail_pool_mib'))} | {_f(r.get('init_s'))} | {r.get('mode', '')} |")
    g = [r for r in rows if r.get("goals")]
    if g:
        lines += ["", "## Issue-6 goals (Kakeya rows vs FLASH_ATTN bf16 of the same model, tp and mode: eager or CUDA graphs)", ""]
        for r in g:
            lines.append(f"- {r['model']} / {r['config']} (tp {r['tp']}): "
                         + "; ".join(f"{k} {v}" for k, v in r["goals"].items()))
    lines += causes_section(rows, kernels, kernels_name)
    nm = [r for r in rows if r.get("not_measured")]
    if nm:
        lines += ["", "## Not measured (fields grouped by reason)", ""]
        for r in nm:
            by_reason: dict = {}
            for f, why in sorted(r["not_measured"].items()):
                by_reason.setdefault(why, []).append(f)
            for why, fs in by_reason.items():
                lines.append(f"- {r['model']} / {r['config']} (tp {r['tp']}): {', '.join(fs)} — {why}")
    return "\n".join(lines) + "\n"


def causes_section(rows: list[dict], kernels: dict | None, kernels_name: str) -> list[str]:
    """Cause analysis of the measured Kakeya rows that have a measured bf16 row of the same model, tp and mode."""
    base = {(r["model"], r["tp"], r["config"]): r for r in rows if r["config"] in BASELINES and r.get("capacity_tokens")}

    def ref(r):
        return base.get((r["model"], r["tp"], reference_config(r["config"])))
    ks = [r for r in rows if r.get("family") == "kakeya" and r.get("capacity_tokens") and ref(r) is not None]
    if not ks:
        return []
    out = ["", "## Causes (derived from the measured numbers above" + (f" and {kernels_name}" if kernels else "")
           + "; models, not measurements)", ""]
    for k in ks:
        out += causes.markdown(k, ref(k), kernels, CAPACITY_TOL, kernels_name)
    return out


def plot(res: dict, path: str) -> bool:
    """Capacity and decode tok/s relative to FLASH_ATTN bf16, one group of bars per row; False if no data."""
    rows = [r for r in add_ratios(res["rows"]) if r["config"] not in BASELINES and r.get("capacity_ratio")]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("capacity_ratio", "KV capacity"), ("decode_tok_s_b16_32k_ratio", "decode b16 @32k"),
            ("decode_tok_s_max_batch_32k_ratio", "decode max batch @32k")]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.2))
    w = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        xs = [j + (i - 1) * w for j in range(len(rows))]
        ys = [r.get(k) or 0 for r in rows]
        ax.bar(xs, ys, width=w, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['model']}\n{r['config']}" + (f" tp{r['tp']}" if r["tp"] > 1 else "") for r in rows],
                       fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("× FLASH_ATTN bf16 (same model, tp, eager/graphs)")
    ax.set_title(f"vLLM 0.26 serving, {res.get('gpu', '')} (missing bar = not measured)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
