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
    k_table: torch.Tensor | None = None
    v_table: torch.Tensor | None = None
    k_weights: dict[int, torch.Tensor] = field(default_factory=dict)
    source: str | None = None

    def weight(self, layer: int) -> torch.Tensor | None:
        return self.k_weights.get(layer)


_CACHE: dict = {}


def resolve(cfg: KakeyaConfig, *, num_layers: int, num_kv_heads: int, head_dim: int,
            model_config: dict | None) -> Calibration:
    if not cfg.calibration:
        return Calibration()
    key = (cfg.calibration, cfg.k_bits, cfg.v_bits, cfg.skip_layers, num_layers, num_kv_heads, head_dim)
    if key in _CACHE:
        return _CACHE[key]
    from kakeya_calibration.bundle import config_hash, load_bundle
    _, t = load_bundle(cfg.calibration, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       model_config_hash=None if model_config is None else config_hash(model_config),
                       k_bits=(cfg.k_bits,), v_bits=(cfg.v_bits,))
    cal = Calibration(k_table=t.get(f"k_table.b{cfg.k_bits}"), v_table=t.get(f"v_table.b{cfg.v_bits}"),
                      k_weights={int(n.split(".")[1]): w for n, w in t.items()
                                 if n.startswith("k_weight.") and int(n.split(".")[1]) not in cfg.skip_layers},
                      source=cfg.calibration)
    _CACHE[key] = cal
    return cal
