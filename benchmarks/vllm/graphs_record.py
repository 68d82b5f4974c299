"""Compare the CUDA-graphs test's engines from its record file, for a device call cut short before pytest's verdict.

tests/test_vllm_graphs_gpu.py records every engine's greedy tokens and top logprobs (``cuda_graphs_engine`` lines in
GPU_TEST_RECORD) as soon as the engine finishes; this applies the test's own rule (first divergence, near-tie) to
the pairs whose two engines both finished. Session 9's graphs part was cut at 208 s after 5 of 6 engines.
    python benchmarks/vllm/graphs_record.py benchmarks/results/vllm_sN/.../gpu_test_record.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.vllm_gpu_common import Gen, first_divergence, near_tie  # noqa: E402

PAIRS = [("graphs", "compiled"), ("fa_graphs", "fa_compiled"), ("planned", "ref"), ("graphs", "ref")]


def engines(path: str) -> dict[str, dict[str, Gen]]:
    """{engine: {prompt: Gen}} from the record lines that carry tokens (the last line per engine wins)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r.get("test") != "cuda_graphs_engine" or "tokens" not in r:
            continue
        runs = {}
        for k, toks in r["tokens"].items():
            g = Gen(toks)
            top = (r.get("top") or {}).get(k)
            if top is not None:    # JSON object keys are strings: back to token ids
                g.top = [{int(t): lp for t, lp in pos.items()} for pos in top]
            runs[k] = g
        out[r["engine"]] = runs
    return out


def compare(runs: dict[str, dict[str, Gen]]) -> list[dict]:
    """Per available pair: prompts identical, near-tie divergences and divergences beyond a near-tie."""
    rows = []
    for a, b in PAIRS:
        if a not in runs or b not in runs:
            rows.append({"pair": f"{a} vs {b}", "missing": [e for e in (a, b) if e not in runs]})
            continue
        div = {k: first_divergence(runs[a][k], runs[b][k]) for k in runs[b]}
        bad = {k: near_tie(runs[a][k], runs[b][k], i) for k, i in div.items() if i is not None}
        rows.append({"pair": f"{a} vs {b}", "prompts": len(div), "identical": sum(i is None for i in div.values()),
                     "near_tie": {k: div[k] for k, why in bad.items() if why is None},
                     "beyond_near_tie": {k: why for k, why in bad.items() if why is not None}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record")
    for row in compare(engines(ap.parse_args().record)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
