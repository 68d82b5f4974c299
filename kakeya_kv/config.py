"""Every Kakeya knob in one place: environment variables, validated with clear errors.

The vLLM backend, the CLI and the tests all read settings through here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A KAKEYA_* setting is malformed; the message names the variable and the fix."""


def cache_dir() -> Path:
    p = Path(os.environ.get("KAKEYA_CACHE_DIR", Path.home() / ".cache" / "kakeya-kv"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def device_triton(env=None) -> Path | None:
    """KAKEYA_DEVICE_TRITON (CPU tools only): a folder holding the GPU image's Triton, made with
    `pip install --no-deps --target DIR triton==3.6.0`; the sm_90 compile checks then also run with it
    (benchmarks/kernels/compile_check.py --device-triton). Unset = those checks are skipped."""
    env = os.environ if env is None else env
    raw = (env.get("KAKEYA_DEVICE_TRITON") or "").strip()
    if not raw:
        return None
    p = Path(raw).expanduser().resolve()
    if not (p / "triton" / "__init__.py").is_file():
        raise ConfigError(f"KAKEYA_DEVICE_TRITON={raw!r}: {p} holds no triton package; make it with "
                          "`pip install --no-deps --target DIR triton==3.6.0` or unset it")
    return p


def parse_layer_list(name: str, raw: str | None, num_layers: int | None = None) -> tuple[int, ...]:
    """Parse "0,1,26,27" (empty = none). Rejects non-integers, negatives, duplicates, out-of-range."""
    if raw is None or raw.strip() == "":
        return ()
    out = []
    for tok in raw.split(","):
        tok = tok.strip()
        if not tok:
            raise ConfigError(f"{name}={raw!r}: empty entry (use e.g. \"0,1,26,27\")")
        try:
            v = int(tok)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: {tok!r} is not an integer layer index") from None
        if v < 0:
            raise ConfigError(f"{name}={raw!r}: negative layer index {v}")
        if num_layers is not None and v >= num_layers:
            raise ConfigError(f"{name}={raw!r}: layer {v} out of range for a model with {num_layers} layers")
        if v in out:
            raise ConfigError(f"{name}={raw!r}: layer {v} listed twice")
        out.append(v)
    return tuple(sorted(out))


def _int_env(env, name: str, default: int, allowed: tuple[int, ...]) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not an integer (allowed: {allowed})") from None
    if v not in allowed:
        raise ConfigError(f"{name}={raw!r}: must be one of {allowed}")
    return v


def _choice_env(env, name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    v = raw.strip().lower()
    if v not in allowed:
        raise ConfigError(f"{name}={raw!r}: must be one of {', '.join(allowed)}")
    return v


def _decode_variant_env(env) -> str:
    raw = (env.get("KAKEYA_DECODE_VARIANT") or "").strip()
    if raw.lower().startswith("candidate:"):
        from kakeya_kernels.variants import CANDIDATES      # the kernels package ships with this one
        name = raw.split(":", 1)[1]
        if name not in CANDIDATES:
            raise ConfigError(f"KAKEYA_DECODE_VARIANT={raw!r}: no such candidate; known: "
                              f"{', '.join('candidate:' + n for n in sorted(CANDIDATES))}")
        return f"candidate:{name}"
    return _choice_env(env, "KAKEYA_DECODE_VARIANT", "tuned", DECODE_VARIANTS)


K_GRIDS = ("auto", "lloyd", "uniform")


def _k_grid(env, fmt: str, k_bits: int, layer_bits, decode_variant: str, calibration: str | None) -> str:
    """KAKEYA_K_GRID: the K stream's centroid table, resolved here to lloyd (Lloyd-Max for N(0,1)) or uniform
    (lloyd_max.uniform_table: what the int8 K-score decode launch reads; 4-bit K only). auto (the default): uniform
    when the format is kakeya, every compressed layer has 4-bit K and no calibration bundle is named (a bundle may
    bring fitted K tables), else lloyd."""
    grid = _choice_env(env, "KAKEYA_K_GRID", "auto", K_GRIDS)
    widths = sorted({k_bits} | {kb for _, kb, _ in layer_bits})
    if grid == "auto":
        grid = "uniform" if fmt == "kakeya" and widths == [4] and not calibration else "lloyd"
    elif grid != "lloyd" and fmt != "kakeya":
        raise ConfigError(f"KAKEYA_K_GRID={grid!r} applies to KAKEYA_FORMAT=kakeya only (got {fmt!r}); unset it")
    if decode_variant.startswith("candidate:ki8") and (grid != "uniform" or widths != [4]):
        raise ConfigError(f"KAKEYA_DECODE_VARIANT={decode_variant} computes K scores from 4-bit codes on the uniform "
                          f"grid: it needs KAKEYA_K_GRID=uniform or auto (resolved here: {grid!r}) and 4-bit K in "
                          f"every layer (K widths here: {widths})")
    return grid


def _prefill_variant_env(env, fmt: str) -> str:
    """KAKEYA_PREFILL_VARIANT: the launch of prefill / mixed steps of the default format's kernel — tuned (default:
    kakeya_kernels.variants.PREFILL_TUNED), baseline (the previous launch) or candidate:NAME of PREFILL_CANDIDATES.
    Other formats have no such launch: baseline, and any other value is refused."""
    name, raw = "KAKEYA_PREFILL_VARIANT", (env.get("KAKEYA_PREFILL_VARIANT") or "").strip()
    if raw.lower().startswith("candidate:"):
        from kakeya_kernels.variants import PREFILL_CANDIDATES
        cand = raw.split(":", 1)[1]
        if cand not in PREFILL_CANDIDATES:
            raise ConfigError(f"{name}={raw!r}: no such candidate; known: tuned, baseline, "
                              f"{', '.join('candidate:' + n for n in sorted(PREFILL_CANDIDATES))}")
        value = f"candidate:{cand}"
    else:
        value = _choice_env(env, name, "tuned" if fmt == "kakeya" else "baseline", PREFILL_VARIANTS)
    if fmt != "kakeya" and value != "baseline":
        raise ConfigError(f"{name}={raw!r} only applies to KAKEYA_FORMAT=kakeya (format is {fmt}); unset it")
    return value


# Decode-attention launch: "tuned" = the H200 sweeps' winner (register tables, fused, 4-row GQA tiles), the
# default; "baseline" = the path of sessions 2-5; "candidate:NAME" = an opt-in candidate of
# kakeya_kernels.variants.CANDIDATES (experiments). All agree within the bench's bound.
DECODE_VARIANTS = ("tuned", "baseline")
# Prefill / mixed-step launch (kakeya format): "tuned" = kakeya_kernels.variants.PREFILL_TUNED (per head_dim, from
# session 9's kernel timings; the default), "baseline" = the launch before it, "candidate:NAME" = PREFILL_CANDIDATES.
PREFILL_VARIANTS = ("tuned", "baseline")
# Attention of exact (bf16) layers in vLLM: "triton" = our kernel on our page layout (the default); "flash" = vLLM's
# own FlashAttention backend (its page layout, builder and impl), so exact layers round exactly as FLASH_ATTN does.
EXACT_ATTENTIONS = ("triton", "flash")
FORMATS = ("kakeya", "v13", "exact")
EXACT = "exact"   # what KakeyaConfig.layer_bits gives for a layer stored as bf16


def _mib(name: str, raw: str) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not an integer number of MiB (1..1048576)") from None
    if not 1 <= v <= 1 << 20:
        raise ConfigError(f"{name}={raw!r}: must be 1..1048576 MiB")
    return v


def _scratch_mib(env, fmt: str) -> int:
    """KAKEYA_SCRATCH_MIB: MiB of bf16 pages a decode-then-attend launch may decode per phase (kakeya_kernels.scratch:
    KAKEYA_PREFILL_VARIANT=candidate:scratch, v13's KAKEYA_V13_ATTENTION=scratch), 1..1048576, default 512 (v13:
    1024, as before session 11: its decode-path scratch holds every sealed block of a batch). The
    prefill scratch is reserved whole at model load (vLLM counts it as non-KV memory) and a phase that would need
    more runs the tuned prefill launch; v13's scratch grows on demand up to the cap and errors past it.
    KAKEYA_V13_SCRATCH_MIB, its earlier name, stays accepted with KAKEYA_FORMAT=v13; both set must agree."""
    raw = (env.get("KAKEYA_SCRATCH_MIB") or "").strip()
    old = (env.get("KAKEYA_V13_SCRATCH_MIB") or "").strip()
    if old and fmt != "v13":
        raise ConfigError(f"KAKEYA_V13_SCRATCH_MIB={old!r} only applies to KAKEYA_FORMAT=v13 (format is {fmt}); use "
                          "KAKEYA_SCRATCH_MIB or unset it")
    if raw and fmt == "exact":
        raise ConfigError(f"KAKEYA_SCRATCH_MIB={raw!r} has no effect with KAKEYA_FORMAT=exact (nothing is decoded); "
                          "unset it")
    v = _mib("KAKEYA_SCRATCH_MIB", raw) if raw else None
    w = _mib("KAKEYA_V13_SCRATCH_MIB", old) if old else None
    if v is not None and w is not None and v != w:
        raise ConfigError(f"KAKEYA_SCRATCH_MIB={raw!r} and KAKEYA_V13_SCRATCH_MIB={old!r} (its old name) disagree; "
                          "unset KAKEYA_V13_SCRATCH_MIB")
    return v or w or (1024 if fmt == "v13" else 512)


def _v13_attention(env, fmt: str) -> str:
    """KAKEYA_V13_ATTENTION: fused (default) or scratch (the decode-then-attend fallback)."""
    raw = env.get("KAKEYA_V13_ATTENTION")
    if raw is not None and raw.strip() and fmt != "v13":
        raise ConfigError(f"KAKEYA_V13_ATTENTION={raw!r} only applies to KAKEYA_FORMAT=v13 (format is {fmt}); unset it")
    return _choice_env(env, "KAKEYA_V13_ATTENTION", "fused", ("fused", "scratch"))


def _exact_attention(env, fmt: str, boundary: tuple[int, ...]) -> str:
    """KAKEYA_EXACT_ATTENTION: triton (default) or flash; refused where no layer is exact (it would do nothing)."""
    v = _choice_env(env, "KAKEYA_EXACT_ATTENTION", "triton", EXACT_ATTENTIONS)
    if v == "flash" and fmt != "exact" and not boundary:
        raise ConfigError("KAKEYA_EXACT_ATTENTION=flash has no effect: no layer is exact (set KAKEYA_FORMAT=exact or "
                          "KAKEYA_BOUNDARY_SKIP_LAYERS), unset it")
    return v


def _cuda_graphs(env) -> bool | None:
    """KAKEYA_CUDA_GRAPHS: auto (default, None) | 1 | 0. Pure-decode steps planned on the GPU into persistent buffers,
    so vLLM may capture them as full CUDA graphs. auto: on for KAKEYA_FORMAT=kakeya whenever vLLM is not told
    --enforce-eager (cuda_graphs_for); 1 also plans decode on the GPU in eager engines; 0: host-planned, piecewise
    graphs only. Session 14 (H100, suite_job graphs): captured vs compiled 8/8 greedy outputs identical, GPU-planned
    vs host-planned (eager) 8/8; session 13 serving: +3 % at the largest batch, +16 % at batch 16 (32k)."""
    raw = env.get("KAKEYA_CUDA_GRAPHS")
    if raw is None or raw.strip().lower() in ("", "auto"):
        return None
    return bool(_int_env(env, "KAKEYA_CUDA_GRAPHS", 0, (0, 1)))


def cuda_graphs_for(cfg: "KakeyaConfig", enforce_eager: bool) -> bool:
    """Whether decode steps are GPU-planned (full CUDA graphs unless vLLM runs eager): the knob if set, else auto."""
    if cfg.cuda_graphs is not None:
        return cfg.cuda_graphs
    return cfg.format == "kakeya" and not enforce_eager


TAIL_STORAGES = ("pool", "pages")
# The value when KAKEYA_TAIL_STORAGE is unset, for KAKEYA_FORMAT=kakeya (exact and v13 always use "pool"). Read by
# the config and by the plugin's registration (patches.apply), which installs the scheduler's tail-page allocation
# from the environment; switching it to "pages" needs the GPU suites (core, lifecycle incl. preemption, graphs).
TAIL_STORAGE_DEFAULT = "pool"


def _tail_storage(env, fmt: str) -> str:
    """KAKEYA_TAIL_STORAGE: where a request's unsealed (exact bf16) tokens live. pool: one row per --max-num-seqs
    slot in every compressed layer, allocated outside vLLM's KV budget. pages: in the request's own pages after its
    sealed ones, allocated by vLLM's scheduler (kakeya_v1_3_ppl.tailpages), so the reported capacity keeps the
    format's whole ratio (session 15, H100: 4.29x bf16 vs 3.76x with the pool). Environment only: the scheduler's
    allocation is patched when the plugin registers (checks.additional_env refuses it in --additional-config)."""
    if not (env.get("KAKEYA_TAIL_STORAGE") or "").strip():
        return TAIL_STORAGE_DEFAULT if fmt == "kakeya" else "pool"
    v = _choice_env(env, "KAKEYA_TAIL_STORAGE", "pool", TAIL_STORAGES)
    if v == "pages" and fmt != "kakeya":
        raise ConfigError(f"KAKEYA_TAIL_STORAGE=pages applies to KAKEYA_FORMAT=kakeya (got {fmt!r}): the exact "
                          "format has no tails and v13 keeps its own; unset it")
    return v


PREFILL_ATTENDS = ("blocks", "chunk")


def _prefill_attend(env, fmt: str, prefill_variant: str) -> str:
    """KAKEYA_PREFILL_ATTEND: what a prefill chunk's queries read of the chunk's own earlier tokens. blocks (default):
    every 512-token block before the query's own is read compressed, as a later decode step reads it (the chunk runs
    in one phase per block it touches: write, attend, seal). chunk: the scheduled chunk's tokens (and the tail's
    tokens before them) attend each other exact and only blocks sealed in earlier steps are read compressed, as
    vLLM's TurboQuant continuation prefill does; one attention launch per step and one seal of all blocks the chunk
    filled (runtime.forward_span). With 512-token chunks on block boundaries both give the same result. NOT yet
    timed on a GPU; not with the scratch prefill candidates."""
    v = _choice_env(env, "KAKEYA_PREFILL_ATTEND", "blocks", PREFILL_ATTENDS)
    if v == "chunk":
        if fmt != "kakeya":
            raise ConfigError(f"KAKEYA_PREFILL_ATTEND=chunk applies to KAKEYA_FORMAT=kakeya (got {fmt!r}); unset it")
        from kakeya_kernels.variants import PREFILL_CANDIDATES
        cand = prefill_variant.split(":", 1)[1] if prefill_variant.startswith("candidate:") else None
        if cand is not None and any(launch.get("scratch") for launch in PREFILL_CANDIDATES[cand].values()):
            raise ConfigError(f"KAKEYA_PREFILL_ATTEND=chunk does not run the scratch prefill launches "
                              f"(KAKEYA_PREFILL_VARIANT={prefill_variant!r}: they read tails of at most 512 tokens); "
                              "unset one of them")
    return v


def _memory_log(env) -> str | None:
    """KAKEYA_MEMORY_LOG: a file the engine worker appends its torch CUDA memory to (JSON lines, at most one per
    second); its directory must exist. Unset = no log."""
    raw = env.get("KAKEYA_MEMORY_LOG")
    if raw is None or raw.strip() == "":
        return None
    p = Path(raw.strip()).expanduser().resolve()
    if not p.parent.is_dir():
        raise ConfigError(f"KAKEYA_MEMORY_LOG={raw!r}: directory {p.parent} does not exist; create it or unset the "
                          "variable")
    if p.is_dir():
        raise ConfigError(f"KAKEYA_MEMORY_LOG={raw!r}: is a directory; give a file path (e.g. {p / 'memory.jsonl'})")
    return str(p)


def parse_layer_bits(raw: str | None, fmt: str = "kakeya", num_layers: int | None = None,
                     name: str = "KAKEYA_LAYER_BITS") -> tuple[tuple[int, int, int], ...]:
    """Parse "17:4/3,18:4/3,20-24:5/4" -> ((17, 4, 3), (18, 4, 3), (20, 5, 4), ...), sorted by layer.

    Each entry is LAYER or FIRST-LAST (inclusive), then K bits / V bits the format allows.
    """
    if raw is None or raw.strip() == "":
        return ()
    from .format import ALLOWED_BITS
    allowed = ALLOWED_BITS[fmt]
    seen: dict[int, str] = {}
    out = []
    for tok in raw.split(","):
        tok = tok.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?:(\d+)/(\d+)", tok)
        if not m:
            raise ConfigError(f"{name}={raw!r}: bad entry {tok!r} (use LAYER:KBITS/VBITS or FIRST-LAST:KBITS/VBITS, "
                              f"e.g. \"17:4/3,20-24:5/4\")")
        lo = int(m[1])
        hi = int(m[2]) if m[2] is not None else lo
        kb, vb = int(m[3]), int(m[4])
        if hi < lo:
            raise ConfigError(f"{name}={raw!r}: range {tok!r} is empty (first layer after last)")
        if num_layers is not None and hi >= num_layers:
            raise ConfigError(f"{name}={raw!r}: layer {hi} out of range for a model with {num_layers} layers")
        if kb not in allowed["k"] or vb not in allowed["v"]:
            raise ConfigError(f"{name}={raw!r}: {tok!r}: format {fmt} allows K bits {allowed['k']} and "
                              f"V bits {allowed['v']}")
        for layer in range(lo, hi + 1):
            if layer in seen:
                raise ConfigError(f"{name}={raw!r}: layer {layer} set twice ({seen[layer]!r} and {tok!r})")
            seen[layer] = tok
            out.append((layer, kb, vb))
    return tuple(sorted(out))


def format_layer_bits(layer_bits) -> str:
    """Inverse of parse_layer_bits, merging consecutive layers of equal widths into ranges."""
    parts, run = [], []
    for layer, kb, vb in sorted(layer_bits):
        if run and run[-1][0] == layer - 1 and run[-1][1:] == (kb, vb):
            run.append((layer, kb, vb))
            continue
        if run:
            parts.append(run)
        run = [(layer, kb, vb)]
    if run:
        parts.append(run)
    return ",".join((f"{r[0][0]}" if len(r) == 1 else f"{r[0][0]}-{r[-1][0]}") + f":{r[0][1]}/{r[0][2]}"
                    for r in parts)


@dataclass(frozen=True)
class KakeyaConfig:
    format: str = "kakeya"
    k_bits: int = 4
    v_bits: int = 3
    boundary_skip_layers: tuple[int, ...] = ()
    layer_bits: tuple[tuple[int, int, int], ...] = ()   # (layer, k_bits, v_bits) overriding k_bits/v_bits
    skip_layers: tuple[int, ...] = ()
    calibration: str | None = None
    cuda_graphs: bool | None = None  # full CUDA graphs for pure-decode steps; None = auto (cuda_graphs_for)
    scratch_mib: int = 512        # cap of the bf16 decode scratch (kakeya_kernels.scratch: blocks one launch reads)
    v13_attention: str = "fused"  # v13 attention: fused (reads slots) | scratch (decode blocks, then exact pages)
    decode_variant: str = "tuned"  # decode-attention launch (kakeya_kernels.variants): tuned | baseline
    k_grid: str = "lloyd"         # K centroid table as resolved (KAKEYA_K_GRID=auto picks): lloyd | uniform
    prefill_variant: str = "tuned"  # prefill/mixed-step launch: tuned | baseline | candidate:NAME (PREFILL_CANDIDATES)
    exact_attention: str = "triton"  # exact layers in vLLM: triton (ours) | flash (vLLM's FlashAttention backend)
    memory_log: str | None = None  # JSON lines of the engine worker's torch CUDA memory (the soak's leak check)
    # vLLM's default --max-num-seqs (1024 on H100/H200) is lowered until the exact-tail pool takes at most this
    # percentage of GPU memory (an explicit --max-num-seqs is kept, up to checks.check_tail_pool's 25 % refusal).
    tail_pool_percent: int = 5
    tail_storage: str = "pool"    # exact tails: pool (per-slot rows, outside vLLM's budget) | pages (request's pages)
    prefill_attend: str = "blocks"  # a prefill chunk's own earlier tokens: blocks (read compressed) | chunk (exact)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env=None, num_layers: int | None = None) -> "KakeyaConfig":
        env = os.environ if env is None else env
        fmt = env.get("KAKEYA_FORMAT", "kakeya").strip().lower() or "kakeya"
        if fmt == "default":
            fmt = "kakeya"
        if fmt not in FORMATS:
            raise ConfigError(f"KAKEYA_FORMAT={fmt!r}: unknown format (allowed: default, {', '.join(FORMATS)})")
        from .format import ALLOWED_BITS
        boundary = parse_layer_list("KAKEYA_BOUNDARY_SKIP_LAYERS", env.get("KAKEYA_BOUNDARY_SKIP_LAYERS"), num_layers)
        raw_lb = env.get("KAKEYA_LAYER_BITS")
        if fmt == "exact" and raw_lb and raw_lb.strip():
            raise ConfigError(f"KAKEYA_LAYER_BITS={raw_lb!r}: KAKEYA_FORMAT=exact stores every layer as bf16; "
                              "unset one of them")
        layer_bits = parse_layer_bits(raw_lb, fmt, num_layers)
        clash = sorted({layer for layer, _, _ in layer_bits} & set(boundary))
        if clash:
            raise ConfigError(f"KAKEYA_LAYER_BITS={raw_lb!r}: layer(s) {clash} are also in "
                              f"KAKEYA_BOUNDARY_SKIP_LAYERS (exact bf16); list each layer in one of them")
        k_bits = _int_env(env, "KAKEYA_K_BITS", 4 if fmt == "kakeya" else 3, ALLOWED_BITS[fmt]["k"])
        decode_variant = _decode_variant_env(env)
        calibration = env.get("KAKEYA_CALIBRATION") or None
        prefill_variant, tail_storage = _prefill_variant_env(env, fmt), _tail_storage(env, fmt)
        return cls(
            format=fmt,
            k_bits=k_bits,
            v_bits=_int_env(env, "KAKEYA_V_BITS", 3 if fmt == "kakeya" else 2, ALLOWED_BITS[fmt]["v"]),
            boundary_skip_layers=boundary,
            layer_bits=layer_bits,
            skip_layers=parse_layer_list("KAKEYA_SKIP_LAYERS", env.get("KAKEYA_SKIP_LAYERS"), num_layers),
            calibration=calibration,
            cuda_graphs=_cuda_graphs(env),
            scratch_mib=_scratch_mib(env, fmt),
            v13_attention=_v13_attention(env, fmt),
            decode_variant=decode_variant,
            k_grid=_k_grid(env, fmt, k_bits, layer_bits, decode_variant, calibration),
            prefill_variant=prefill_variant,
            exact_attention=_exact_attention(env, fmt, boundary),
            memory_log=_memory_log(env),
            tail_pool_percent=_int_env(env, "KAKEYA_TAIL_POOL_PERCENT", 5, tuple(range(1, 26))),
            tail_storage=tail_storage,
            prefill_attend=_prefill_attend(env, fmt, prefill_variant),
        )

    @property
    def int8_k_scores(self) -> bool:
        """The tuned decode launch computes K scores by int8 MMAs (kakeya_kernels.variants.TUNED_KI8): K on the
        uniform grid and 4 bits wide in every compressed layer."""
        widths = {self.k_bits} | {kb for _, kb, _ in self.layer_bits}
        return self.format == "kakeya" and self.k_grid == "uniform" and widths == {4}

    def bits_for(self, layer: int) -> tuple[int, int] | str:
        """(k_bits, v_bits) the layer is stored with, or EXACT (bf16: boundary layer or exact format)."""
        if self.format == "exact" or layer in self.boundary_skip_layers:
            return EXACT
        for lay, kb, vb in self.layer_bits:
            if lay == layer:
                return kb, vb
        return self.k_bits, self.v_bits

    def layer_plan(self, num_layers: int) -> list[tuple[int, int] | str]:
        """bits_for every layer of a num_layers model (checks that the knobs fit the model)."""
        listed = [lay for lay, _, _ in self.layer_bits] + list(self.boundary_skip_layers)
        if listed and max(listed) >= num_layers:
            raise ConfigError(f"KAKEYA_LAYER_BITS / KAKEYA_BOUNDARY_SKIP_LAYERS name layer {max(listed)}, "
                              f"the model has {num_layers} layers")
        return [self.bits_for(i) for i in range(num_layers)]


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines of a recipe file (blank lines and # comments skipped); only KAKEYA_* keys allowed."""
    env = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, val = line.partition("=")
        key = key.strip()
        if not eq or not key.startswith("KAKEYA_"):
            raise ConfigError(f"{path}:{n}: expected KAKEYA_NAME=value, got {line!r}")
        env[key] = val.strip()
    return env
