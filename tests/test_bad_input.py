"""Bad input gets a one-line, actionable error at start-up (issue 7, CPU part); no pickle anywhere."""
import re
from pathlib import Path

import pytest

from kakeya_kv.config import ConfigError
from kakeya_v1_3_ppl.checks import check_block_size, check_capacity, check_layer, settings

OK = dict(head_size=64, alibi=False, sliding_window=None, logits_soft_cap=None, attn_type="decoder",
          kv_cache_dtype="auto", kv_sharing=False)


@pytest.mark.parametrize("env,msg", [
    ({"KAKEYA_BOUNDARY_SKIP_LAYERS": "0,x"}, "'x' is not an integer"),
    ({"KAKEYA_BOUNDARY_SKIP_LAYERS": "0,30"}, "out of range"),
    ({"KAKEYA_BOUNDARY_SKIP_LAYERS": "1,1"}, "listed twice"),
    ({"KAKEYA_BOUNDARY_SKIP_LAYERS": "-1"}, "negative"),
    ({"KAKEYA_SKIP_LAYERS": "0,,2"}, "empty entry"),
    ({"KAKEYA_FORMAT": "zstd"}, "unknown format"),
    ({"KAKEYA_K_BITS": "four"}, "not an integer"),
    ({"KAKEYA_V_BITS": "9"}, "must be one of"),
])
def test_malformed_settings(env, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        settings(30, env)
    assert "\n" not in str(e.value) and "KAKEYA_" in str(e.value)


def test_v13_is_refused_in_vllm_with_the_alternative():
    with pytest.raises(ValueError, match="KAKEYA_FORMAT=default or exact"):
        settings(30, {"KAKEYA_FORMAT": "v13"})


@pytest.mark.parametrize("override,msg", [
    (dict(alibi=True), "ALiBi"), (dict(sliding_window=4096), "sliding window"),
    (dict(logits_soft_cap=30.0), "soft-cap"), (dict(attn_type="encoder_only"), "encoder_only"),
    (dict(kv_cache_dtype="fp8"), "kv-cache-dtype fp8"), (dict(kv_sharing=True), "KV sharing"),
    (dict(head_size=96), "head_dim 96"), (dict(head_size=80), "supported: 64, 128, 256"),
])
def test_unsupported_attention_is_refused(override, msg):
    check_layer(**OK)
    with pytest.raises(ValueError, match=msg) as e:
        check_layer(**{**OK, **override})
    assert "--attention-backend" in str(e.value)


def test_block_size_and_capacity():
    check_block_size(512)
    check_block_size(1024)
    with pytest.raises(ValueError, match="--block-size 512"):
        check_block_size(16)
    check_capacity(8, 512, 4096)
    with pytest.raises(ValueError, match="needs 8"):
        check_capacity(7, 512, 4096)


def test_no_pickle_anywhere():
    """Files are read as safetensors/JSON only: no pickle, no torch.load, no numpy pickles."""
    root = Path(__file__).resolve().parent.parent
    bad = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\btorch\.load\(|allow_pickle\s*=\s*True|\bdill\b")
    hits = []
    for p in root.rglob("*.py"):
        if any(part.startswith(".") for part in p.relative_to(root).parts) or p.name == Path(__file__).name:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if bad.search(line):
                hits.append(f"{p.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_tail_pool_is_bounded_and_refused_when_too_large():
    from kakeya_v1_3_ppl.checks import check_tail_pool, tail_pool_bytes
    # SmolLM2: 30 layers x 3 heads x 64, 8 rows -> 30 * 8 * 512 * 3 * 64 * 4 B = 90 MiB
    assert tail_pool_bytes(8, 3, 64, 30) == 8 * 512 * 3 * 64 * 4 * 30
    assert check_tail_pool(8, 3, 64, 30, 141 * 2**30) == tail_pool_bytes(8, 3, 64, 30)
    # Qwen3-8B-like: 36 layers x 8 heads x 128 with 1024 rows would need 72 GiB
    with pytest.raises(ValueError, match=r"--max-num-seqs \d+ or less"):
        check_tail_pool(1024, 8, 128, 36, 80 * 2**30)
