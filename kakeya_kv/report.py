"""Writers for benchmark results: JSON, a markdown table and a ratio-vs-ΔPPL plot."""
from __future__ import annotations

import json
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


def verdict(res: dict, ours: str = "kakeya") -> str:
    """Issue-2 check, computed from the rows: for each TurboQuant preset, our settings that
    have a strictly higher ratio AND a strictly lower ΔPPL (and the CI-separated ones)."""
    fm = res["formats"]
    mine = [f for f in fm if f["family"] == ours]
    lines = ["## Does the default format beat TurboQuant? (computed from the rows above)", "",
             "| TurboQuant preset | ratio | ΔPPL % | kakeya settings with higher ratio and lower ΔPPL | "
             "… and lower ΔPPL CI upper bound than its lower bound |", "|---|---|---|---|---|"]
    for t in sorted((f for f in fm if f["family"] == "turboquant"), key=lambda r: r["ratio_vs_bf16"]):
        win = [m for m in mine if m["ratio_vs_bf16"] > t["ratio_vs_bf16"] and m["delta_ppl_pct"] < t["delta_ppl_pct"]]
        sep = [m for m in win if m.get("delta_ppl_pct_ci95") and t.get("delta_ppl_pct_ci95")
               and m["delta_ppl_pct_ci95"][1] < t["delta_ppl_pct_ci95"][0]]
        fmt = lambda xs: ", ".join(f"{m['name']} ({m['ratio_vs_bf16']:.2f}×, {m['delta_ppl_pct']:+.2f} %)" for m in xs) or "none"
        lines.append(f"| {t['name']} | {t['ratio_vs_bf16']:.2f} | {t['delta_ppl_pct']:+.2f} | {fmt(win)} | {fmt(sep)} |")
    return "\n".join(lines)


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
