"""Needle in a haystack through the codec cache (HF/CPU): can the model still retrieve one fact
planted at a given depth of a 4k / 8k-token Austen context when its KV is stored compressed?

The context is prefilled in 256-token chunks (sealed 512-token blocks + exact tail, as the server
sees it), then the answer is decoded greedily from the same cache. A trial succeeds when the
needle's number appears in the first tokens generated. bf16 runs the same trials, so a format is
judged against what the model itself can do.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .harness import SealStats, codec_cache
from .model_format import ModelFormat

NEEDLE = " The secret number of the old library is {n}. "
QUESTION = "\n\nQuestion: What is the secret number of the old library?\nAnswer: The secret number of the old library is"
NUMBERS = (48213, 90527, 31764, 67049, 25831, 74196, 13570, 59302)


def build_prompt(tok, hay_ids: list[int], context: int, depth: float, number: int) -> list[int]:
    needle = tok(NEEDLE.format(n=number), add_special_tokens=False)["input_ids"]
    q = tok(QUESTION, add_special_tokens=False)["input_ids"]
    n_hay = context - len(needle) - len(q)
    hay = hay_ids[:n_hay]
    at = int(depth * n_hay)
    return hay[:at] + needle + hay[at:] + q


@torch.no_grad()
def answer(model, ids: list[int], fmt: ModelFormat, chunk: int = 256, max_new: int = 8) -> list[int]:
    cache = codec_cache(model, fmt, SealStats())
    x = torch.tensor(ids)
    logits = None
    for s in range(0, len(ids), chunk):
        logits = model(input_ids=x[s:s + chunk][None], past_key_values=cache, use_cache=True).logits[0, -1]
    out = []
    for _ in range(max_new):
        t = int(logits.argmax())
        out.append(t)
        logits = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return out


def run(model, tok, fmts: list[ModelFormat], contexts=(4096, 8192), depths=(0.1, 0.3, 0.5, 0.7, 0.9),
        progress=None) -> list[dict]:
    from . import data
    hay = data.corpus_tokens(tok, data.EVAL_BOOKS)[:max(contexts)]
    rows = []
    for fmt in fmts:
        row = {"name": fmt.name, "family": fmt.family}
        for ctx in contexts:
            hits, answers = [], []
            for i, depth in enumerate(depths):
                n = NUMBERS[i % len(NUMBERS)]
                gen = tok.decode(answer(model, build_prompt(tok, hay, ctx, depth, n), fmt))
                hits.append(str(n) in gen.replace(" ", ""))
                answers.append(gen)
                if progress is not None:
                    progress.update(1)
            row[f"niah_{ctx // 1024}k"] = sum(hits) / len(hits)
            row[f"niah_{ctx // 1024}k_hits"] = hits
            row[f"niah_{ctx // 1024}k_answers"] = answers
        rows.append(row)
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
    depths = tuple(float(d) for d in a.depths.split(","))
    with tqdm(total=len(fmts) * len(ctxs) * len(depths), desc="niah trials", file=sys.stderr) as bar:
        rows = run(model, tok, fmts, ctxs, depths, progress=bar)
    res = {"model": "SmolLM2-135M-Instruct", "haystack": "Austen evaluation books", "contexts": list(ctxs),
           "depths": list(depths), "chunk": 256, "command": "kakeya-kv " + " ".join(sys.argv[1:]),
           "elapsed_s": time.time() - t0, "formats": rows}
    out = Path(a.out)
    write_json(out / "niah.json", res)
    keys = [f"niah_{c // 1024}k" for c in ctxs]
    lines = [f"# Needle in a haystack (HF/CPU, codec cache, chunked prefill 256; depths {list(depths)})", "",
             "| format | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    (out / "NIAH.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
