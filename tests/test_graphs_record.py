"""benchmarks/vllm/graphs_record.py: the graphs test's pair rule applied offline to a cut run's record."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "vllm"))


def _line(engine, tokens, top):
    return json.dumps({"test": "cuda_graphs_engine", "engine": engine, "tokens": tokens, "top": top})


def test_pairs_from_a_cut_record(tmp_path):
    import graphs_record as G
    tie = [{"5": -0.1, "6": -0.3, "1": -4.0}, {"7": -0.2, "8": -5.0, "1": -6.0}]
    far = [{"5": -0.1, "9": -3.0, "1": -4.0}, {"7": -0.2, "8": -5.0, "1": -6.0}]
    rec = tmp_path / "rec.jsonl"
    rec.write_text("\n".join([
        json.dumps({"test": "cuda_graphs_parity"}),
        _line("compiled", {"p0": [5, 7], "p1": [5, 7], "p2": [5, 7]}, {"p0": tie, "p1": tie, "p2": far}),
        # graphs: p0 identical, p1 flips 5 -> 6 (a near-tie in both runs), p2 flips 5 -> 9 (compiled: 2.9 nats)
        _line("graphs", {"p0": [5, 7], "p1": [6, 7], "p2": [9, 7]},
              {"p0": tie, "p1": [{"6": -0.1, "5": -0.2, "1": -4.0}] + tie[1:],
               "p2": [{"9": -0.1, "5": -0.2, "1": -4.0}] + far[1:]}),
        _line("fa_compiled", {"p0": [5, 7]}, {"p0": tie})]) + "\n")
    rows = {r["pair"]: r for r in G.compare(G.engines(str(rec)))}
    g = rows["graphs vs compiled"]
    assert g["identical"] == 1 and list(g["near_tie"]) == ["p1"] and list(g["beyond_near_tie"]) == ["p2"]
    assert "by 2.90 nats" in g["beyond_near_tie"]["p2"]
    assert rows["fa_graphs vs fa_compiled"]["missing"] == ["fa_graphs"]
    assert rows["planned vs ref"]["missing"] == ["planned", "ref"]
