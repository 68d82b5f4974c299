"""Calibration bundle -> what the kernels apply (no vLLM import: unit-tested on CPU).

``KAKEYA_CALIBRATION`` names a bundle folder; it is validated against the served model's geometry
and config hash (a mismatching, truncated or tampered bundle is refused with a message naming the
mismatch). ``KAKEYA_SKIP_LAYERS`` keeps the data-free defaults on the listed layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kakeya_kv.config import KakeyaConfig


@dataclass
class Calibration:
    k_table: torch.Tensor | None = None     # fitted tables of the default widths (KAKEYA_K_BITS / V_BITS)
    v_table: torch.Tensor | None = None
    k_weights: dict[int, torch.Tensor] = field(default_factory=dict)
    source: str | None = None
    k_tables: dict[int, torch.Tensor] = field(default_factory=dict)   # every width served (KAKEYA_LAYER_BITS)
    v_tables: dict[int, torch.Tensor] = field(default_factory=dict)

    def weight(self, layer: int) -> torch.Tensor | None:
        return self.k_weights.get(layer)

    def tables(self, k_bits: int, v_bits: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Fitted (K, V) tables for a layer served at these widths (None: data-free tables)."""
        return self.k_tables.get(k_bits), self.v_tables.get(v_bits)


_CACHE: dict = {}


def resolve(cfg: KakeyaConfig, *, num_layers: int, num_kv_heads: int, head_dim: int,
            model_config: dict | None) -> Calibration:
    if not cfg.calibration:
        return Calibration()
    key = (cfg.calibration, cfg.k_bits, cfg.v_bits, cfg.layer_bits, cfg.skip_layers, num_layers, num_kv_heads,
           head_dim)
    if key in _CACHE:
        return _CACHE[key]
    from kakeya_calibration.bundle import config_hash, load_bundle
    kbs = tuple(sorted({cfg.k_bits} | {kb for _, kb, _ in cfg.layer_bits}))
    vbs = tuple(sorted({cfg.v_bits} | {vb for _, _, vb in cfg.layer_bits}))
    _, t = load_bundle(cfg.calibration, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       model_config_hash=None if model_config is None else config_hash(model_config),
                       k_bits=kbs, v_bits=vbs)
    k_tables = {b: t[f"k_table.b{b}"] for b in kbs if f"k_table.b{b}" in t}
    v_tables = {b: t[f"v_table.b{b}"] for b in vbs if f"v_table.b{b}" in t}
    cal = Calibration(k_table=k_tables.get(cfg.k_bits), v_table=v_tables.get(cfg.v_bits),
                      k_weights={int(n.split(".")[1]): w for n, w in t.items()
                                 if n.startswith("k_weight.") and int(n.split(".")[1]) not in cfg.skip_layers},
                      source=cfg.calibration, k_tables=k_tables, v_tables=v_tables)
    _CACHE[key] = cal
    return cal
