"""Summarise gpu_job.sh's Nsight Compute profiles (ncu --csv --page details) of one TUNED decode launch per head_dim.

python benchmarks/kernels/ncu_summary.py OUT.md ncu_decode_d128.csv ncu_decode_d64.csv
Writes a markdown table: issue rate, occupancy, registers, spills, instructions per K/V code element and the warp
stall breakdown (cycles per issued instruction, largest first)."""
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import GQA, HKV  # noqa: E402
from profile_decode import BATCH, CONTEXT, K_BITS, V_BITS  # noqa: E402  (gpu_job.sh profiles its defaults)

PICK = ["Duration", "SM Frequency", "Issued Warp Per Scheduler", "No Eligible", "Active Warps Per Scheduler",
        "Eligible Warps Per Scheduler", "Warp Cycles Per Issued Instruction", "Achieved Occupancy",
        "Theoretical Occupancy", "Registers Per Thread", "Block Limit Registers", "Block Limit Shared Mem",
        "Local Memory Spilling Requests", "DRAM Throughput", "L1/TEX Hit Rate", "Compute (SM) Throughput",
        "Executed Instructions", "Grid Size"]


def read(path: str) -> dict:
    rows = [r for r in csv.reader(open(path)) if r]
    start = next(i for i, r in enumerate(rows) if r[0] == "ID")
    hdr = rows[start]
    out = {}
    for r in rows[start + 1:]:
        m = dict(zip(hdr, r))
        if m.get("Metric Name"):
            out[m["Metric Name"]] = (m["Metric Value"], m.get("Metric Unit", ""))
    return out


def main():
    dst, paths = sys.argv[1], sys.argv[2:]
    prof = {int(re.search(r"d(\d+)", Path(p).name).group(1)): read(p) for p in paths}
    ds = sorted(prof, reverse=True)
    lines = [f"# Nsight Compute: one TUNED decode launch (k{K_BITS}v{V_BITS}, batch {BATCH}, context {CONTEXT}, "
             f"{HKV} KV heads, GQA {GQA})", "",
             "ncu fixes the SM clock (see SM Frequency), so Duration is longer than the bench's time.", "",
             "| metric | " + " | ".join(f"D={d}" for d in ds) + " |", "|---" * (1 + len(ds)) + "|"]
    for k in PICK:
        lines.append(f"| {k} | " + " | ".join(" ".join(prof[d].get(k, ("-", ""))).strip() for d in ds) + " |")
    # Thread instructions per code element: warp instructions x 32 / (batch x context x Hkv x D x 2 streams)
    per = {d: float(prof[d]["Executed Instructions"][0].replace(",", "")) * 32 / (BATCH * CONTEXT * HKV * d * 2)
           for d in ds if "Executed Instructions" in prof[d]}
    lines.append("| thread instructions per K/V code element | " + " | ".join(f"{per.get(d, 0):.2f}" for d in ds)
                 + " |")
    lines += ["", "Warp stall reasons (cycles per issued instruction; `selected` = issuing):", "",
              "| stall | " + " | ".join(f"D={d}" for d in ds) + " |", "|---" * (1 + len(ds)) + "|"]
    pre = "smsp__average_warps_issue_stalled_"
    names = sorted({k[len(pre):].split("_per_issue_active")[0] for d in ds for k in prof[d] if k.startswith(pre)},
                   key=lambda n: -float(prof[ds[0]].get(f"{pre}{n}_per_issue_active.ratio", ("0",))[0] or 0))
    for n in names:
        vals = [prof[d].get(f"{pre}{n}_per_issue_active.ratio", ("-",))[0] for d in ds]
        if any(v not in ("0", "0.00", "-") for v in vals):
            lines.append(f"| {n} | " + " | ".join(vals) + " |")
    Path(dst).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
