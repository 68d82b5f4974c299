"""The vLLM backend's CPU step planner: phases, tail writes and seals against a simulated cache."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kakeya_v1_3_ppl.plan import TailState, gqa_plan, plan_step

N = 512


class Sim:
    """Ground truth: what each tail slot holds (positions) and which blocks are sealed."""

    def __init__(self):
        self.tail = {}      # slot -> list of positions
        self.sealed = {}    # req_id -> set of sealed block indices

    def run(self, phases, req_ids, slots, starts):
        for ph in phases:
            # every query may read exactly: sealed blocks [0, n_sealed) and tail positions [n_sealed*N, seq_end)
            for tok, slot, off in zip(ph.write_tok, ph.write_slot, ph.write_off):
                pos = int(off)  # relative to the block
                self.tail.setdefault(int(slot), {})[pos] = int(tok)
            for i, r in enumerate(ph.rows):
                rid = req_ids[r]
                ns, end = int(ph.n_sealed[i]), int(ph.seq_end[i])
                assert all(b in self.sealed.get(rid, set()) for b in range(ns)), "reads an unsealed block"
                held = self.tail.get(int(ph.tail_slot[i]), {})
                for p in range(ns * N, end):
                    assert p - ns * N in held, f"tail lacks position {p}"
            for row, blk, slot in zip(ph.seal_row, ph.seal_blk, ph.seal_slot):
                rid = req_ids[row]
                assert blk not in self.sealed.get(rid, set()), "sealed twice"
                assert sorted(self.tail[int(slot)]) == list(range(N)), "sealing an incomplete block"
                self.sealed.setdefault(rid, set()).add(int(blk))
                self.tail[int(slot)] = {}
            # a fresh block resets the slot (tokens at offset 0 overwrite)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 700), min_size=1, max_size=6), min_size=1, max_size=3))
def test_phases_cover_every_token_once_and_seal_full_blocks(chunk_lists):
    state, sim = TailState(), Sim()
    req_ids = [f"r{i}" for i in range(len(chunk_lists))]
    done = [0] * len(chunk_lists)
    steps = max(len(c) for c in chunk_lists)
    for s in range(steps):
        rows = [i for i, c in enumerate(chunk_lists) if s < len(c)]
        qlen = [chunk_lists[i][s] for i in rows]
        qsl = np.concatenate([[0], np.cumsum(qlen)])
        seq = np.array([done[i] + q for i, q in zip(rows, qlen)])
        # fresh blocks: clear the simulated slot when a block starts at offset 0
        for i, q in zip(rows, qlen):
            if done[i] % N == 0:
                sim.tail[i] = {}
        phases = plan_step(qsl, seq, np.array(rows), [req_ids[i] for i in rows], state)
        sim.run(phases, [req_ids[i] for i in rows], rows, [done[i] for i in rows])
        covered = np.sort(np.concatenate([p.tok for p in phases]))
        assert (covered == np.arange(qsl[-1])).all(), "every query token runs exactly once"
        for i, q in zip(rows, qlen):
            done[i] += q
    for i, rid in enumerate(req_ids):
        assert sim.sealed.get(rid, set()) == set(range(done[i] // N))


def test_prefix_cached_full_block_is_read_sealed_not_rewritten():
    """vLLM recomputes the last prompt token when the whole prompt (1024 tokens) hits the cache."""
    state = TailState()
    phases = plan_step(np.array([0, 1]), np.array([1024]), np.array([5]), ["new"], state)
    assert len(phases) == 1
    ph = phases[0]
    assert ph.n_sealed.tolist() == [2] and len(ph.write_tok) == 0 and len(ph.seal_row) == 0
    assert state.cached_reads == 1 and state.holds(5, "new", 2, 0)


def test_reused_slot_does_not_trust_previous_owner():
    state = TailState()
    plan_step(np.array([0, 100]), np.array([100]), np.array([0]), ["a"], state)
    assert state.holds(0, "a", 0, 100)
    # Another request on slot 0 at the same offset must not read a's tokens as its own: with an
    # incomplete block that is an error, never a silent read.
    with pytest.raises(RuntimeError, match="does not hold"):
        plan_step(np.array([0, 1]), np.array([101]), np.array([0]), ["b"], state)
    # The legitimate case (full block from the prefix cache) reads it sealed.
    ph = plan_step(np.array([0, 1]), np.array([512]), np.array([0]), ["c"], state)[0]
    assert ph.n_sealed.tolist() == [1] and len(ph.write_tok) == 0


def test_gqa_plan_tiles_do_not_straddle_requests():
    pl = gqa_plan(np.array([5, 6, 9]), np.array([0, 0, 1]), 2, gqa=3, bm=4)
    assert pl["nt"] == 3                          # request 0: 6 rows -> 2 tiles, request 1: 3 rows -> 1 tile
    assert pl["tile_req"].tolist() == [0, 0, 1]
    assert sorted(pl["dest"].tolist()) == [0, 1, 2, 3, 4, 5, 8, 9, 10]
    assert (pl["qpos"] >= 0).sum() == 9


def test_decode_buffers_mask_padding_rows_of_a_captured_batch():
    import torch

    from kakeya_v1_3_ppl.plan import DecodeBuffers
    buf = DecodeBuffers(4, gqa=3, bm=16, device="cpu")
    seq = torch.tensor([512, 7, 0], dtype=torch.int32)        # third row: padding (no request)
    bt = torch.tensor([[5, 6], [7, 8], [0, 0]], dtype=torch.int32)
    d = buf.fill(3, seq, bt, torch.tensor([2, 0], dtype=torch.int32))
    assert d["slot64"].tolist() == [2, 0, 4] and d["off64"].tolist() == [511, 6, 0]
    assert d["seal_flag"].tolist() == [1, 0, 0] and d["seal_page"].tolist()[:2] == [5, 7]
    qpos = d["plan"]["qpos"].view(3, 16)
    assert (qpos[0, :3] == 511).all() and (qpos[1, :3] == 6).all() and (qpos[2] == -1).all() and (qpos[:, 3:] == -1).all()
    assert d["plan"]["nt"] == 3 and d["plan"]["tile_req"].tolist() == [0, 1, 2]
