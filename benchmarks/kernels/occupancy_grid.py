"""Launch-config grid for decode attention: registers, loop spills, resident programs/warps per SM and loop SASS per
code element of each (head_dim, lut, pf, tt, num_warps, maxnreg), from sm_90 compiles on the CPU (sass_count.py).

A CPU PROXY, not a speed: it says which launches raise the resident warps per SM (latency hiding) without loop spills
or many more instructions per element; only a GPU sweep says which is faster. Compile with the Triton the device runs
(its register allocation differs: session 9's device had 3.6, e.g. REG4 at D=64 takes 146 registers there and 122
with 3.9), e.g. PYTHONPATH=/tmp/tri36:$PYTHONPATH.

python benchmarks/kernels/occupancy_grid.py --jsonl OUT.jsonl [--md OUT.md] [--d 64 128] [--bits 4,3] [--quick]
Rows are appended to the JSONL as they compile (a cut-short run keeps what it had; a rerun skips rows already there).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import triton

import sass_count as S
from kakeya_kernels.variants import num_splits

SMS, N_TILES, HKV, BLOCKS = 132, 16, 8, 32   # the sweep's shape: H200 SMs; b16 (bm 4 = GQA 4: a tile per request)
#                                             x 8 KV heads; 16k / 512 sealed blocks
KEYS = ("head_dim", "k_bits", "v_bits", "lut", "pf", "tt", "num_warps", "maxnreg")


def configs(dims, quick: bool):
    """Every (d, lut, pf, tt, num_warps, maxnreg) of the grid. lut 5 (the linear candidate, uniform caches only; lut 7
    before session 13) and quick mode: tt 64/128 at 4 warps only."""
    caps = (None, 64, 72, 80, 96, 128, 168)
    for d in dims:
        for lut, pf, tt, w, r in itertools.product((4, 5), (False, True), (32, 64, 128), (2, 4, 8), caps):
            if (lut == 5 or quick) and not (w == 4 and tt in (64, 128)):
                continue
            yield dict(head_dim=d, lut=lut, pf=pf, tt=tt, num_warps=w, maxnreg=r)


def one_wave(programs_per_sm: int) -> dict:
    """The sweep shape's grid when it is sized to one full wave (variants 'fill'): splits, sealed blocks per program
    (the longest split; the tail's split also runs the 100-token tail)."""
    splits = num_splits(dict(fill=programs_per_sm), N_TILES, HKV, BLOCKS, SMS)
    return {"fill_splits": splits, "fill_blocks_per_program": -(-BLOCKS // splits)}


def row(c: dict, kb: int, vb: int) -> dict:
    r = S.count(c["head_dim"], kb, vb, c["lut"], c["tt"], c["num_warps"], c["maxnreg"], bm=4, fused=True, pf=c["pf"])
    return {**c, "k_bits": kb, "v_bits": vb, "triton": triton.__version__, "per_element": round(r["per_element"], 3),
            "regs": r["regs"], "spill_in_loop": r["spill_instructions_in_loop"], "spill_all": r["spill_instructions"],
            "shared_bytes": r["shared_bytes"], "programs_per_sm": r["programs_per_sm"],
            "warps_per_sm": r["warps_per_sm"], **one_wave(r["programs_per_sm"])}


COLS = ("| triton | D | k/v bits | lut | pf | tt | warps | reg cap | regs | loop spills | all spills | shared KB | "
        "programs/SM | warps/SM | SASS/el | fill splits | blocks/program |")


def _line(r: dict, name: str = "") -> str:
    return (f"| {name + ' ' if name else ''}{r['triton']} | {r['head_dim']} | {r['k_bits']}/{r['v_bits']} | "
            f"{r['lut']} | {'yes' if r['pf'] else 'no'} | {r['tt']} | {r['num_warps']} | {r['maxnreg'] or '-'} | {r['regs']} | "
            f"{r['spill_in_loop']} | {r['spill_all']} | {r['shared_bytes'] / 1024:.0f} | {r['programs_per_sm']} | "
            f"{r['warps_per_sm']} | {r['per_element']:.2f} | {r['fill_splits']} | {r['fill_blocks_per_program']} |")


def markdown(rows: list[dict]) -> str:
    """The backend default and the sweep candidates (kakeya_kernels.variants) first, then the whole grid."""
    from kakeya_kernels.variants import CANDIDATES, TUNED
    out = ["# Decode launch grid — sm_90 compiles on the CPU (CPU PROXY, not a speed)", "",
           "Made by `benchmarks/kernels/occupancy_grid.py` (per Triton version: the device runs 3.6). "
           "sass_count.occupancy: 64K registers, 228 KB shared, 64 warps per SM. `SASS/el` = sealed-loop SASS "
           "instructions per code element per thread; `fill splits` / `blocks/program` = the batch-16 ctx-16k grid "
           "(16 x 8 tiles, 32 sealed blocks each) sized to one full wave at that occupancy. Swap launches are not "
           "in the grid (sass_count.count(..., swap=True) compiles them).", "",
           "## Backend default (TUNED) and variants.CANDIDATES", "", COLS.replace("| triton", "| variant, triton"),
           "|" + "---|" * 17]
    index = {tuple(r[k] for k in KEYS) + (r["triton"],): r for r in rows}
    named = [("TUNED", TUNED)] + sorted(CANDIDATES.items())
    for tri in sorted({r["triton"] for r in rows}):
        for name, per_d in named:
            for d, v in sorted(per_d.items()):
                if v.get("swap"):   # the grid compiles without swap: its row would be another launch's numbers
                    continue
                r = index.get((d, 4, 3, v["lut"], bool(v.get("pf")), v["tt"], v["num_warps"], v["maxnreg"], tri))
                if r:   # the variant's own split rule at that shape, next to the name
                    rule = f"fill {v['fill']}" if v.get("fill") else f"waves {v['waves']}"
                    out.append(_line(r, f"{name} ({rule}: {num_splits(v, N_TILES, HKV, BLOCKS, SMS)} splits)"))
    out += ["", "## Whole grid (k4v3)", "", COLS, "|" + "---|" * 17]
    for r in sorted(rows, key=lambda r: (r["triton"], r["head_dim"], r["k_bits"], r["lut"], r["pf"], r["tt"],
                                         r["num_warps"], r["maxnreg"] or 999)):
        out.append(_line(r))
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--md")
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    kb, vb = map(int, a.bits.split(","))
    done = []
    if os.path.exists(a.jsonl):
        with open(a.jsonl) as f:
            done = [json.loads(line) for line in f if line.strip()]
    have = {tuple(r[k] for k in KEYS) + (r["triton"],) for r in done}
    with open(a.jsonl, "a") as f:
        for c in configs(a.d, a.quick):
            key = tuple({**c, "k_bits": kb, "v_bits": vb}[k] for k in KEYS) + (triton.__version__,)
            if key in have:
                continue
            try:
                r = row(c, kb, vb)
            except Exception as e:   # a config that does not compile is a row too (the reason, one line)
                r = {**c, "k_bits": kb, "v_bits": vb, "triton": triton.__version__, "error": repr(e)[:200]}
            done.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(json.dumps(r), flush=True)
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown([r for r in done if "error" not in r]))


if __name__ == "__main__":
    main()
