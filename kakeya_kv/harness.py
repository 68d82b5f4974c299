"""HF/CPU evaluation harness: a transformers cache that stores K/V through a codec.

Protocol (the way the vLLM server sees a prompt): each window of ``window``
tokens is fed in chunks of ``chunk`` tokens. Each chunk attends to the decoded
sealed blocks + the exact bf16 tail + its own exact K/V; once a layer's tail
holds ``codec.block_tokens`` tokens they are sealed (encoded + decoded) and
only the decoded values are seen afterwards. Per-token formats (TurboQuant,
int4, fp8) have block_tokens = 1: every earlier token is read compressed, as
in vLLM. The second half of each window is scored: PPL, and KLD against the
bf16 run of the same chunks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .model_format import ModelFormat


class CodecLayer(DynamicLayer):
    def __init__(self, layer_idx: int, fmt: ModelFormat, stats: "SealStats"):
        super().__init__()
        self.layer_idx = layer_idx
        self.codec = fmt.codec_for(layer_idx)
        self.stats = stats
        self.n_sealed = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # The server stores bf16: everything attention reads is bf16-representable.
        kn = key_states.to(torch.bfloat16).to(key_states.dtype)
        vn = value_states.to(torch.bfloat16).to(value_states.dtype)
        keys = torch.cat([self.keys, kn], -2)
        values = torch.cat([self.values, vn], -2)
        self.keys, self.values = keys, values
        if self.codec is not None and not self.codec.self_exact:
            # Written to the cache first, attention reads every token back compressed (the chunk too).
            kh, vh = self.codec.roundtrip(kn[0].float(), vn[0].float(), self.layer_idx)
            self.stats.add(self.layer_idx, kn[0].float(), vn[0].float(), kh, vh)
            self.keys = torch.cat([keys[..., :-kn.shape[-2], :], kh[None].to(keys.dtype)], -2)
            self.values = torch.cat([values[..., :-vn.shape[-2], :], vh[None].to(values.dtype)], -2)
            self.n_sealed = self.keys.shape[-2]
            return self.keys, self.values
        if self.codec is not None:
            bt = self.codec.block_tokens
            upto = (keys.shape[-2] // bt) * bt
            if upto > self.n_sealed:
                seg_k = keys[0, :, self.n_sealed:upto].float()
                seg_v = values[0, :, self.n_sealed:upto].float()
                kh, vh = self.codec.roundtrip(seg_k, seg_v, self.layer_idx)
                self.stats.add(self.layer_idx, seg_k, seg_v, kh, vh)
                self.keys = torch.cat([keys[..., :self.n_sealed, :], kh[None].to(keys.dtype),
                                       keys[..., upto:, :]], -2)
                self.values = torch.cat([values[..., :self.n_sealed, :], vh[None].to(values.dtype),
                                         values[..., upto:, :]], -2)
                self.n_sealed = upto
        return keys, values


@dataclass
class SealStats:
    k_err: float = 0.0
    k_energy: float = 0.0
    v_err: float = 0.0
    v_energy: float = 0.0

    def add(self, layer, k, v, kh, vh):
        # Relative MSE about the per-channel mean: a pure offset error would be
        # invisible to softmax for K, so the centred energy is the honest scale.
        self.k_err += (kh - k).pow(2).sum().item()
        self.k_energy += (k - k.mean(-2, keepdim=True)).pow(2).sum().item()
        self.v_err += (vh - v).pow(2).sum().item()
        self.v_energy += (v - v.mean(-2, keepdim=True)).pow(2).sum().item()

    def merge(self, o: "SealStats"):
        self.k_err += o.k_err
        self.k_energy += o.k_energy
        self.v_err += o.v_err
        self.v_energy += o.v_energy


def codec_cache(model, fmt: ModelFormat, stats: SealStats) -> Cache:
    n = model.config.num_hidden_layers
    return Cache(layers=[CodecLayer(i, fmt, stats) for i in range(n)])


@torch.no_grad()
def window_logprobs(model, ids: torch.Tensor, fmt: ModelFormat, chunk: int, score_from: int,
                    stats: SealStats, prefill_chunk: int | None = None) -> torch.Tensor:
    """Log-probs [len(ids) - score_from, V] predicting ids[score_from:], via chunked prefill. prefill_chunk: the
    tokens before score_from go in chunks of that size instead (e.g. all in one: vLLM's KAKEYA_PREFILL_ATTEND=chunk
    for a prompt prefilled in one chunk), the scored ones in chunks of ``chunk``."""
    from .query_quant import quantized_query
    cache = codec_cache(model, fmt, stats)
    outs = []
    with quantized_query(getattr(fmt.codec, "query_quant", None)):
        _chunks(model, ids, cache, chunk, score_from, outs, prefill_chunk)
    return torch.cat(outs, 0)


def _chunks(model, ids, cache, chunk, score_from, outs, prefill_chunk=None):
    n = ids.shape[0]
    starts = (list(range(0, n, chunk)) if prefill_chunk is None
              else list(range(0, score_from, prefill_chunk)) + list(range(score_from, n, chunk)))
    for s, e in zip(starts, starts[1:] + [n]):
        piece = ids[s:e]
        logits = model(input_ids=piece[None], past_key_values=cache, use_cache=True).logits[0]
        # logits at position p predict token p+1; keep p in [score_from-1, len-2]
        lo, hi = max(s, score_from - 1), min(s + piece.shape[0], ids.shape[0] - 1)
        if hi > lo:
            outs.append(torch.log_softmax(logits[lo - s:hi - s].float(), -1))


@dataclass
class FormatResult:
    fmt: ModelFormat
    nll: list[float] = field(default_factory=list)     # per-window mean NLL
    kld: list[float] = field(default_factory=list)     # per-window mean KL(bf16 || fmt)
    top1: list[float] = field(default_factory=list)    # per-window top-1 agreement with bf16
    stats: SealStats = field(default_factory=SealStats)


def t95(n: int) -> float:
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
             15: 2.13, 20: 2.09, 30: 2.04, 40: 2.02, 60: 2.00, 120: 1.98}
    keys = sorted(table)
    for k in keys:
        if n <= k:
            return table[k]
    return 1.96


def summarize(res: FormatResult, ref: FormatResult) -> dict:
    from .quality import paired_delta_pct     # one paired-ΔPPL interval for the HF and vLLM reports
    n = len(res.nll)
    ppl = math.exp(sum(res.nll) / n)
    delta, ci = paired_delta_pct(res.nll, ref.nll)
    window_ppl = [math.exp(x) for x in res.nll]
    wm = sum(window_ppl) / n
    return {
        "ppl": ppl,
        "delta_ppl_pct": delta,
        "delta_ppl_pct_ci95": ci if ci is not None else [float("nan"), float("nan")],
        "ppl_window_sd": math.sqrt(sum((p - wm) ** 2 for p in window_ppl) / (n - 1)) if n > 1 else 0.0,
        "kld": sum(res.kld) / n,
        "kld_window_sd": (math.sqrt(sum((x - sum(res.kld) / n) ** 2 for x in res.kld) / (n - 1))
                          if n > 1 else 0.0),
        "top1_agree": sum(res.top1) / n,
        "k_rel_mse": res.stats.k_err / res.stats.k_energy if res.stats.k_energy else 0.0,
        "v_rel_mse": res.stats.v_err / res.stats.v_energy if res.stats.v_energy else 0.0,
    }


def _score_window(r: FormatResult, model, w: torch.Tensor, chunk: int, ref_lp: torch.Tensor | None) -> torch.Tensor:
    """Run r's format on window w (second half scored); append NLL, and KLD / top-1 against ref_lp
    (None: r is the reference). Returns the scored log-probabilities."""
    score_from = w.shape[0] // 2
    lp = window_logprobs(model, w, r.fmt, chunk, score_from, r.stats)
    r.nll.append(-lp.gather(1, w[score_from:][:, None]).mean().item())
    if ref_lp is None:
        r.kld.append(0.0)
        r.top1.append(1.0)
    else:
        r.kld.append((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item())
        r.top1.append((ref_lp.argmax(-1) == lp.argmax(-1)).float().mean().item())
    return lp


def evaluate(model, windows: list[torch.Tensor], formats: list[ModelFormat], chunk: int = 256,
             progress=None, should_stop=None) -> tuple[FormatResult, list[FormatResult]]:
    """Run every format on every window; the first format must be the bf16 reference. Window-major, so
    only one window's reference log-probabilities are held at a time, and a `should_stop()` that turns
    true (a deadline) ends the run between windows with every format on the same windows."""
    results = [FormatResult(f) for f in formats]
    for w in windows:
        if should_stop is not None and should_stop():
            break
        ref_lp = _score_window(results[0], model, w, chunk, None)
        if progress is not None:
            progress.update(1)
        for r in results[1:]:
            _score_window(r, model, w, chunk, ref_lp)
            if progress is not None:
                progress.update(1)
    return results[0], results[1:]


def reference(model, windows: list[torch.Tensor], chunk: int = 256) -> tuple[FormatResult, list[torch.Tensor]]:
    """bf16 reference result and its scored log-probabilities per window (kept for later KLDs)."""
    from .codecs.base import BF16
    res = FormatResult(ModelFormat("bf16", "bf16", BF16()))
    return res, [_score_window(res, model, w, chunk, None) for w in windows]


def evaluate_against(model, windows: list[torch.Tensor], fmt: ModelFormat, ref_lps: list[torch.Tensor],
                     chunk: int = 256) -> FormatResult:
    """One format on the windows, KLD/top-1 against the stored reference log-probabilities."""
    r = FormatResult(fmt)
    for w, ref_lp in zip(windows, ref_lps):
        _score_window(r, model, w, chunk, ref_lp)
    return r
