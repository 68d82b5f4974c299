"""Same-step prefix hits: vLLM registers a block in the prefix cache when it schedules the step that fills it,
before that step runs, so a request admitted later in the same step can hit a block another request fills and
seals in this very step (e.g. two identical prompts arriving together). Its queries must read that page only
after the seal; a request continuing its own tail must not be delayed."""
import numpy as np

from kakeya_v1_3_ppl.plan import TailState, plan_step

N = 512


def _reads_after_seals(phases, tables, sealed_before=()):
    """Replay the phases against physical pages: every sealed page a query reads must be sealed by then."""
    sealed = set(sealed_before)
    for ph in phases:
        for i, r in enumerate(ph.rows):
            for b in range(int(ph.n_sealed[i])):
                assert tables[r][b] in sealed, f"row {r} reads page {tables[r][b]} before it is sealed"
        sealed |= {tables[r][b] for r, b in zip(ph.seal_row, ph.seal_blk)}
    return sealed


def _step(rows):
    """rows: (req_id, slot, start, q_len) -> plan_step arguments."""
    qsl = np.concatenate([[0], np.cumsum([q for *_, q in rows])])
    seq = np.array([s + q for _, _, s, q in rows])
    return qsl, seq, np.array([slot for _, slot, _, _ in rows]), [rid for rid, *_ in rows]


def test_hit_on_a_block_sealed_in_the_same_step_reads_it_after_the_seal():
    # r1: fresh 520-token prompt (fills and seals page 0); r2: the same prompt, admitted after r1 in the same
    # step with a hit on page 0, computes 512..519.
    phases = plan_step(*_step([("r1", 0, 0, 520), ("r2", 1, 512, 8)]), TailState())
    _reads_after_seals(phases, {0: [0, 1], 1: [0, 2]})


def test_chained_same_step_hits():
    # r2 hits r1's page 0 and fills + seals its own page 3; r3 hits pages 0 and 3 in the same step.
    phases = plan_step(*_step([("r1", 0, 0, 1100), ("r2", 1, 512, 588), ("r3", 2, 1024, 76)]), TailState())
    sealed = _reads_after_seals(phases, {0: [0, 1, 2], 1: [0, 3, 4], 2: [0, 3, 5]})
    assert sealed == {0, 1, 3}
    assert sorted(np.concatenate([p.tok for p in phases]).tolist()) == list(range(1100 + 588 + 76))


def test_own_tail_and_earlier_hits_are_not_delayed():
    state = TailState()
    plan_step(*_step([("a", 0, 0, 256)]), state)                     # a's tail holds 256 tokens of block 0
    # b hits a page sealed in an earlier step (nothing is sealed in this step): no extra phase for it.
    phases = plan_step(*_step([("a", 0, 256, 100), ("b", 1, 512, 40)]), state)
    assert len(phases) == 1 and sorted(phases[0].rows.tolist()) == [0, 1]
    _reads_after_seals(phases, {0: [7], 1: [9, 10]}, sealed_before={9})


def test_fully_cached_prompt_recomputing_its_last_token_waits_for_a_same_step_seal():
    # r1: fresh 512-token prompt (fills and seals page 0); r2: the same prompt, fully cached, recomputes only
    # token 511 - a read-only phase over page 0, which must come after r1's seal (found by the GPU-planned path's
    # test: the planner put both in one phase and r2 read an unsealed page).
    phases = plan_step(*_step([("r1", 0, 0, 512), ("r2", 1, 511, 1)]), TailState())
    _reads_after_seals(phases, {0: [0], 1: [0]})
    assert len(phases) == 2 and list(phases[1].rows) == [1] and len(phases[1].write_tok) == 0
