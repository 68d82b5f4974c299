import pytest

from kakeya_kv.config import ConfigError, KakeyaConfig, parse_layer_list


def test_layer_list_parsing():
    assert parse_layer_list("X", "0,1,26,27") == (0, 1, 26, 27)
    assert parse_layer_list("X", "") == ()
    assert parse_layer_list("X", None) == ()
    assert parse_layer_list("X", " 3, 1 ") == (1, 3)


@pytest.mark.parametrize("raw,msg", [("0,a", "not an integer"), ("0,,1", "empty entry"), ("1,1", "twice"),
                                     ("-1", "negative"), ("0,30", "out of range")])
def test_layer_list_errors_name_the_problem(raw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_layer_list("KAKEYA_BOUNDARY_SKIP_LAYERS", raw, num_layers=30)
    assert "KAKEYA_BOUNDARY_SKIP_LAYERS" in str(e.value)


def test_config_from_env_defaults_and_validation():
    c = KakeyaConfig.from_env({})
    assert (c.format, c.k_bits, c.v_bits, c.boundary_skip_layers) == ("kakeya", 4, 3, ())
    c = KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13"})
    assert (c.k_bits, c.v_bits) == (3, 2)
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "default"}).format == "kakeya"
    with pytest.raises(ConfigError, match="unknown format"):
        KakeyaConfig.from_env({"KAKEYA_FORMAT": "zip"})
    with pytest.raises(ConfigError, match="KAKEYA_K_BITS"):
        KakeyaConfig.from_env({"KAKEYA_K_BITS": "7"})
    with pytest.raises(ConfigError, match="not an integer"):
        KakeyaConfig.from_env({"KAKEYA_V_BITS": "three"})


# --- KAKEYA_LAYER_BITS: per-layer (K bits, V bits) -------------------------------------------------------------
from kakeya_kv.config import EXACT, format_layer_bits, parse_layer_bits, read_env_file  # noqa: E402


def test_layer_bits_parsing_ranges_and_round_trip():
    lb = parse_layer_bits("20-22:5/4, 17:4/3,18:4/3", num_layers=30)
    assert lb == ((17, 4, 3), (18, 4, 3), (20, 5, 4), (21, 5, 4), (22, 5, 4))
    assert format_layer_bits(lb) == "17-18:4/3,20-22:5/4"
    assert parse_layer_bits(format_layer_bits(lb)) == lb
    assert parse_layer_bits("") == () and parse_layer_bits(None) == ()


@pytest.mark.parametrize("raw,msg", [
    ("17:4", "bad entry"), ("17-a:4/3", "bad entry"), ("5-3:4/3", "empty"), ("30:4/3", "out of range"),
    ("17:7/3", "allows K bits"), ("17:4/1", "allows K bits"), ("17:4/3,16-18:5/4", "set twice"),
    ("17:4/3,", "bad entry")])
def test_layer_bits_errors_name_the_problem(raw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        KakeyaConfig.from_env({"KAKEYA_LAYER_BITS": raw}, num_layers=30)
    assert "KAKEYA_LAYER_BITS" in str(e.value)


def test_layer_bits_conflicts_with_boundary_and_exact_format():
    with pytest.raises(ConfigError, match=r"\[17\].*KAKEYA_BOUNDARY_SKIP_LAYERS"):
        KakeyaConfig.from_env({"KAKEYA_LAYER_BITS": "16-18:4/3", "KAKEYA_BOUNDARY_SKIP_LAYERS": "0,17"})
    with pytest.raises(ConfigError, match="KAKEYA_FORMAT=exact"):
        KakeyaConfig.from_env({"KAKEYA_FORMAT": "exact", "KAKEYA_LAYER_BITS": "1:4/3"})
    # v13 allows 1-bit streams, kakeya does not: validation follows the format
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13", "KAKEYA_LAYER_BITS": "2:1/1"}).bits_for(2) == (1, 1)


def test_every_layer_gets_bits_or_exact():
    c = KakeyaConfig.from_env({"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2", "KAKEYA_BOUNDARY_SKIP_LAYERS": "0",
                               "KAKEYA_LAYER_BITS": "2-3:4/3"})
    assert c.layer_plan(5) == [EXACT, (3, 2), (4, 3), (4, 3), (3, 2)]
    with pytest.raises(ConfigError, match="the model has 3 layers"):
        c.layer_plan(3)
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "exact"}).layer_plan(2) == [EXACT, EXACT]


def test_env_file_reader(tmp_path):
    p = tmp_path / "r.env"
    p.write_text("# comment\n\nKAKEYA_K_BITS=3\nKAKEYA_LAYER_BITS=1-2:4/3\n")
    assert read_env_file(p) == {"KAKEYA_K_BITS": "3", "KAKEYA_LAYER_BITS": "1-2:4/3"}
    p.write_text("PATH=/bin\n")
    with pytest.raises(ConfigError, match="r.env:1"):
        read_env_file(p)


def test_prefill_attend_knob():
    assert KakeyaConfig.from_env({}).prefill_attend == "blocks"
    assert KakeyaConfig.from_env({"KAKEYA_PREFILL_ATTEND": "Chunk"}).prefill_attend == "chunk"
    with pytest.raises(ConfigError, match="KAKEYA_PREFILL_ATTEND"):
        KakeyaConfig.from_env({"KAKEYA_PREFILL_ATTEND": "all"})
    with pytest.raises(ConfigError, match="KAKEYA_FORMAT=kakeya"):
        KakeyaConfig.from_env({"KAKEYA_PREFILL_ATTEND": "chunk", "KAKEYA_FORMAT": "v13"})
    assert KakeyaConfig.from_env({"KAKEYA_PREFILL_ATTEND": "chunk", "KAKEYA_TAIL_STORAGE": "pages"}).prefill_attend \
        == "chunk"
    with pytest.raises(ConfigError, match="scratch"):
        KakeyaConfig.from_env({"KAKEYA_PREFILL_ATTEND": "chunk", "KAKEYA_PREFILL_VARIANT": "candidate:scratch"})
    cfg = KakeyaConfig.from_env({"KAKEYA_PREFILL_ATTEND": "chunk", "KAKEYA_PREFILL_VARIANT": "baseline"})
    assert (cfg.prefill_attend, cfg.prefill_variant) == ("chunk", "baseline")
