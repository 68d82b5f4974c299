"""The backend's per-layer data path, without vLLM (tested end-to-end on CPU in the Triton interpreter).

``forward_compressed``: for each phase of the step plan — write the phase's tokens into the request's
exact tail, attend (sealed pages read compressed + tail exact, causal), seal blocks that became full
straight into their pages (a phase's optional ``launch`` dict = the variant's kernel knobs and split count, from the
metadata builder, absent = the kernels' defaults; a phase with ``attn`` runs one launch per entry, over disjoint
query tokens with their own tiles and knobs: Launches.phase). ``forward_span`` (KAKEYA_PREFILL_ATTEND=chunk): prefill
chunks attend their own tokens exact in one launch, before the phases. ``forward_exact``: write tokens into bf16 pages
in place, attend over pages.
"""
from __future__ import annotations

import torch

from kakeya_kernels.kakeya_triton import gather_tail_blocks, write_tail_tokens
from kakeya_kv.format import BLOCK_TOKENS

from .tailpages import tail_view


def forward_compressed(kk, query, key, value, kv_cache, tail_k, tail_v, phases, block_table, scale: float,
                       output, k_weight=None, precise: bool = False, tail_pages=None, span: dict | None = None):
    """``tail_pages`` (tailpages.TailGeometry; KAKEYA_TAIL_STORAGE=pages): the exact tails live in each request's
    pages after its sealed ones. A phase writes its tokens into those pages and the attention kernel reads the tails
    there (tail_tpp); tail_k / tail_v is then a scratch shared by the layers that only a seal uses: the block's
    tail is copied into it first, because the seal writes the block into the first of its tail pages."""
    if span is not None:   # KAKEYA_PREFILL_ATTEND=chunk: before the phases, which may read blocks it seals
        forward_span(kk, query, key, value, kv_cache, tail_k, tail_v, span, block_table, scale, output, k_weight,
                     precise, tail_pages)
    tails, paged = (tail_k, tail_v), {}
    if tail_pages is not None:
        view, tails, paged = _paged(kv_cache, tail_pages)
        tpp = tail_pages.tokens_per_page
    for ph in phases:
        if tail_pages is not None:
            if ph["n_write"]:
                _write_tail_pages(view, _tail_ids(block_table[ph["rows"]], ph["n_sealed"], tail_pages), tpp,
                                  ph["write_req"], ph["write_off"], key[ph["write_tok"]], value[ph["write_tok"]])
        elif ph["n_write"]:
            tail_k[ph["write_slot"], :, ph["write_off"]] = key[ph["write_tok"]].to(tail_k.dtype)
            tail_v[ph["write_slot"], :, ph["write_off"]] = value[ph["write_tok"]].to(tail_v.dtype)
        if ph["n_tok"]:
            bt = block_table[ph["rows"]]
            for a in ph.get("attn", (ph,)):    # a mixed step's phase: decode rows and prefill chunks, own launches
                out = kk.attention(query[a["tok"]], a["q_pos"], a["q_req"], kv_cache, bt, ph["n_sealed"],
                                   ph["seq_end"], *tails, ph["tail_slot"], scale, plan=a["plan"], precise=precise,
                                   **paged, **a.get("launch", {}))
                output[a["tok"]] = out.to(output.dtype)
        if ph["n_seal"]:
            if tail_pages is not None:
                ids = _tail_ids(block_table[ph["seal_row"]], ph["seal_blk"], tail_pages)
                flag = torch.ones(ph["n_seal"], dtype=torch.int32, device=kv_cache.device)
                gather_tail_blocks(*tails, ids, flag, tail_k, tail_v, ph["seal_slot"])
            _seal_into(kk, tail_k[ph["seal_slot"]], tail_v[ph["seal_slot"]], kv_cache,
                       block_table[ph["seal_row"], ph["seal_blk"]].long(), k_weight)
    return output


def forward_span(kk, query, key, value, kv_cache, tail_k, tail_v, sp: dict, block_table, scale: float, output,
                 k_weight=None, precise: bool = False, tail_pages=None):
    """KAKEYA_PREFILL_ATTEND=chunk (plan.Span): each span row's exact tokens from n_sealed * 512 on — its tail's tokens
    before the step, then the chunk's — go into a packed span buffer, token-major [span_pages * 512, Hkv, D] (row i:
    n_full + 1 pages from first_page, so its size follows the step's tokens, not rows x the longest row), that the
    attention kernel reads as the rows' tails (its tail loop takes any length and strides), over the blocks sealed
    before the step read compressed; then the span's full blocks are sealed in one launch and the page after them
    becomes the row's tail. One attention launch and one seal per layer per step, where the block phases take one of
    each per block the chunk touches. A span whose rows have no sealed block yet (fresh prompts: the whole context is
    in the buffer) runs vLLM's FlashAttention over the buffer's 512-token pages instead where it is importable on
    CUDA (``sp["flash"]``, from plan.span_to_device), as bf16 serving does."""
    R, H, D, P = len(sp["rows"]), tail_k.shape[1], tail_k.shape[3], sp["span_pages"]
    buf_k = torch.empty(P * BLOCK_TOKENS, H, D, dtype=tail_k.dtype, device=tail_k.device)
    buf_v = torch.empty_like(buf_k)
    pages_k, pages_v = buf_k.view(P, BLOCK_TOKENS, H, D), buf_v.view(P, BLOCK_TOKENS, H, D)
    bt = block_table[sp["rows"]]
    # The tail's tokens into each row's first page (positions past its old fill are overwritten or lie past its
    # seq_end), then the chunk. Tails in pages: gathered before the seals below overwrite the first of those pages.
    if tail_pages is not None:
        view, (pk, pv), _ = _paged(kv_cache, tail_pages)
        gather_tail_blocks(pk, pv, _tail_ids(bt, sp["n_sealed"], tail_pages),
                           torch.ones(R, dtype=torch.int32, device=buf_k.device), pages_k.transpose(1, 2),
                           pages_v.transpose(1, 2), sp["first_page"])
    else:
        pages_k[sp["first_page"]] = tail_k[sp["tail_slot"]].transpose(1, 2)
        pages_v[sp["first_page"]] = tail_v[sp["tail_slot"]].transpose(1, 2)
    buf_k[sp["w_idx"]] = key[sp["tok"]].to(buf_k.dtype)
    buf_v[sp["w_idx"]] = value[sp["tok"]].to(buf_v.dtype)
    fa = sp.get("flash")
    if fa is not None and not precise:
        fn, version = fa["fn"]
        out = fn(query[sp["tok"]].to(torch.bfloat16), pages_k, pages_v, max_seqlen_q=fa["max_q"],
                 cu_seqlens_q=fa["cu_q"], max_seqlen_k=fa["max_k"], seqused_k=sp["seq_end"],
                 block_table=fa["block_table"], softmax_scale=scale, causal=True, fa_version=version)
    else:
        # [1, Hkv, tokens, D] views whose "slot" stride is one token: row i's tail slot is its first token's index
        # (span_slot = first_page * 512), so the kernel reads row i's span from there on.
        n = P * BLOCK_TOKENS
        sk = buf_k.as_strided((1, H, n, D), (H * D, D, H * D, 1))
        sv = buf_v.as_strided((1, H, n, D), (H * D, D, H * D, 1))
        out = kk.attention(query[sp["tok"]], sp["q_pos"], sp["q_req"], kv_cache, bt, sp["n_sealed"], sp["seq_end"],
                           sk, sv, sp["span_slot"], scale, plan=sp["plan"], precise=precise, **sp.get("launch", {}))
    output[sp["tok"]] = out.to(output.dtype)
    if sp["n_seal"]:
        _seal_into(kk, pages_k[sp["seal_page"]].transpose(1, 2), pages_v[sp["seal_page"]].transpose(1, 2), kv_cache,
                   bt[sp["seal_req"], sp["seal_blk"]].long(), k_weight)
    if tail_pages is not None:   # only the new tail's real tokens: its pages past them may not be allocated
        _write_tail_pages(view, _tail_ids(bt, sp["n_sealed"] + sp["n_full"], tail_pages), tail_pages.tokens_per_page,
                          sp["rem_req"], sp["rem_off"], buf_k[sp["rem_idx"]], buf_v[sp["rem_idx"]])
    else:
        tail_k[sp["tail_slot"]] = pages_k[sp["tail_page"]].transpose(1, 2)
        tail_v[sp["tail_slot"]] = pages_v[sp["tail_page"]].transpose(1, 2)
    return output


def _seal_into(kk, k, v, kv_cache, pages, k_weight):
    """Seal the blocks k / v [S, Hkv, 512, D] and store them in kv_cache's pages [S] (one seal launch)."""
    sealed = torch.empty(k.shape[0], kv_cache.shape[1], kv_cache.shape[2], dtype=torch.uint8, device=kv_cache.device)
    kk.seal(k, v, sealed, k_weight=k_weight)
    kv_cache[pages] = sealed


def _write_tail_pages(view, ids, tpp: int, req, off, k, v):
    """Tokens k / v [W, Hkv, D] at tail offsets off [W] of requests req [W] (rows of ids, their tail page ids)
    into the bf16 tail view (tails in pages: offset t is row t % tpp of page t // tpp)."""
    page, row = ids[req, off // tpp], off % tpp
    view[page, :, 0, row] = k.to(view.dtype)
    view[page, :, 1, row] = v.to(view.dtype)


def _paged(kv_cache, geom):
    """KAKEYA_TAIL_STORAGE=pages: the layer's tail view, its K / V halves (what the attention kernel reads as tails)
    and the launch argument that says so."""
    view = tail_view(kv_cache, geom)
    return view, (view[:, :, 0], view[:, :, 1]), {"tail_tpp": geom.tokens_per_page}


def _tail_ids(bt, first_block, geom):
    """Tail page ids [R, pages] (int32, contiguous) of block-table rows bt [R, width]: positions first_block ..
    first_block + pages - 1 (clamped into the table: a row that reads and writes no tail may point past its
    allocation)."""
    pos = first_block.long()[:, None] + torch.arange(geom.pages, device=bt.device)[None, :]
    return bt.gather(1, pos.clamp_max(bt.shape[1] - 1)).to(torch.int32).contiguous()


def forward_exact(kk, query, key, value, kv_cache, ex, block_table, seq_lens, slot_mapping, num_tokens: int,
                  scale: float, output, precise: bool = False):
    """kv_cache: bf16 [pages, Hkv, 2, 512, D]; slot_mapping: page * 512 + offset per token (-1 = padding)."""
    sm = slot_mapping[:num_tokens].long()
    ok = sm >= 0
    blk, off = sm[ok] // BLOCK_TOKENS, sm[ok] % BLOCK_TOKENS
    kv_cache[blk, :, 0, off] = key[:num_tokens][ok].to(kv_cache.dtype)
    kv_cache[blk, :, 1, off] = value[:num_tokens][ok].to(kv_cache.dtype)
    pages = kv_cache.view(torch.uint8).view(kv_cache.shape[0], kv_cache.shape[1], -1)
    # ex: a host-planned phase (token indices) or a DecodeBuffers dict (token r = request r, no gather).
    q = query[:ex["B"]] if "B" in ex else query[ex["tok"]]
    out = kk.attention_exact(q, ex["q_pos"], ex["q_req"], pages, block_table, seq_lens.to(torch.int32), scale,
                             plan=ex["plan"], precise=precise)
    if "B" in ex:
        output[:ex["B"]] = out.to(output.dtype)
    else:
        output[ex["tok"]] = out.to(output.dtype)
    return output


def forward_decode(kk, query, key, value, kv_cache, tail_k, tail_v, d: dict, block_table, scale: float, output,
                   k_weight=None, precise: bool = False, tail_pages=None):
    """One new token per request, metadata from DecodeBuffers: write, attend, seal where a block filled —
    fixed launches, no host sync. ``tail_pages``: as in forward_compressed, with fixed shapes (a captured graph
    replays it): rows that write nothing (padding, read-only) write their page's old value back."""
    B = d["B"]
    tails, paged = (tail_k, tail_v), {}
    if tail_pages is not None:
        # Two launches per layer (this write, the pre-seal copy below), page ids looked up in the kernels: the torch
        # version (~19 small kernels per layer) cost ~40 us per layer at batch 16 (session 15, H100, inferred from
        # the b16 step time of pages vs the pool).
        _, tails, paged = _paged(kv_cache, tail_pages)
        write_tail_tokens(*tails, key, value, block_table, d["q_pos"], d["slot64"], d["scratch_slot"])
    else:
        tail_k[d["slot64"], :, d["off64"]] = key[:B].to(tail_k.dtype)
        tail_v[d["slot64"], :, d["off64"]] = value[:B].to(tail_v.dtype)
    out = kk.attention(query[:B], d["q_pos"], d["q_req"], kv_cache, block_table, d["n_sealed"], d["seq_end"],
                       *tails, d["tail_slot"], scale, plan=d["plan"], precise=precise, **paged, **d.get("launch", {}))
    output[:B] = out.to(output.dtype)
    if tail_pages is not None:     # only the rows whose block filled: the seal reads a copy (see forward_compressed)
        gather_tail_blocks(*tails, block_table, d["seal_flag"], tail_k, tail_v, d["tail_slot"], q_pos=d["q_pos"])
    kk.seal_indirect(tail_k, tail_v, d["tail_slot"], kv_cache, d["seal_page"], d["seal_flag"], k_weight)
    return output
