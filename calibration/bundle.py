"""Calibration bundle = ``calibration.safetensors`` + ``manifest.json`` in one folder.

The manifest carries the bundle format version, the model identity (name and a hash
of its config), geometry (layers, KV heads, head_dim), RoPE settings, the codec
format, the calibration corpus and token count, and the SHA-256 of the tensor file.
:func:`load_bundle` refuses a bundle that is missing, truncated, tampered with, or
made for another model, geometry or format version, with a message naming the
mismatch. Tensors only (safetensors) and JSON: nothing is unpickled.

Tensors (all float32):
  ``k_weight.{L}``  [H, D]  RoPE-pair-averaged query energy per KV head (GQA group
                            pooled), shrunk towards 1: the w of the K shaping.
  ``k_table.b{B}`` / ``v_table.b{B}``  [2^B]  Lloyd-Max tables fitted to the codec's
                            normalised rotated coordinates on calibration text.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BUNDLE_VERSION = 1
TENSORS = "calibration.safetensors"
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """The calibration bundle cannot be used; the message says why and which field."""


def config_hash(cfg: dict) -> str:
    """Model identity that survives transformers versions: geometry + RoPE base/type, whichever key holds them
    (transformers 5 moved rope_theta/rope_scaling into rope_parameters)."""
    keys = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
            "vocab_size", "intermediate_size")
    sub = {k: cfg.get(k) for k in keys}
    sub["head_dim"] = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta") or rp.get("rope_theta")
    sub["rope_theta"] = None if theta is None else float(theta)
    sub["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(out: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(out / TENSORS))
    man = dict(manifest, bundle_version=BUNDLE_VERSION, tensors_file=TENSORS,
               tensors_sha256=_sha256(out / TENSORS), tensor_names=sorted(tensors))
    (out / MANIFEST).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    return out


_TENSOR_NAME = re.compile(r"k_weight\.(\d+)|([kv])_table\.b(\d+)")
MAX_MANIFEST_BYTES = 1 << 20


def _bundle_file(root: Path, name: str) -> Path:
    """A bundle file must be a regular file inside the bundle folder itself (a link may not lead elsewhere)."""
    p = root / name
    if not p.is_file():
        raise BundleError(f"calibration bundle {root}: missing {name}")
    if p.resolve().parent != root:
        raise BundleError(f"calibration bundle {root}: {name} links to {p.resolve()}, outside the bundle folder; "
                          "copy the file into the folder")
    return p


def load_bundle(path: Path | str, *, num_layers: int, num_kv_heads: int, head_dim: int,
                model_config_hash: str | None = None, fmt: str = "kakeya",
                k_bits: tuple[int, ...] = (), v_bits: tuple[int, ...] = ()) -> tuple[dict, dict]:
    """Validate and load a bundle; returns (manifest, tensors). ``k_bits``/``v_bits``: widths the caller will
    serve, whose fitted tables must be in the bundle (never a silent fallback to the data-free tables)."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise BundleError(f"KAKEYA_CALIBRATION={path}: not a directory")
    mpath, tpath = _bundle_file(root, MANIFEST), _bundle_file(root, TENSORS)
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"calibration bundle {root}: {MANIFEST} is {mpath.stat().st_size} bytes, not a manifest")
    try:
        man = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"calibration bundle {root}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(man, dict):
        raise BundleError(f"calibration bundle {root}: {MANIFEST} must hold a JSON object")
    if man.get("bundle_version") != BUNDLE_VERSION:
        raise BundleError(f"calibration bundle {root}: bundle_version {man.get('bundle_version')!r}, "
                          f"this build reads version {BUNDLE_VERSION}")
    if _sha256(tpath) != man.get("tensors_sha256"):
        raise BundleError(f"calibration bundle {root}: {TENSORS} does not match the manifest's SHA-256 "
                          "(truncated or modified)")
    expect = {"format": fmt, "num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    if model_config_hash is not None:
        expect["model_config_hash"] = model_config_hash
    for k, v in expect.items():
        if man.get(k) != v:
            raise BundleError(f"calibration bundle {root} was made for {k}={man.get(k)!r}, "
                              f"but this model/backend has {k}={v!r}")
    tensors = load_file(str(tpath))
    if sorted(tensors) != man.get("tensor_names"):
        raise BundleError(f"calibration bundle {root}: tensor names differ from the manifest")
    for name, t in tensors.items():
        m = _TENSOR_NAME.fullmatch(name)
        if m is None:
            raise BundleError(f"calibration bundle {root}: unknown tensor {name!r} (expected k_weight.L, "
                              "k_table.bB, v_table.bB)")
        if m[1] is not None:
            layer = int(m[1])
            if not 0 <= layer < num_layers or tuple(t.shape) != (num_kv_heads, head_dim):
                raise BundleError(f"calibration bundle {root}: {name} has shape {tuple(t.shape)}, "
                                  f"expected ({num_kv_heads}, {head_dim}) for a layer < {num_layers}")
            if not torch.isfinite(t).all() or (t <= 0).any():
                raise BundleError(f"calibration bundle {root}: {name} has non-finite or non-positive weights")
        else:
            bits = int(m[3])
            if tuple(t.shape) != (1 << bits,) or not torch.isfinite(t).all() or not (t[1:] > t[:-1]).all():
                raise BundleError(f"calibration bundle {root}: {name} must be {1 << bits} ascending finite values")
    for stream, widths in (("k", k_bits), ("v", v_bits)):
        have = sorted(int(n.split(".b")[1]) for n in tensors if n.startswith(f"{stream}_table.b"))
        for b in widths:
            if b not in have:
                raise BundleError(f"calibration bundle {root} has no {stream}_table.b{b} (it has widths {have}) for "
                                  f"{stream.upper()} bits {b}; re-run `kakeya-kv calibrate`, or unset "
                                  "KAKEYA_CALIBRATION")
    return man, tensors
