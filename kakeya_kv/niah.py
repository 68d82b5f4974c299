"""Needle in a haystack through the codec cache (HF/CPU): can the model still retrieve one fact
planted at a given depth of a 4k / 8k-token Austen context when its KV is stored compressed?

The context is prefilled in 256-token chunks (sealed 512-token blocks + exact tail, as the server
sees it), then the answer is decoded greedily from the same cache. A trial succeeds when the
needle's number appears in the first tokens generated. bf16 runs the same trials, so a format is
judged against what the model itself can do. The vLLM path (`kakeya_kv.vllm_eval`) runs the very same
trials (`trials`, `score`); a trial's prompt leaves MAX_NEW positions free below the model's
max_position_embeddings (SmolLM2: 8192), so the "8k" prompt is 8184 tokens.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # torch/transformers only where a model runs: the vLLM path imports this module too
    from .model_format import ModelFormat

NEEDLE = " The secret number of the old library is {n}. "
QUESTION = "\n\nQuestion: What is the secret number of the old library?\nAnswer: The secret number of the old library is"
NUMBERS = (48213, 90527, 31764, 67049, 25831, 74196, 13570, 59302, 86415, 40973)
MAX_NEW = 8   # tokens generated per trial; the number comes first


def build_prompt(tok, hay_ids: list[int], context: int, depth: float, number: int) -> list[int]:
    needle = tok(NEEDLE.format(n=number), add_special_tokens=False)["input_ids"]
    q = tok(QUESTION, add_special_tokens=False)["input_ids"]
    n_hay = context - len(needle) - len(q)
    hay = hay_ids[:n_hay]
    at = int(depth * n_hay)
    return hay[:at] + needle + hay[at:] + q


def depths(n: int) -> tuple[float, ...]:
    """n needle depths, each centred in one of n equal slices of the haystack (n=5: 0.1, 0.3, ..., 0.9)."""
    if n < 1:
        raise ValueError(f"need at least one depth, got {n}")
    return tuple(round((i + 0.5) / n, 6) for i in range(n))


def prompt_tokens(context: int, max_pos: int, max_new: int = MAX_NEW) -> int:
    """Prompt length of a `context` trial: prompt + answer must fit the model's positions (vLLM refuses
    prompt + max_tokens > max_model_len; positions past max_position_embeddings were never trained)."""
    return min(context, max_pos - max_new)


def trials(tok, hay_ids: list[int], contexts, depth_list, max_pos: int, max_new: int = MAX_NEW) -> list[dict]:
    """The trials (context, depth, number, prompt ids) both the HF and the vLLM path run."""
    out = []
    for ctx in contexts:
        for i, depth in enumerate(depth_list):
            n = NUMBERS[i % len(NUMBERS)]
            ids = build_prompt(tok, hay_ids, prompt_tokens(ctx, max_pos, max_new), depth, n)
            out.append({"context": ctx, "depth": depth, "number": n, "ids": ids})
    return out


def is_hit(number: int, text: str) -> bool:
    return str(number) in text.replace(" ", "")


def score(trial_list: list[dict], texts: list[str]) -> dict:
    """niah_{C}k = fraction of trials of context C whose answer contains the needle's number (+ hits, answers)."""
    if len(trial_list) != len(texts):
        raise ValueError(f"{len(trial_list)} trials but {len(texts)} answers")
    out: dict = {}
    for ctx in sorted({t["context"] for t in trial_list}):
        key = f"niah_{ctx // 1024}k"
        pairs = [(t, x) for t, x in zip(trial_list, texts) if t["context"] == ctx]
        hits = [is_hit(t["number"], x) for t, x in pairs]
        out[key] = sum(hits) / len(hits)
        out[key + "_hits"] = hits
        out[key + "_answers"] = [x for _, x in pairs]
        out[key + "_depths"] = [t["depth"] for t, _ in pairs]
    return out


def answer(model, ids: list[int], fmt: ModelFormat, chunk: int = 256, max_new: int = MAX_NEW) -> list[int]:
    import torch

    from .harness import SealStats, codec_cache
    cache = codec_cache(model, fmt, SealStats())
    x = torch.tensor(ids)
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            logits = model(input_ids=x[s:s + chunk][None], past_key_values=cache, use_cache=True).logits[0, -1]
        for _ in range(max_new):
            t = int(logits.argmax())
            out.append(t)
            logits = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return out


def run(model, tok, fmts: list[ModelFormat], contexts=(4096, 8192), depth_list=depths(5),
        progress=None) -> list[dict]:
    from . import data
    hay = data.corpus_tokens(tok, data.EVAL_BOOKS)[:max(contexts)]
    tl = trials(tok, hay, contexts, depth_list, model.config.max_position_embeddings)
    rows = []
    for fmt in fmts:
        texts = []
        for t in tl:
            texts.append(tok.decode(answer(model, t["ids"], fmt)))
            if progress is not None:
                progress.update(1)
        rows.append({"name": fmt.name, "family": fmt.family, **score(tl, texts)})
    return rows


def main(a) -> int:
    from tqdm import tqdm

    from . import formats
    from .cli import _load
    from .report import write_json
    t0 = time.time()
    model, tok = _load(a.threads)
    L = model.config.num_hidden_layers
    fmts = formats.by_name(L, a.formats.split(","))
    ctxs = tuple(int(c) for c in a.contexts.split(","))
    dl = tuple(float(d) for d in a.depths.split(","))
    with tqdm(total=len(fmts) * len(ctxs) * len(dl), desc="niah trials", file=sys.stderr) as bar:
        rows = run(model, tok, fmts, ctxs, dl, progress=bar)
    res = {"model": "SmolLM2-135M-Instruct", "haystack": "Austen evaluation books", "contexts": list(ctxs),
           "depths": list(dl), "chunk": 256, "command": "kakeya-kv " + " ".join(sys.argv[1:]),
           "elapsed_s": time.time() - t0, "formats": rows}
    out = Path(a.out)
    write_json(out / "niah.json", res)
    keys = [f"niah_{c // 1024}k" for c in ctxs]
    lines = [f"# Needle in a haystack (HF/CPU, codec cache, chunked prefill 256; depths {list(dl)})", "",
             "| format | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    (out / "NIAH.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
