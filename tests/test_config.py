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
