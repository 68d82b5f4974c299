"""Auto-recipe and per-layer sensitivity on held-out text (HF harness, CPU).

``kakeya-kv recipe --budget-ppl 1.0`` evaluates the settings the vLLM backend can serve — one
(K bits, V bits) for all compressed layers, plus either a set of exact bf16 boundary layers or the
most sensitive layers upgraded to one step more bits (KAKEYA_LAYER_BITS) — in order of decreasing
whole-model ratio on windows of the *calibration* books (never the evaluation books), and writes the
first one whose ΔPPL vs bf16 is within the budget to ``deploy/recipes/<model>.env`` with the
measured numbers in its header. Upgrading sensitive layers costs far fewer bytes than keeping them
exact, so the search tries 1, 2, 4, 8, 16 upgraded layers before any exact layer at the same base.

``kakeya-kv sensitivity`` measures ΔPPL when only layer L is compressed, for every L (the seed's
per-layer table): it says which layers a boundary set should protect.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path

from .codecs.kakeya import KakeyaCodec
from .config import KakeyaConfig, format_layer_bits
from .format import ALLOWED_BITS
from .formats import from_config
from .model_format import ModelFormat

BITS = ((4, 4), (4, 3), (3, 3), (3, 2), (2, 2))
UPGRADE_COUNTS = (1, 2, 4, 8, 16)   # how many of the most sensitive layers get one step more bits


def upgraded(kb: int, vb: int) -> tuple[int, int] | None:
    """One step more bits on each stream (None when the format allows no more)."""
    ks, vs = ALLOWED_BITS["kakeya"]["k"], ALLOWED_BITS["kakeya"]["v"]
    return (kb + 1, vb + 1) if kb + 1 in ks and vb + 1 in vs else None


def boundary_sets(num_layers: int, sensitive: list[int] | None = None) -> list[tuple[int, ...]]:
    """Exact-layer sets to try: the most sensitive layers first when a sensitivity table is given
    (measured: for this format they are middle layers, not the first/last two), else first/last."""
    L = num_layers
    if sensitive:
        return [()] + [tuple(sorted(sensitive[:k])) for k in (1, 2, 4) if k <= len(sensitive)]
    return [(), (0,), (0, L - 1), (0, 1, L - 2, L - 1)]


def sensitive_layers(path: str | Path | None, num_layers: int) -> list[int] | None:
    """Layers ordered by KLD when only that layer is compressed (from `kakeya-kv sensitivity`)."""
    import json
    if not path or not Path(path).is_file():
        return None
    rows = json.loads(Path(path).read_text())["layers"]
    if len(rows) != num_layers:
        raise SystemExit(f"{path}: sensitivity table has {len(rows)} layers, the model {num_layers}")
    return [r["layer"] for r in sorted(rows, key=lambda r: -r["kld"])]


def setting_env(kb: int, vb: int, exact: tuple[int, ...] = (), layer_bits=()) -> dict[str, str]:
    """The KAKEYA_* variables of one servable setting (what the recipe file will contain)."""
    return {"KAKEYA_FORMAT": "default", "KAKEYA_K_BITS": str(kb), "KAKEYA_V_BITS": str(vb),
            "KAKEYA_BOUNDARY_SKIP_LAYERS": ",".join(map(str, exact)),
            "KAKEYA_LAYER_BITS": format_layer_bits(layer_bits)}


def setting_format(env: dict[str, str], num_layers: int, name: str) -> ModelFormat:
    """The format the backend serves for these variables (validated like the backend validates them)."""
    return from_config(KakeyaConfig.from_env(env, num_layers=num_layers), num_layers, name)


def ratio(num_layers: int, head_dim: int, kb: int, vb: int, exact: tuple[int, ...], layer_bits=()) -> float:
    """Whole-model KV ratio vs bf16 from the per-layer block layouts."""
    f = setting_format(setting_env(kb, vb, exact, layer_bits), num_layers, "ratio")
    return f.ratio_vs_bf16(num_layers, 1, head_dim)


def candidates(num_layers: int, head_dim: int, sensitive: list[int] | None = None) -> list[ModelFormat]:
    """Every setting to try, by decreasing ratio: uniform bits × boundary sets, and (with a sensitivity
    table) uniform bits with the 1, 2, 4, ... most sensitive layers upgraded one step."""
    settings = [(kb, vb, tuple(ex), ()) for (kb, vb), ex in itertools.product(BITS, boundary_sets(num_layers, sensitive))]
    for kb, vb in BITS:
        up = upgraded(kb, vb)
        if not sensitive or up is None:
            continue
        for n in UPGRADE_COUNTS:
            if n < len(sensitive):
                settings.append((kb, vb, (), tuple((layer, *up) for layer in sorted(sensitive[:n]))))
    out = []
    for kb, vb, ex, lb in settings:
        name = (f"kakeya_k{kb}v{vb}" + (f"_b{'-'.join(map(str, ex))}" if ex else "")
                + (f"_up{len(lb)}k{lb[0][1]}v{lb[0][2]}" if lb else ""))
        env = setting_env(kb, vb, ex, lb)
        f = setting_format(env, num_layers, name)
        f.extra.update(k_bits=kb, v_bits=vb, layer_bits=env["KAKEYA_LAYER_BITS"], env=env,
                       ratio=f.ratio_vs_bf16(num_layers, 1, head_dim))
        out.append(f)
    return sorted(out, key=lambda f: -f.extra["ratio"])


def held_out_windows(tok, n: int, length: int):
    """Windows of the calibration books: disjoint from the evaluation text."""
    from . import data
    return data.windows(tok, data.CALIB_BOOKS, n, length)


def search(model, wins, num_layers: int, head_dim: int, budget_pct: float, chunk: int = 256, log=print,
           sensitive: list[int] | None = None):
    """First candidate (by decreasing ratio) whose mean ΔPPL on the windows is within the budget."""
    from . import harness
    ref, ref_lps = harness.reference(model, wins, chunk=chunk)
    tried = []
    for f in candidates(num_layers, head_dim, sensitive):
        res = harness.evaluate_against(model, wins, f, ref_lps, chunk=chunk)
        s = harness.summarize(res, ref)
        row = {"name": f.name, "k_bits": f.extra["k_bits"], "v_bits": f.extra["v_bits"],
               "boundary": list(f.exact_layers), "layer_bits": f.extra["layer_bits"], "ratio": f.extra["ratio"], **s}
        tried.append(row)
        log(f"  {f.name:28s} ratio {row['ratio']:.2f}  ΔPPL {s['delta_ppl_pct']:+.2f} % "
            f"[{s['delta_ppl_pct_ci95'][0]:+.2f}, {s['delta_ppl_pct_ci95'][1]:+.2f}]  KLD {s['kld']:.4f}")
        if s["delta_ppl_pct"] <= budget_pct:
            return row, tried, math.exp(sum(ref.nll) / len(ref.nll))
    return None, tried, math.exp(sum(ref.nll) / len(ref.nll))


def recipe_env(row: dict, model_name: str, budget: float, n_windows: int, window: int, command: str) -> str:
    ci = row["delta_ppl_pct_ci95"]
    return (f"# Kakeya KV recipe: {model_name} — written by `{command}`\n"
            f"# Budget: ΔPPL <= {budget:g} %. MEASURED (HF/CPU harness, chunked prefill 256, {n_windows} held-out windows "
            f"x {window} tokens of the calibration books, disjoint from the evaluation text):\n"
            f"#   setting {row['name']}: whole-model KV ratio {row['ratio']:.2f}x (per-layer block format bytes; the\n"
            f"#   vLLM capacity ratio also pays the exact-tail pool), ΔPPL {row['delta_ppl_pct']:+.2f} % [95 % CI {ci[0]:+.2f}, {ci[1]:+.2f}], "
            f"KLD {row['kld']:.4f}\n"
            f"# Usage: set -a; . {{this file}}; set +a; vllm serve MODEL --attention-backend KAKEYA\n"
            f"KAKEYA_FORMAT=default\nKAKEYA_K_BITS={row['k_bits']}\nKAKEYA_V_BITS={row['v_bits']}\n"
            f"KAKEYA_BOUNDARY_SKIP_LAYERS={','.join(map(str, row['boundary']))}\n"
            f"KAKEYA_LAYER_BITS={row.get('layer_bits', '')}\n")


def sensitivity(model, wins, num_layers: int, kb: int, vb: int, chunk: int = 256, progress=None) -> list[dict]:
    """ΔPPL / KLD when only layer L is compressed (k{kb}v{vb}); all other layers exact."""
    from . import harness
    ref, ref_lps = harness.reference(model, wins, chunk=chunk)
    rows = []
    for layer in range(num_layers):
        others = tuple(i for i in range(num_layers) if i != layer)
        f = ModelFormat(f"only_L{layer}", "kakeya", KakeyaCodec(kb, vb), others)
        res = harness.evaluate_against(model, wins, f, ref_lps, chunk=chunk)
        rows.append({"layer": layer, **harness.summarize(res, ref)})
        if progress is not None:
            progress.update(1)
    return rows


def run_recipe(a) -> int:
    from .cli import _load
    t0 = time.time()
    model, tok = _load(a.threads)
    cfg = model.config
    L = cfg.num_hidden_layers
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    wins = held_out_windows(tok, a.windows, a.window)
    print(f"recipe search: budget ΔPPL <= {a.budget_ppl} %, {len(wins)} held-out windows", file=sys.stderr)
    sens = sensitive_layers(a.sensitivity, L)
    best, tried, bf16_ppl = search(model, wins, L, D, a.budget_ppl, log=lambda m: print(m, file=sys.stderr),
                                   sensitive=sens)
    command = "kakeya-kv " + " ".join(sys.argv[1:])
    if best is None:
        print(f"no candidate met the {a.budget_ppl} % budget; tried {len(tried)}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else Path("deploy/recipes") / f"{a.model_name}.env"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(recipe_env(best, a.model_name, a.budget_ppl, len(wins), a.window, command))
    print(f"wrote {out}: {best['name']} ratio {best['ratio']:.2f}x ΔPPL {best['delta_ppl_pct']:+.2f} % "
          f"({(time.time() - t0) / 60:.1f} min)")
    return 0


def run_sensitivity(a) -> int:
    from tqdm import tqdm

    from .cli import _load
    from .report import write_json
    model, tok = _load(a.threads)
    cfg = model.config
    L = cfg.num_hidden_layers
    wins = held_out_windows(tok, a.windows, a.window)
    with tqdm(total=L, desc="layers", file=sys.stderr) as bar:
        rows = sensitivity(model, wins, L, a.k_bits, a.v_bits, progress=bar)
    res = {"model": "SmolLM2-135M-Instruct", "setting": f"k{a.k_bits}v{a.v_bits}", "windows": len(wins),
           "text": "held-out calibration books", "command": "kakeya-kv " + " ".join(sys.argv[1:]), "layers": rows}
    out = Path(a.out)
    write_json(out / "sensitivity.json", res)
    lines = [f"# Per-layer sensitivity: only layer L compressed ({res['setting']}, {len(wins)} held-out windows)", "",
             "| layer | ΔPPL % | 95% CI | KLD |", "|---|---|---|---|"]
    for r in rows:
        ci = r["delta_ppl_pct_ci95"]
        lines.append(f"| {r['layer']} | {r['delta_ppl_pct']:+.3f} | [{ci[0]:+.3f}, {ci[1]:+.3f}] | {r['kld']:.5f} |")
    (out / "SENSITIVITY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
