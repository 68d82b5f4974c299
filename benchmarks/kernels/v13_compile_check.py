"""Compile the v13 Triton kernels (kernels/v13_triton.py) for sm_90 without a GPU, for every served geometry
(head_dim 64/128, the K/V widths of KAKEYA_FORMAT=v13's defaults and per-layer upgrades, query tiles 4 and 16).

python benchmarks/kernels/v13_compile_check.py [--quick]   (run without TRITON_INTERPRET; exit 1 on any failure;
--quick: the three heaviest/most distinct configurations, what CI runs)
Reports each configuration's shared memory, registers, spill stack and occupancy (sass_count.occupancy), so a kernel that cannot launch on the H200
(over 227 KB of shared memory) is caught before device time is spent.
"""
from __future__ import annotations

import sys
import time

from compile_check import _compile
from sass_count import occupancy
from kakeya_kernels import v13_triton as V
from kakeya_kv.format import v13_layout

PTR = {"cache_ptr": "*u8", "q_ptr": "*bf16", "tail_k_ptr": "*bf16", "tail_v_ptr": "*bf16", "had_ptr": "*fp32",
       "sgn_ptr": "*fp32", "ktab_ptr": "*fp32", "vtab_ptr": "*fp32", "tab_ptr": "*fp32", "out_ptr": "*fp32",
       "lse_ptr": "*fp32", "dst_ptr": "*bf16", "qpos_ptr": "*i32", "req_ptr": "*i32", "bt_ptr": "*i32",
       "nsealed_ptr": "*i32", "seqlen_ptr": "*i32", "tslot_ptr": "*i32", "page_ptr": "*i32", "dst_idx_ptr": "*i32",
       "scale": "fp32"}


def attn(d, kb, vb, bm, precise):
    lay = v13_layout(d, k_bits=kb, v_bits=vb)
    kl, vl = lay.k, lay.v
    n, D, de, k, L, kbits, segb, kcap = V.geometry(kl)
    vcap = V.geometry(vl)[7]
    const = dict(VOFF=kl.size, N=n, D=D, DE=de, L=L, KC=k, SEGB=segb, SEG_BYTES=kl["seg"].nbytes,
                 O_BASIS=kl["basis"].offset, O_MEAN=kl["mean"].offset, O_CENT=kl["centres"].offset,
                 O_SEG=kl["seg"].offset, O_T=kl["t"].offset, O_NORM=kl["norm"].offset, O_RES=kl["residual"].offset,
                 KBITS=kbits, KRB=kl["residual"].shape[1], KCAP=kcap, K_CNT=kl["outlier_count"].offset if kcap else 0,
                 K_OUT=kl["outliers"].offset if kcap else 0, VBITS=vl.bits, VRB=vl["residual"].shape[1], VCAP=vcap,
                 V_CNT=0, V_OUT=0, BM=bm, TT=32, E=8, PRECISE=precise)
    return _compile(V._v13_attn_kernel, const, PTR, V.attn_warps(d))


def decode(d, bits, kstream):
    lay = v13_layout(d, k_bits=bits, v_bits=bits)
    st = lay.k if kstream else lay.v
    n, D, de, k, L, b, segb, cap = V.geometry(st)
    const = dict(STREAM_OFF=0, N=n, D=D, DE=de, L=L, BITS=b, RB=st["residual"].shape[1], SEGB=segb,
                 SEG_BYTES=st["seg"].nbytes, CAP=cap, O_BASIS=st["basis"].offset, O_MEAN=st["mean"].offset,
                 O_CENT=st["centres"].offset, O_SEG=st["seg"].offset, O_T=st["t"].offset, O_NORM=st["norm"].offset,
                 O_RES=st["residual"].offset, O_CNT=st["outlier_count"].offset if cap else 0,
                 O_OUT=st["outliers"].offset if cap else 0, TT=32, E=8)
    return _compile(V._v13_decode_kernel, const, PTR, 4)


def main(argv=None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    jobs = [(f"attn d{d} k{kb}v{vb} bm{bm} {'precise' if p else 'fast'}", lambda d=d, kb=kb, vb=vb, bm=bm, p=p:
             attn(d, kb, vb, bm, p)) for d in (64, 128) for kb, vb in ((3, 2), (4, 3)) for bm in (4, 16)
            for p in (False, True)]
    jobs += [(f"decode d{d} b{b} {'K' if ks else 'V'}", lambda d=d, b=b, ks=ks: decode(d, b, ks))
             for d in (64, 128) for b in (2, 3) for ks in (True, False)]
    if quick:
        keep = ("attn d128 k3v2 bm16 fast", "attn d64 k3v2 bm4 fast", "decode d128 b3 K")
        jobs = [j for j in jobs if j[0] in keep]
    bad = 0
    for name, fn in jobs:
        t0 = time.time()
        try:
            occ = occupancy(fn(), V.attn_warps(int(name.split()[1][1:])) if name.startswith("attn") else 4)
            print(f"ok   {name}: shared {occ['shared_bytes']} B, regs {occ['regs']}, spill stack "
                  f"{occ['stack_bytes']} B, {occ['programs_per_sm']} programs/SM ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:   # noqa: BLE001 - report every configuration
            bad += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    print(f"{len(jobs) - bad}/{len(jobs)} compile for sm_90")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
