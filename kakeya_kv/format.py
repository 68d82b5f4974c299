"""Block-format specification: the one place that defines every stored byte.

A *slot* is one sealed block of ``BLOCK_TOKENS`` tokens of one KV head: the K
stream followed by the V stream. A vLLM page of one layer holds
``num_kv_heads`` slots. The CPU reference codecs, the Triton kernels and the
vLLM allocator take sizes and offsets from the :class:`BlockLayout` objects
built here; nothing else hard-codes them. All multi-byte fields are
little-endian. Randomness comes from :mod:`kakeya_kv.prng` (SplitMix64).

Formats
-------
``kakeya`` (default, version 1) — per stream, per block:
    mean   float32[D]   block channel mean (removes K's DC offsets exactly)
    scale  float16[D]   per-channel shaping lambda_c = (w_c / v_c)^(1/4)
    gain   float16[n]   per-token least-squares gain |g|; sign bit set = the
                        token was coded uncentred (attention sinks: small norm,
                        far from the block mean), i.e. mean is not added back
    codes  uint8[n, D*b/8]  b-bit Lloyd-Max N(0,1) indices of
                        z = R (lambda * (x - mean)) / rms,  R = H diag(s) / sqrt(D),
                        s = SplitMix64(ROTATION_SEED) signs, LSB-first packing.
    decode: x = [signbit(g) ? 0 : mean] + (R^T (|g| * table[codes])) / lambda
``v13`` (the seed codec, revision 2 with its defects fixed) — see
    :func:`v13_layout`; byte layout of the seed's slot (header 48 B "KK13").
``exact`` — bf16 K and V, row-major [n, D]: lossless, bit-exact round trip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

BLOCK_TOKENS = 512
SUPPORTED_HEAD_DIMS = (64, 128, 256)
ROTATION_SEED = 0x4B414B45_59414B56  # "KAKEYAKV"
V13_SEED = 0xCAFEBABE
V13_MAGIC = b"KK13"
V13_REVISION = 2
ALIGN = 16

ALLOWED_BITS = {
    "kakeya": {"k": (2, 3, 4, 5, 6), "v": (2, 3, 4, 5, 6)},
    "v13": {"k": (1, 2, 3, 4), "v": (1, 2, 3, 4)},
    "exact": {"k": (16,), "v": (16,)},
}

_DTYPES = {"float32": (torch.float32, 4), "float16": (torch.float16, 2), "bfloat16": (torch.bfloat16, 2),
           "uint8": (torch.uint8, 1), "uint16": (torch.int16, 2), "uint32": (torch.int32, 4)}


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    nbytes: int
    dtype: str          # storage dtype, see _DTYPES
    shape: tuple

    def view(self, slot: torch.Tensor) -> torch.Tensor:
        """Typed view of this field inside a uint8 slot tensor [..., stream_bytes]."""
        tdt, _ = _DTYPES[self.dtype]
        raw = slot[..., self.offset:self.offset + self.nbytes]
        return raw.contiguous().view(tdt).reshape(*slot.shape[:-1], *self.shape)


@dataclass(frozen=True)
class StreamLayout:
    fields: tuple[Field, ...]
    size: int
    bits: int
    params: dict = field(default_factory=dict, compare=False, hash=False)

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def offsets(self) -> dict[str, int]:
        return {f.name: f.offset for f in self.fields}


@dataclass(frozen=True)
class BlockLayout:
    format: str
    version: int
    head_dim: int
    k: StreamLayout
    v: StreamLayout
    block_tokens: int = BLOCK_TOKENS

    @property
    def slot_bytes(self) -> int:
        return self.k.size + self.v.size

    @property
    def bytes_per_token_head(self) -> float:
        return self.slot_bytes / self.block_tokens

    @property
    def ratio_vs_bf16(self) -> float:
        return (4 * self.head_dim) / self.bytes_per_token_head

    def page_bytes(self, num_kv_heads: int) -> int:
        return num_kv_heads * self.slot_bytes


class _Builder:
    def __init__(self):
        self.fields: list[Field] = []
        self.off = 0

    def add(self, name, dtype, shape, nbytes=None):
        _, item = _DTYPES[dtype]
        nb = nbytes if nbytes is not None else item * math.prod(shape)
        self.fields.append(Field(name, self.off, nb, dtype, tuple(shape)))
        self.off += nb

    def done(self, bits, align=ALIGN, **params) -> StreamLayout:
        size = -(-self.off // align) * align
        return StreamLayout(tuple(self.fields), size, bits, params)


def _check_head_dim(head_dim: int):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not supported (supported: {SUPPORTED_HEAD_DIMS})")


def _check_bits(fmt, stream, bits):
    if bits not in ALLOWED_BITS[fmt][stream]:
        raise ValueError(f"{fmt}: {stream.upper()} bit width {bits} not allowed {ALLOWED_BITS[fmt][stream]}")


def kakeya_stream(head_dim: int, bits: int, n: int = BLOCK_TOKENS) -> StreamLayout:
    b = _Builder()
    b.add("mean", "float32", (head_dim,))
    b.add("scale", "float16", (head_dim,))
    b.add("gain", "float16", (n,))
    b.add("codes", "uint8", (n, head_dim * bits // 8))
    return b.done(bits)


def kakeya_layout(head_dim: int, k_bits: int = 4, v_bits: int = 3) -> BlockLayout:
    _check_head_dim(head_dim)
    _check_bits("kakeya", "k", k_bits)
    _check_bits("kakeya", "v", v_bits)
    return BlockLayout("kakeya", 1, head_dim, kakeya_stream(head_dim, k_bits), kakeya_stream(head_dim, v_bits))


def v_codes_token_major(codes: torch.Tensor, head_dim: int, bits: int = 4) -> torch.Tensor:
    """EXPERIMENTAL V-code order read by the int8 P.V path (kakeya_triton VI8; no sealed cache uses it yet):
    codes uint8 [..., n, D*b/8] (the kakeya stream's per-token rows, LSB-first) -> uint8 [..., D, n*b/8], per dim
    the block's tokens LSB-first (4 bits: token 2i in the low nibble of byte i). Same bytes, other order: the P.V
    MMA contracts over tokens, so its operand wants consecutive tokens packed together. 4-bit codes only."""
    if bits != 4:
        raise ValueError(f"token-major V codes are defined for 4-bit codes only, got {bits}")
    n = codes.shape[-2]
    c = torch.stack((codes & 15, codes >> 4), -1).reshape(*codes.shape[:-2], n, head_dim)   # dims 2j, 2j+1
    t = c.transpose(-1, -2).reshape(*codes.shape[:-2], head_dim, n // 2, 2)
    return (t[..., 0] | (t[..., 1] << 4)).contiguous()


def token_major_cache(slots: torch.Tensor, lay: BlockLayout) -> torch.Tensor:
    """A copy of kakeya slots uint8 [..., slot_bytes] with the V codes in v_codes_token_major order (the rest
    unchanged): the cache the experimental VI8 launch reads."""
    f = lay.v["codes"]
    out = slots.clone()
    lo = lay.k.size + f.offset
    codes = slots[..., lo:lo + f.nbytes].reshape(*slots.shape[:-1], *f.shape)
    out[..., lo:lo + f.nbytes] = v_codes_token_major(codes, lay.head_dim, lay.v.bits).reshape(
        *slots.shape[:-1], f.nbytes)
    return out


def exact_layout(head_dim: int) -> BlockLayout:
    _check_head_dim(head_dim)
    s = _Builder()
    s.add("data", "bfloat16", (BLOCK_TOKENS, head_dim))
    st = s.done(16)
    return BlockLayout("exact", 1, head_dim, st, st)


def v13_stream(head_dim: int, d_eff: int, k: int, bits: int, outlier_frac: float,
               n: int = BLOCK_TOKENS) -> StreamLayout:
    """Seed v1.3 slot (§5 of the seed spec), revision 2.

    Header (48 B): 0:4 magic "KK13"; 4:8 d_eff u32; 8:12 k u32; 12:16 bits u32;
    16:20 stored outliers u32; 20:24 metric u32 (0 = mse, always: the seed's
    inner_product norm-drop bug is gone); 24:32 rotation seed u64;
    32:36 block_scale f32 (revision 2: every fp16 field is in units of it, so
    large-magnitude K cannot overflow fp16); 36:40 revision u32 (=2); 40:48 zero.
    """
    L = 1 << (d_eff - 1).bit_length()
    seg_bits = max(1, math.ceil(math.log2(k)))
    b = _Builder()
    b.add("header", "uint8", (48,))
    b.add("basis", "float16", (d_eff, head_dim))
    b.add("mean", "float16", (head_dim,))
    b.add("centres", "float16", (k, d_eff))
    b.add("seg", "uint8", ((n * seg_bits + 7) // 8,))
    b.add("t", "float16", (n,))
    b.add("norm", "float16", (n,))
    b.add("residual", "uint8", (n, (L * bits + 7) // 8))
    if outlier_frac > 0:
        cap = math.ceil(outlier_frac * n * L)
        b.add("outlier_count", "uint16", (n,))
        b.add("outliers", "uint8", (cap, 4))  # (u16 idx, f16 value) little-endian
    # align=1: byte-identical sizes to the seed's slots (20 012 / 11 696 B at D=64).
    return b.done(bits, align=1, d_eff=d_eff, k=k, wht_len=L, seg_bits=seg_bits, outlier_frac=outlier_frac,
                  outlier_cap=math.ceil(outlier_frac * n * L) if outlier_frac > 0 else 0)


def v13_layout(head_dim: int, d_eff: int | None = None, k: int = 16, k_bits: int = 3, v_bits: int = 2,
               k_outlier_frac: float = 0.08, v_outlier_frac: float = 0.0) -> BlockLayout:
    _check_head_dim(head_dim)
    _check_bits("v13", "k", k_bits)
    _check_bits("v13", "v", v_bits)
    d_eff = d_eff or head_dim // 2
    if not 1 <= d_eff <= head_dim:
        raise ValueError(f"d_eff {d_eff} out of range 1..{head_dim}")
    return BlockLayout("v13", V13_REVISION, head_dim,
                       v13_stream(head_dim, d_eff, k, k_bits, k_outlier_frac),
                       v13_stream(head_dim, d_eff, k, v_bits, v_outlier_frac))


def layout(fmt: str, head_dim: int, **params) -> BlockLayout:
    if fmt == "kakeya":
        return kakeya_layout(head_dim, **params)
    if fmt == "v13":
        return v13_layout(head_dim, **params)
    if fmt == "exact":
        return exact_layout(head_dim)
    raise ValueError(f"unknown block format {fmt!r}")


def describe(lay: BlockLayout) -> str:
    """Markdown description of one layout (used to generate docs/FORMAT.md)."""
    lines = [f"### `{lay.format}` v{lay.version}, head_dim {lay.head_dim}: "
             f"slot {lay.slot_bytes} B = {lay.bytes_per_token_head:.3f} B/token/head "
             f"({lay.ratio_vs_bf16:.2f}x vs bf16)", "", "| stream | field | offset | bytes | dtype | shape |",
             "|---|---|---|---|---|---|"]
    for name, st in (("K", lay.k), ("V", lay.v)):
        for f in st.fields:
            lines.append(f"| {name} (b={st.bits}) | {f.name} | {f.offset} | {f.nbytes} | {f.dtype} | {list(f.shape)} |")
        lines.append(f"| {name} | *(stream size)* | | {st.size} | | |")
    return "\n".join(lines)
