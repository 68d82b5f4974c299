import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kakeya_calibration.bundle import MANIFEST, TENSORS, BundleError, load_bundle, write_bundle
from kakeya_calibration.calibrate import calibrate, pair_average
from kakeya_kv.codecs.kakeya import KakeyaCodec

GEOM = dict(num_layers=2, num_kv_heads=1, head_dim=64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).float().eval()
    wins = [torch.randint(0, 97, (1024,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    tensors, man = calibrate(model, wins, k_bits=(3, 4), v_bits=(3,))
    out = write_bundle(tmp_path_factory.mktemp("b") / "bundle", tensors, man)
    return out, man, tensors


def test_roundtrip_and_contents(bundle):
    path, man, tensors = bundle
    m2, t2 = load_bundle(path, model_config_hash=man["model_config_hash"], **GEOM)
    assert m2["calibration_tokens"] == 2048 and m2["rope"]["layout"] == "rotate_half"
    assert set(t2) == {"k_weight.0", "k_weight.1", "k_table.b3", "k_table.b4", "v_table.b3"}
    w = t2["k_weight.0"]
    assert torch.allclose(w[:, :32], w[:, 32:]) and (w > 0).all()   # RoPE-pair averaged, shrunk > 0
    c = KakeyaCodec.from_bundle(t2, 4, 3)
    k = torch.randn(1, 512, 64)
    kh, vh = c.roundtrip(k, k, 0)
    assert c.name == "kakeya_k4v3_calwt" and ((kh - k).norm() / k.norm()) < 0.15


def _copy(src, dst):
    dst.mkdir()
    for f in (MANIFEST, TENSORS):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.mark.parametrize("damage,msg", [
    ("missing_manifest", "missing manifest.json"),
    ("missing_tensors", "missing calibration.safetensors"),
    ("truncate", "SHA-256"),
    ("tamper", "SHA-256"),
    ("bad_json", "not valid JSON"),
    ("version", "bundle_version"),
])
def test_damaged_bundles_are_refused(bundle, tmp_path, damage, msg):
    path, man, _ = bundle
    p = _copy(path, tmp_path / "b")
    if damage == "missing_manifest":
        (p / MANIFEST).unlink()
    elif damage == "missing_tensors":
        (p / TENSORS).unlink()
    elif damage == "truncate":
        data = (p / TENSORS).read_bytes()
        (p / TENSORS).write_bytes(data[: len(data) // 2])
    elif damage == "tamper":
        data = bytearray((p / TENSORS).read_bytes())
        data[-1] ^= 0xFF
        (p / TENSORS).write_bytes(bytes(data))
    elif damage == "bad_json":
        (p / MANIFEST).write_text("{not json")
    elif damage == "version":
        m = json.loads((p / MANIFEST).read_text())
        m["bundle_version"] = 99
        (p / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=msg):
        load_bundle(p, **GEOM)


@pytest.mark.parametrize("override,msg", [
    (dict(num_layers=30), "num_layers"), (dict(head_dim=128), "head_dim"), (dict(num_kv_heads=8), "num_kv_heads"),
    (dict(model_config_hash="0" * 16), "model_config_hash"), (dict(fmt="v13"), "format"),
])
def test_bundle_for_another_model_is_refused(bundle, override, msg):
    path, man, _ = bundle
    args = dict(GEOM, model_config_hash=man["model_config_hash"])
    args.update(override)
    with pytest.raises(BundleError, match=msg):
        load_bundle(path, **args)


def test_bad_tensor_contents_are_refused(tmp_path):
    base = dict(format="kakeya", **GEOM)
    write_bundle(tmp_path / "a", {"k_table.b3": torch.tensor([3.0, 2, 1, 0, 4, 5, 6, 7])}, base)
    with pytest.raises(BundleError, match="ascending"):
        load_bundle(tmp_path / "a", **GEOM)
    write_bundle(tmp_path / "b", {"k_weight.0": torch.ones(1, 32)}, base)
    with pytest.raises(BundleError, match="shape"):
        load_bundle(tmp_path / "b", **GEOM)
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "nope", **GEOM)


def test_pair_average():
    w = torch.arange(8.0)
    assert pair_average(w).tolist() == [2, 3, 4, 5, 2, 3, 4, 5]


def test_backend_resolves_bundle_with_skip_layers_and_refuses_mismatch(bundle):
    """What the vLLM backend applies: fitted tables for its bit widths, K weights except KAKEYA_SKIP_LAYERS."""
    from kakeya_kv.config import KakeyaConfig
    from kakeya_v1_3_ppl.calib import resolve
    path, man, tensors = bundle
    cfg = KakeyaConfig.from_env({"KAKEYA_CALIBRATION": str(path), "KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "3",
                                 "KAKEYA_SKIP_LAYERS": "1"}, num_layers=2)
    cal = resolve(cfg, num_layers=2, num_kv_heads=1, head_dim=64, model_config=None)
    assert torch.equal(cal.k_table, tensors["k_table.b3"]) and torch.equal(cal.v_table, tensors["v_table.b3"])
    assert cal.weight(0) is not None and cal.weight(1) is None
    with pytest.raises(BundleError, match="head_dim"):
        resolve(cfg, num_layers=2, num_kv_heads=1, head_dim=128, model_config=None)
    assert resolve(KakeyaConfig(), num_layers=2, num_kv_heads=1, head_dim=64, model_config=None).source is None


def test_config_hash_is_stable_across_rope_key_layouts():
    from kakeya_calibration.bundle import config_hash
    base = dict(model_type="llama", num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                hidden_size=576, vocab_size=49152, intermediate_size=1536)
    old = dict(base, rope_theta=100000, rope_scaling=None)                               # transformers 4
    new = dict(base, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})   # transformers 5
    assert config_hash(old) == config_hash(new)
    assert config_hash(dict(base, rope_theta=10000)) != config_hash(old)
