"""Design probe for issue 3 (CPU proxy only, not a served kernel): a decode loop with int8 K scores (the served
KI8 helpers) AND int8 P@V, over a hypothetical token-major V code layout (per dim, the block's tokens two to a byte:
4-bit V; the current format stores V codes per token, dims two to a byte at 4 bits).

Why: the P@V MMA contracts over tokens, so its operand fragments want consecutive TOKENS packed in a register; the
current layout packs consecutive DIMS, and Triton stages every decoded V element through shared memory 16 bits at a
time (64 STS.U16 per thread per 64-token tile). With V stored token-major, the same nibble split as KI8's K gives
the operand directly, and P goes to int8 hi + lo like KI8's query. The data are garbage (fixed offsets in a fake
slot); only the instruction stream is meaningful:

    PYTHONPATH=/tmp/tri36 python benchmarks/kernels/proto/vi8_probe.py     # sm_90 compile with the device's Triton

Session 12 result (Triton 3.6, sm_90, 4 warps, loop SASS per code element per thread): D=128 rows 4 (GQA 4): tt 64
3.34, tt 128 2.61 (cap 128, 122 registers, 4 programs/SM), tt 256 2.25 (cap 168); D=64 tt 128 3.90. The served
kernel: TUNED 7.70, ki8 5.67 (D=128); TUNED 7.52, ki8 6.48 (D=64). Timed on the H100 in the same session (the
served kernel's VI8 path, benchmarks/results/vllm_s12/kernels_int8): on a k4v4 cache D=128 b16 16k TUNED 306.3 µs,
ki8 251.0, ki8 + vi8 224.8 (tt 128): the SASS proxy overstates gains at this level (vi8: -22 % SASS, -10 % time).
"""
import collections
import inspect
import os
import sys

import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kakeya_kernels.kakeya_triton import _i8_dots, _i8_scores, _i8_split, _kbytes, _nib8  # noqa: E402


@triton.jit
def proto(q_ptr, cache_ptr, out_ptr, nblk, D: tl.constexpr, BM: tl.constexpr, TT: tl.constexpr, ASM: tl.constexpr):
    pid = tl.program_id(0)
    d = tl.arange(0, D)
    r = tl.arange(0, BM)
    q = tl.load(q_ptr + r[:, None] * D + d[None, :]).to(tl.float32)
    qeh, qoh, qel, qol, qa = _i8_split(q, tl.max(tl.abs(q), 1), BM, D)
    kq = qa / 127.0
    m_i = tl.full((BM,), -float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    for b in range(pid, nblk, 64):
        slot = cache_ptr + b * 65536
        for t0 in tl.range(0, 512, TT, num_stages=1):
            t = t0 + tl.arange(0, TT)
            kg = tl.load((slot + 60000).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
            kb8 = _kbytes(slot, t, t < 512, D)
            s = _i8_scores(qeh, qoh, qel, qol, kb8, ASM) * kq[:, None]
            s = s * tl.abs(kg)[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vg = tl.load((slot + 61000).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
            pg = p * tl.abs(vg)[None, :]
            peh, poh, pel, pol, pa = _i8_split(pg, tl.max(pg, 1), BM, TT)
            # V^T codes: [D, TT/2] bytes, row d = tokens t0.. of dim d, two per byte (even token low nibble)
            tb = t0 // 2 + tl.arange(0, TT // 2)
            vlo, vhi = _nib8(tl.load(slot + 30000 + d[:, None] * 256 + tb[None, :]), ASM)
            acc = acc * alpha[:, None] + _i8_dots(peh, poh, pel, pol, vlo, vhi) * (pa / 127.0)[:, None]
            m_i = m_new
    tl.store(out_ptr + pid * BM * D + r[:, None] * D + d[None, :], acc / l_i[:, None])


def loop_sass(kernel, D: int, BM: int, TT: int, num_warps: int, maxnreg: int | None):
    """sm_90 compile of a probe kernel (signature of `proto`): (loop SASS per code element per thread, occupancy,
    the loop's most common opcodes)."""
    import sass_count as S
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {"q_ptr": "*bf16", "cache_ptr": "*u8", "out_ptr": "*fp32", "nblk": "i32", "D": "constexpr",
           "BM": "constexpr", "TT": "constexpr", "ASM": "constexpr"}
    const = {"D": D, "BM": BM, "TT": TT, "ASM": 1}
    params = list(inspect.signature(kernel.fn).parameters)
    src = ASTSource(kernel, sig, constexprs={(params.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(3)})
    opts = dict(num_warps=num_warps) if maxnreg is None else dict(num_warps=num_warps, maxnreg=maxnreg)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ins = S.sass(ck.asm["cubin"])
    best = max((collections.Counter(S.opcode(t) for a, t in ins if lo <= a <= hi)
                for lo, hi in S.innermost_loops(ins)), key=lambda c: sum(c.values()))
    return sum(best.values()) / (TT * D * 2 / (32 * num_warps)), S.occupancy(ck, num_warps), best.most_common(12)


def main():
    for D, BM, TT, nw, reg in [(128, 4, 64, 4, 128), (128, 4, 128, 4, 128), (64, 4, 128, 4, 128), (128, 4, 256, 4, 168)]:
        per, occ, top = loop_sass(proto, D, BM, TT, nw, reg)
        print(f"D={D} rows={BM} tt={TT} warps={nw} cap={reg}: {per:.2f} loop SASS per code element; {occ}; {top[:10]}",
              flush=True)


if __name__ == "__main__":
    main()
