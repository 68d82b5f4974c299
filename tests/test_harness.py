"""The evaluation protocol on a tiny random Llama (no download)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kakeya_kv.codecs.base import BF16
from kakeya_kv.codecs.exact import ExactCodec
from kakeya_kv.codecs.kakeya import KakeyaCodec
from kakeya_kv.harness import SealStats, evaluate, summarize, window_logprobs
from kakeya_kv.model_format import ModelFormat, vllm_tq_boundary
from tests.codec_fakes import Zero


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).float().eval()


def test_exact_format_reproduces_bf16_bit_for_bit(model):
    ids = torch.randint(0, 97, (1100,), generator=torch.Generator().manual_seed(1))
    a = window_logprobs(model, ids, ModelFormat("bf16", "bf16", BF16()), 256, 550, SealStats())
    b = window_logprobs(model, ids, ModelFormat("exact", "bf16", ExactCodec()), 256, 550, SealStats())
    assert a.shape == (1100 - 550, 97)
    assert torch.equal(a, b)


def test_chunked_prefill_reads_sealed_blocks(model):
    ids = torch.randint(0, 97, (1024,), generator=torch.Generator().manual_seed(2))
    ref = window_logprobs(model, ids, ModelFormat("bf16", "bf16", BF16()), 256, 1, SealStats())
    z = window_logprobs(model, ids, ModelFormat("zero", "zero", Zero()), 256, 1, SealStats())
    # Before the first block is sealed (positions < 512) outputs are identical ...
    assert torch.allclose(ref[:510], z[:510], atol=1e-5)
    # ... after it, every position reads the zeroed sealed block.
    assert (ref[520:] - z[520:]).abs().amax(-1).min() > 1e-4


def test_one_chunk_prefill_reads_its_own_blocks_exact(model):
    """prefill_chunk (vLLM's KAKEYA_PREFILL_ATTEND=chunk, a prompt in one chunk): the first scored token attends the
    whole prefix exact (its block zeroed by the Zero codec only for later chunks), then the 256-token scoring chunks
    read the sealed prefix; with prefill_chunk=256 the first scored token already reads it sealed."""
    ids = torch.randint(0, 97, (1536,), generator=torch.Generator().manual_seed(4))
    ref = window_logprobs(model, ids, ModelFormat("bf16", "bf16", BF16()), 256, 1024, SealStats())
    zero = ModelFormat("zero", "zero", Zero())
    one = window_logprobs(model, ids, zero, 256, 1024, SealStats(), prefill_chunk=1024)
    blocks = window_logprobs(model, ids, zero, 256, 1024, SealStats())
    assert one.shape == blocks.shape == (512, 97)
    assert torch.allclose(one[0], ref[0], atol=1e-5) and (blocks[0] - ref[0]).abs().max() > 1e-4
    assert (one[10:] - ref[10:]).abs().amax(-1).min() > 1e-4     # later chunks read the zeroed sealed blocks


def test_boundary_layers_stay_exact(model):
    fmt = ModelFormat("zero_all_exact", "zero", Zero(), exact_layers=(0, 1, 2))
    ids = torch.randint(0, 97, (1024,), generator=torch.Generator().manual_seed(3))
    ref = window_logprobs(model, ids, ModelFormat("bf16", "bf16", BF16()), 256, 600, SealStats())
    got = window_logprobs(model, ids, fmt, 256, 600, SealStats())
    assert torch.equal(ref, got)
    assert fmt.bytes_per_token(3, 1, 64) == 3 * 256


def test_evaluate_summary_fields(model):
    wins = [torch.randint(0, 97, (1024,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    fmts = [ModelFormat("bf16", "bf16", BF16()), ModelFormat("k4v3", "kakeya", KakeyaCodec(4, 3))]
    ref, (res,) = evaluate(model, wins, fmts, chunk=256)
    s = summarize(res, ref)
    assert len(res.nll) == 3 and s["kld"] > 0 and 0 < s["k_rel_mse"] < 0.05
    lo, hi = s["delta_ppl_pct_ci95"]
    assert lo <= s["delta_ppl_pct"] + 1e-9 or hi >= s["delta_ppl_pct"] - 1e-9
    assert summarize(ref, ref)["delta_ppl_pct"] == 0.0


def test_vllm_tq_boundary():
    assert vllm_tq_boundary(30) == (0, 1, 28, 29)
    assert vllm_tq_boundary(3) == (0, 2)


def test_verdict_lists_only_dominating_settings():
    from kakeya_kv.report import verdict
    row = lambda n, fam, r, d, ci: {"name": n, "family": fam, "ratio_vs_bf16": r, "delta_ppl_pct": d,
                                    "delta_ppl_pct_ci95": ci}
    res = {"formats": [row("tq", "turboquant", 3.0, 1.0, [0.8, 1.2]),
                       row("a", "kakeya", 4.0, 0.5, [0.3, 0.7]),     # dominates, CI-separated
                       row("b", "kakeya", 3.5, 0.9, [0.7, 1.1]),     # dominates, CIs overlap
                       row("c", "kakeya", 2.0, 0.1, [0.0, 0.2]),     # lower ratio
                       row("d", "kakeya", 5.0, 1.5, [1.3, 1.7])]}    # worse ΔPPL
    line = [l for l in verdict(res).splitlines() if l.startswith("| tq ")][0]
    cells = [c.strip() for c in line.split("|")]
    assert "a (" in cells[4] and "b (" in cells[4] and "c (" not in cells[4] and "d (" not in cells[4]
    assert "a (" in cells[5] and "b (" not in cells[5]


def test_fp8_format_also_quantizes_the_query_like_vllm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kakeya_kv.codecs.base import BF16
    from kakeya_kv.codecs.competitors import FP8E4M3
    from kakeya_kv.harness import SealStats, window_logprobs
    from kakeya_kv.model_format import ModelFormat
    from kakeya_kv.query_quant import NAME

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).float().eval()
    model.config._attn_implementation = NAME
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1))

    class KVOnlyFP8(FP8E4M3):
        query_quant = None

    lp = lambda codec: window_logprobs(model, ids, ModelFormat("f", "fp8", codec), 256, 150, SealStats())
    ref = window_logprobs(model, ids, ModelFormat("bf16", "bf16", BF16()), 256, 150, SealStats())
    with_q, kv_only = lp(FP8E4M3()), lp(KVOnlyFP8())
    assert not torch.equal(with_q, kv_only)            # the query cast is applied
    assert not torch.equal(kv_only, ref)               # and the KV cast too


def test_kakeya_sdpa_equals_sdpa_without_query_quant():
    """The harness's attention is transformers' SDPA (causal mask included, also for chunks that attend a
    cache) unless a format casts the query."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kakeya_kv.codecs.base import BF16
    from kakeya_kv.harness import SealStats, window_logprobs
    from kakeya_kv.model_format import ModelFormat
    from kakeya_kv.query_quant import NAME
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).float().eval()
    ids = torch.randint(0, 97, (96,), generator=torch.Generator().manual_seed(1))
    bf16 = ModelFormat("bf16", "bf16", BF16())
    ref = window_logprobs(model, ids, bf16, 32, 48, SealStats())
    model.config._attn_implementation = NAME
    got = window_logprobs(model, ids, bf16, 32, 48, SealStats())
    assert torch.allclose(ref, got, atol=1e-5)


def test_by_name_builds_any_allowed_kakeya_setting():
    from kakeya_kv import formats
    f = formats.by_name(30, ["kakeya_k5v4"])
    assert [x.name for x in f] == ["bf16", "kakeya_k5v4"] and f[1].codec.k_bits == 5
    with pytest.raises(SystemExit, match="unknown format"):
        formats.by_name(30, ["kakeya_k9v9x"])


def test_evaluate_stops_between_windows_when_told():
    """A deadline ends the run between windows: every format keeps the same completed windows."""
    import torch

    from kakeya_kv import harness
    from kakeya_kv.codecs.base import BF16
    from kakeya_kv.model_format import ModelFormat

    calls = []
    orig = harness._score_window

    def fake_score(r, model, w, chunk, ref_lp):
        calls.append(r.fmt.name)
        r.nll.append(1.0)
        return torch.zeros(1)

    harness._score_window = fake_score
    try:
        fmts = [ModelFormat("bf16", "bf16", BF16()), ModelFormat("other", "bf16", BF16())]
        wins = [torch.zeros(4, dtype=torch.long)] * 3
        ref, res = harness.evaluate(None, wins, fmts, should_stop=lambda: len(calls) >= 4)
    finally:
        harness._score_window = orig
    assert len(ref.nll) == 2 and len(res[0].nll) == 2     # stopped after window 2 of 3
