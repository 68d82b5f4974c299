"""Per-layer bit widths in the HF harness: KAKEYA_* settings -> ModelFormat, per-layer routing, byte accounting."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kakeya_kv.codecs.base import BF16
from kakeya_kv.codecs.exact import ExactCodec
from kakeya_kv.codecs.kakeya import KakeyaCodec
from kakeya_kv.config import KakeyaConfig
from kakeya_kv.format import kakeya_layout
from kakeya_kv.formats import by_name, from_config, from_recipe
from kakeya_kv.harness import SealStats, window_logprobs
from kakeya_kv.model_format import ModelFormat
from tests.codec_fakes import Zero


def test_settings_become_per_layer_codecs_and_ratio_from_layouts():
    cfg = KakeyaConfig.from_env({"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2", "KAKEYA_BOUNDARY_SKIP_LAYERS": "0",
                                 "KAKEYA_LAYER_BITS": "17-18:4/3,23:5/4"}, num_layers=30)
    f = from_config(cfg, 30, "mix")
    assert f.codec_for(0) is None
    widths = {i: (f.codec_for(i).k_bits, f.codec_for(i).v_bits) for i in range(1, 30)}
    assert widths[17] == widths[18] == (4, 3) and widths[23] == (5, 4)
    assert {w for i, w in widths.items() if i not in (17, 18, 23)} == {(3, 2)}
    # Independent sum over the slot layouts (bytes per 512-token block and head), 3 KV heads, D=64.
    slot = {b: kakeya_layout(64, *b).slot_bytes for b in ((3, 2), (4, 3), (5, 4))}
    per_head = 256.0 + 26 * slot[(3, 2)] / 512 + 2 * slot[(4, 3)] / 512 + slot[(5, 4)] / 512
    assert f.bytes_per_token(30, 3, 64) == pytest.approx(3 * per_head)
    assert f.ratio_vs_bf16(30, 3, 64) == pytest.approx(30 * 256 / per_head)
    uniform = from_config(KakeyaConfig.from_env({"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2"}), 30, "u")
    assert uniform.layer_codecs == {} and uniform.ratio_vs_bf16(30, 3, 64) > f.ratio_vs_bf16(30, 3, 64)
    assert isinstance(from_config(KakeyaConfig.from_env({"KAKEYA_FORMAT": "exact"}), 30, "e").codec, BF16)


def test_recipe_file_as_a_format_name(tmp_path):
    p = tmp_path / "mine.env"
    p.write_text("# test\nKAKEYA_K_BITS=3\nKAKEYA_V_BITS=2\nKAKEYA_LAYER_BITS=1:4/3\n")
    bf16, f = by_name(4, [f"recipe:{p}"])
    assert bf16.name == "bf16" and f.name == "mine" and f.codec_for(1).name == "kakeya_k4v3"
    assert f.extra["recipe"] == str(p) and "KAKEYA_LAYER_BITS=1:4/3" in f.notes
    p.write_text("KAKEYA_LAYER_BITS=9:4/3\n")
    with pytest.raises(ValueError, match="out of range"):
        from_recipe(str(p), 4)


def test_layer_codec_must_match_the_default_protocol():
    class PerToken(Zero):
        block_tokens = 1
    with pytest.raises(ValueError, match="only in its stored bytes"):
        ModelFormat("x", "kakeya", KakeyaCodec(3, 2), layer_codecs={1: PerToken()})
    with pytest.raises(ValueError, match="both exact"):
        ModelFormat("x", "kakeya", KakeyaCodec(3, 2), exact_layers=(1,), layer_codecs={1: KakeyaCodec(4, 3)})


def test_harness_routes_each_layer_to_its_codec():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).float().eval()
    ids = torch.randint(0, 97, (1024,), generator=torch.Generator().manual_seed(4))
    # Zero only on layer 1 via a per-layer codec (others lossless) == Zero everywhere with 0 and 2 exact.
    per_layer = ModelFormat("pl", "zero", ExactCodec(), layer_codecs={1: Zero()})
    boundary = ModelFormat("b", "zero", Zero(), exact_layers=(0, 2))
    a = window_logprobs(model, ids, per_layer, 256, 600, SealStats())
    b = window_logprobs(model, ids, boundary, 256, 600, SealStats())
    ref = window_logprobs(model, ids, ModelFormat("bf16", "bf16", BF16()), 256, 600, SealStats())
    assert torch.equal(a, b)
    assert (a - ref).abs().max() > 1e-4   # layer 1 really read zeros


def test_measure_visits_windows_so_every_prefix_is_spread():
    import importlib.util
    from pathlib import Path
    p = Path(__file__).resolve().parent.parent / "benchmarks" / "perlayer" / "measure.py"
    spec = importlib.util.spec_from_file_location("perlayer_measure", p)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    order = m.spread_order(32)
    assert sorted(order) == list(range(32)) and order[:4] == [0, 16, 8, 24]
    for k in (2, 4, 8, 16):   # the first k windows are evenly spaced over both books
        assert sorted(order[:k]) == list(range(0, 32, 32 // k))
    assert sorted(m.spread_order(5)) == list(range(5))
