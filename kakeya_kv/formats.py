"""The named whole-model formats that `kakeya-kv compare` evaluates."""
from __future__ import annotations

from .codecs.base import BF16
from .codecs.competitors import competitor_codecs
from .codecs.kakeya import KakeyaCodec
from .codecs.v13 import V13Codec
from .model_format import ModelFormat, vllm_tq_boundary

# Our default format's settings evaluated in the comparison (all layers compressed).
KAKEYA_SETTINGS = ((4, 4), (4, 3), (3, 3), (3, 2))


def standard_formats(num_layers: int) -> list[ModelFormat]:
    tq_skip = vllm_tq_boundary(num_layers)
    out = [ModelFormat("bf16", "bf16", BF16())]
    for kb, vb in KAKEYA_SETTINGS:
        c = KakeyaCodec(kb, vb)
        out.append(ModelFormat(c.name, "kakeya", c))
    out.append(ModelFormat("v13", "v13", V13Codec(), notes="seed defaults: d_eff=D/2, k=16, K b3 + 8% outliers T=2, V b2"))
    for c in competitor_codecs():
        if c.family == "turboquant":
            out.append(ModelFormat(c.name, c.family, c, tq_skip, notes="as vLLM runs it: layers 0,1,L-2,L-1 bf16"))
            out.append(ModelFormat(c.name + "_noboundary", c.family, c, (), notes="all layers compressed"))
        else:
            out.append(ModelFormat(c.name, c.family, c))
    return out


def by_name(num_layers: int, names: list[str]) -> list[ModelFormat]:
    import re
    allf = {f.name: f for f in standard_formats(num_layers)}
    for n in names:   # any kakeya bit widths the format allows, e.g. kakeya_k5v4
        m = re.fullmatch(r"kakeya_k(\d)v(\d)", n)
        if m and n not in allf:
            c = KakeyaCodec(int(m[1]), int(m[2]))
            allf[n] = ModelFormat(c.name, "kakeya", c)
    unknown = [n for n in names if n not in allf]
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; known: {sorted(allf)}")
    chosen = [allf[n] for n in names if n != "bf16"]
    return [allf["bf16"]] + chosen
