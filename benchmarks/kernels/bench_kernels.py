"""Kernel benchmarks on one GPU: decode attention (ours vs FlashAttention-3 on bf16), seal cost.

python benchmarks/kernels/bench_kernels.py --out DIR   -> DIR/kernels.json (schema of issue 3)
Each timing is triton.testing.do_bench (warm-up first, median) on the same card in one run.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from triton.testing import do_bench

from kakeya_kernels.kakeya_triton import KakeyaKernels

HKV, GQA = 8, 4


def fa_decode_fn(batch, ctx, d):
    """bf16 paged decode through vLLM's FlashAttention-3 (page 256), or SDPA if the kit is absent."""
    q = torch.randn(batch, HKV * GQA, d, dtype=torch.bfloat16, device="cuda")
    page = 256
    nb = -(-ctx // page)
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        k = torch.randn(batch * nb, page, HKV, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        bt = torch.arange(batch * nb, dtype=torch.int32, device="cuda").view(batch, nb)
        cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        used = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")

        def run():
            return flash_attn_varlen_func(q, k, v, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=ctx, seqused_k=used,
                                          block_table=bt, softmax_scale=d ** -0.5, causal=True, fa_version=3)
        name = "fa3"
    except Exception as e:  # noqa: BLE001 - the kit may be missing
        print("FA3 unavailable, SDPA baseline:", repr(e)[:200])
        k = torch.randn(batch, HKV, ctx, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        qs = q.view(batch, HKV * GQA, 1, d)

        def run():
            return torch.nn.functional.scaled_dot_product_attention(qs, k, v, enable_gqa=True)
        name = "sdpa"
    bytes_ = batch * ctx * HKV * d * 4
    return run, bytes_, name


def ours_decode_fn(kk: KakeyaKernels, batch, ctx, d, sms, tt=64, warps=8, lut=0, ns=1):
    tail = 100
    n_sealed = ctx // 512
    seq = n_sealed * 512 + tail
    pages = batch * n_sealed
    proto = torch.zeros(4, HKV, kk.lay.slot_bytes, dtype=torch.uint8, device="cuda")
    kk.seal((torch.randn(4, HKV, 512, d, device="cuda") * 2).bfloat16(),
            torch.randn(4, HKV, 512, d, device="cuda").bfloat16(), proto)
    cache = proto.repeat(-(-pages // 4), 1, 1)[:pages].contiguous()
    bt = torch.randperm(pages, device="cuda").to(torch.int32).view(batch, n_sealed)
    tk = torch.randn(batch, HKV, 512, d, device="cuda").bfloat16()
    tv = torch.randn_like(tk)
    q = torch.randn(batch, HKV * GQA, d, dtype=torch.bfloat16, device="cuda")
    pos = torch.full((batch,), seq - 1, device="cuda")
    req = torch.arange(batch, device="cuda")
    nsl = torch.full((batch,), n_sealed, dtype=torch.int32, device="cuda")
    sl = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    ts = torch.arange(batch, dtype=torch.int32, device="cuda")
    plan = kk.plan(pos, req, batch, GQA)
    splits = max(1, min(n_sealed + 1, math.ceil(2 * sms / (plan["nt"] * HKV))))

    def run():
        return kk.attention(q, pos, req, cache, bt, nsl, sl, tk, tv, ts, scale=d ** -0.5, splits=splits, plan=plan,
                            tt=tt, num_warps=warps, lut=lut, num_stages=ns)
    bytes_ = batch * (n_sealed * HKV * kk.lay.slot_bytes + tail * HKV * d * 4)
    return run, bytes_, splits


def copy_bandwidth():
    x = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x)) * 1e-3
    return 2 * x.numel() / t / 1e9


def prefill_layer_us(d):
    """One Qwen3-8B-like layer (hidden 4096, 8 KV heads, MLP 12288) on 512 tokens: GEMMs + causal attention."""
    h, inter, hq = 4096, 12288, 4096 // d
    bf = dict(dtype=torch.bfloat16, device="cuda")
    x = torch.randn(512, h, **bf)
    wqkv = torch.randn(h, (hq + 2 * HKV) * d, **bf)
    wo = torch.randn(hq * d, h, **bf)
    w1 = torch.randn(h, 2 * inter, **bf)
    w2 = torch.randn(inter, h, **bf)
    a = torch.randn(512, hq * d, **bf)
    m = torch.randn(512, inter, **bf)
    q = torch.randn(1, hq, 512, d, **bf)
    kv = torch.randn(1, HKV, 512, d, **bf)

    def run():
        x @ wqkv
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        a @ wo
        x @ w1
        m @ w2
    return do_bench(run) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kbits", type=int, default=4)
    ap.add_argument("--vbits", type=int, default=3)
    a = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    res = {"gpu": props.name, "copy_gbps": copy_bandwidth(), "format": f"kakeya_k{a.kbits}v{a.vbits}",
           "decode": [], "seal": []}
    free = torch.cuda.mem_get_info()[0]
    res["tuning"] = []
    best = {}
    for d in (64, 128):
        kk = KakeyaKernels(d, a.kbits, a.vbits, "cuda")
        # Small sweep of tile size / warps on one shape; the best is used for the matrix.
        for tt, warps, lut, ns in [(tt, w, l, 1) for tt in (64, 128) for w in (4, 8) for l in (0, 1)]:
            try:
                fn, _, _ = ours_decode_fn(kk, 16, 16384, d, sms, tt, warps, lut, ns)
                us = do_bench(fn) * 1e3
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / registers
                print("config failed", d, tt, warps, lut, ns, repr(e)[:120])
                continue
            res["tuning"].append({"head_dim": d, "tt": tt, "num_warps": warps, "lut": lut, "num_stages": ns,
                                  "us_b16_ctx16k": us})
            print(f"tune D={d} tt={tt} warps={warps} lut={lut} ns={ns}: {us:.1f} us", flush=True)
            if d not in best or us < best[d][0]:
                best[d] = (us, tt, warps, lut, ns)
        _, tt, warps, lut, ns = best[d]
        x = (torch.randn(64, HKV, 512, d, device="cuda") * 2).bfloat16()
        slots = torch.zeros(64, HKV, kk.lay.slot_bytes, dtype=torch.uint8, device="cuda")
        seal_us = do_bench(lambda: kk.seal(x, x, slots)) * 1e3 / 64
        res["seal"].append({"format": res["format"], "head_dim": d, "us_per_block_layer": seal_us,
                            "prefill_us_per_block_layer": prefill_layer_us(d)})
        for ctx in (4096, 16384, 65536, 131072):
            for batch in (1, 16, 64):
                if batch * ctx * HKV * d * 4 * 1.3 > free * 0.8:
                    continue
                fa, fa_bytes, fa_name = fa_decode_fn(batch, ctx, d)
                fa_us = do_bench(fa) * 1e3
                del fa
                ours, bytes_, splits = ours_decode_fn(kk, batch, ctx, d, sms, tt, warps, lut, ns)
                us = do_bench(ours) * 1e3
                del ours
                torch.cuda.empty_cache()
                row = {"format": res["format"], "head_dim": d, "batch": batch, "context": ctx, "us": us,
                       "fa3_bf16_us": fa_us, "baseline": fa_name, "bytes": bytes_, "gbps": bytes_ / us / 1e3,
                       "bf16_bytes": fa_bytes, "speedup_vs_bf16": fa_us / us, "splits": splits,
                       "floor_us": bytes_ / (res["copy_gbps"] * 1e3), "tt": tt, "num_warps": warps, "lut": lut,
                       "num_stages": ns}
                res["decode"].append(row)
                print(f"D={d} ctx={ctx:6d} b={batch:2d}  ours {us:8.1f} us ({row['gbps']:6.0f} GB/s)  "
                      f"{fa_name} {fa_us:8.1f} us  x{fa_us / us:.2f}  floor {row['floor_us']:.1f} us", flush=True)
    with open(f"{a.out}/kernels.json", "w") as f:
        json.dump(res, f, indent=1)
    for s in res["seal"]:
        print(f"seal D={s['head_dim']}: {s['us_per_block_layer']:.1f} us/block-layer vs prefill "
              f"{s['prefill_us_per_block_layer']:.1f} us ({100 * s['us_per_block_layer'] / s['prefill_us_per_block_layer']:.1f} %)")


if __name__ == "__main__":
    main()
