"""Per-step planning on the CPU (no vLLM import): which tokens go where, in which phase.

A request's new tokens may cross 512-token block boundaries (chunked prefill). A block is
sealed only after the queries inside it have attended to it exactly, so one step runs in
*phases*: phase j handles, for every request, the j-th block its new tokens touch —
write those tokens into the request's exact tail, attend (sealed blocks + tail), and seal
the block if it became full. Decode batches are one phase.

The tail of a request lives in slot ``req_idx`` (vLLM's persistent request row, bounded by
max_num_seqs, reused when the request finishes, aborts or is preempted). ``TailState`` tracks on
the CPU which block and how many tokens each slot holds, keyed by request id so that a reused
row never reads the previous owner's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kakeya_kernels.kakeya_triton import gqa_plan
from kakeya_kv.format import BLOCK_TOKENS as N


@dataclass
class TailState:
    """CPU mirror of what each tail slot holds: owner request, block index, tokens filled."""
    owner: dict[int, str] = field(default_factory=dict)
    block: dict[int, int] = field(default_factory=dict)
    fill: dict[int, int] = field(default_factory=dict)
    cached_reads: int = 0   # phases served read-only from an already-sealed (prefix-cached) block

    def holds(self, slot: int, req_id: str, blk: int, fill: int) -> bool:
        return self.owner.get(slot) == req_id and self.block.get(slot) == blk and self.fill.get(slot) == fill

    def set(self, slot: int, req_id: str, blk: int, fill: int) -> None:
        self.owner[slot], self.block[slot], self.fill[slot] = req_id, blk, fill


@dataclass
class Phase:
    tok: np.ndarray          # [Tp] batch token indices whose queries run in this phase
    q_pos: np.ndarray        # [Tp] absolute positions
    q_req: np.ndarray        # [Tp] index into this phase's request arrays
    rows: np.ndarray         # [Rp] batch rows of the phase's requests
    n_sealed: np.ndarray     # [Rp] sealed blocks readable by this phase's queries
    seq_end: np.ndarray      # [Rp] causal end (exclusive) of keys for the phase
    tail_slot: np.ndarray    # [Rp] tail slot (req_idx)
    write_tok: np.ndarray    # [W] batch token indices written into the tail
    write_slot: np.ndarray   # [W]
    write_off: np.ndarray    # [W] offset inside the block (pos % 512)
    seal_row: np.ndarray     # [S] batch rows whose block fills in this phase
    seal_blk: np.ndarray     # [S] logical block index to seal
    seal_slot: np.ndarray    # [S] tail slot holding it
    # [W] index into this phase's request arrays of each written token (tails kept in pages: whose pages)
    write_req: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass
class Span:
    """KAKEYA_PREFILL_ATTEND=chunk: the step's prefill rows, each attending its exact span — the tail's tokens before
    the step and the chunk's own — in one launch, over the blocks sealed before the step read compressed; then every
    block of the span that is full is sealed, and what is left becomes the tail (runtime.forward_span)."""
    tok: np.ndarray          # [Ts] batch token indices of the span rows' new tokens
    q_pos: np.ndarray        # [Ts] absolute positions
    q_req: np.ndarray        # [Ts] index into the span's request arrays
    rows: np.ndarray         # [Rs] batch rows
    n_sealed: np.ndarray     # [Rs] blocks sealed before the step (the span starts at n_sealed * 512)
    seq_end: np.ndarray      # [Rs] context length after the step
    tail_slot: np.ndarray    # [Rs] tail slot (req_idx)
    seal_req: np.ndarray     # [S] index into the span's request arrays of each block to seal
    seal_local: np.ndarray   # [S] block index inside that request's span
    seal_blk: np.ndarray     # [S] logical block index (n_sealed + local)
    n_full: np.ndarray       # [Rs] blocks of the span sealed in this step (the new tail is block n_sealed + n_full)
    first_page: np.ndarray   # [Rs] the row's first 512-token page in the packed span buffer (row i: n_full + 1 pages)
    span_pages: int          # pages of the packed span buffer (sum over rows of n_full + 1)


def plan_step(qsl: np.ndarray, seq_lens: np.ndarray, req_idx: np.ndarray, req_ids: list[str],
              state: TailState | None) -> list[Phase]:
    """Split one step's batch into phases. qsl [B+1] query start offsets, seq_lens [B] context length
    including the new tokens, req_idx [B] tail slot per row, req_ids [B]. ``state`` None = no tail
    (exact pages: one phase, every block readable, nothing sealed)."""
    return _plan(qsl, seq_lens, req_idx, req_ids, state, False)[1]


def plan_step_chunked(qsl: np.ndarray, seq_lens: np.ndarray, req_idx: np.ndarray, req_ids: list[str],
                      state: TailState) -> tuple[Span | None, list[Phase]]:
    """KAKEYA_PREFILL_ATTEND=chunk: rows with several new tokens that continue their own tail (no prefix-cache
    resume) form the step's Span, which runs before the phases; the other rows (decode tokens, resumes after a
    prefix-cache hit) are planned in phases as plan_step does. The span seals before any phase runs, so a phase that
    reads a block the span seals in this step reads it sealed."""
    return _plan(qsl, seq_lens, req_idx, req_ids, state, True)


def _span(qsl, seq_lens, req_idx, req_ids, state: TailState, rows: np.ndarray, start: np.ndarray) -> Span | None:
    if not len(rows):
        return None
    q_len = (seq_lens[rows] - start[rows]).astype(np.int64)
    ns = start[rows] // N
    end = seq_lens[rows].astype(np.int64)
    n_full = (end - ns * N) // N
    tok = np.concatenate([np.arange(qsl[r], qsl[r] + n, dtype=np.int64) for r, n in zip(rows, q_len)])
    q_req = np.repeat(np.arange(len(rows), dtype=np.int64), q_len)
    q_pos = start[rows][q_req] + (tok - qsl[rows][q_req])
    seal_req = np.repeat(np.arange(len(rows), dtype=np.int64), n_full)
    seal_local = np.concatenate([np.arange(n, dtype=np.int64) for n in n_full])
    for i, r in enumerate(rows):
        state.set(int(req_idx[r]), req_ids[r], int(end[i] // N), int(end[i] % N))
    return Span(tok=tok, q_pos=q_pos, q_req=q_req, rows=rows.astype(np.int64), n_sealed=ns, seq_end=end,
                tail_slot=req_idx[rows].astype(np.int64), seal_req=seal_req, seal_local=seal_local,
                seal_blk=ns[seal_req] + seal_local, n_full=n_full,
                first_page=np.concatenate([[0], np.cumsum(n_full + 1)[:-1]]).astype(np.int64),
                span_pages=int((n_full + 1).sum()))


def _plan(qsl: np.ndarray, seq_lens: np.ndarray, req_idx: np.ndarray, req_ids: list[str],
          state: TailState | None, chunked: bool) -> tuple[Span | None, list[Phase]]:
    B = len(seq_lens)
    q_len = np.diff(qsl[:B + 1]).astype(np.int64)
    start = seq_lens[:B].astype(np.int64) - q_len
    if state is None:
        tok = np.arange(int(qsl[B]), dtype=np.int64)
        rows = np.arange(B)
        q_req = np.repeat(rows, q_len)
        q_pos = start[q_req] + (tok - qsl[q_req])
        e = np.empty(0, dtype=np.int64)
        return None, [Phase(tok, q_pos, q_req, rows, (seq_lens[:B] + N - 1) // N, seq_lens[:B].astype(np.int64),
                            np.zeros(B, dtype=np.int64), e, e, e, e, e, e)]
    b0 = start // N
    # First phase of each request: does its tail hold the block's earlier tokens?
    read_only_first = np.zeros(B, dtype=bool)
    hit = np.zeros(B, dtype=bool)      # starts after a prefix-cache hit (its sealed blocks are not its own seals)
    for r in range(B):
        if q_len[r] == 0:
            continue
        off = int(start[r] - b0[r] * N)
        slot = int(req_idx[r])
        hit[r] = start[r] > 0 and not state.holds(slot, req_ids[r], int(b0[r]), off)
        if off and hit[r]:
            # The block's first `off` tokens are not in the tail: they come from a prefix-cache hit,
            # i.e. the block is full and already sealed (vLLM recomputes only the last token).
            if seq_lens[r] != (b0[r] + 1) * N:
                raise RuntimeError(
                    f"kakeya: request {req_ids[r]!r} resumes at position {int(start[r])} but its tail slot {slot} "
                    f"does not hold the block's first {off} tokens and the block is not complete; refusing to "
                    "attend to missing KV")
            read_only_first[r] = True
    span = None
    if chunked:
        in_span = (q_len > 1) & ~hit
        span = _span(qsl, seq_lens[:B], req_idx, req_ids, state, np.nonzero(in_span)[0], start)
        q_len = np.where(in_span, 0, q_len)     # the span rows get no phases
    b1 = np.where(q_len > 0, (seq_lens[:B].astype(np.int64) - 1) // N, b0 - 1)
    shift = _hit_shifts(hit, q_len, b0, seq_lens[:B].astype(np.int64) // N - 1, read_only_first)
    n_phases = int((b1 - b0 + 1 + shift).max(initial=0))
    phases = []
    for j in range(n_phases):
        act = np.nonzero((q_len > 0) & (j >= shift) & (b0 + j - shift <= b1))[0]
        blk = b0[act] + j - shift[act]
        lo = np.maximum(start[act], blk * N)
        hi = np.minimum(seq_lens[act].astype(np.int64), (blk + 1) * N)
        ro = read_only_first[act] & (j == shift[act])
        toks, poss, reqs, w_tok, w_slot, w_off, w_req = [], [], [], [], [], [], []
        for i, r in enumerate(act):
            t0 = qsl[r] + (lo[i] - start[r])
            n = hi[i] - lo[i]
            tk = np.arange(t0, t0 + n, dtype=np.int64)
            toks.append(tk)
            poss.append(np.arange(lo[i], hi[i], dtype=np.int64))
            reqs.append(np.full(n, i, dtype=np.int64))
            if not ro[i]:
                w_tok.append(tk)
                w_slot.append(np.full(n, req_idx[r], dtype=np.int64))
                w_off.append(np.arange(lo[i], hi[i], dtype=np.int64) - blk[i] * N)
                w_req.append(np.full(n, i, dtype=np.int64))
        full = (hi == (blk + 1) * N) & ~ro
        cat = lambda xs: np.concatenate(xs) if xs else np.empty(0, dtype=np.int64)
        phases.append(Phase(
            tok=cat(toks), q_pos=cat(poss), q_req=cat(reqs), rows=act.astype(np.int64),
            n_sealed=np.where(ro, blk + 1, blk), seq_end=np.where(ro, (blk + 1) * N, hi),
            tail_slot=req_idx[act].astype(np.int64),
            write_tok=cat(w_tok), write_slot=cat(w_slot), write_off=cat(w_off), write_req=cat(w_req),
            seal_row=act[full].astype(np.int64), seal_blk=blk[full], seal_slot=req_idx[act][full].astype(np.int64)))
        for i, r in enumerate(act):
            if ro[i]:
                state.cached_reads += 1
                if hi[i] == (blk[i] + 1) * N:
                    state.set(int(req_idx[r]), req_ids[r], int(blk[i]) + 1, 0)
            elif full[i]:
                state.set(int(req_idx[r]), req_ids[r], int(blk[i]) + 1, 0)
            else:
                state.set(int(req_idx[r]), req_ids[r], int(blk[i]), int(hi[i] - blk[i] * N))
    return span, phases


def read_only_rows(phases: list[Phase], B: int) -> np.ndarray:
    """[B] bool: batch rows with query tokens of which none is written into a tail (a prefix-cache hit whose
    recomputed last token reads its already-sealed block)."""
    has_q, writes = np.zeros(B, dtype=bool), np.zeros(B, dtype=bool)
    for ph in phases:
        has_q[ph.rows[np.unique(ph.q_req)]] = True
        written = np.isin(ph.tok, ph.write_tok)
        writes[ph.rows[np.unique(ph.q_req[written])]] = True
    return has_q & ~writes


def _hit_shifts(hit: np.ndarray, q_len: np.ndarray, b0: np.ndarray, last_full: np.ndarray,
                read_only_first: np.ndarray) -> np.ndarray:
    """Phase offset per request. vLLM puts a block into the prefix cache when it schedules the step that fills it,
    so a request admitted later in the same step can hit a block that another request seals in this very step
    (two identical prompts arriving together). Such a request starts after the last phase that seals any of its
    hit blocks' indices (< its first block); taken in ascending block order, so chained hits wait in turn. No
    physical page ids here (a host copy of the block table would cost a sync): any same-index seal counts.
    Requests continuing their own tail keep offset 0, so ordinary steps gain no phases. A read-only first phase
    (the whole prompt cached, its last token recomputed) reads its own first block sealed: that block counts too."""
    shift = np.zeros(len(hit), dtype=np.int64)
    live = q_len > 0
    for r in sorted(np.nonzero(hit)[0], key=lambda r: b0[r]):
        last = np.minimum(last_full, b0[r] - 1 + int(read_only_first[r]))    # each other request's last sealed hit block
        seals = live & (last >= b0) & (np.arange(len(hit)) != r)
        if seals.any():
            shift[r] = int((shift + last - b0)[seals].max()) + 1
    return shift


def to_device(ph: Phase, device, gqa: int, bm: int) -> dict:
    """Tensors the impl needs for one phase (one small H2D copy per field): one attention launch over all of its
    query tokens, in tiles of bm rows."""
    return dict(_phase_fields(ph, device), **_tokens(ph, np.arange(len(ph.tok)), device, gqa, bm))


def _h2d(a, device, dt=torch.int32):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dt).to(device, non_blocking=True)


def _phase_fields(ph: Phase, device) -> dict:
    """The phase's per-request arrays (what the kernel's tile -> request map indexes), tail writes and seals."""
    t = lambda a, dt=torch.int32: _h2d(a, device, dt)   # noqa: E731
    return dict(
        rows=t(ph.rows, torch.int64), n_sealed=t(ph.n_sealed), seq_end=t(ph.seq_end), tail_slot=t(ph.tail_slot),
        write_tok=t(ph.write_tok, torch.int64), write_slot=t(ph.write_slot, torch.int64),
        write_off=t(ph.write_off, torch.int64), write_req=t(ph.write_req, torch.int64), n_write=len(ph.write_tok),
        seal_row=t(ph.seal_row, torch.int64), seal_blk=t(ph.seal_blk, torch.int64),
        seal_slot=t(ph.seal_slot, torch.int64), n_seal=len(ph.seal_row), n_tok=len(ph.tok))


def _tokens(ph: Phase, sel: np.ndarray, device, gqa: int, bm: int) -> dict:
    """One launch over the phase's query tokens ``sel`` (indices into ph.tok): the tokens and their tiles of bm rows.
    The tiles index the phase's request arrays, so launches over disjoint token sets share them."""
    t = lambda a, dt=torch.int32: _h2d(a, device, dt)   # noqa: E731
    q_pos, q_req = ph.q_pos[sel], ph.q_req[sel]
    pl = gqa_plan(q_pos, q_req, len(ph.rows), gqa, bm)
    # Host sealed-block counts of the requests this launch attends (-1: none of its tokens here): what a
    # decode-then-attend launch (kakeya_kernels.scratch) sizes its scratch from, without a host sync.
    ns_host = np.where(np.isin(np.arange(len(ph.rows)), q_req), ph.n_sealed, -1)
    return dict(tok=t(ph.tok[sel], torch.int64), q_pos=t(q_pos), q_req=t(q_req), n_tok=len(sel),
                plan=dict(dest=t(pl["dest"], torch.int64), qpos=t(pl["qpos"]), tile_req=t(pl["tile_req"]),
                          src=t(pl["src"]), nt=pl["nt"], bm=bm, gqa=gqa, T=pl["T"], n_sealed_host=ns_host,
                          # host varlen metadata for FlashAttention over a scratch (kakeya_kernels.scratch.flash_meta)
                          q_count_host=np.bincount(q_req, minlength=len(ph.rows)), seq_end_host=ph.seq_end))


def span_flash_fn(device, head_dim: int):
    """(vLLM's FlashAttention varlen function, version) for spans of fresh prompts, or None without CUDA or an
    importable vLLM FlashAttention (the attention kernel then reads the span buffer). Resolve once per builder."""
    if torch.device(device).type != "cuda":
        return None
    from kakeya_kernels.scratch import flash_varlen
    try:
        return flash_varlen(head_dim)
    except RuntimeError:
        return None


def _span_flash(sp: Span, device, fn):
    """FlashAttention varlen metadata of a span whose rows have no sealed block (fresh prompts), or None: other spans
    or no FlashAttention (fn None, span_flash_fn)."""
    if fn is None or sp.n_sealed.any():
        return None
    cnt = np.bincount(sp.q_req, minlength=len(sp.rows))
    t = lambda a, dt=torch.int32: _h2d(a, device, dt)   # noqa: E731
    width = int(sp.n_full.max()) + 1
    table = sp.first_page[:, None] + np.minimum(np.arange(width)[None, :], sp.n_full[:, None])   # past a row: its last
    return dict(fn=fn, cu_q=t(np.concatenate([[0], np.cumsum(cnt)])), max_q=int(cnt.max()),
                max_k=int(sp.seq_end.max()), block_table=t(table))


def span_to_device(sp: Span, device, gqa: int, bm: int, flash_fn=None) -> dict:
    """Tensors of the step's Span (one small H2D copy per field) and its one attention launch, tiles of bm rows
    (flash_fn, from span_flash_fn: FlashAttention metadata for a span of fresh prompts, _span_flash)."""
    t = lambda a, dt=torch.int32: _h2d(a, device, dt)   # noqa: E731
    pl = gqa_plan(sp.q_pos, sp.q_req, len(sp.rows), gqa, bm)
    rem = sp.seq_end - (sp.n_sealed + sp.n_full) * N          # tokens of each row's new tail (tails in pages)
    rem_req = np.repeat(np.arange(len(sp.rows)), rem)
    rem_off = np.concatenate([np.arange(n, dtype=np.int64) for n in rem])
    tail_page = sp.first_page + sp.n_full
    # Indices into the packed span buffer (token-major [span_pages * 512, Hkv, D]; row i from token first_page * 512)
    return dict(tok=t(sp.tok, torch.int64), q_pos=t(sp.q_pos), q_req=t(sp.q_req), n_tok=len(sp.tok),
                rows=t(sp.rows, torch.int64), n_sealed=t(sp.n_sealed), seq_end=t(sp.seq_end),
                tail_slot=t(sp.tail_slot, torch.int64), first_page=t(sp.first_page, torch.int64),
                span_slot=t(sp.first_page * N),       # the kernel's tail "slot" of row i: its first token
                w_idx=t(sp.first_page[sp.q_req] * N + sp.q_pos - sp.n_sealed[sp.q_req] * N, torch.int64),
                seal_page=t(sp.first_page[sp.seal_req] + sp.seal_local, torch.int64), seal_req=t(sp.seal_req, torch.int64),
                seal_blk=t(sp.seal_blk, torch.int64), n_seal=len(sp.seal_req), n_full=t(sp.n_full, torch.int64),
                tail_page=t(tail_page, torch.int64), span_pages=sp.span_pages,
                rem_req=t(rem_req, torch.int64), rem_off=t(rem_off, torch.int64),
                rem_idx=t(tail_page[rem_req] * N + rem_off, torch.int64),
                flash=_span_flash(sp, device, flash_fn),
                plan=dict(dest=t(pl["dest"], torch.int64), qpos=t(pl["qpos"]), tile_req=t(pl["tile_req"]),
                          src=t(pl["src"]), nt=pl["nt"], bm=bm, gqa=gqa, T=pl["T"]))


class DecodeBuffers:
    """Pure-decode steps (one new token per request) planned on the GPU into persistent buffers:
    no host planning or copies per step, fixed addresses per batch size (what a captured CUDA graph
    replays). Token r of the batch is request r's new token. Padding rows of a captured batch size
    (seq_len 0) write into ``scratch_slot``, never seal, and their query rows are masked."""

    def __init__(self, max_reqs: int, gqa: int, bm: int, device, scratch_slot: int | None = None):
        self.n, self.gqa, self.bm = max_reqs, gqa, bm
        self.scratch = max_reqs if scratch_slot is None else scratch_slot
        self.tpr = -(-gqa // bm)                                  # tiles per request
        z = lambda dt: torch.zeros(max_reqs, dtype=dt, device=device)
        self.q_pos, self.n_sealed, self.seq_end = z(torch.int32), z(torch.int32), z(torch.int32)
        self.tail_slot, self.seal_flag, self.seal_page = z(torch.int32), z(torch.int32), z(torch.int32)
        self.slot64, self.off64 = z(torch.int64), z(torch.int64)
        self.req = torch.arange(max_reqs, dtype=torch.int32, device=device)
        g = torch.arange(gqa, device=device)
        r = torch.arange(max_reqs, device=device)
        self.dest = ((r[:, None] * self.tpr + g[None, :] // bm) * bm + g[None, :] % bm).reshape(-1)
        self.tile_req = torch.arange(max_reqs, dtype=torch.int32, device=device).repeat_interleave(self.tpr)
        self.qpos = torch.full((max_reqs * self.tpr * bm,), -1, dtype=torch.int32, device=device)
        # Tile row -> query row (token * gqa + head-in-group; -1 = padding) for the fused launch, which gathers its
        # query rows itself. Fixed for a batch size (token r = request r), so built once here, not per step.
        self.src = torch.full_like(self.qpos, -1)
        self.src[self.dest] = torch.arange(max_reqs * gqa, dtype=torch.int32, device=device)

    def fill(self, B: int, seq_lens: torch.Tensor, block_table: torch.Tensor, req_rows: torch.Tensor,
             read_only: np.ndarray | None = None) -> dict:
        """``read_only`` (host, [B] bool, from read_only_rows of the step's CPU plan): rows whose token is the last
        one of a full block that came from the prefix cache (vLLM recomputes it). Such a row writes nothing and
        seals nothing; it reads the block sealed, or, when another row of this very step seals that same page
        (two identical prompts arriving together), exactly from that row's tail, which holds all 512 tokens once
        this step's token is written (forward_decode writes before it attends)."""
        if B > self.n:
            raise ValueError(f"decode batch of {B} requests exceeds max_num_seqs={self.n}")
        valid = seq_lens[:B] > 0
        pos = (seq_lens[:B].long() - 1).clamp_min(0)
        ns = pos // N
        n_real = min(B, int(req_rows.shape[0]))
        rows = torch.full((B,), self.scratch, dtype=torch.int64, device=seq_lens.device)
        rows[:n_real] = req_rows[:n_real].long()
        rows = torch.where(valid, rows, torch.full_like(rows, self.scratch))
        page = block_table[:B].gather(1, ns[:, None]).squeeze(1)
        seal = ((pos % N) == N - 1) & valid
        n_sealed, tail_rows, write_rows = ns, rows, rows
        if read_only is not None and bool(np.any(read_only[:B])):
            ro = torch.from_numpy(np.ascontiguousarray(read_only[:B], dtype=bool)).to(seq_lens.device)
            seal = seal & ~ro
            same = (page[None, :] == page[:, None]) & seal[None, :] & ro[:, None]     # [reader, sealer]
            from_tail = same.any(1)
            scratch = torch.full_like(rows, self.scratch)
            n_sealed = torch.where(ro & ~from_tail, ns + 1, ns)
            tail_rows = torch.where(from_tail, rows[same.int().argmax(1)], torch.where(ro, scratch, rows))
            write_rows = torch.where(ro, scratch, rows)
        self.q_pos[:B].copy_(pos)
        self.n_sealed[:B].copy_(n_sealed)
        self.seq_end[:B].copy_(seq_lens[:B])
        self.tail_slot[:B].copy_(tail_rows)
        self.slot64[:B].copy_(write_rows)
        self.off64[:B].copy_(pos % N)
        self.seal_flag[:B].copy_(seal)
        self.seal_page[:B].copy_(page)
        rows_per_req = self.tpr * self.bm
        self.qpos[:B * rows_per_req].fill_(-1)
        qp = torch.where(valid, pos, torch.full_like(pos, -1)).to(torch.int32)
        self.qpos.index_copy_(0, self.dest[:B * self.gqa], qp.repeat_interleave(self.gqa))
        return dict(B=B, q_pos=self.q_pos[:B], q_req=self.req[:B], n_sealed=self.n_sealed[:B],
                    seq_end=self.seq_end[:B], tail_slot=self.tail_slot[:B], slot64=self.slot64[:B],
                    off64=self.off64[:B], seal_flag=self.seal_flag[:B], seal_page=self.seal_page[:B],
                    scratch_slot=self.scratch,
                    plan=dict(dest=self.dest[:B * self.gqa], qpos=self.qpos[:B * rows_per_req],
                              tile_req=self.tile_req[:B * self.tpr], src=self.src[:B * rows_per_req], nt=B * self.tpr,
                              bm=self.bm, gqa=self.gqa, T=B))


# Process-wide diagnostics (read by the GPU tests of an in-process engine, whose builders they cannot reach).
STATS = {"scratch_fallbacks": 0}


class Launches:
    """The attention launches of a metadata builder's host-planned steps (kakeya_kernels.variants): ``decode`` for
    requests with one query token (KAKEYA_DECODE_VARIANT), ``base`` for requests with several (prefill chunks;
    KAKEYA_PREFILL_VARIANT: tuned, baseline or candidate:NAME). ``phase`` gives each kind present in a phase its own
    launch; ``attach`` adds a launch's kernel knobs and split count, which depend on host-known sizes only (tiles,
    block-table width)."""

    def __init__(self, name: str, head_dim: int, num_kv_heads: int, device, prefill: str = "tuned",
                 scratch_mib: int | None = None, int8_k: bool = False):
        from kakeya_kernels.variants import decode_variant, prefill_variant
        self.decode, self.base = decode_variant(name, head_dim, int8_k), prefill_variant(prefill, head_dim)
        # "baseline" is the fallback to the previous path: one base launch per phase, decode rows included.
        self.split = prefill != "baseline" and self.decode != self.base
        self.hkv, self.head_dim = num_kv_heads, head_dim
        self._span_fa = False     # span_flash_fn, resolved at the first span (chunk mode only)
        # A decode-then-attend prefill launch (kakeya_kernels.scratch) needs one bf16 page per attended sealed block
        # + one per request; a phase needing more than the KAKEYA_SCRATCH_MIB cap holds runs the tuned prefill launch
        # instead (same result up to bf16 rounding), so the cap bounds memory and never fails a request.
        self.scratch_cap = self.fallback = None
        if self.base.get("scratch"):
            from kakeya_kernels.scratch import ScratchPages, flash_varlen
            from kakeya_kv.config import KakeyaConfig
            if self.base["scratch"] == "flash":
                flash_varlen(head_dim)    # refuse at engine start, not at the first prefill
            scratch_mib = KakeyaConfig.scratch_mib if scratch_mib is None else scratch_mib
            self.scratch_cap = ScratchPages(head_dim, scratch_mib).capacity_pages(num_kv_heads)
            self.fallback = prefill_variant("tuned", head_dim)
        self.fallbacks = 0   # phases that took the fallback (diagnostics; tests read it)
        dev = torch.device(device)
        self.sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4

    def attach(self, ph: dict, v: dict, max_blocks: int) -> dict:
        from kakeya_kernels.variants import kernel_args, num_splits
        ph["launch"] = dict(kernel_args(v), splits=num_splits(v, ph["plan"]["nt"], self.hkv, max_blocks, self.sms))
        return ph

    def _base_for(self, ph: Phase, sel: np.ndarray | None = None) -> dict:
        """The base launch for the phase's query tokens ``sel`` (None: all): the scratch launch unless its pages
        (sealed blocks + 1 of each request those tokens attend) exceed the cap."""
        if self.scratch_cap is None:
            return self.base
        reqs = np.unique(ph.q_req if sel is None else ph.q_req[sel])
        if int((ph.n_sealed[reqs] + 1).sum()) <= self.scratch_cap:
            return self.base
        self.fallbacks += 1
        STATS["scratch_fallbacks"] += 1
        return self.fallback

    def span(self, sp: Span, device, gqa: int, max_blocks: int) -> dict:
        """The step's Span (KAKEYA_PREFILL_ATTEND=chunk) with the prefill launch (tuned or baseline: the config
        refuses the scratch candidates, whose launches read tails of at most 512 tokens)."""
        if self.base.get("scratch"):
            raise ValueError("KAKEYA_PREFILL_ATTEND=chunk needs the tuned or baseline prefill launch, not a scratch one")
        if self._span_fa is False:
            self._span_fa = span_flash_fn(device, self.head_dim)
        return self.attach(span_to_device(sp, device, gqa, self.base["bm"], self._span_fa), self.base, max_blocks)

    def phase(self, ph: Phase, device, gqa: int, max_blocks: int, decode_step: bool = False) -> dict:
        """One phase of a host-planned step (decode_step: every request has one new token). In a mixed step the
        requests with one query token in the phase (decode rows) get the decode launch over their own tiles and the
        others (prefill chunks) the base launch: a 1-token row in a prefill tile (bm up to 128 rows) would waste most
        of it. Such a phase carries ``attn`` = [decode launch, base launch], each {tok, q_pos, q_req, n_tok, plan,
        launch} over disjoint tokens; a phase of one kind keeps one launch (plan / launch at the phase level)."""
        if decode_step or not len(ph.tok):
            v = self.decode if decode_step else self.base
            return self.attach(to_device(ph, device, gqa, v["bm"]), v, max_blocks)
        v = None
        if self.split:
            one = (np.bincount(ph.q_req, minlength=len(ph.rows)) == 1)[ph.q_req]
            if one.all():
                v = self.decode
            elif one.any():
                d = _phase_fields(ph, device)
                d["attn"] = [self.attach(_tokens(ph, sel, device, gqa, w["bm"]), w, max_blocks)
                             for w, sel in ((self.decode, np.nonzero(one)[0]),
                                            (self._base_for(ph, np.nonzero(~one)[0]), np.nonzero(~one)[0]))]
                return d
        v = v or self._base_for(ph)
        return self.attach(to_device(ph, device, gqa, v["bm"]), v, max_blocks)
