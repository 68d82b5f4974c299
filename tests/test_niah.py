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
