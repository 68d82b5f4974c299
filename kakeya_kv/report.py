"""Writers for benchmark results: JSON, a markdown table and a ratio-vs-ΔPPL plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def markdown_table(res: dict) -> str:
    head = ("| format | family | boundary bf16 layers | B/token (model) | ratio vs bf16 | PPL | ΔPPL % | ΔPPL 95% CI | "
            "KLD | top-1 agree | K rel MSE | V rel MSE |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for f in sorted(res["formats"], key=lambda r: -r["ratio_vs_bf16"]):
        ci = f.get("delta_ppl_pct_ci95", [float("nan")] * 2)
        rows.append(
            f"| {f['name']} | {f['family']} | {','.join(map(str, f['exact_layers'])) or '—'} | "
            f"{f['bytes_per_token']:.0f} | {f['ratio_vs_bf16']:.2f} | {f['ppl']:.3f} | {f['delta_ppl_pct']:+.2f} | "
            f"[{ci[0]:+.2f}, {ci[1]:+.2f}] | {f['kld']:.4f} | {f['top1_agree']:.3f} | "
            f"{f['k_rel_mse']:.4f} | {f['v_rel_mse']:.4f} |")
    return head + "\n" + "\n".join(rows)


def paired_gap_ci(mine: dict, rival: dict) -> list[float] | None:
    """95 % interval of the mean per-window NLL difference (mine − rival) on their common windows, in ΔPPL %
    terms; None without per-window NLL. Pairing cancels the text's own difficulty, so two settings whose
    intervals vs the baseline overlap can still be told apart."""
    from .quality import paired_delta_pct
    a = dict(zip(mine.get("window_ids") or [], mine.get("window_nll") or []))
    b = dict(zip(rival.get("window_ids") or [], rival.get("window_nll") or []))
    common = [i for i in a if i in b]
    return paired_delta_pct([a[i] for i in common], [b[i] for i in common])[1] if len(common) >= 2 else None


def beats(rows: list[dict], rival_families=("turboquant",), ours: str = "kakeya") -> list[dict]:
    """For each rival row: our rows with a strictly higher ratio AND a strictly lower ΔPPL; those whose ΔPPL CI
    upper bound is below the rival's lower bound; and those whose paired per-window difference to the rival
    has a 95 % interval entirely below 0. Rows lacking a number are skipped."""
    ok = lambda r: r.get("ratio_vs_bf16") is not None and r.get("delta_ppl_pct") is not None
    mine = [r for r in rows if r["family"] == ours and ok(r)]
    out = []
    for t in sorted((r for r in rows if r["family"] in rival_families and ok(r)), key=lambda r: r["ratio_vs_bf16"]):
        win = [m for m in mine if m["ratio_vs_bf16"] > t["ratio_vs_bf16"] and m["delta_ppl_pct"] < t["delta_ppl_pct"]]
        sep = [m for m in win if m.get("delta_ppl_pct_ci95") and t.get("delta_ppl_pct_ci95")
               and m["delta_ppl_pct_ci95"][1] < t["delta_ppl_pct_ci95"][0]]
        paired = [(m, ci) for m in win if (ci := paired_gap_ci(m, t)) is not None and ci[1] < 0]
        out.append({"rival": t, "beaten_by": win, "ci_separated": sep, "paired_separated": paired})
    return out


def beats_table(rows: list[dict], rival_families=("turboquant",), ours: str = "kakeya") -> str:
    fmt = lambda xs: ", ".join(f"{m['name']} ({m['ratio_vs_bf16']:.2f}×, {m['delta_ppl_pct']:+.2f} %)" for m in xs) or "none"
    fmt_p = lambda xs: ", ".join(f"{m['name']} [{ci[0]:+.2f}, {ci[1]:+.2f}]" for m, ci in xs) or "none"
    lines = ["| rival | ratio | ΔPPL % | our settings with higher ratio and lower ΔPPL | "
             "… and ΔPPL CI upper bound below the rival's lower bound | "
             "… and paired per-window PPL difference to the rival, 95 % CI (%) below 0 |", "|---|---|---|---|---|---|"]
    for b in beats(rows, rival_families, ours):
        t = b["rival"]
        lines.append(f"| {t['name']} | {t['ratio_vs_bf16']:.2f} | {t['delta_ppl_pct']:+.2f} | {fmt(b['beaten_by'])} | "
                     f"{fmt(b['ci_separated'])} | {fmt_p(b['paired_separated'])} |")
    return "\n".join(lines)


def verdict(res: dict, ours: str = "kakeya") -> str:
    """Issue-2 check, computed from the rows: for each TurboQuant preset, our settings that
    have a strictly higher ratio AND a strictly lower ΔPPL (and the CI-separated ones)."""
    return ("## Does the default format beat TurboQuant? (computed from the rows above)\n\n"
            + beats_table(res["formats"], ("turboquant",), ours))


def summary_markdown(res: dict) -> str:
    return (f"# Codec comparison ({res['windows']} windows × {res['window_tokens']} tokens, second halves scored, "
            f"chunked prefill {res['chunk']})\n\nModel: {res['model']}  \nCorpus: {res['corpus']}  \n"
            f"bf16 PPL: {res['bf16_ppl']:.4f}  \nCommand: `{res['command']}` ({res['elapsed_s'] / 60:.1f} min)\n\n"
            f"{markdown_table(res)}\n\n{verdict(res)}\n\n"
            + "".join(f"> {n}\n\n" for n in res.get("notes", []))
            + "![ratio vs ΔPPL](codec_compare.png)\n")


def plot_frontier(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"kakeya": "tab:red", "v13": "tab:brown", "turboquant": "tab:blue", "turboquant_plus": "tab:cyan",
              "int4_per_token_head": "tab:green", "fp8": "tab:purple", "bf16": "black"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for f in res["formats"]:
        c = colors.get(f["family"], "gray")
        x, y, ci = f["ratio_vs_bf16"], f["delta_ppl_pct"], f.get("delta_ppl_pct_ci95")
        axes[0].errorbar(x, y, yerr=None if not ci else [[y - ci[0]], [ci[1] - y]], fmt="o", color=c,
                         capsize=2, ms=5)
        axes[0].annotate(f["name"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if f["family"] != "bf16":
            axes[1].plot(x, f["kld"], "o", color=c, ms=5)
            axes[1].annotate(f["name"], (x, f["kld"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for ax in axes:       # room on the right for the labels of the highest-ratio points
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi + 0.25 * (hi - lo))
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set_ylabel("ΔPPL vs bf16, % (lower is better; bars = 95% CI over windows)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("mean KL(bf16 ‖ format) per scored token, nats (lower is better)")
    for ax in axes:
        ax.set_xlabel("whole-model KV ratio vs bf16 (higher is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M-Instruct, Jane Austen: {res['windows']} windows × {res['window_tokens']} tokens, "
                 f"second halves scored, chunked prefill {res['chunk']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------- quality.json (issue 5)
FAMILY_COLORS = {"kakeya": "tab:red", "v13": "tab:brown", "turboquant": "tab:blue", "turboquant_plus": "tab:cyan",
                 "int4_per_token_head": "tab:green", "fp8": "tab:purple", "bf16": "black"}


def _num(x, f="{:.4f}"):
    return "—" if x is None else f.format(x)


def _ci(ci, f="{:+.2f}"):
    return "" if not ci else f" [{f.format(ci[0])}, {f.format(ci[1])}]"


def _runs_lines(doc: dict) -> list[str]:
    """For a result merged from several calls: which call measured what, and the check that makes them comparable."""
    runs = doc.get("runs")
    if not runs:
        return []
    parts = [f"call {i + 1} ({Path(r['file']).name}): {', '.join(r['measured']) or 'baseline only'}"
             for i, r in enumerate(runs)]
    return [f"Measured in {len(runs)} calls on the same card, each with its own {doc['baseline']} run; "
            f"{doc.get('baseline_check', '')}. " + "; ".join(parts) + ".", ""]


def quality_markdown(doc: dict) -> str:
    pr = doc.get("protocol", {})
    lines = [f"# Quality ({doc.get('backend', '')}, {doc['gpu']}, {doc['model']})", "",
             f"{doc['windows']} windows × {pr.get('window_tokens', 2048)} tokens of {doc['corpus']}; "
             f"{pr.get('scored', 'second half')} scored. Ratio: {doc.get('ratio_method', '')}. "
             f"KLD vs {doc['baseline']}: {doc.get('kld_method', '')}. ΔPPL interval: 95 % over windows of the "
             "paired per-window NLL difference; PPL interval: 95 % over windows.", "",
             *[f"> {n}\n" for n in doc.get("notes", [])],
             *_runs_lines(doc),
             "| config | family | ratio vs bf16 | PPL [95 % CI] | ΔPPL % [95 % CI] | KLD | NIAH 4k | NIAH 8k | windows | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(doc["configs"], key=lambda r: -(r.get("ratio_vs_bf16") or 0))
    for r in rows:
        note = f"= {r['same_setting_as']} (same setting, not re-run)" if r.get("same_setting_as") else ""
        if any(m["what"] == "config" for m in r["not_measured"]):
            note = "NOT MEASURED: " + next(m["reason"] for m in r["not_measured"] if m["what"] == "config")
        lines.append(
            f"| {r['name']} | {r['family']} | {_num(r['ratio_vs_bf16'], '{:.2f}')} | "
            f"{_num(r['ppl'])}{_ci(r['ppl_ci95'], '{:.3f}')} | {_num(r['delta_ppl_pct'], '{:+.2f}')}"
            f"{_ci(r.get('delta_ppl_pct_ci95'))} | {_num(r['kld'])} | {_num(r['niah_4k'], '{:.2f}')} | "
            f"{_num(r['niah_8k'], '{:.2f}')} | {r.get('windows', 0)} | {note} |")
    pc = doc.get("protocol_check", {})
    lines += ["", f"Protocol check (scored tokens read the compressed cache): **{pc.get('ok')}** — "
              f"TurboQuant presets measured {pc.get('turboquant_measured')}, each differs from the baseline: "
              f"{pc.get('differs_from_baseline')}, pairwise: {pc.get('pairwise_differ')} ({pc.get('rule')}).", "",
              "## Ours vs every competitor (computed from the rows above)", "",
              beats_table(rows, ("turboquant", "int4_per_token_head", "fp8")), ""]
    whole = {m["name"] for m in doc["not_measured"] if m["what"] == "config"}   # one line for a config never measured
    nm = [m for m in doc["not_measured"] if m["name"] not in whole or m["what"] == "config"]
    if nm:
        lines += ["## Not measured", ""] + [f"- {m['name']}: {'everything' if m['what'] == 'config' else m['what']} "
                                            f"— {m['reason']}" for m in nm]
    return "\n".join(lines) + "\n"


def plot_quality(doc: dict, path: Path) -> None:
    """Ratio vs ΔPPL (95 % CI bars) and ratio vs KLD, every measured config; unmeasured ones named."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    same = {}           # a recipe equal to a measured setting is one point, labelled with both names
    for r in doc["configs"]:
        if r.get("same_setting_as"):
            same.setdefault(r["same_setting_as"], []).append(r["name"].removeprefix("recipe:"))
    for r in doc["configs"]:
        x, y, c = r.get("ratio_vs_bf16"), r.get("delta_ppl_pct"), FAMILY_COLORS.get(r["family"], "gray")
        if x is None or y is None or r.get("same_setting_as"):
            continue
        label = r["name"] + ("\n= " + "\n= ".join(same[r["name"]]) if r["name"] in same else "")
        ci = r.get("delta_ppl_pct_ci95")
        axes[0].errorbar(x, y, yerr=None if not ci else [[y - ci[0]], [ci[1] - y]], fmt="o", color=c, capsize=2, ms=5)
        axes[0].annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if r.get("kld"):
            axes[1].plot(x, r["kld"], "o", color=c, ms=5)
            axes[1].annotate(label, (x, r["kld"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for ax in axes:       # room on the right for the labels of the highest-ratio points
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi + 0.25 * (hi - lo))
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set_ylabel(f"ΔPPL vs {doc['baseline']}, % (bars: 95 % CI)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel(f"KL({doc['baseline']} ‖ config) per scored token, nats")
    for ax in axes:
        ax.set_xlabel("KV ratio vs bf16 (higher is better)")
        ax.grid(alpha=0.3)
    missing = sorted({m["name"] for m in doc["not_measured"] if m["what"] in ("config", "ppl", "ratio_vs_bf16")})
    if missing:
        fig.text(0.01, 0.01, "not measured: " + ", ".join(missing), fontsize=7, color="darkred")
    fig.suptitle(f"{doc['model']} on {doc['gpu']}: {doc['windows']} windows", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def issue4_doc(doc: dict) -> dict:
    """vllm_quality.json (issue 4's schema) from the same rows: configs with a capacity and a PPL."""
    keep = ("name", "family", "capacity_tokens", "ratio_vs_bf16", "ppl", "delta_ppl_pct", "delta_ppl_pct_ci95",
            "greedy_identical_prompts", "greedy_first_divergence", "same_setting_as")
    rows = [{k: r[k] for k in keep if k in r} for r in doc["configs"]
            if r.get("capacity_tokens") and r.get("ppl") is not None and r.get("delta_ppl_pct") is not None]
    return {"gpu": doc["gpu"], "model": doc["model"], "windows": doc["windows"], "protocol": doc.get("protocol"),
            "configs": rows, "not_measured": doc["not_measured"], "source": "quality.json of the same run"}


ISSUE4_REQUIRED = ("kakeya_k4v3", "triton_fp8", "int4_per_token_head", "flash_bf16")


def issue4_complete(v4: dict) -> bool:
    """The rows issue 4's done-when compares (default format, fp8, int4_per_token_head, bf16) are all measured."""
    have = {r["name"] for r in v4["configs"]}
    return all(n in have for n in ISSUE4_REQUIRED)


def issue4_markdown(v4: dict) -> str:
    lines = [f"# vLLM quality and capacity ({v4['gpu']}, {v4['model']}, {v4['windows']} windows)", "",
             "Same run and protocol as quality.md. Capacity = KV tokens vLLM reports.", "",
             "| config | family | capacity tokens | ratio | PPL | ΔPPL % [95 % CI] |", "|---|---|---|---|---|---|"]
    for r in sorted(v4["configs"], key=lambda r: -r["ratio_vs_bf16"]):
        lines.append(f"| {r['name']} | {r['family']} | {r['capacity_tokens']} | {r['ratio_vs_bf16']:.2f} | "
                     f"{r['ppl']:.4f} | {r['delta_ppl_pct']:+.2f}{_ci(r.get('delta_ppl_pct_ci95'))} |")
    return "\n".join(lines) + "\n"


def gap_markdown(hf: dict, vl: dict, notes: str = "", command: str = "") -> str:
    """HF_VS_VLLM.md: the same configs through the HF/CPU harness and through vLLM, side by side."""
    hrows = {r["name"]: r for r in hf["configs"]}
    both = [r for r in vl["configs"] if r["name"] in hrows]
    same = hf["windows"] == vl["windows"]
    lines = ["# HF/CPU harness vs vLLM (generated, do not edit: `kakeya_kv.report gap`)", "",
             *([f"Command: `{command}`", ""] if command else []),
             f"HF: {hf.get('backend', '')}, {hf['gpu']}, {hf['windows']} windows. vLLM: {vl.get('backend', '')}, "
             f"{vl['gpu']}, {vl['windows']} windows. "
             + ("Same window count." if same else "**Different window counts**: the gap includes sampling noise.")
             + " KLD: HF over the full vocabulary, vLLM from top-k prompt logprobs (a coarser estimate).", "",
             "| config | HF ratio | vLLM ratio | HF ΔPPL % [CI] | vLLM ΔPPL % [CI] | gap (pp) | HF KLD | vLLM KLD | "
             "NIAH 4k HF / vLLM | NIAH 8k HF / vLLM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in sorted(both, key=lambda r: -(r.get("ratio_vs_bf16") or 0)):
        h = hrows[v["name"]]
        gap = (None if v["delta_ppl_pct"] is None or h["delta_ppl_pct"] is None
               else v["delta_ppl_pct"] - h["delta_ppl_pct"])
        lines.append(
            f"| {v['name']} | {_num(h['ratio_vs_bf16'], '{:.2f}')} | {_num(v['ratio_vs_bf16'], '{:.2f}')} | "
            f"{_num(h['delta_ppl_pct'], '{:+.2f}')}{_ci(h.get('delta_ppl_pct_ci95'))} | "
            f"{_num(v['delta_ppl_pct'], '{:+.2f}')}{_ci(v.get('delta_ppl_pct_ci95'))} | {_num(gap, '{:+.2f}')} | "
            f"{_num(h['kld'])} | {_num(v['kld'])} | {_num(h['niah_4k'], '{:.2f}')} / {_num(v['niah_4k'], '{:.2f}')} | "
            f"{_num(h['niah_8k'], '{:.2f}')} / {_num(v['niah_8k'], '{:.2f}')} |")
    only = sorted(set(hrows) ^ {r["name"] for r in vl["configs"]})
    if only:
        lines += ["", "In one document only: " + ", ".join(only)]
    return "\n".join(lines) + "\n" + (f"\n{notes.strip()}\n" if notes.strip() else "")


def main(argv=None) -> int:
    """python -m kakeya_kv.report gap --hf H.json [--hf H2.json] --vllm V.json [--notes F] --out HF_VS_VLLM.md"""
    import argparse

    from . import quality
    p = argparse.ArgumentParser(prog="python -m kakeya_kv.report")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gap", help="HF_VS_VLLM.md from an HF and a vLLM quality document")
    g.add_argument("--hf", action="append", help="quality_hf.json or codec_compare*.json (later ones override rows; "
                                                 "default benchmarks/results/quality_hf.json)")
    g.add_argument("--vllm", default="benchmarks/results/quality.json", help="quality.json or a legacy vllm_quality.json")
    g.add_argument("--notes", default="", help="markdown appended below the table (the analysis)")
    g.add_argument("--out", default="benchmarks/results/HF_VS_VLLM.md")
    a = p.parse_args(argv)
    hfs = [quality.load_any(f) for f in (a.hf or ["benchmarks/results/quality_hf.json"])]
    hf = hfs[0]
    for extra in hfs[1:]:          # e.g. the int4/fp8 rows re-measured with vLLM's semantics
        names = {r["name"] for r in extra["configs"]}
        hf = {**hf, "configs": [r for r in hf["configs"] if r["name"] not in names] + extra["configs"]}
    notes = Path(a.notes).read_text() if a.notes else ""
    command = "python -m kakeya_kv.report " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(a.out).write_text(gap_markdown(hf, quality.load_any(a.vllm), notes, command))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
