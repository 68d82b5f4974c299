"""The vLLM backend's data path end to end on CPU (Triton interpreter): planner -> tail writes ->
attention -> seals into pages, over several steps of chunked prefill and decode with two requests,
against a float64 reference in which a query at position p reads blocks before p // 512 as the CPU
reference codec decodes the bytes sealed into their pages, and its own block exact. (Seal bytes vs
the reference encoder are covered by test_kernels; here a wrong page, slot, offset, phase or seal
order would show as an O(1) error.)"""
import math

import numpy as np
import torch

from kakeya_kv.codecs.kakeya import KakeyaCodec
from kakeya_kv.format import BLOCK_TOKENS as N
from kakeya_kv.format import exact_layout
from kakeya_v1_3_ppl.plan import TailState, plan_step, plan_step_chunked, span_to_device, to_device
from kakeya_v1_3_ppl.runtime import forward_compressed, forward_exact

D, HKV, GQA = 64, 1, 2
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (request, new tokens) per step: chunks crossing 512-boundaries, a second request joining, decodes.
STEPS = [[(0, 300)], [(0, 300), (1, 100)], [(0, 480), (1, 430)], [(0, 1), (1, 1)], [(0, 1), (1, 1)], [(0, 3)]]


def _ref(q, pos, K, V, decoded, nb=None):
    """float64 attention of q [Hq, D] at pos over K/V [HKV, L, D]; blocks before nb (default pos // N: the query's
    own block) from ``decoded``."""
    nb = pos // N if nb is None else nb
    k, v = K[:, :pos + 1].double().clone(), V[:, :pos + 1].double().clone()
    if nb and decoded is not None:
        k[:, :nb * N], v[:, :nb * N] = decoded[0][:, :nb * N].double(), decoded[1][:, :nb * N].double()
    k, v = k.repeat_interleave(GQA, 0), v.repeat_interleave(GQA, 0)
    s = torch.einsum("hd,hld->hl", q.double(), k) / math.sqrt(D)
    return torch.einsum("hl,hld->hd", torch.softmax(s, -1), v)


def _run(exact: bool, bits=(4, 3), steps=STEPS, chunk: bool = False, with_cache: bool = False):
    """chunk: KAKEYA_PREFILL_ATTEND=chunk (plan_step_chunked + forward_span): a query reads compressed only the
    blocks sealed before its step."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    g = torch.Generator().manual_seed(0)
    total = [sum(n for s in steps for r, n in s if r == i) for i in range(2)]
    K = [(torch.randn(HKV, L, D, generator=g) + torch.randn(D, generator=g) * 3).bfloat16() for L in total]
    V = [torch.randn(HKV, L, D, generator=g).bfloat16() for L in total]
    kk = KakeyaKernels(D, *bits, DEV)
    codec = KakeyaCodec(*bits)   # decodes the kernel's sealed pages for the reference
    pages = 8
    bt = torch.randperm(pages, generator=g).view(2, 4).to(torch.int32).to(DEV)
    if exact:
        cache = torch.zeros(pages, HKV, 2, N, D, dtype=torch.bfloat16, device=DEV)
    else:
        cache = torch.zeros(pages, HKV, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
    tail_k = torch.zeros(4, HKV, N, D, dtype=torch.bfloat16, device=DEV)
    tail_v = torch.zeros_like(tail_k)
    state, done, seen = TailState(), [0, 0], []
    for step in steps:
        rows = [r for r, _ in step]
        qlen = [n for _, n in step]
        qsl = np.concatenate([[0], np.cumsum(qlen)])
        seq = np.array([done[r] + n for r, n in step])
        q = torch.randn(int(qsl[-1]), HKV * GQA, D, generator=g).bfloat16()
        k = torch.cat([K[r][:, done[r]:done[r] + n].transpose(0, 1) for r, n in step])
        v = torch.cat([V[r][:, done[r]:done[r] + n].transpose(0, 1) for r, n in step])
        out = torch.zeros(q.shape, dtype=torch.bfloat16, device=DEV)
        btab = bt[torch.tensor(rows, device=DEV)]
        req_slot = np.array([r + 2 for r in rows])            # persistent rows need not equal batch rows
        if exact:
            (ph,) = plan_step(qsl, seq, req_slot, [f"r{r}" for r in rows], None)
            pos = np.concatenate([np.arange(done[r], done[r] + n) for r, n in step])
            sm = torch.tensor([int(btab[i, p // N]) * N + p % N for i, (r, n) in enumerate(step)
                               for p in range(done[r], done[r] + n)], device=DEV)
            assert (ph.q_pos == pos).all()
            forward_exact(kk, q.to(DEV), k.to(DEV), v.to(DEV), cache, to_device(ph, DEV, GQA, 16), btab,
                          torch.tensor(seq, device=DEV), sm, len(sm), D ** -0.5, out, precise=True)
        else:
            ids = [f"r{r}" for r in rows]
            span, plan = (plan_step_chunked(qsl, seq, req_slot, ids, state) if chunk
                          else (None, plan_step(qsl, seq, req_slot, ids, state)))
            phases = [to_device(ph, DEV, GQA, 16) for ph in plan]
            forward_compressed(kk, q.to(DEV), k.to(DEV), v.to(DEV), cache, tail_k, tail_v, phases, btab,
                               D ** -0.5, out, precise=True,
                               span=None if span is None else span_to_device(span, DEV, GQA, 16))
        t = 0
        for r, n in step:
            for p in range(done[r], done[r] + n):
                seen.append((q[t], out[t].double().cpu(), r, p, done[r] // N if chunk else p // N))
                t += 1
            done[r] += n
    decoded = None
    if not exact:   # what the pages hold now is what every later query read (sealed blocks never change)
        decoded = [codec.decode(cache[bt[r, :done[r] // N].long()].cpu().transpose(0, 1), D) if done[r] >= N
                   else None for r in range(2)]
    worst = 0.0
    for qt, ot, r, p, nb in seen:
        ref = _ref(qt, p, K[r], V[r], None if exact else decoded[r], nb)
        worst = max(worst, ((ot - ref).norm() / ref.norm()).item())
    return (worst, cache.cpu()) if with_cache else worst


def test_compressed_data_path_matches_reference_over_steps():
    assert _run(exact=False) < 8e-3   # bf16 output rounding (precise mode; sealed bytes may differ in 1e-3)


# Chunks sealing several blocks at once, a mixed step (decode row + prefill row), a chunk ending on a block boundary.
CHUNK_STEPS = [[(0, 300)], [(0, 300), (1, 1030)], [(0, 480), (1, 1)], [(0, 1), (1, 600)], [(0, 3), (1, 1)]]


def test_chunk_exact_prefill_matches_its_reference_and_seals_the_same_pages():
    """KAKEYA_PREFILL_ATTEND=chunk: each query reads exact everything after the blocks sealed before its step (so
    not what block phases give: their reference differs by the compression error), and the pages it seals hold the
    same bytes as the block phases' (same tokens, same blocks)."""
    worst, cache = _run(exact=False, steps=CHUNK_STEPS, chunk=True, with_cache=True)
    assert worst < 8e-3
    worst_b, cache_b = _run(exact=False, steps=CHUNK_STEPS, with_cache=True)
    assert worst_b < 8e-3
    assert torch.equal(cache, cache_b)


def test_chunked_plan_keeps_decode_rows_and_prefix_resumes_in_phases():
    state = TailState()
    # a: 1300-token prompt (span: seals blocks 0-1, tail = block 2 with 276); b: 1 decode token after 10 (phase)
    state.set(1, "b", 0, 10)
    span, phases = plan_step_chunked(np.array([0, 1300, 1301]), np.array([1300, 11]), np.array([0, 1]), ["a", "b"],
                                     state)
    assert list(span.rows) == [0] and list(span.n_full) == [2] and list(span.seal_blk) == [0, 1]
    assert span.span_pages == 3 and list(span.first_page) == [0] and len(span.tok) == 1300
    assert len(phases) == 1 and list(phases[0].rows) == [1] and list(phases[0].tok) == [1300]
    assert state.holds(0, "a", 2, 1300 - 2 * N) and state.holds(1, "b", 0, 11)
    # a prefix-cache resume (c's first 1024 tokens cached: its tail holds nothing) is not a span row
    span, phases = plan_step_chunked(np.array([0, 300]), np.array([1324]), np.array([2]), ["c"], state)
    assert span is None and [list(p.rows) for p in phases] == [[0]]


def test_exact_pages_data_path_matches_reference_over_steps():
    assert exact_layout(D).slot_bytes == 2 * N * D * 2
    assert _run(exact=True) < 8e-3


def test_gpu_planned_decode_path_equals_the_general_path():
    """DecodeBuffers + forward_decode (fixed launches, no host planning: the CUDA-graph path) give the
    same outputs and the same sealed pages as the CPU-planned phases, across a block seal."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl.plan import DecodeBuffers
    from kakeya_v1_3_ppl.runtime import forward_decode
    g = torch.Generator().manual_seed(4)
    kk = KakeyaKernels(D, 4, 3, DEV)
    L0 = [509, 300]
    steps = 5
    K = [(torch.randn(L + steps, HKV, D, generator=g) + torch.randn(D, generator=g) * 3).bfloat16() for L in L0]
    V = [torch.randn(L + steps, HKV, D, generator=g).bfloat16() for L in L0]
    bt = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=DEV)
    rows_slot = np.array([5, 1])                       # persistent request rows (tail slots)
    cache = torch.zeros(4, HKV, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
    tail_k = torch.zeros(6, HKV, N, D, dtype=torch.bfloat16, device=DEV)
    tail_v = torch.zeros_like(tail_k)
    state = TailState()
    ids = ["a", "b"]
    qsl = np.array([0, L0[0], L0[0] + L0[1]])
    q = torch.randn(sum(L0), HKV * GQA, D, generator=g).bfloat16().to(DEV)
    out = torch.zeros_like(q)
    phases = [to_device(p, DEV, GQA, 16) for p in plan_step(qsl, np.array(L0), rows_slot, ids, state)]
    forward_compressed(kk, q, torch.cat([K[0][:L0[0]], K[1][:L0[1]]]).to(DEV),
                       torch.cat([V[0][:L0[0]], V[1][:L0[1]]]).to(DEV), cache, tail_k, tail_v, phases, bt,
                       D ** -0.5, out, precise=True)
    a = (cache.clone(), tail_k.clone(), tail_v.clone())
    b = (cache.clone(), tail_k.clone(), tail_v.clone())
    buf = DecodeBuffers(8, GQA, 16, DEV)
    for s in range(steps):
        seq = np.array([L0[0] + s + 1, L0[1] + s + 1])
        qd = torch.randn(2, HKV * GQA, D, generator=g).bfloat16().to(DEV)
        kd = torch.stack([K[0][L0[0] + s], K[1][L0[1] + s]]).to(DEV)
        vd = torch.stack([V[0][L0[0] + s], V[1][L0[1] + s]]).to(DEV)
        oa, ob = torch.zeros_like(qd), torch.zeros_like(qd)
        ph = [to_device(p, DEV, GQA, 16) for p in plan_step(np.array([0, 1, 2]), seq, rows_slot, ids, state)]
        forward_compressed(kk, qd, kd, vd, a[0], a[1], a[2], ph, bt, D ** -0.5, oa, precise=True)
        d = buf.fill(2, torch.tensor(seq, dtype=torch.int32, device=DEV), bt, torch.tensor(rows_slot, device=DEV))
        forward_decode(kk, qd, kd, vd, b[0], b[1], b[2], d, bt, D ** -0.5, ob, precise=True)
        assert torch.equal(oa, ob), f"step {s}"
    assert torch.equal(a[0], b[0]) and a[0][3].any()    # block 0 of request a was sealed into page 3


def test_gpu_planned_decode_on_exact_pages_equals_the_general_path():
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl.plan import DecodeBuffers
    g = torch.Generator().manual_seed(5)
    kk = KakeyaKernels(D, 4, 3, DEV)
    bt = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=DEV)
    cache = torch.randn(4, HKV, 2, N, D, generator=g).bfloat16().to(DEV)   # stale bytes past seq_len
    lens = [511, 40]
    buf = DecodeBuffers(4, GQA, 16, DEV)
    for s in range(3):
        seq = np.array([lens[0] + s, lens[1] + s])
        q = torch.randn(2, HKV * GQA, D, generator=g).bfloat16().to(DEV)
        k = torch.randn(2, HKV, D, generator=g).bfloat16().to(DEV)
        v = torch.randn(2, HKV, D, generator=g).bfloat16().to(DEV)
        sm = torch.tensor([int(bt[r, (L - 1) // N]) * N + (L - 1) % N for r, L in enumerate(seq)], device=DEV)
        (ph,) = plan_step(np.array([0, 1, 2]), seq, np.array([0, 1]), ["a", "b"], None)
        oa, ob = torch.zeros_like(q), torch.zeros_like(q)
        sl = torch.tensor(seq, dtype=torch.int32, device=DEV)
        ca = cache.clone()
        forward_exact(kk, q, k, v, ca, to_device(ph, DEV, GQA, 16), bt, sl, sm, 2, D ** -0.5, oa, precise=True)
        d = buf.fill(2, sl, bt, torch.tensor([0, 1], device=DEV))
        forward_exact(kk, q, k, v, cache, d, bt, sl, sm, 2, D ** -0.5, ob, precise=True)
        assert torch.equal(oa, ob) and torch.equal(ca, cache)


def test_gpu_planned_decode_prefix_hit_on_a_block_sealed_now_or_before():
    """A new request whose whole prompt is prefix-cached arrives in a pure-decode step (vLLM recomputes its last
    token: one query at offset 511 of a full block). The GPU-planned path (KAKEYA_CUDA_GRAPHS) must neither write
    nor seal for it, and must read that block: sealed when it was sealed before (then it equals the CPU-planned
    phases exactly), or, when another request seals that very page in this step (identical prompts arriving
    together), exactly from that request's tail (then its output equals the sealer's own for the same query)."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl.plan import DecodeBuffers, read_only_rows
    from kakeya_v1_3_ppl.runtime import forward_decode
    g = torch.Generator().manual_seed(6)
    kk = KakeyaKernels(D, 4, 3, DEV)
    L = N + 2
    K = (torch.randn(L, HKV, D, generator=g) + torch.randn(D, generator=g) * 3).bfloat16()
    V = torch.randn(L, HKV, D, generator=g).bfloat16()
    cache = torch.zeros(6, HKV, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV)
    tail_k = torch.zeros(9, HKV, N, D,   # 8 request rows + DecodeBuffers' scratch row
                         dtype=torch.bfloat16, device=DEV)
    tail_v = torch.zeros_like(tail_k)
    state = TailState()
    q0 = torch.randn(N - 1, HKV * GQA, D, generator=g).bfloat16().to(DEV)      # request a: 511-token prefill
    (ph,) = plan_step(np.array([0, N - 1]), np.array([N - 1]), np.array([5]), ["a"], state)
    forward_compressed(kk, q0, K[:N - 1].to(DEV), V[:N - 1].to(DEV), cache, tail_k, tail_v,
                       [to_device(ph, DEV, GQA, 16)], torch.tensor([[3, 1]], dtype=torch.int32, device=DEV),
                       D ** -0.5, torch.zeros_like(q0), precise=True)
    buf = DecodeBuffers(8, GQA, 16, DEV)

    def step(rows, ids, seq, bt, toks, qd):
        """One pure-decode step both ways from the same starting bytes; returns (host out, gpu out, host, gpu)."""
        bt = torch.tensor(bt, dtype=torch.int32, device=DEV)
        kd, vd = K[toks].to(DEV), V[toks].to(DEV)
        phases = plan_step(np.arange(len(rows) + 1), np.array(seq), np.array(rows), ids, state)
        host, gpu = (cache.clone(), tail_k.clone(), tail_v.clone()), (cache.clone(), tail_k.clone(), tail_v.clone())
        oa, ob = torch.zeros_like(qd), torch.zeros_like(qd)
        forward_compressed(kk, qd, kd, vd, *host, [to_device(p, DEV, GQA, 16) for p in phases], bt, D ** -0.5, oa,
                           precise=True)
        d = buf.fill(len(rows), torch.tensor(seq, dtype=torch.int32, device=DEV), bt,
                     torch.tensor(rows, device=DEV), read_only_rows(phases, len(rows)))
        forward_decode(kk, qd, kd, vd, *gpu, d, bt, D ** -0.5, ob, precise=True)
        return oa, ob, host, gpu

    # Step 1: a decodes token 511 and seals block 0 into page 3; c (same prompt, page 3 from the prefix cache)
    # recomputes token 511 in the same step with the same query.
    qd = torch.randn(1, HKV * GQA, D, generator=g).bfloat16().to(DEV).expand(2, -1, -1).contiguous()
    oa, ob, host, gpu = step([5, 1], ["a", "c"], [N, N], [[3, 1], [3, 2]], [N - 1, N - 1], qd)
    assert torch.equal(oa[0], ob[0]) and torch.equal(host[0], gpu[0]) and host[0][3].any()
    assert torch.equal(ob[1], ob[0])                       # c read block 0 exactly, from a's tail
    assert torch.equal(gpu[1][1], tail_k[1])               # c wrote nothing into its own slot
    assert (oa[1].float() - ob[1].float()).abs().max() < 0.25 * ob[1].float().abs().max()  # host: sealed block
    cache.copy_(host[0]); tail_k.copy_(host[1]); tail_v.copy_(host[2])
    # Step 2: a decodes on into block 1; d (same prompt again) hits page 3, sealed a step ago.
    qd = torch.randn(2, HKV * GQA, D, generator=g).bfloat16().to(DEV)
    oa, ob, host, gpu = step([5, 2], ["a", "d"], [N + 1, N], [[3, 1], [3, 4]], [N, N - 1], qd)
    assert torch.equal(oa, ob) and torch.equal(host[0], gpu[0])
    assert torch.equal(host[1][5], gpu[1][5]) and torch.equal(gpu[1][2], tail_k[2])


def _pool_vs_pages(seed: int, steps, width: int, pages: int, chunk: bool = False):
    """The same steps run twice from random inputs: tails in per-slot rows (the pool) and each request's tail in its
    own pages after its sealed ones (the pages start as random bytes: stale sealed data, NaN / inf bit patterns
    included, so a read past a tail's filled rows would show); chunk: KAKEYA_PREFILL_ATTEND=chunk planning. Asserts
    equal outputs at every step and equal sealed pages at the end; returns the tokens each request holds."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl.tailpages import TailGeometry
    g = torch.Generator().manual_seed(seed)
    kk = KakeyaKernels(D, 4, 3, DEV)
    geom = TailGeometry.of(kk.lay)
    assert geom.pages == 5
    bt = torch.randperm(pages, generator=g).view(2, width).to(torch.int32).to(DEV)
    noise = torch.randint(0, 256, (pages, HKV, kk.lay.slot_bytes), generator=g, dtype=torch.int32).to(torch.uint8)
    caches = {"pool": torch.zeros(pages, HKV, kk.lay.slot_bytes, dtype=torch.uint8, device=DEV), "pages": noise.to(DEV)}
    tails = {m: (torch.zeros(4, HKV, N, D, dtype=torch.bfloat16, device=DEV),
                 torch.zeros(4, HKV, N, D, dtype=torch.bfloat16, device=DEV)) for m in caches}
    states, done = {m: TailState() for m in caches}, [0, 0]
    for step in steps:
        rows = [r for r, _ in step]
        qsl = np.concatenate([[0], np.cumsum([n for _, n in step])])
        seq = np.array([done[r] + n for r, n in step])
        q = torch.randn(int(qsl[-1]), HKV * GQA, D, generator=g).bfloat16().to(DEV)
        k = (torch.randn(int(qsl[-1]), HKV, D, generator=g) + 2).bfloat16().to(DEV)
        v = torch.randn(int(qsl[-1]), HKV, D, generator=g).bfloat16().to(DEV)
        btab = bt[torch.tensor(rows, device=DEV)]
        outs = {}
        for m, cache in caches.items():
            args = (qsl, seq, np.array([r + 1 for r in rows]), [f"r{r}" for r in rows], states[m])
            span, plan = plan_step_chunked(*args) if chunk else (None, plan_step(*args))
            outs[m] = torch.zeros(q.shape, dtype=torch.bfloat16, device=DEV)
            forward_compressed(kk, q, k, v, cache, *tails[m], [to_device(ph, DEV, GQA, 16) for ph in plan], btab,
                               D ** -0.5, outs[m], precise=True, tail_pages=geom if m == "pages" else None,
                               span=None if span is None else span_to_device(span, DEV, GQA, 16))
        assert torch.equal(outs["pool"], outs["pages"]) and not outs["pages"].isnan().any(), step
        for r, n in step:
            done[r] += n
    for r in range(2):
        sealed = bt[r, :done[r] // N].long()
        assert torch.equal(caches["pool"][sealed], caches["pages"][sealed])
    return done


def test_tails_kept_in_pages_give_the_pool_path_bit_for_bit():
    """tailpages: the same steps as above, once with tails in per-slot rows (the served pool) and once with each
    request's tail in its own pages after its sealed ones (positions n_sealed .. n_sealed + 4, a scratch shared by the
    layers): equal outputs and equal sealed pages, the pages starting as random bytes."""
    done = _pool_vs_pages(3, STEPS, width=8, pages=16)
    assert [d // N for d in done] == [2, 1]


def test_gpu_planned_decode_with_tails_in_pages_equals_the_general_path():
    """forward_decode with tails in pages (fixed shapes, the graph path) gives the same outputs and pages as the
    host-planned phases with tails in pages, and the same outputs as the served pool, across a block seal, with a
    padding row in the batch (it must write nothing into the pages)."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    from kakeya_v1_3_ppl.plan import DecodeBuffers
    from kakeya_v1_3_ppl.runtime import forward_decode
    from kakeya_v1_3_ppl.tailpages import TailGeometry
    g = torch.Generator().manual_seed(4)
    kk = KakeyaKernels(D, 4, 3, DEV)
    geom = TailGeometry.of(kk.lay)
    L0, steps, width, npages = [509, 300], 5, 7, 16
    K = [(torch.randn(L + steps, HKV, D, generator=g) + torch.randn(D, generator=g) * 3).bfloat16() for L in L0]
    V = [torch.randn(L + steps, HKV, D, generator=g).bfloat16() for L in L0]
    bt = torch.randperm(npages - 1, generator=g)[:2 * width].add(1).view(2, width).to(torch.int32).to(DEV)
    bt3 = torch.cat([bt, torch.zeros(1, width, dtype=torch.int32, device=DEV)])   # row 2: padding (page 0)
    rows_slot = np.array([5, 1])
    noise = torch.randint(0, 256, (npages, HKV, kk.lay.slot_bytes), generator=g, dtype=torch.int32).to(torch.uint8)
    mk = lambda: torch.zeros(7, HKV, N, D, dtype=torch.bfloat16, device=DEV)   # noqa: E731
    pool = [torch.zeros_like(noise).to(DEV), mk(), mk()]
    gen = [noise.clone().to(DEV), mk(), mk()]
    dec = [noise.clone().to(DEV), mk(), mk()]
    states = [TailState(), TailState()]
    ids = ["a", "b"]
    qsl = np.array([0, L0[0], L0[0] + L0[1]])
    q = torch.randn(sum(L0), HKV * GQA, D, generator=g).bfloat16().to(DEV)
    k0, v0 = torch.cat([K[0][:L0[0]], K[1][:L0[1]]]).to(DEV), torch.cat([V[0][:L0[0]], V[1][:L0[1]]]).to(DEV)
    for st, (c, tk, tv), tp in ((states[0], pool, None), (states[1], gen, geom)):
        phases = [to_device(p, DEV, GQA, 16) for p in plan_step(qsl, np.array(L0), rows_slot, ids, st)]
        forward_compressed(kk, q, k0, v0, c, tk, tv, phases, bt, D ** -0.5, torch.zeros_like(q), precise=True,
                           tail_pages=tp)
    dec[0].copy_(gen[0])
    buf = DecodeBuffers(8, GQA, 16, DEV, scratch_slot=6)
    for s in range(steps):
        seq = np.array([L0[0] + s + 1, L0[1] + s + 1])
        qd = torch.randn(3, HKV * GQA, D, generator=g).bfloat16().to(DEV)
        kd = torch.stack([K[0][L0[0] + s], K[1][L0[1] + s], K[0][0]]).to(DEV)
        vd = torch.stack([V[0][L0[0] + s], V[1][L0[1] + s], V[0][0]]).to(DEV)
        outs = []
        for st, (c, tk, tv), tp in ((states[0], pool, None), (states[1], gen, geom)):
            ph = [to_device(p, DEV, GQA, 16) for p in plan_step(np.array([0, 1, 2]), seq, rows_slot, ids, st)]
            outs.append(torch.zeros(2, HKV * GQA, D, dtype=torch.bfloat16, device=DEV))
            forward_compressed(kk, qd[:2], kd[:2], vd[:2], c, tk, tv, ph, bt, D ** -0.5, outs[-1], precise=True,
                               tail_pages=tp)
        before0 = dec[0][0].clone()
        d = buf.fill(3, torch.tensor([*seq, 0], dtype=torch.int32, device=DEV), bt3, torch.tensor(rows_slot, device=DEV))
        od = torch.zeros_like(qd)
        forward_decode(kk, qd, kd, vd, dec[0], dec[1], dec[2], d, bt3, D ** -0.5, od, precise=True, tail_pages=geom)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], od[:2]), f"step {s}"
        assert torch.equal(dec[0][0], before0)                      # the padding row wrote nothing (page 0)
    assert torch.equal(gen[0], dec[0])
    sealed = bt[0, :1].long()                                       # request a sealed block 0 during the steps
    assert torch.equal(pool[0][sealed], dec[0][sealed]) and dec[0][sealed].any()


def test_chunk_exact_prefill_with_tails_in_pages_gives_the_pool_path_bit_for_bit():
    """KAKEYA_PREFILL_ATTEND=chunk with each request's tail in its own pages (gathered into the span before the seals
    overwrite the first of them, the new tail's tokens written back after): the same outputs and sealed pages as with
    the pool (two seals in one span, a mixed step, a decode step after). The pages start as random bytes."""
    done = _pool_vs_pages(5, [[(0, 300)], [(0, 300), (1, 1030)], [(0, 1), (1, 1)]], width=10, pages=20, chunk=True)
    assert [d // N for d in done] == [1, 2]
