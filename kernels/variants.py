"""Decode-attention launch variants: the measured default per head_dim and the previous path.

A variant = kernel knobs (lut, fused, tt, num_warps, maxnreg; see kakeya_triton.KakeyaKernels) + the planner's
rows per query tile ``bm`` + the KV split rule (``waves`` = target programs per SM, None = a fixed split count).

"tuned" is the winner of the H200 sweeps (k4v3, batch 16, context 16k, CUDA-graph replay); see TUNED below. Session 6
(benchmarks/results/kernels_h200_session6.json) found the pair-table launch (lut 2: D=128 484 µs vs 981 µs for the
previous path, D=64 262 vs 745 µs); session 7 (benchmarks/results/kernels_h200_session7.json) measured the centroid
tables held in registers (lut 4, the "reg4" candidate) faster again, same run: D=64 216.0 vs 258.9 µs, D=128 425.2 vs
480.6 µs, outputs within 4e-5 of the baseline's. Codes wider than 4 bits (k5) keep the pair table inside lut 4.
"baseline" is the backend path of sessions 2-5 (bm 16, 8 splits). KAKEYA_DECODE_VARIANT picks one (or
candidate:NAME, one of CANDIDATES below, to serve a sweep candidate without a code change).
"""
from __future__ import annotations

import math

BASELINE = dict(lut=0, fused=False, tt=64, num_warps=8, maxnreg=None, bm=16, waves=None)
FIXED_SPLITS = 8   # the baseline's split count (waves None)
PAIR_TABLE = {128: dict(lut=2, fused=True, tt=64, num_warps=4, maxnreg=96, bm=4, waves=2),     # session 6's winner
              64: dict(lut=2, fused=True, tt=64, num_warps=4, maxnreg=None, bm=4, waves=2)}
REG4 = {d: dict(v, lut=4) for d, v in PAIR_TABLE.items()}   # session 7's winner, the default until session 8
# Session 8 (H200, same run, b16 ctx16k, benchmarks/results/vllm_s8/kernels_suite/): per head_dim, the best of the
# candidates that keep the grid (split rule) unchanged, so the gain should not depend on the batch/context shape:
# D=64 "pf" 181.6 vs REG4 218.2 µs (-17 %), D=128 "t128_reg4" 396.2 vs 425.0 µs (-7 %); outputs within 1.6e-4 of
# the baseline's. ("fill" was faster at D=128, 363.9 µs, but changes the grid and was 36 % slower at D=64: it stays
# a candidate until a grid run.) The goal grid of that run used REG4.
# Session 9 (H200, benchmarks/results/vllm_s9/late/kernels.json; device Triton 3.6): register-capped launches sized
# to one full wave of resident programs ("fill") won; `--grid goal16k --grid-variant best` timed each winner next to
# session 8's default in the same rows, µs: D=64 "t128_fill4" b16 181.2 vs 182.1, **b64 695.1 vs 845.3** (-18 %);
# D=128 "pf_r128_fill4" b16 367.8 vs 394.9 (-7 %), b64 1408.3 vs 1444.4 (-2.5 %); outputs within 3.5e-4 of the
# baseline's. (Sweep b16 16k, same call: D=64 t128_fill4 180.7, pf 181.9, pf_r128_fill4 181.9, fill 188.2, t128
# 202.8, w8_r80 210.3; D=128 pf_r128_fill4 362.5, fill 363.8, t128_fill4 371.0, w8_r80 386.7, t128 395.4, pf 413.8.)
# Contexts 64k / 128k were not timed with them; the split rule (num_splits) gives one wave at any batch.
# Session 8's D=128 default stays available as candidate:t128_reg4 (its D=64 one, "pf", left the sweep in session 11).
TUNED = {64: dict(REG4[64], tt=128, maxnreg=128, waves=None, fill=4),
         128: dict(REG4[128], pf=True, maxnreg=128, waves=None, fill=4)}
NAMES = ("tuned", "baseline")
# Opt-in candidates for GPU sweeps (KAKEYA_DECODE_VARIANT=candidate:NAME serves one, for experiments). Session 7 timed session 6's pair-table
# launch (PAIR_TABLE), "reg4" (then TUNED, now REG4: centroid tables in registers as byte planes) and "swap" (the
# sealed-block MMAs with the codes as the M operand: a 4-row query tile pads to N = 8, not M = 16) over 128-token
# tiles with V's table in registers ("swap_t128_reg3", lut 3: codes of <= 3 bits; "swap_t128" with the pair table,
# 234.4 / 441.6 µs below, is dropped: the register tables beat it).
# Session 7 (H200, µs at b16 ctx16k, D=64 / D=128): pair table 258.9 / 480.6, reg4 216.0 / 425.2, swap 260.7 / 484.7,
# swap_t128 234.4 / 441.6, swap_t128_reg3 224.9 / 412.1; the 2-stage pipelining probe 541.0 / 1415.6.
# Session 8 (same run, µs D=64 / D=128): swap_t128_reg3 227.4 / 411.6 and pf_fill 234.8 / 378.5 lost to
# swap_t128_reg4 / pf and to fill: dropped from the sweep.
# Session 9 (same run, µs D=64 / D=128, benchmarks/results/vllm_s9/kernels_suite/; FA3 bf16 129.4 / 244.1): TUNED
# 181.5 / 396.2, t128_reg4 204.7 / -, pf - / 412.8, swap_t128_reg4 208.7 / 405.0, fill 297.6 / 363.5, t128_w8
# 364.1 / 430.8, pf_w8 274.2 / 466.2, linear 189.5 / 380.5 (lut 4 on the same uniform cache 182.1 / 398.7).
# Dropped: t128_w8, pf_w8 and swap_t128_reg4 (lost to t128_reg4 in sessions 8 and 9 at both head_dims).
# Why the 8-warp launches and fill at D=64 lost: the device compiles with Triton 3.6 (torch 2.11's pin), whose register
# counts differ from this repo's CPU Triton 3.9 (benchmarks/kernels/occupancy_grid.py, PYTHONPATH=/tmp/tri36,
# benchmarks/results/KERNELS_OCCUPANCY_PROXY.md): t128_w8 takes 167 registers there at D=64 (1 program of 8 warps/SM) and 128 at D=128 (2),
# pf_w8 120 / 128 (2 / 2), so waves 2 (3 splits = 384 programs at batch 16 on 132 SMs) ran as 3 or 2 waves; fill at D=64
# (uncapped REG4: 146 registers on 3.6, 122 on 3.9) held 3 programs/SM, not the 4 it assumed, so its 512 programs ran as
# two waves. The kernel is latency-bound (~23 % of the SM's issue rate), so the candidates added after that run raise
# resident warps with a register cap (occupancy then does not depend on the Triton version: tests/test_kernel_bench.py)
# and size the grid to one full wave at that occupancy ("fill"); numbers below are the sm_90 compile with Triton 3.6
# (CPU PROXY, not speeds), k4v3, as (registers, loop spill instructions, programs/SM, warps/SM, loop SASS per code
# element): TUNED D=64 (163, 0, 3, 12, 8.39), D=128 (128, 20, 4, 16, 6.76; its waves-2 grid uses 2.9 of the 4 slots).
# k3v2 and k5v4 keep the same occupancy (no loop spill at D=64).
CANDIDATES = {"t128_reg4": {d: dict(v, tt=128, maxnreg=128 if d == 128 else None) for d, v in REG4.items()},
              # One full wave of 4-warp programs at a cap of 96 registers: 5 programs (20 warps)/SM. D=128: the
              # session-9 best (363.5 µs; 3.6: 13 loop spills, 7.28 SASS/element); D=64 (changed after that run, was the
              # uncapped REG4 with fill 4, see above): no loop spill, 8.31 SASS/element, 7 blocks per program at b16 16k
              # vs TUNED's 11.
              "fill": {d: dict(REG4[d], maxnreg=96, waves=None, fill=5) for d in REG4},
              # Not yet timed: TUNED's D=128 launch (128-token tiles, cap 128) with one full wave of
              # its 4 programs/SM (TUNED's waves 2 fills 2.9): same kernel, 8 blocks per program instead of 11;
              # D=64 the same launch: 4 programs/SM (uncapped t128_reg4: 3), 0 loop spills, 7.52 SASS/element.
              "t128_fill4": {d: dict(REG4[d], tt=128, maxnreg=128, waves=None, fill=4) for d in REG4},
              # Not yet timed: the prefetch (D=64's TUNED) at a cap of 128: 4 programs/SM in one wave instead of 3
              # (D=64: 0 loop spills, 8.97 SASS/element vs 8.39) / 2 (D=128: 17 spills, 7.70 vs pf's 7.20 at 255
              # registers).
              "pf_r128_fill4": {d: dict(REG4[d], pf=True, maxnreg=128, waves=None, fill=4) for d in REG4},
              # TUNED without the centroid lookup (lut 7, "linear"; session 9 above: -5 % at D=128, +4 % at D=64): codes
              # of 2-4 bits decode to 1024 + 2 j + 1 in fp16 by a bit trick (a prmt + a lop3 per pair of codes), the
              # offset 1024 + 2^b is taken off once per block, the grid step Delta / 2 rides on the per-token gains.
              # ONLY for caches sealed with uniform-grid tables (lloyd_max.uniform_table; KakeyaKernels refuses other
              # tables); the bench times it, and lut 4 for reference, on such a cache. sm_90 compile (sass_count.py,
              # Triton 3.9): loop SASS instructions per code element per thread, TUNED -> lut 7 (lut 5 = exact fp16
              # subtract, lut 6 = integer convert): D=64 k4v3 7.81 -> 7.75 (7.78, 11.92), k3v2 7.81 -> 8.66 (8.77,
              # 12.67); D=128 k4v3 5.66 -> 5.67 (5.87, 19.29), k3v2 5.25 -> 6.01 (6.25, 24.73); 128 registers everywhere
              # (D=64 k3v2: TUNED 134 -> 3 programs/SM, lut 7 128 -> 4), spill instructions in the loop D=128 k4v3 19 ->
              # 15, k3v2 4 -> 5. The prmt lookup it removes was ~1.9 of those instructions per element; the rest
              # (unpack, layout moves: IMAD/MOV) stays, so expect little unless the GPU disagrees.
              # Session 13 (H100, tests/test_linear_decode.py on the GPU): lut 7 misses the float64 bound (1e-2 in
              # output dim 0), lut 5 and 6 pass: the tensor cores' fp32 accumulation truncates, so summing the
              # always-positive p x (1024 + ...) products leaves a bias that survives taking the offset off (a constant
              # in the rotated V accumulator, i.e. dim 0 after the inverse Hadamard). The candidate is lut 5 since;
              # the kernel refuses lut 7 on the GPU.
              "linear": {d: dict(v, lut=5) for d, v in TUNED.items()},
              # Session 12 (not yet timed): TUNED with the K scores from int8 MMAs of the raw 4-bit code nibbles
              # (kakeya_triton KI8: the rotated query split into int8 hi + lo parts per row; no per-code decode of K),
              # V as TUNED (lut 4, any table). ONLY for 4-bit K sealed with the uniform grid (lloyd_max.uniform_table;
              # KakeyaKernels refuses other K tables); the bench times it on the uniform-table cache next to the
              # same launch without ki8. No register prefetch: with it, D=128 spills again (sm_90 / Triton 3.6
              # compile, k4v3, loop SASS per code element: TUNED 7.70 (17 loop spills), ki8 with pf 7.54 (5), ki8
              # without pf 5.67 (0), 4 programs/SM each; D=64 TUNED 7.52 -> ki8 6.48). The decoded-K path without pf
              # (r168_fill3) was 6.66.
              "ki8": {d: dict(v, ki8=True, pf=False) for d, v in TUNED.items()}}
# Session 15 (not yet timed): the default (ki8) with each sealed block split into 4 work items of 128 tokens
# (_attn_kernel SUB), for small batches: the full grid on an H100 had batch 1 at 0.38-0.85x FA3 (16k, D=128: 74.1 vs
# 33.6 us), likely (inferred from the launch shape, not profiled) because one request gives only 8 heads x blocks
# programs of one whole block each (a 512-token block is one program's latency). Each item re-rotates the query and undoes the V transform, so large batches should lose: the
# bench's full grid decides where (if anywhere) the default should take it. SUB 1 compiles to the same SASS as before
# (compile_check --against, 184/184 identical).
CANDIDATES["ki8_sub4"] = {d: dict(v, sub=4) for d, v in CANDIDATES["ki8"].items()}
CANDIDATES["ki8_sub2"] = {d: dict(v, sub=2) for d, v in CANDIDATES["ki8"].items()}
# Candidates for small batches, timed over the decode grid (bench --grid-variant), not in the batch-16 sweep.
GRID_ONLY = ("ki8_sub2", "ki8_sub4")
# Session 7's default (REG4, "reg4") left the sweep for "linear" (<= 8 variants per head_dim); TUNED vs REG4 is
# measured in the session 8 numbers above.
# Session 12: "r168_fill3" (D=128: no prefetch, cap 168, fill 3; spill-free) and "swap_r168_fill3" (the same with swap)
# left the sweep for "ki8" after losing in session 11 (H100, b16 16k: 361.2 and 374.6 µs vs TUNED 359.0): removing
# TUNED's spills gained nothing; swap was slower. Their definitions (for KAKEYA_DECODE_VARIANT experiments) are in
# RETIRED below.
RETIRED = {"r168_fill3": {128: dict(REG4[128], maxnreg=168, waves=None, fill=3), 64: dict(TUNED[64])},
           "swap_r168_fill3": {128: dict(REG4[128], maxnreg=168, waves=None, fill=3, swap=True),
                               64: dict(TUNED[64])}}
# Relative difference allowed between two variants' outputs on the same inputs (the bench's acceptance bound and
# the parity tests'): bf16 outputs of the same math differ by rounding (~2e-3 relative); more means broken.
ACCEPT_REL = 1e-2
KERNEL_KEYS = ("lut", "fused", "tt", "num_warps", "maxnreg", "swap", "pf", "prefill", "scratch", "ki8", "vi8", "sub")   # swap, pf: not
# in BASELINE (swap: no candidate since session 9, the kernel keeps it); prefill, scratch: only in PREFILL_CANDIDATES


CANDIDATE_PREFIX = "candidate:"    # KAKEYA_DECODE_VARIANT=candidate:NAME serves an opt-in candidate (experiments)


# The tuned launch where the kernel set's K is 4-bit on the uniform grid (KakeyaConfig.int8_k_scores; KAKEYA_K_GRID=
# auto gives that grid to 4-bit K without a calibration bundle): TUNED with int8 K scores (H100, session 12: b16 16k
# -17 % at D=128, -12 % at D=64, same cache).
TUNED_KI8 = CANDIDATES["ki8"]


def decode_variant(name: str, head_dim: int, int8_k: bool = False) -> dict:
    """The variant `name` (tuned, baseline or candidate:NAME) at this head_dim; int8_k: K is 4-bit on the uniform
    grid, so "tuned" takes TUNED_KI8. head_dims a variant does not cover (256) keep the baseline."""
    if name.startswith(CANDIDATE_PREFIX):
        c = CANDIDATES.get(name[len(CANDIDATE_PREFIX):])
        if c is None:
            raise ValueError(f"decode variant {name!r}: no such candidate (known: {', '.join(sorted(CANDIDATES))})")
        return dict(c.get(head_dim, BASELINE))
    if name not in NAMES:
        raise ValueError(f"decode variant must be one of {NAMES} or {CANDIDATE_PREFIX}NAME, got {name!r}")
    if name == "tuned" and head_dim in TUNED:
        return dict((TUNED_KI8 if int8_k else TUNED)[head_dim])
    return dict(BASELINE)


def kernel_args(v: dict) -> dict:
    """The part of a variant that KakeyaKernels.attention takes per call."""
    return {k: v[k] for k in KERNEL_KEYS if k in v}


def num_splits(v: dict, n_tiles: int, hkv: int, max_blocks: int, sms: int) -> int:
    """KV splits for a launch of n_tiles query tiles x hkv heads, never more than the sealed blocks + tail there are
    to split (max_blocks: a host-known bound, e.g. the block table's width, so a captured decode graph keeps one
    split count per batch size). ``fill`` (resident programs per SM): as many programs as fit in ONE wave (round
    down: a grid of 4.85 programs per SM with 4 resident runs two waves); else ``waves``: about that many programs
    per SM (round up); else a fixed count."""
    tiles = max(1, n_tiles * hkv)
    items = max_blocks * v.get("sub", 1) + 1          # "sub": each sealed block is that many work items
    if v.get("fill"):
        return max(1, min(items, v["fill"] * sms // tiles))
    if v.get("waves") is None:
        return FIXED_SPLITS
    return max(1, min(items, math.ceil(v["waves"] * sms / tiles)))


# Prefill / mixed-step launches (KAKEYA_PREFILL_VARIANT: "tuned" = PREFILL_TUNED below, the default, timed at kernel
# level; "baseline" = the previous path, the fallback). A prefill phase's queries are many tokens of one request over
# the same sealed blocks, so a tile of bm rows (bm / GQA tokens x the GQA heads of one KV head) decodes each sealed
# 64-token K/V tile once for all of its rows: the baseline (bm 16 = 4 tokens at GQA 4) decodes every sealed block once
# per 4 tokens. "prefill": the kernel's PREFILL path (query rows re-read per block instead of held in registers; tail
# loop bounded by the tile's last query position; codes stored for the MMA through an int16 bitcast: with 64-row tiles
# the MMAs are Hopper wgmma, and Triton 3.6 could not compile the decode path's join -> reshape there, see _dec16's
# FLAT). waves = the compiled occupancy (programs per SM) with the H200 image's Triton 3.6 (torch 2.11's pin), so a
# phase's grid fills one wave per split (Triton 3.9 holds 3 programs of q16 at D=64, 3.6 only 2: 208 registers). sm_90
# compile (benchmarks/kernels/sass_count.py, k4v3; tests/test_prefill_variants.py checks spills and occupancy): SASS
# warp-instructions of the sealed loop per query token per 64 cached tokens, D=64 / 128, Triton 3.6: baseline 1064 /
# 1770, q16 603 / 941, q64 239 / 490, q128 210 / 257 (3.9: 922 / 1448, 538 / 821, 246 / 506, 218 / 264); a proxy for
# the decode work saved, not a speed. Session 9's first H200 call failed to compile q64 / q128 (Triton 3.6, before the
# FLAT fix); its late call timed them (PREFILL_TUNED below).
_PF = dict(lut=4, fused=True, maxnreg=None, prefill=True)
PREFILL_CANDIDATES = {
    # register-table lookups at the baseline's tile: the lookup's share of the gain, without the tile's
    "q16": {64: dict(_PF, tt=64, num_warps=4, bm=16, waves=2), 128: dict(_PF, tt=64, num_warps=4, bm=16, waves=2)},
    # 16 tokens x GQA 4 per tile (D=64: 4 warps, tt 32 — no spill in the loop; D=128: 8 warps, no spill in the loop)
    "q64": {64: dict(_PF, tt=32, num_warps=4, bm=64, waves=2), 128: dict(_PF, tt=64, num_warps=8, bm=64, waves=1)},
    # 32 tokens x GQA 4 per tile (8 warps, tt 32: no spill in the loop at either head_dim)
    "q128": {64: dict(_PF, tt=32, num_warps=8, bm=128, waves=1), 128: dict(_PF, tt=32, num_warps=8, bm=128, waves=1)},
    # Timed in session 10 (below); not yet run in vLLM. Decode once, then attend (kakeya_kernels.scratch): the sealed
    # blocks a launch reads are decoded into bf16 exact pages once per launch (q128 decodes each block once per
    # 32-token tile: 16 times for a 512-token chunk), then the exact-page kernel runs over them + the exact tail in
    # 32-token x GQA 4 tiles. Costs a bf16
    # scratch of (sealed blocks + 1) x Hkv x 2 x 512 x D per launch (KAKEYA_SCRATCH_MIB caps it). lut / prefill are
    # not read on this path (exact pages). sm_90 compile of the exact-page launch with Triton 3.6 (3.9): D=64 120
    # (125) registers, 2 programs/SM; D=128 160 (166), 1/SM; no spills; the decode kernel is compile_check's.
    "scratch": {64: dict(lut=0, fused=True, tt=64, num_warps=8, maxnreg=None, bm=128, waves=2, scratch=True),
                128: dict(lut=0, fused=True, tt=32, num_warps=8, maxnreg=None, bm=128, waves=1, scratch=True)},
    # Session 11: the same decode into the scratch, then vLLM's FlashAttention varlen (FA3 on sm_90) over its pages
    # instead of our exact-page kernel. Needs vLLM's FlashAttention (the kit); the bench records an error without it.
    # H100 (benchmarks/results/vllm_s11/kernels/), µs, D=128 16k / 1 request / chunk 512: scratch_fa 640, scratch
    # 870, q128 1251, FA3 bf16 217; the fastest launch in all 14 rows that fit the 512 MiB scratch (D=128: 0.30-0.35x
    # FA3, 1.7-2.0x q128; D=64: 0.36-0.56x FA3, 1.6-2.8x q64). By difference (not profiled), most of its time is the
    # block decode and tail copy (640 - 217 µs; computed: the bf16 bytes the decode writes take ~30 µs at copy
    # bandwidth):
    # _decode_kernel (one 8-warp program per block x head, global-table gather) is the next thing to speed up.
    # In vLLM (Qwen3-8B-like, H100): prefill 15 674 tok/s vs the tuned launch's 14 926 (+5 %), bf16 36 771; it also
    # costs its 512 MiB reservation (capacity -1.1 %) and changed greedy tokens on 1 of 5 prompts beyond the near-tie
    # rule (tests/test_vllm_scratch_gpu.py). Not the default.
    "scratch_fa": {d: dict(lut=0, fused=True, tt=64, num_warps=8, maxnreg=None, bm=128, waves=1, scratch="flash")
                   for d in (64, 128)},
}
# Session 9 (H200, benchmarks/results/vllm_s9/late/kernels.json "prefill", k4v3, µs per 512-token chunk of one request
# against a 16k context): D=128 baseline 6525, q16 3425, q64 2125, q128 1277, FA3 bf16 220; D=64 baseline 4648, q16
# 2024, q64 649, q128 646, FA3 221. Every candidate within 5.4e-4 of the baseline launch's output in all 16 rows
# (chunk 512 / 2048 x 1 / 4 requests x 16k / 32k). q128 was the fastest at D=128 in all 8 rows; at D=64 q64 took at
# most q128's time in 7 of 8 (the exception: 649 vs 646 above) and needs half the tile's rows. Kernel timings only:
# no prefill candidate has run inside vLLM on a GPU yet.
# Session 10 (H100 80GB HBM3, benchmarks/results/vllm_s10/kernels/kernels.json "prefill", no vLLM kit: the bf16
# baseline is torch SDPA, not FA3), µs: "scratch" was the fastest launch in all 9 rows timed — D=128 16k / 1 request /
# chunk 512: scratch 874, q128 1268, q64 2115, baseline 6383, SDPA 445; D=128 32k / 4 requests / chunk 2048: scratch
# 26394 vs q128 39772, SDPA 14069 (0.47-0.53x SDPA over the 8 D=128 rows); D=64 16k / 1 / 512: scratch 405, q128 644,
# SDPA 291. Every candidate agreed with the baseline launch (scratch within 4.8e-3: bf16 pages, as FA's cache). It is
# not the default yet: it has not run inside vLLM, its scratch is allocated after vLLM's memory profiling, and a phase
# whose sealed blocks exceed KAKEYA_SCRATCH_MIB is an error instead of falling back to q128.
PREFILL_TUNED = {64: PREFILL_CANDIDATES["q64"][64], 128: PREFILL_CANDIDATES["q128"][128]}
PREFILL_NAMES = ("tuned", "baseline")


def prefill_variant(name: str, head_dim: int) -> dict:
    """The launch of prefill / mixed steps: "tuned" (the default: PREFILL_TUNED), "baseline" (the previous path) or
    candidate:NAME of PREFILL_CANDIDATES; head_dims neither covers (256) keep the baseline."""
    if name.startswith(CANDIDATE_PREFIX):
        c = PREFILL_CANDIDATES.get(name[len(CANDIDATE_PREFIX):])
        if c is None:
            raise ValueError(f"prefill variant {name!r}: no such candidate (known: "
                             f"{', '.join(sorted(PREFILL_CANDIDATES))})")
        return dict(c.get(head_dim, BASELINE))
    if name not in PREFILL_NAMES:
        raise ValueError(f"prefill variant must be one of {PREFILL_NAMES} or {CANDIDATE_PREFIX}NAME, got {name!r}")
    return dict(PREFILL_TUNED[head_dim]) if name == "tuned" and head_dim in PREFILL_TUNED else dict(BASELINE)
