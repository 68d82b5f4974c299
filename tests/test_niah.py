"""Needle-in-a-haystack plumbing on a tiny random model (the real run is `kakeya-kv niah`)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kakeya_kv.codecs.base import BF16
from kakeya_kv.codecs.kakeya import KakeyaCodec
from kakeya_kv.model_format import ModelFormat
from kakeya_kv.niah import answer


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_prompt_places_the_needle_at_depth():
    from kakeya_kv.niah import NEEDLE, build_prompt
    tok = _Tok()
    hay = list(range(5, 90)) * 100
    ids = build_prompt(tok, hay, 1000, 0.5, 12345)
    needle = tok(NEEDLE.format(n=12345))["input_ids"]
    at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
    assert len(ids) == 1000 and 0.35 < at / 1000 < 0.5   # half-way into the haystack, before the question


def test_answer_decodes_from_the_codec_cache():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).float().eval()
    ids = torch.randint(0, 97, (1100,), generator=torch.Generator().manual_seed(1)).tolist()
    a = answer(model, ids, ModelFormat("bf16", "bf16", BF16()), max_new=4)
    b = answer(model, ids, ModelFormat("bf16", "bf16", BF16()), max_new=4)
    c = answer(model, ids, ModelFormat("k3v2", "kakeya", KakeyaCodec(3, 2)), max_new=4)
    assert a == b and len(c) == 4


def test_same_trials_for_both_backends():
    from kakeya_kv.niah import MAX_NEW, NUMBERS, depths, prompt_tokens, score, trials
    assert depths(5) == (0.1, 0.3, 0.5, 0.7, 0.9) and len(set(depths(10))) == 10
    assert prompt_tokens(4096, 8192) == 4096 and prompt_tokens(8192, 8192) == 8192 - MAX_NEW
    tl = trials(_Tok(), list(range(5, 90)) * 200, (4096, 8192), depths(10), 8192)
    assert [len(t["ids"]) for t in tl] == [4096] * 10 + [8192 - MAX_NEW] * 10
    assert [t["number"] for t in tl[:10]] == list(NUMBERS[:10])
    texts = [f" {t['number']}." if i % 4 else " the old library" for i, t in enumerate(tl)]
    s = score(tl, texts)
    assert s["niah_4k"] == 0.7 and s["niah_8k"] == 0.8 and s["niah_8k_depths"] == list(depths(10))
    assert score(tl[:1], [" 48 213"])["niah_4k"] == 1.0          # digits split by spaces still count
