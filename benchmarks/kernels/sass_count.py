"""Instruction-count proxy for decode-attention variants, without a GPU.

Compiles ``_attn_kernel`` for sm_90 (Triton + its bundled ptxas), disassembles the cubin (cuobjdump) and
counts the SASS instructions of the sealed-block token loop (the innermost loop that reads code bytes) per
code element per thread. A proxy only: it ignores latency, occupancy and memory; speed needs the GPU.

python benchmarks/kernels/sass_count.py [--json OUT] [--d 64 128] [--lut 0 1 2]
The H200 image compiles with Triton 3.6 (torch 2.11's pin), whose registers (hence occupancy, spills) differ from
this machine's 3.9: PYTHONPATH=$KAKEYA_DEVICE_TRITON python benchmarks/kernels/sass_count.py counts with that one.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import inspect
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kakeya_kernels import kakeya_triton as K
from kakeya_kv import lloyd_max
from kakeya_kv.format import BLOCK_TOKENS, exact_layout, kakeya_layout

_PTR_TYPES = {"q_ptr": "*bf16", "tail_k_ptr": "*bf16", "tail_v_ptr": "*bf16", "cache_ptr": "*u8",
              "hada_ptr": "*bf16", "sgn_ptr": "*fp32", "rot_ptr": "*fp32", "out_ptr": "*fp32", "lse_ptr": "*fp32", "ktab_ptr": "*fp16", "vtab_ptr": "*fp16"}

_ALIGNED_INTS = {"q_row", "q_head", "c_page", "c_head", "t_slot", "t_head", "t_tok", "o_row", "o_head", "o_split"}


def compile_attn(d: int, kb: int, vb: int, lut: int, tt: int = 64, num_warps: int = 8, bm: int = 16, arch: int = 90,
                 maxnreg: int | None = None, mod=K, fused: bool = False, precise: bool = False, gqa: int = 4,
                 swap: bool = False, ns: int = 1, pf: bool = False, prefill: bool = False, exact: bool = False,
                 ki8: bool = False, vi8: bool = False, tpp: int = 0, sub: int = 1):
    """mod: the kernels module (another version can be loaded with load_kernels(path) to compare). ns: software
    pipeline stages of the block loops (KakeyaKernels.attention's num_stages). exact: the exact-page launch
    (attention_exact: boundary layers, the scratch prefill path). tpp: tokens per page of exact tails read from the
    requests' pages (KAKEYA_TAIL_STORAGE=pages; 0 = per-request tail rows). sub: parts per sealed block (the
    small-batch split, _attn_kernel's SUB)."""
    lay = kakeya_layout(d, kb, vb)
    kl, vl = lay.k, lay.v
    (kg, knb), (vg, vnb) = K._group(kb), K._group(vb)
    const = dict(KV_OFF=exact_layout(d).k.size if exact else kl.size, EXACT=int(exact), BF16DOT=1, K_MEAN=kl["mean"].offset, K_SCALE=kl["scale"].offset,
                 K_GAIN=kl["gain"].offset, K_CODES=kl["codes"].offset, V_MEAN=vl["mean"].offset,
                 V_SCALE=vl["scale"].offset, V_GAIN=vl["gain"].offset, V_CODES=vl["codes"].offset, KBITS=kb, KG=kg,
                 KNB=knb, VBITS=vb, VG=vg, VNB=vnb, D=d, BM=bm, N=BLOCK_TOKENS, TT=tt, PRECISE=int(precise),
                 DIAG=0, LUT=lut, NS=ns, GATHER=int(fused), GQA=gqa if fused else 1, ASM=1, SWAP=int(swap), PF=int(pf),
                 PREFILL=int(prefill),
                 ROT_PREC="tf32", SPLITS=8,   # these two: older versions
                 KSTEP=1.0, VSTEP=1.0,        # the kernel's defaults (a launch passes them only for lut 5-7)
                 KI8=int(ki8), VI8=int(vi8), TPP=int(tpp), SUB=int(sub))
    # The steps of uniform-grid tables, as KakeyaKernels passes them: both for lut 5-7, K's for ki8, V's for vi8.
    linear = lut in getattr(mod, "LINEAR_LUTS", ())
    if linear or ki8 or vi8:
        ks, vs = mod.linear_steps({"k": lloyd_max.uniform_table(kb), "v": lloyd_max.uniform_table(vb)},
                                  {"k": kb, "v": vb})
        if linear or ki8:
            const["KSTEP"] = ks
        if linear or vi8:
            const["VSTEP"] = vs
    params = list(inspect.signature(mod._attn_kernel.fn).parameters)
    const = {k: v for k, v in const.items() if k in params}
    sig = {}
    for p in params:
        if p in const:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = "*fp32" if precise and p in ("ktab_ptr", "vtab_ptr", "hada_ptr") else _PTR_TYPES.get(p, "*i32")
        else:
            sig[p] = "fp32" if p == "scale" else "i32"
    # As the JIT would specialise a real launch: pointers and strides that are multiples of 16 (not bt_req,
    # l_row, l_head: they depend on the batch and the split count).
    aligned = [i for i, p in enumerate(params) if sig[p].startswith("*") or p in _ALIGNED_INTS]
    src = ASTSource(mod._attn_kernel, sig, constexprs={(params.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    opts = dict(num_warps=num_warps) if maxnreg is None else dict(num_warps=num_warps, maxnreg=maxnreg)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def sass(cubin: bytes) -> list[tuple[int, str]]:
    text = _cuobjdump(cubin, "-sass")
    return [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def occupancy(ck, num_warps: int) -> dict:
    """Registers/thread (ptxas), shared bytes/program (Triton) -> resident warps per SM on an H100/H200
    (64K registers, 228 KB shared, 64 warps, 32 programs per SM; registers allocated in units of 8)."""
    usage = _cuobjdump(ck.asm["cubin"], "-res-usage")
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))      # register spills live on the stack
    shared = int(ck.metadata.shared)
    by_regs = 65536 // (-(-regs // 8) * 8 * 32 * num_warps)
    by_smem = (228 * 1024) // max(shared + 1024, 1)
    programs = max(0, min(by_regs, by_smem, 64 // num_warps, 32))
    return {"regs": regs, "stack_bytes": stack, "shared_bytes": shared, "programs_per_sm": programs, "warps_per_sm": programs * num_warps}


def innermost_loops(ins):
    """(start, end) address ranges of backward branches that contain no other backward branch."""
    loops = []
    for a, t in ins:
        m = re.search(r"BRA\s+(?:`\()?\.?L?_?x?_?\w*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            loops.append((int(m.group(1), 16), a))
    return [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]


def opcode(t: str) -> str:
    t = re.sub(r"^@!?U?P\w+\s+", "", t.strip())
    op = t.split()[0]
    keep = ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "HMMA")
    return op if op.startswith(keep) else op.split(".")[0]


def load_kernels(path: str):
    spec = importlib.util.spec_from_file_location("kakeya_triton_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def count(d: int, kb: int, vb: int, lut: int, tt: int = 64, num_warps: int = 8, maxnreg: int | None = None,
          bm: int = 16, mod=K, fused: bool = False, swap: bool = False, pf: bool = False, prefill: bool = False,
          ki8: bool = False, vi8: bool = False) -> dict:
    ck = compile_attn(d, kb, vb, lut, tt, num_warps, bm=bm, maxnreg=maxnreg, mod=mod, fused=fused, swap=swap, pf=pf,
                      prefill=prefill, ki8=ki8, vi8=vi8)
    ins = sass(ck.asm["cubin"])
    best = None
    for lo, hi in innermost_loops(ins):
        ops = collections.Counter(opcode(t) for a, t in ins if lo <= a <= hi)
        # The sealed-block loop is the one that loads code bytes (the tail loop reads bf16 rows).
        if any(o.startswith("LDG.E.U8") for o in ops) and (best is None or sum(ops.values()) > sum(best.values())):
            best = ops
    if best is None:   # all code loads vectorised (4-bit streams, int8 paths): the longest loop that loads at all
        for lo, hi in innermost_loops(ins):
            ops = collections.Counter(opcode(t) for a, t in ins if lo <= a <= hi)
            if any(o.startswith("LDG") for o in ops) and (best is None or sum(ops.values()) > sum(best.values())):
                best = ops
    elems = tt * d * 2 / (32 * num_warps)          # K and V code elements per thread per iteration
    n = sum(best.values())
    spill_loop = best.get("LDL", 0) + best.get("STL", 0)
    spill_all = sum(1 for a, t in ins if opcode(t) in ("LDL", "STL"))
    cat = collections.Counter()
    for o, c in best.items():
        cat["global_load" if o.startswith("LDG") else "shared" if o.startswith(("LDS", "STS", "LDSM", "STSM"))
            else "mma" if o.startswith(("HMMA", "IMMA")) else "barrier" if o == "BAR" else "alu"] += c
    return {"head_dim": d, "k_bits": kb, "v_bits": vb, "lut": lut, "tt": tt, "num_warps": num_warps, "maxnreg": maxnreg, "bm": bm,
            "swap": bool(swap), "ki8": bool(ki8),
            "loop_instructions": n, "per_element": n / elems, "spill_instructions_in_loop": spill_loop,
            "spill_instructions": spill_all,
            "per_element_by_kind": {k: v / elems for k, v in sorted(cat.items())},
            **occupancy(ck, num_warps),
            "top_opcodes": best.most_common(12)}


def candidates_table(path: str, dims, kb: int, vb: int) -> None:
    """The backend's tuned default and every opt-in candidate (kakeya_kernels.variants), per head_dim."""
    from kakeya_kernels.variants import CANDIDATES, TUNED
    out = [f"| variant | head_dim | lut | swap | tt | warps | reg cap | loop SASS instr per code element per thread | "
           "global loads per element | registers | spill LDL/STL in loop | shared KB | resident warps/SM |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in dims:
        for name, v in [("tuned (default)", TUNED[d])] + [(n, c[d]) for n, c in CANDIDATES.items()]:
            r = count(d, kb, vb, v["lut"], v["tt"], v["num_warps"], v["maxnreg"], v["bm"], fused=v["fused"],
                      swap=v.get("swap", False), pf=v.get("pf", False), ki8=v.get("ki8", False))
            out.append(f"| {name} | {d} | {v['lut']} | {'yes' if v.get('swap') else 'no'} | {v['tt']} | "
                       f"{v['num_warps']} | {v['maxnreg'] or '-'} | {r['per_element']:.2f} | "
                       f"{r['per_element_by_kind'].get('global_load', 0):.2f} | {r['regs']} | "
                       f"{r['spill_instructions_in_loop']} | {r['shared_bytes'] / 1024:.0f} | {r['warps_per_sm']} |")
            print(out[-1], flush=True)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--md", help="markdown table of the bench sweep's variants (+ --old) per head_dim")
    ap.add_argument("--old", help="another kakeya_triton.py to compare, e.g. from git show REV:kernels/kakeya_triton.py")
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--candidates", help="markdown table of the backend default vs variants.CANDIDATES per head_dim")
    a = ap.parse_args()
    if a.candidates:
        return candidates_table(a.candidates, a.d, *map(int, a.bits.split(",")))
    from bench_kernels import SWEEP
    kb, vb = map(int, a.bits.split(","))
    old = load_kernels(a.old) if a.old else None
    rows, seen = [], set()
    for d in a.d:
        todo = [("old", dict(lut=0, tt=64, num_warps=8, maxnreg=None, bm=16, fused=False), old)] if old else []
        for v in SWEEP:
            key = (v["lut"], v["tt"], v["num_warps"], v["maxnreg"], v["bm"], v["fused"])
            if key not in seen:
                seen.add(key)
                todo.append(("new", {k: v[k] for k in ("lut", "tt", "num_warps", "maxnreg", "bm", "fused")}, K))
        for name, v, mod in todo:
            r = dict(count(d, kb, vb, v["lut"], v["tt"], v["num_warps"], v["maxnreg"], v["bm"], mod, v["fused"]),
                     kernel=name, fused=v["fused"])
            rows.append(r)
            print(f"{name} D={d} {v}: {r['loop_instructions']} instr/iteration = {r['per_element']:.2f} per code "
                  f"element per thread; regs {r['regs']} (spill LDL/STL {r['spill_instructions_in_loop']} in the loop, "
                  f"{r['spill_instructions']} in all), shared {r['shared_bytes']} B "
                  f"-> {r['warps_per_sm']} warps/SM", flush=True)
        seen.clear()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"what": "SASS instruction counts of the sealed-block token loop, sm_90, compiled on CPU "
                               "(a proxy, not a measurement of speed)", "triton": triton.__version__, "rows": rows},
                      f, indent=1)
    if a.md:
        out = ["| kernel | head_dim | variant | loop SASS instr per code element per thread | registers | spill "
               "LDL/STL in loop (all) | shared KB | resident warps/SM |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            var = (f"lut{r['lut']} {'fused' if r['fused'] else 'torch'} tt{r['tt']} w{r['num_warps']}"
                   f"{' r' + str(r['maxnreg']) if r['maxnreg'] else ''} bm{r['bm']}")
            out.append(f"| {r['kernel']} | {r['head_dim']} | {var} | {r['per_element']:.2f} | {r['regs']} | "
                       f"{r['spill_instructions_in_loop']} ({r['spill_instructions']}) | {r['shared_bytes'] / 1024:.0f} | "
                       f"{r['warps_per_sm']} |")
        with open(a.md, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
