"""Exact tails in the request's own pages (vllm_backend tailpages, KAKEYA_TAIL_STORAGE=pages): geometry per
layout, and the bit-exact copy of a full block's tail from its pages into the shared scratch before a seal
(kakeya_triton.gather_tail_blocks, Triton interpreter on CPU)."""
import pytest
import torch

from kakeya_kv.format import BLOCK_TOKENS, kakeya_layout
from kakeya_kernels.kakeya_triton import gather_tail_blocks, write_tail_tokens
from kakeya_v1_3_ppl.tailpages import TailGeometry, group_pages, tail_view

# The copy kernel runs where the pages live: the GPU when there is one, else the interpreter on CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("d,kb,vb", [(128, 4, 3), (64, 4, 3), (128, 3, 2), (64, 3, 2), (128, 4, 4)])
def test_geometry_fits_a_full_block_per_head_slot(d, kb, vb):
    lay = kakeya_layout(d, kb, vb)
    g = TailGeometry.of(lay)
    assert g.tokens_per_page * 4 * d <= lay.slot_bytes < (g.tokens_per_page + 1) * 4 * d
    assert (g.pages - 1) * g.tokens_per_page < BLOCK_TOKENS <= g.pages * g.tokens_per_page
    assert g.pages == round(lay.ratio_vs_bf16 + 0.5)   # a sealed page is ratio x smaller than bf16: ~ratio pages


def test_group_takes_the_widest_need_and_prices_it():
    lays = [kakeya_layout(128, 4, 3), kakeya_layout(128, 3, 2)]
    assert group_pages(lays) == max(TailGeometry.of(x).pages for x in lays) == 6
    assert group_pages([]) == 0
    with pytest.raises(ValueError, match="cannot hold"):
        _ = TailGeometry(100, 64).pages


def _pages(nblocks, hkv, lay, seed):
    return torch.randint(0, 256, (nblocks, hkv, lay.slot_bytes), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.int32).to(torch.uint8)


@pytest.mark.parametrize("d,kb,vb", [(64, 4, 3), (128, 3, 2)])
def test_tokens_written_by_the_layout_copy_bit_exact_for_flagged_items_only(d, kb, vb):
    """Tokens written the way the data path writes them (token t of a request: its tail page t // tpp, row t % tpp,
    through tail_view) come back bit for bit from gather_tail_blocks into the scratch rows named, in order, for the
    flagged items only; the pages are not changed."""
    lay, hkv = kakeya_layout(d, kb, vb), 2
    g = TailGeometry.of(lay)
    kv = _pages(40, hkv, lay, 0).to(DEV)
    view = tail_view(kv, g)
    slots, rows = 5, torch.tensor([3, 0, 4])
    gen = torch.Generator().manual_seed(1)
    tail_k = torch.randn(slots, hkv, BLOCK_TOKENS, d, generator=gen).bfloat16()
    tail_v = torch.randn(slots, hkv, BLOCK_TOKENS, d, generator=gen).bfloat16()
    page_ids = torch.randperm(40, generator=gen)[:3 * g.pages].view(3, g.pages).to(torch.int32)  # distinct pages
    t = torch.arange(BLOCK_TOKENS)
    page, row = page_ids[:, t // g.tokens_per_page].long(), t % g.tokens_per_page   # [3, 512], [512]
    page, row = page.to(DEV), row.to(DEV)
    view[page, :, 0, row] = tail_k[rows].transpose(1, 2).to(DEV)                    # [3, 512, Hkv, D]
    view[page, :, 1, row] = tail_v[rows].transpose(1, 2).to(DEV)
    before = kv.clone()
    out_k, out_v = torch.zeros_like(tail_k, device=DEV), torch.zeros_like(tail_v, device=DEV)
    flag = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEV)
    gather_tail_blocks(view[:, :, 0], view[:, :, 1], page_ids.to(DEV), flag, out_k, out_v,
                       rows.to(DEV, torch.int32))
    out_k, out_v, kv, before, view = out_k.cpu(), out_v.cpu(), kv.cpu(), before.cpu(), tail_view(kv.cpu(), g)
    for i in (0, 2):
        assert torch.equal(out_k[rows[i]].view(torch.int16), tail_k[rows[i]].view(torch.int16))
        assert torch.equal(out_v[rows[i]].view(torch.int16), tail_v[rows[i]].view(torch.int16))
    assert not out_k[0].any() and not out_v[0].any()          # item 1 (row 0) not flagged: untouched
    assert not out_k[1].any() and not out_k[2].any()          # rows not named: untouched
    assert torch.equal(kv, before)                            # a copy out of the pages, never into them
    # token t of request r, head h: page t // tpp, row t % tpp, K half then V half of the head's slot
    t = BLOCK_TOKENS - 1
    p, i = page_ids[0, t // g.tokens_per_page], t % g.tokens_per_page
    assert torch.equal(view[p, 1, 1, i], tail_v[3, 1, t])
    n = g.tokens_per_page * 4 * d                             # the tail rows end before the slot does
    assert n <= lay.slot_bytes


def test_block_copy_refuses_pages_that_cannot_hold_a_block():
    lay = kakeya_layout(64, 4, 3)
    g = TailGeometry.of(lay)
    view = tail_view(_pages(8, 1, lay, 0), g)
    scratch = torch.zeros(2, 1, BLOCK_TOKENS, 64, dtype=torch.bfloat16)
    ids = torch.zeros(1, g.pages - 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="cannot hold"):
        gather_tail_blocks(view[:, :, 0], view[:, :, 1], ids, torch.ones(1, dtype=torch.int32), scratch,
                           scratch.clone(), torch.zeros(1, dtype=torch.int32))


def test_view_refuses_other_shapes():
    lay = kakeya_layout(64, 4, 3)
    g = TailGeometry.of(lay)
    with pytest.raises(ValueError, match="uint8 pages"):
        tail_view(torch.zeros(2, 1, lay.slot_bytes + 2, dtype=torch.uint8), g)
    with pytest.raises(ValueError, match="uint8 pages"):
        tail_view(torch.zeros(2, 1, lay.slot_bytes, dtype=torch.int8), g)


def test_decode_write_puts_each_token_in_its_tail_page_row_and_skips_flagged_slots():
    """write_tail_tokens (a decode step, page ids looked up in the block table): token r at position p goes to
    block-table position p // 512 + (p % 512) // tpp, row (p % 512) % tpp of row r; rows whose slot is the skip
    slot write nothing; nothing else changes. gather_tail_blocks with q_pos then reads a full block back."""
    lay, hkv, d = kakeya_layout(64, 4, 3), 2, 64
    g = TailGeometry.of(lay)
    kv = _pages(40, hkv, lay, 3).to(DEV)
    gen = torch.Generator().manual_seed(5)
    bt = torch.randperm(39, generator=gen)[:3 * 9].add(1).view(3, 9).to(torch.int32)
    pos = torch.tensor([1023, 517, 130], dtype=torch.int32)         # block 1 last token, block 1 row 5, block 0
    slot = torch.tensor([0, 7, 2], dtype=torch.int64)                # row 1: the skip slot
    key = torch.randn(3, hkv, d, generator=gen).bfloat16()
    val = torch.randn(3, hkv, d, generator=gen).bfloat16()
    before = kv.clone()
    view = tail_view(kv, g)
    # V as a view of a wider qkv-like buffer (other strides than K), as vLLM passes it after a K norm
    qkv = torch.zeros(3, 3 * hkv * d, dtype=torch.bfloat16)
    qkv[:, 2 * hkv * d:] = val.reshape(3, hkv * d)
    v_view = qkv.to(DEV)[:, 2 * hkv * d:].view(3, hkv, d)
    assert v_view.stride() != key.stride()
    write_tail_tokens(view[:, :, 0], view[:, :, 1], key.to(DEV), v_view, bt.to(DEV), pos.to(DEV), slot.to(DEV), 7)
    want = tail_view(before.clone().cpu(), g)
    for r in (0, 2):
        p = int(pos[r])
        off = p % BLOCK_TOKENS
        page = int(bt[r, p // BLOCK_TOKENS + off // g.tokens_per_page])
        want[page, :, 0, off % g.tokens_per_page] = key[r]
        want[page, :, 1, off % g.tokens_per_page] = val[r]
    assert torch.equal(tail_view(kv.cpu(), g).view(torch.int16), want.view(torch.int16))
    # the block of row 0 is complete in its pages iff all its other tokens are there: write them, then copy it out
    for t in range(BLOCK_TOKENS - 1):
        write_tail_tokens(view[:, :, 0], view[:, :, 1], key[:1].expand(1, hkv, d).contiguous().to(DEV),
                          val[:1].contiguous().to(DEV), bt.to(DEV), torch.tensor([BLOCK_TOKENS + t],
                          dtype=torch.int32, device=DEV), slot[:1].to(DEV), 7)
    out_k = torch.zeros(1, hkv, BLOCK_TOKENS, d, dtype=torch.bfloat16, device=DEV)
    out_v = torch.zeros_like(out_k)
    gather_tail_blocks(view[:, :, 0], view[:, :, 1], bt.to(DEV), torch.tensor([1, 0, 0], dtype=torch.int32,
                       device=DEV), out_k, out_v, torch.tensor([0, 0, 0], dtype=torch.int32, device=DEV),
                       q_pos=pos.to(DEV))
    assert torch.equal(out_k.cpu()[0].view(torch.int16), key[0][:, None].expand(hkv, BLOCK_TOKENS, d).view(torch.int16))
    assert torch.equal(out_v.cpu()[0, :, -1], val[0])
    with pytest.raises(ValueError, match="key / value must be"):
        write_tail_tokens(view[:, :, 0], view[:, :, 1], key[:, :1].to(DEV), val[:, :1].to(DEV), bt.to(DEV),
                          pos.to(DEV), slot.to(DEV), 7)
