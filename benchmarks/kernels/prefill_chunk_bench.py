"""KAKEYA_PREFILL_ATTEND=chunk vs the block phases, one layer on the GPU: a prefill chunk of `chunk` new tokens after
`context` cached tokens (sealed blocks), through the backend's own data path (runtime.forward_compressed with the
metadata builder's launches: plan.Launches.phase / .span) — the block phases run write / attend / seal once per block
the chunk touches, the span one attention launch and one seal for the whole chunk. Next to them: bf16 attention of the
same queries over the same context exact (torch SDPA, causal from the bottom right), the cost bf16 pays for it.
A span of a fresh prompt runs vLLM's FlashAttention where the gpu-kit is staged (span_attention "flash"; the kernel's
time over the same span then in span_kernel_us), the attention kernel otherwise.

    python benchmarks/kernels/prefill_chunk_bench.py [--out prefill_chunk.json] [--cases 0:8192,0:2048,16384:2048]

Times are triton.testing.do_bench medians (warm-up first) of one layer's data path (the host plan of a step is built
once for all layers and timed apart, plan_us); the two paths' outputs differ by design (the span reads the chunk's
earlier blocks exact), their relative difference is recorded. Session 15's serving row (H100, Qwen3-8B-like) put the
default's prefill at 0.41x bf16 (8192-token prompt): this measures how much of it the block phases cost.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import triton

from kakeya_kernels.kakeya_triton import KakeyaKernels
from kakeya_kv import lloyd_max
from kakeya_kv.format import BLOCK_TOKENS as N
from kakeya_v1_3_ppl.plan import Launches, TailState, plan_step, plan_step_chunked
from kakeya_v1_3_ppl.runtime import forward_compressed

HKV, GQA = 8, 4


def _sdpa(q, k, v, scale):
    """bf16 causal attention of q [n, Hq, D] (the last n positions) over k / v [L, Hkv, D]."""
    from torch.nn.attention.bias import causal_lower_right
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    kt, vt = kt.repeat_interleave(GQA, 1), vt.repeat_interleave(GQA, 1)
    mask = causal_lower_right(qt.shape[2], kt.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)[0].transpose(0, 1)


def run(d: int, context: int, chunk: int, dev, bench=triton.testing.do_bench, hkv: int = HKV) -> dict:
    """One row (one request). bench(fn, warmup=, rep=) -> ms (CPU test: a stand-in in the Triton interpreter)."""
    if context % N:
        raise ValueError(f"context must be whole sealed blocks (a multiple of {N}), got {context}")
    g = torch.Generator(device=dev).manual_seed(context + chunk)
    kk = KakeyaKernels(d, 4, 3, dev, k_table=lloyd_max.uniform_table(4))     # the default: uniform K, ki8 launch
    nb, total = context // N, context + chunk
    width = -(-total // N) + 1
    cache = torch.zeros(width + 1, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=dev)
    K = torch.randn(total, hkv, d, device=dev, generator=g).bfloat16()
    V = torch.randn(total, hkv, d, device=dev, generator=g).bfloat16()
    if nb:
        kk.seal(K[:context].view(nb, N, hkv, d).transpose(1, 2), V[:context].view(nb, N, hkv, d).transpose(1, 2),
                cache[1:nb + 1])
    bt = torch.arange(1, width + 1, dtype=torch.int32, device=dev)[None]
    q = torch.randn(chunk, hkv * GQA, d, device=dev, generator=g).bfloat16()
    k, v = K[context:], V[context:]
    qsl, seq, slot = np.array([0, chunk]), np.array([total]), np.array([0])
    launches = Launches("tuned", d, hkv, dev, prefill="tuned", int8_k=True)

    def state():
        s = TailState()
        if nb:
            s.set(0, "r", nb, 0)
        return s

    t0 = time.perf_counter()
    phases = [launches.phase(p, dev, GQA, width) for p in plan_step(qsl, seq, slot, ["r"], state())]
    t1 = time.perf_counter()
    span, rest = plan_step_chunked(qsl, seq, slot, ["r"], state())
    span = launches.span(span, dev, GQA, width)
    t2 = time.perf_counter()
    assert not rest
    tails = {m: (torch.zeros(1, hkv, N, d, dtype=torch.bfloat16, device=dev),
                 torch.zeros(1, hkv, N, d, dtype=torch.bfloat16, device=dev)) for m in ("blocks", "span")}
    caches = {m: cache.clone() for m in ("blocks", "span")}
    outs = {m: torch.zeros_like(q) for m in ("blocks", "span")}

    def blocks():
        return forward_compressed(kk, q, k, v, caches["blocks"], *tails["blocks"], phases, bt, d ** -0.5,
                                  outs["blocks"])

    def chunked():
        return forward_compressed(kk, q, k, v, caches["span"], *tails["span"], [], bt, d ** -0.5, outs["span"],
                                  span=span)

    span_kernel = dict(span, flash=None)     # the attention kernel over the span buffer even where FA would run

    def chunked_kernel():
        return forward_compressed(kk, q, k, v, caches["span"], *tails["span"], [], bt, d ** -0.5, outs["span"],
                                  span=span_kernel)

    def sdpa():
        return _sdpa(q, K, V, d ** -0.5)

    blocks(), chunked()
    ref = sdpa().float()
    rel = lambda a: float((a.float() - ref).norm() / ref.norm())   # noqa: E731
    row = {"head_dim": d, "kv_heads": hkv, "gqa": GQA, "context": context, "chunk": chunk,
           "phases": len(phases), "span_attention": "flash" if span.get("flash") else "kernel",
           "sealed_pages_equal": bool(torch.equal(caches["blocks"], caches["span"])),
           "blocks_plan_us": round((t1 - t0) * 1e6, 1), "span_plan_us": round((t2 - t1) * 1e6, 1),
           "blocks_rel_to_bf16": rel(outs["blocks"]), "span_rel_to_bf16": rel(outs["span"])}
    timed = [("blocks_us", blocks), ("span_us", chunked), ("sdpa_bf16_us", sdpa)]
    if span.get("flash"):
        timed.append(("span_kernel_us", chunked_kernel))
    for name, fn in timed:
        row[name] = round(bench(fn, warmup=10, rep=50) * 1e3, 1)
    row["span_speedup"] = round(row["blocks_us"] / row["span_us"], 3)
    row["span_vs_sdpa"] = round(row["span_us"] / row["sdpa_bf16_us"], 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="prefill_chunk.json")
    ap.add_argument("--cases", default="0:8192,0:2048,16384:2048,30720:2048",
                    help="context:chunk pairs (context in whole 512-token blocks)")
    ap.add_argument("--head-dims", default="128,64")
    a = ap.parse_args()
    dev = torch.device("cuda")
    cases = [tuple(map(int, c.split(":"))) for c in a.cases.split(",")]
    rows = []
    for d in map(int, a.head_dims.split(",")):
        for c, n in cases:
            rows.append(run(d, c, n, dev))
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, open(a.out, "w"), indent=1)
    print(f"{'D':>4} {'context':>7} {'chunk':>6} {'phases':>6} {'blocks us':>10} {'span us':>9} {'speedup':>7} "
          f"{'sdpa us':>8} {'span/sdpa':>9} {'rel blocks':>10} {'rel span':>9} {'span via':>8} pages=")
    for r in rows:
        print(f"{r['head_dim']:>4} {r['context']:>7} {r['chunk']:>6} {r['phases']:>6} {r['blocks_us']:>10} "
              f"{r['span_us']:>9} {r['span_speedup']:>7} {r['sdpa_bf16_us']:>8} {r['span_vs_sdpa']:>9} "
              f"{r['blocks_rel_to_bf16']:>10.2e} {r['span_rel_to_bf16']:>9.2e} {r['span_attention']:>8} "
              f"{r['sealed_pages_equal']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
