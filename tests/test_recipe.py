"""Recipe search and per-layer sensitivity on a tiny random model (the real runs are CLI commands)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kakeya_kv.config import KakeyaConfig
from kakeya_kv.recipe import candidates, ratio, recipe_env, search, sensitivity


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).float().eval()
    wins = [torch.randint(0, 97, (1024,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    return model, wins


def test_candidates_are_ordered_by_ratio_and_servable():
    c = candidates(30, 64)
    r = [f.extra["ratio"] for f in c]
    assert r == sorted(r, reverse=True)
    assert abs(ratio(30, 64, 4, 3, ()) - 256 / 61.5) < 1e-9
    assert ratio(30, 64, 3, 2, (0, 29)) < ratio(30, 64, 3, 2, ())


def test_search_returns_first_within_budget_and_writes_a_loadable_recipe(tiny):
    model, wins = tiny
    best, tried, _ = search(model, wins, 4, 64, budget_pct=1e9, log=lambda m: None)
    assert best is tried[0] and best["ratio"] == max(f.extra["ratio"] for f in candidates(4, 64))
    none, tried2, _ = search(model, wins[:1], 4, 64, budget_pct=-1e9, log=lambda m: None)
    assert none is None and len(tried2) == len(candidates(4, 64))
    env = recipe_env(best, "tiny", 1.0, 2, 1024, "kakeya-kv recipe")
    kv = dict(l.split("=", 1) for l in env.splitlines() if l and not l.startswith("#"))
    cfg = KakeyaConfig.from_env(kv, num_layers=4)
    assert (cfg.k_bits, cfg.v_bits) == (best["k_bits"], best["v_bits"])


def test_sensitivity_has_one_row_per_layer(tiny):
    model, wins = tiny
    rows = sensitivity(model, wins[:1], 4, 3, 2)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert all(r["kld"] > 0 for r in rows)   # compressing any single layer changes the output


def test_boundary_sets_follow_the_sensitivity_table(tmp_path):
    import json

    from kakeya_kv.recipe import boundary_sets, sensitive_layers
    rows = [{"layer": i, "kld": k} for i, k in enumerate([0.1, 0.5, 0.3, 0.2])]
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"layers": rows}))
    order = sensitive_layers(p, 4)
    assert order == [1, 2, 3, 0]
    assert boundary_sets(4, order) == [(), (1,), (1, 2), (0, 1, 2, 3)]
    assert boundary_sets(4) == [(), (0,), (0, 3), (0, 1, 2, 3)]
    assert sensitive_layers(tmp_path / "missing.json", 4) is None
    with pytest.raises(SystemExit, match="has 4 layers, the model 3"):
        sensitive_layers(p, 3)


def test_candidates_upgrade_the_most_sensitive_layers():
    from kakeya_kv.recipe import candidates, ratio
    order = [23, 18, 24, 17, 14, 15, 7, 19, 20, 25, 4, 21, 12, 8, 16, 5, 3, 27]
    c = {f.name: f for f in candidates(30, 64, order)}
    up4 = c["kakeya_k3v2_up4k4v3"]
    assert up4.extra["layer_bits"] == "17-18:4/3,23-24:4/3" and up4.exact_layers == ()
    assert [i for i in range(30) if up4.codec_for(i).k_bits == 4] == [17, 18, 23, 24]
    r = up4.extra["ratio"]
    assert r == ratio(30, 64, 3, 2, (), ((17, 4, 3), (18, 4, 3), (23, 4, 3), (24, 4, 3)))
    # Upgrades cost fewer bytes than exact layers and more than nothing:
    assert c["kakeya_k3v2"].extra["ratio"] > r > c["kakeya_k3v2_b23"].extra["ratio"]
    assert c["kakeya_k3v2_up1k4v3"].extra["ratio"] > c["kakeya_k3v2_up2k4v3"].extra["ratio"] > r
    assert "kakeya_k4v4_up16k5v5" in c and not any("up" in n for n in {f.name for f in candidates(30, 64)})


def test_search_over_upgrades_writes_layer_bits(tiny, monkeypatch):
    import kakeya_kv.recipe as recipe
    model, wins = tiny
    monkeypatch.setattr(recipe, "BITS", ((3, 2),))
    none, tried, _ = recipe.search(model, wins[:1], 4, 64, budget_pct=-1e9, log=lambda m: None, sensitive=[2, 1, 3, 0])
    assert none is None
    assert [t["layer_bits"] for t in tried if t["layer_bits"]] == ["2:4/3", "1-2:4/3"]
    row = next(t for t in tried if t["layer_bits"] == "1-2:4/3")
    env = recipe_env(row, "tiny", 1.0, 1, 1024, "kakeya-kv recipe")
    kv = dict(l.split("=", 1) for l in env.splitlines() if l and not l.startswith("#"))
    cfg = KakeyaConfig.from_env(kv, num_layers=4)
    assert cfg.layer_plan(4) == [(3, 2), (4, 3), (4, 3), (3, 2)]
    assert f"ratio {row['ratio']:.2f}x" in env
