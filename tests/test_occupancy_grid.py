"""benchmarks/kernels/occupancy_grid.py's bookkeeping (the sm_90 compiles themselves: test_kernel_bench.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernels"))

import occupancy_grid as G  # noqa: E402

from kakeya_kernels.variants import CANDIDATES, TUNED  # noqa: E402


def test_one_wave_columns():
    """The table's fill columns on the sweep's shape (b16 x 8 KV heads = 128 tiles, 32 sealed blocks, 132 SMs):
    splits = programs/SM x 132 // 128 (one wave, round down), never more than the blocks + the tail; blocks per
    program = the longest split's share."""
    assert [G.one_wave(p)["fill_splits"] for p in (1, 2, 3, 4, 5, 8, 16, 40)] == [1, 2, 3, 4, 5, 8, 16, 33]
    assert [G.one_wave(p)["fill_blocks_per_program"] for p in (3, 4, 5, 8)] == [11, 8, 7, 4]


def test_grid_covers_the_candidates_and_marks_them():
    """Every lut-4/5 launch of TUNED and the candidates is a grid row (so the summary table can show it); the
    markdown lists them first, by name, per Triton version, and says it is a proxy."""
    keys = {(c["head_dim"], c["lut"], c["pf"], c["tt"], c["num_warps"], c["maxnreg"]) for c in G.configs((64, 128),
                                                                                                       False)}
    named = [("TUNED", TUNED)] + list(CANDIDATES.items())
    for _, per_d in named:
        for d, v in per_d.items():
            assert (d, v["lut"], bool(v.get("pf")), v["tt"], v["num_warps"], v["maxnreg"]) in keys
    assert all(c["num_warps"] == 4 for c in G.configs((64,), True))
    fake = [dict(c, k_bits=4, v_bits=3, triton="x", regs=96, spill_in_loop=0, spill_all=0, shared_bytes=2048,
                 programs_per_sm=5, warps_per_sm=20, per_element=8.0, **G.one_wave(5))
            for c in G.configs((64,), False) if c["tt"] == 64 and c["num_warps"] == 4]
    md = G.markdown(fake)
    assert "CPU PROXY" in md and "| fill (fill 5: 5 splits) x | 64 |" in md
    assert "| TUNED (" not in md                      # session 9's TUNED at D=64 has tt 128: not among the fake rows
    assert "| fill (fill 5: 5 splits) x | 64 |" in md
    assert "| t128_fill4 (" not in md                 # tt 128: not among the fake rows
