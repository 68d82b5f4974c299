"""KAKEYA_TAIL_STORAGE=pages vs the pool, kernel level (GPU): the served decode launch reading each request's exact
tail from per-request rows (pool) and from its own pages (tail_tpp), on the same sealed cache and the same tail
values; the masked block copy a seal needs (gather_tail_blocks), with every row / no row flagged and in the decode
step's block-table form; and the decode step's token write (write_tail_tokens) vs the pool's index_put.

    python benchmarks/kernels/tail_pages_bench.py [--out tail_pages.json] [--batches 16,48,96] [--context 8192]

Outputs must agree bit for bit (same values, same arithmetic); times are triton.testing.do_bench medians (warm-up
first). Session 14's serving run showed the torch gather of the first tail-pages version costing ~0.4 ms per
request per decode step (Qwen3-8B-like, H100): this measures the kernel-side replacement.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

from kakeya_kernels.kakeya_triton import KakeyaKernels, gather_tail_blocks, write_tail_tokens
from kakeya_kernels.variants import decode_variant, kernel_args, num_splits
from kakeya_kv import lloyd_max
from kakeya_kv.format import BLOCK_TOKENS
from kakeya_v1_3_ppl.tailpages import TailGeometry, tail_view

HKV, GQA = 8, 4


def run(d: int, batch: int, context: int, dev, bench=triton.testing.do_bench, sms: int | None = None) -> dict:
    """One row. bench(fn, warmup=, rep=) -> ms (CPU test: a stand-in in the Triton interpreter); sms: SM count."""
    g = torch.Generator(device=dev).manual_seed(batch)
    kk = KakeyaKernels(d, 4, 3, dev, k_table=lloyd_max.uniform_table(4))     # the default: uniform K, ki8 launch
    geom = TailGeometry.of(kk.lay)
    nb = context // BLOCK_TOKENS                       # sealed blocks per request; tails of `tail` tokens
    tail = context % BLOCK_TOKENS or 300
    width = nb + geom.pages
    npages = batch * width + 1
    cache = torch.randint(0, 256, (npages, HKV, kk.lay.slot_bytes), dtype=torch.uint8, device=dev, generator=g)
    # Sealed blocks: seal random K/V once and replicate (speed does not depend on the values).
    kv = torch.randn(2, 1, HKV, BLOCK_TOKENS, d, device=dev, generator=g).bfloat16()
    sealed = torch.empty(1, HKV, kk.lay.slot_bytes, dtype=torch.uint8, device=dev)
    kk.seal(kv[0], kv[1], sealed)
    bt = (1 + torch.randperm(npages - 1, device=dev, generator=g)[:batch * width]).view(batch, width).to(torch.int32)
    cache[bt[:, :nb].flatten().long()] = sealed
    # Tails: the same values in the pool rows and in each request's pages after its sealed ones.
    tk = torch.randn(batch + 1, HKV, BLOCK_TOKENS, d, device=dev, generator=g).bfloat16()
    tv = torch.randn(batch + 1, HKV, BLOCK_TOKENS, d, device=dev, generator=g).bfloat16()
    view, tpp = tail_view(cache, geom), geom.tokens_per_page
    t = torch.arange(tail, device=dev)
    page = bt[:, nb + t // tpp].long()                                        # [batch, tail]
    view[page, :, 0, t % tpp] = tk[:batch, :, :tail].transpose(1, 2)
    view[page, :, 1, t % tpp] = tv[:batch, :, :tail].transpose(1, 2)
    n_sealed = torch.full((batch,), nb, dtype=torch.int32, device=dev)
    seq = torch.full((batch,), nb * BLOCK_TOKENS + tail, dtype=torch.int32, device=dev)
    slot = torch.arange(batch, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HKV * GQA, d, device=dev, generator=g).bfloat16()
    q_pos, q_req = seq.long() - 1, torch.arange(batch, device=dev)
    v = decode_variant("tuned", d, True)
    plan = kk.plan(q_pos, q_req, batch, GQA, v["bm"])
    sms = sms or torch.cuda.get_device_properties(dev).multi_processor_count
    args = dict(kernel_args(v), splits=num_splits(v, plan["nt"], HKV, width, sms), plan=plan)

    def pool():
        return kk.attention(q, q_pos, q_req, cache, bt, n_sealed, seq, tk, tv, slot, d ** -0.5, **args)

    def pages():
        return kk.attention(q, q_pos, q_req, cache, bt, n_sealed, seq, view[:, :, 0], view[:, :, 1], slot,
                            d ** -0.5, tail_tpp=tpp, **args)

    same = bool(torch.equal(pool(), pages()))
    ids = bt[:, nb:nb + geom.pages].contiguous()
    scratch_k, scratch_v = torch.zeros_like(tk), torch.zeros_like(tv)
    flags = {n: torch.full((batch,), f, dtype=torch.int32, device=dev) for n, f in (("all", 1), ("none", 0))}

    def copy(which):
        return lambda: gather_tail_blocks(view[:, :, 0], view[:, :, 1], ids, flags[which], scratch_k, scratch_v, slot)

    # The decode step's forms (runtime.forward_decode): page ids from the block table in the copy, and the write of
    # the step's token into its tail page (slot -1 matches no row: every row writes; the pool path is one
    # torch index_put per K and V).
    def copy_bt():
        return gather_tail_blocks(view[:, :, 0], view[:, :, 1], bt, flags["none"], scratch_k, scratch_v, slot,
                                  q_pos=q_pos32)

    q_pos32 = q_pos.to(torch.int32)
    kd = torch.randn(batch, HKV, d, device=dev, generator=g).bfloat16()
    vd = torch.randn(batch, HKV, d, device=dev, generator=g).bfloat16()
    slot64 = slot.long()

    def write():
        return write_tail_tokens(view[:, :, 0], view[:, :, 1], kd, vd, bt, q_pos32, slot64, -1)

    def write_pool():
        off = q_pos % BLOCK_TOKENS
        tk[slot64, :, off] = kd
        tv[slot64, :, off] = vd

    row = {"head_dim": d, "batch": batch, "context": context, "tail_tokens": tail, "tokens_per_page": tpp,
           "outputs_identical": same}
    for name, fn in (("attn_pool_us", pool), ("attn_pages_us", pages), ("copy_all_rows_us", copy("all")),
                     ("copy_no_row_us", copy("none")), ("copy_bt_no_row_us", copy_bt),
                     ("write_pages_us", write), ("write_pool_us", write_pool)):
        row[name] = round(bench(fn, warmup=25, rep=100) * 1e3, 1)
    row["pages_vs_pool"] = round(row["attn_pages_us"] / row["attn_pool_us"], 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tail_pages.json")
    ap.add_argument("--batches", default="16,48,96")
    ap.add_argument("--context", type=int, default=8192 + 300)
    ap.add_argument("--head-dims", default="128,64")
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows = [run(d, b, a.context, dev) for d in map(int, a.head_dims.split(",")) for b in map(int, a.batches.split(","))]
    json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, open(a.out, "w"), indent=1)
    print(f"{'D':>4} {'batch':>5} {'pool us':>9} {'pages us':>9} {'ratio':>6} {'copy all':>9} {'copy none':>9} "
          f"{'bt none':>8} {'write pg':>8} {'write pool':>10} same")
    for r in rows:
        print(f"{r['head_dim']:>4} {r['batch']:>5} {r['attn_pool_us']:>9} {r['attn_pages_us']:>9} "
              f"{r['pages_vs_pool']:>6} {r['copy_all_rows_us']:>9} {r['copy_no_row_us']:>9} "
              f"{r['copy_bt_no_row_us']:>8} {r['write_pages_us']:>8} {r['write_pool_us']:>10} {r['outputs_identical']}")
    return 0 if all(r["outputs_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
