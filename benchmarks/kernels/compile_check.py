"""Compile, for sm_90 and without a GPU, every kernel configuration the GPU parity suite and the bench launch.

python benchmarks/kernels/compile_check.py [--quick] [--v13] [--device-triton [DIR]] [--hashes OUT.json]
    [--against OLD.json]      (run without TRITON_INTERPRET; exit 1 on any failure)
Catches compile errors (shapes, types, shared memory over the 227 KB limit) before device time is spent.
--device-triton: the same compiles in a child process with the GPU image's Triton (DIR, default
KAKEYA_DEVICE_TRITON; made with `pip install --no-deps --target DIR triton==3.6.0`): session 9's prefill launches
compiled with this machine's Triton 3.9 but failed on the H200's 3.6. --v13: also v13_compile_check.py's
configurations. --hashes / --against: a SHA-256 of each configuration's SASS, written / compared with an earlier
run's file (a kernel change meant for one path must leave the others' machine code identical).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sass_count as S
from bench_kernels import SEAL_VARIANTS, SWEEP, short_sweep
from kakeya_kernels import kakeya_triton as K
from kakeya_kernels.variants import CANDIDATES, PREFILL_CANDIDATES, decode_variant, prefill_variant
from kakeya_kv.format import BLOCK_TOKENS, kakeya_layout
from kakeya_v1_3_ppl.tailpages import TailGeometry

SMEM_LIMIT = 227 * 1024
PREFILL_CASES = [(4, 3, 4, False), (3, 2, 4, False), (5, 4, 4, False), (3, 2, 1, False), (3, 2, 4, True),
                 (5, 2, 4, False), (5, 2, 4, True)]     # K5/V2: test_prefill_path_is_the_same_math's widths


def _fits(ck):
    if ck.metadata.shared > SMEM_LIMIT:
        raise RuntimeError(f"{ck.metadata.shared} B of shared memory")
    return ck


def _compile(fn, const: dict, types: dict, num_warps: int, maxnreg=None):
    params = list(inspect.signature(fn.fn).parameters)
    const = {k: v for k, v in const.items() if k in params}
    sig = {p: "constexpr" if p in const else types.get(p, "*i32" if p.endswith("_ptr") else "i32") for p in params}
    src = ASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")})
    opts = dict(num_warps=num_warps) if maxnreg is None else dict(num_warps=num_warps, maxnreg=maxnreg)
    return _fits(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts))


def seal(d, bits, prec, num_stages, maxnreg):
    st = kakeya_layout(d, bits, bits).k
    g, nb = K._group(bits)
    const = dict(HAS_W=0, STREAM_OFF=0, OFF_MEAN=st["mean"].offset, OFF_SCALE=st["scale"].offset,
                 OFF_GAIN=st["gain"].offset, OFF_CODES=st["codes"].offset, D=d, BITS=bits, G=g, NB=nb,
                 N=BLOCK_TOKENS, TT=64, PREC=prec, INDIRECT=0, BF16DOT=1, SNS=num_stages)
    types = {"src_ptr": "*bf16", "dst_ptr": "*u8", "rot_ptr": "*fp32", "mids_ptr": "*fp32", "table_ptr": "*fp32",
             "w_ptr": "*fp32", "hada_ptr": "*bf16", "sgn_ptr": "*fp32"}
    return _compile(K._seal_kernel, const, types, 4 if d <= 64 else 8, maxnreg)


def scratch_decode(d, bits, precise):
    """The scratch path's block decoder (KakeyaKernels.decode_into: indirect pages, _hada rotation when fast)."""
    st = kakeya_layout(d, bits, bits).k
    g, nb = K._group(bits)
    const = dict(STREAM_OFF=0, OFF_MEAN=st["mean"].offset, OFF_SCALE=st["scale"].offset, OFF_GAIN=st["gain"].offset,
                 OFF_CODES=st["codes"].offset, D=d, BITS=bits, G=g, NB=nb, N=BLOCK_TOKENS, TT=32, INDIRECT=1,
                 PRECISE=int(precise), BF16DOT=1, CHUNK=K.SCRATCH_CHUNK, LUT=0 if precise else 4, ASM=1)
    types = {"cache_ptr": "*u8", "out_ptr": "*bf16", "rot_ptr": "*fp32", "table_ptr": "*fp32", "hada_ptr": "*bf16",
             "sgn_ptr": "*fp32", "ptab_ptr": "*i32", "rtab_ptr": "*i32"}
    return _compile(K._decode_kernel, const, types, K.scratch_decode_warps(d))


def combine(d, splits, gqa):
    const = dict(SP=triton.next_power_of_2(splits), D=d, RB=16, GQA=gqa)
    return _compile(K._combine_kernel, const, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "o_ptr": "*bf16"}, 4)


def tail_gather(d, tpp, bt=0):
    """gather_tail_blocks' kernel (KAKEYA_TAIL_STORAGE=pages: a full block's tail copied out before its seal;
    bt: page ids looked up in the block table, the decode step's form)."""
    const = dict(TPP=tpp, D=d, N=BLOCK_TOKENS, TT=64, BT=bt)
    types = {"src_k": "*bf16", "src_v": "*bf16", "dst_k": "*bf16", "dst_v": "*bf16"}
    return _compile(K._tail_gather_kernel, const, types, 4)


def tail_write(d, tpp):
    """write_tail_tokens' kernel (a decode step's new tokens into their tail pages)."""
    const = dict(TPP=tpp, D=d, N=BLOCK_TOKENS)
    types = {"k_ptr": "*bf16", "v_ptr": "*bf16", "dst_k": "*bf16", "dst_v": "*bf16", "slot_ptr": "*i64"}
    return _compile(K._tail_write_kernel, const, types, 1)


def _served(d, v, tpp, gqa=4):
    """A served launch (variants.decode_variant / prefill_variant dict) with tails in pages of tpp tokens."""
    return _fits(S.compile_attn(d, 4, 3, v["lut"], v["tt"], v["num_warps"], bm=v["bm"], maxnreg=v["maxnreg"],
                                fused=v["fused"], gqa=gqa, pf=v.get("pf", False), prefill=v.get("prefill", False),
                                ki8=v.get("ki8", False), tpp=tpp, sub=v.get("sub", 1)))


def jobs(quick: bool):
    """(name, thunk) for every configuration: GPU parity matrix, bench sweep, seal variants, combine kernel."""
    out = []
    for d in (64, 128):
        for gqa in ((3,) if quick else (1, 3, 8)):
            bm = 1 << (gqa - 1).bit_length()
            for lut, fused, m, b, tt, w, precise in [(0, False, None, 16, 64, 8, True), (0, False, None, 16, 64, 8, False),
                                                     (2, True, 80, bm, 64, 8, True), (2, True, 80, bm, 64, 8, False),
                                                     (2, True, 80, bm, 128, 4, False)]:
                out.append((f"parity D={d} gqa={gqa} lut={lut} bm={b} tt={tt} w={w} precise={precise}",
                            lambda *a: _fits(S.compile_attn(a[0], 4, 3, a[1], a[2], a[3], bm=a[4], maxnreg=a[5],
                                                            fused=a[6], precise=a[7], gqa=a[8])),
                            (d, lut, tt, w, b, m, fused, precise, gqa)))
        # Candidates (variants.CANDIDATES: register tables lut 3/4, swapped MMAs) at every bit width a recipe may
        # give a layer, and in the precise mode (swap is ignored there).
        quick_cases = [(4, (4, 3), False, False), (3, (4, 3), False, True)]
        for lut, (kb, vb), precise, swap in quick_cases + ([] if quick else [
                (4, (4, 3), True, True), (4, (3, 2), False, False), (4, (5, 4), False, True), (3, (3, 2), False, True),
                (4, (4, 4), False, False), (2, (3, 2), False, True), (2, (5, 4), False, True)]):
            out.append((f"candidate D={d} lut={lut} k{kb}v{vb} precise={precise} swap={swap}",
                        lambda *a: _fits(S.compile_attn(a[0], a[1], a[2], a[3], 64, 4, bm=4,
                                                        maxnreg=96 if a[0] == 128 else None, fused=True,
                                                        precise=a[4], gqa=4, swap=a[5])),
                        (d, kb, vb, lut, precise, swap)))
        extra = [v for v in short_sweep(d) if v not in SWEEP]      # the opt-in candidates the short sweep times
        for v in (SWEEP[-2:] + extra[-1:] if quick else SWEEP + extra):
            out.append((f"bench D={d} {v}", lambda *a: _fits(S.compile_attn(a[0], 4, 3, a[1]["lut"], a[1]["tt"],
                                                                            a[1]["num_warps"], bm=a[1]["bm"],
                                                                            maxnreg=a[1]["maxnreg"],
                                                                            fused=a[1]["fused"],
                                                                            swap=a[1].get("swap", False),
                                                                            pf=a[1].get("pf", False),
                                                                            ns=a[1].get("num_stages", 1))),
                        (d, v)))
        # Prefill launches (variants.PREFILL_CANDIDATES: bench --prefill and KAKEYA_PREFILL_VARIANT) at the widths and
        # GQA of the GPU parity tests (tests/test_prefill_variants.py) and k5v4 (the pair table inside lut 4); the
        # quick set's sm_90 check is that test file's (spills, occupancy).
        # The scratch candidate's attention is the exact-page launch (pages decoded by scratch_decode below).
        for name, c in ({} if quick else PREFILL_CANDIDATES).items():
            for kb, vb, gqa, precise in PREFILL_CASES:
                out.append((f"prefill {name} D={d} k{kb}v{vb} gqa={gqa} precise={precise}",
                            lambda *a: _fits(S.compile_attn(a[0], a[2], a[3], a[1]["lut"], a[1]["tt"],
                                                            a[1]["num_warps"], bm=a[1]["bm"], maxnreg=a[1]["maxnreg"],
                                                            fused=a[1]["fused"], gqa=a[4], precise=a[5],
                                                            prefill=not a[1].get("scratch"),
                                                            exact=bool(a[1].get("scratch")))),
                            (d, c[d], kb, vb, gqa, precise)))
        # that test's no-PREFILL reference of the fused fast loop on the GPU (32-row tiles: 64 do not compile there)
        if not quick:
            out.append((f"prefill reference D={d} k5v2 bm=32", lambda a: _fits(S.compile_attn(
                a, 5, 2, 4, 32, 4, bm=32, fused=True, gqa=4)), (d,)))
        for bits in (() if quick else (2, 3, 4, 5)):
            for precise in (False, True):
                out.append((f"scratch decode D={d} bits={bits} precise={precise}", scratch_decode, (d, bits, precise)))
        for sv in (SEAL_VARIANTS[1:2] if quick else SEAL_VARIANTS):
            for bits in (4, 3):
                out.append((f"seal D={d} bits={bits} {sv}", seal,
                            (d, bits, sv.get("prec") or "tf32x3", sv.get("num_stages"), sv.get("maxnreg"))))
        # KAKEYA_TAIL_STORAGE=pages: the served launches reading tails from pages (k4v3: 119 / 123 tokens per page)
        tpp = TailGeometry.of(kakeya_layout(d, 4, 3)).tokens_per_page
        for what, v in (("decode", decode_variant("tuned", d, True)), ("decode lloyd", decode_variant("tuned", d)),
                        ("prefill", prefill_variant("tuned", d))):
            out.append((f"tail pages {what} D={d} tpp={tpp}", _served, (d, v, tpp)))
        for name in ("ki8_sub2", "ki8_sub4"):       # the small-batch split (candidates; SUB 1 = the default's SASS)
            out.append((f"decode {name} D={d}", _served, (d, CANDIDATES[name][d], 0)))
        out.append((f"tail gather D={d} tpp={tpp}", tail_gather, (d, tpp)))
        out.append((f"tail gather (block table) D={d} tpp={tpp}", tail_gather, (d, tpp, 1)))
        out.append((f"tail write D={d} tpp={tpp}", tail_write, (d, tpp)))
        for splits, gqa in (((3, 4),) if quick else ((1, 4), (3, 4), (33, 4), (8, 3), (8, 1))):
            out.append((f"combine D={d} splits={splits} gqa={gqa}", combine, (d, splits, gqa)))
    return out


def sass_hash(ck) -> str:
    return hashlib.sha256("\n".join(t for _, t in S.sass(ck.asm["cubin"])).encode()).hexdigest()[:16]


def device_run(dirpath: str, argv: list[str]) -> int:
    """This script again, in a child process whose `import triton` finds the Triton in dirpath first."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([dirpath] + [p for p in [env.get("PYTHONPATH")] if p])
    env["COMPILE_CHECK_TRITON_DIR"] = dirpath       # the child checks that it really imported this one
    return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env).returncode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a subset (CI)")
    ap.add_argument("--v13", action="store_true", help="also v13_compile_check.py's configurations")
    ap.add_argument("--device-triton", nargs="?", const="", metavar="DIR",
                    help="compile with the Triton in DIR (default: KAKEYA_DEVICE_TRITON) instead of this one")
    ap.add_argument("--hashes", metavar="OUT", help="write {configuration: SASS SHA-256} to OUT (JSON)")
    ap.add_argument("--against", metavar="OLD", help="list the configurations whose SASS differs from OLD's")
    a = ap.parse_args()
    if a.device_triton is not None:
        from kakeya_kv.config import device_triton
        path = a.device_triton or device_triton()
        if not path:
            sys.exit("--device-triton: give DIR or set KAKEYA_DEVICE_TRITON")
        argv = [x for x in sys.argv[1:] if not x.startswith("--device-triton") and x != a.device_triton]
        sys.exit(device_run(str(path), argv))
    want = os.environ.get("COMPILE_CHECK_TRITON_DIR")
    if want and not os.path.realpath(triton.__file__).startswith(os.path.realpath(want)):
        sys.exit(f"imported Triton {triton.__version__} from {triton.__file__}, not from {want}")
    t0, failed, hashes = time.time(), [], {}
    todo = jobs(a.quick)
    for name, fn, args in todo:
        try:
            ck = fn(*args)
            if a.hashes or a.against:
                hashes[name] = sass_hash(ck)
        except Exception as e:  # noqa: BLE001 - report every failure
            failed.append(name)
            print("FAILED", name, repr(e)[:400], flush=True)
    where = f"Triton {triton.__version__} ({os.path.dirname(os.path.dirname(triton.__file__))})"
    print(f"{len(todo) - len(failed)}/{len(todo)} configurations compile for sm_90 with {where} "
          f"({time.time() - t0:.0f} s)")
    if a.hashes:
        with open(a.hashes, "w") as f:
            json.dump({"triton": triton.__version__, "sass_sha256": hashes}, f, indent=1)
    if a.against:
        with open(a.against) as f:
            old = json.load(f)["sass_sha256"]
        common = sorted(set(old) & set(hashes))
        changed = [n for n in common if old[n] != hashes[n]]
        print(f"SASS vs {a.against}: {len(common) - len(changed)}/{len(common)} configurations identical"
              + "".join(f"\n  changed: {n}" for n in changed))
    bad = bool(failed)
    if a.v13:
        import v13_compile_check
        bad |= v13_compile_check.main(["--quick"] if a.quick else []) != 0
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
