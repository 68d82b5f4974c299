"""Serving benchmark (issue 6), offline part: KV capacity, max concurrent long requests, prefill and
decode throughput in vLLM for each KV configuration, same card, one subprocess per configuration.

    source .gpukit/setup.sh; source scripts/device_install.sh
    python benchmarks/serving/serve_bench.py --model qwen3-8b-like --configs flash_bf16,kakeya_k4v3 \
        --contexts 8192,32768 --out $OUT/serving.json

Dummy weights (`load_format="dummy"`) with the exact geometry of `models/<name>/config.json`,
token-id prompts (no tokenizer): speed and memory only, never quality. Decode throughput uses the
prefix cache: a first pass prefills the B prompts (max_tokens=1), the timed second pass re-uses those
blocks and decodes G tokens per request, so it measures decode over a context of ~C tokens.
`server`: TPOT/TTFT (p50/p99) through the OpenAI server for a request-rate sweep, with vLLM's own
`vllm bench serve` (random dataset; the SmolLM2 tokenizer from the gpu-kit stands in for the dummy
model's, whose vocabulary is larger). Not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "flash_bf16": ({"attention_backend": "FLASH_ATTN"}, {}),
    "fp8": ({"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "fp8"}, {}),
    "int4_per_token_head": ({"attention_backend": "TRITON_ATTN", "kv_cache_dtype": "int4_per_token_head"}, {}),
    "turboquant_4bit_nc": ({"kv_cache_dtype": "turboquant_4bit_nc"}, {}),    # gpu-kit --with-fa2
    "turboquant_3bit_nc": ({"kv_cache_dtype": "turboquant_3bit_nc"}, {}),
    "kakeya_k4v3": ({"attention_backend": "KAKEYA"}, {}),
    "kakeya_k4v3_graphs": ({"attention_backend": "KAKEYA"}, {"KAKEYA_CUDA_GRAPHS": "1"}),
    "kakeya_k3v2": ({"attention_backend": "KAKEYA"}, {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2"}),
}


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1000, vocab - 1000) for _ in range(length)]} for _ in range(n)]


def one(a) -> int:
    kw, env = CONFIGS[a.config]
    os.environ.update(env)
    from vllm import LLM, SamplingParams
    model_dir = str(HERE / "models" / a.model)
    vocab = json.load(open(Path(model_dir) / "config.json"))["vocab_size"]
    ctxs = [int(c) for c in a.contexts.split(",")]
    t0 = time.time()
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, enable_prefix_caching=True,
              gpu_memory_utilization=a.gpu_util, max_model_len=max(ctxs) + a.gen + 16, max_num_seqs=a.max_seqs,
              max_num_batched_tokens=a.batched_tokens, tensor_parallel_size=a.tp, **kw)
    cc = llm.llm_engine.vllm_config.cache_config
    cap = (cc.num_gpu_blocks or 0) * cc.block_size
    row = {"model": a.model, "config": a.config, "tp": a.tp, "capacity_tokens": cap, "block_size": cc.block_size,
           "init_s": time.time() - t0, "max_num_seqs": a.max_seqs}
    one_tok = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    gen = SamplingParams(max_tokens=a.gen, ignore_eos=True, detokenize=False)
    # Prefill throughput: 4 fresh prompts of 8k tokens.
    p = _prompts(4, 8192, vocab, 1)
    llm.generate(_prompts(1, 512, vocab, 99), one_tok, use_tqdm=False)          # warm-up
    t = time.time()
    llm.generate(p, one_tok, use_tqdm=False)
    row["prefill_tok_s"] = 4 * 8192 / (time.time() - t)
    for C in ctxs:
        fit = cap // (C + a.gen)
        row[f"max_batch_{C // 1024}k"] = min(fit, a.max_seqs)
        for label, B in (("b16", 16), ("max_batch", min(fit, a.max_seqs))):
            if B < 1 or B > fit:
                row[f"decode_tok_s_{label}_{C // 1024}k"] = None
                continue
            prompts = _prompts(B, C, vocab, 1000 + C + B)
            llm.generate(prompts, one_tok, use_tqdm=False)                       # fill the prefix cache
            t = time.time()
            llm.generate(prompts, gen, use_tqdm=False)                           # decode over cached context
            row[f"decode_tok_s_{label}_{C // 1024}k"] = B * a.gen / (time.time() - t)
            llm.reset_prefix_cache()
    print("RESULT " + json.dumps(row), flush=True)
    return 0


def server(a) -> int:
    """One config: start `vllm serve`, sweep request rates with `vllm bench serve`, print RESULT json."""
    import urllib.request
    kw, env = CONFIGS[a.config]
    model_dir = str(HERE / "models" / a.model)
    port = 8000 + random.Random(a.config).randrange(500)
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir, "--load-format", "dummy", "--tokenizer", a.tokenizer, "--port", str(port),
           "--gpu-memory-utilization", str(a.gpu_util), "--max-model-len", str(a.input_len + a.output_len + 64),
           "--max-num-seqs", str(a.max_seqs), "--tensor-parallel-size", str(a.tp)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    srv = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if srv.poll() is not None or time.time() - t0 > a.startup_s:
                    raise RuntimeError("server did not start: " + srv.stderr.read().decode(errors="replace")[-2000:])
                time.sleep(2)
        sweep = []
        for rate in a.rates.split(","):
            res_file = f"/tmp/bench_{a.config}_{rate}.json"
            b = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm", "--model", model_dir, "--tokenizer",
                                a.tokenizer, "--port", str(port), "--dataset-name", "random", "--random-input-len",
                                str(a.input_len), "--random-output-len", str(a.output_len), "--ignore-eos",
                                "--num-prompts", str(a.num_prompts), "--request-rate", rate, "--save-result",
                                "--result-filename", res_file], capture_output=True, text=True)
            if b.returncode:
                raise RuntimeError(f"vllm bench serve failed at rate {rate}: {(b.stdout + b.stderr)[-1500:]}")
            r = json.load(open(res_file))
            sweep.append({"request_rate": rate, **{k: r.get(k) for k in (
                "median_tpot_ms", "p99_tpot_ms", "median_ttft_ms", "p99_ttft_ms", "request_throughput",
                "output_throughput", "completed")}})
        print("RESULT " + json.dumps({"model": a.model, "config": a.config, "tp": a.tp, "sweep": sweep}), flush=True)
    finally:
        srv.terminate()
        srv.wait(timeout=60)
    return 0


def run(a) -> int:
    import torch
    rows = []
    for name in a.configs.split(","):
        cmd = [sys.executable, __file__, "one", "--config", name, "--model", a.model, "--contexts", a.contexts,
               "--gen", str(a.gen), "--gpu-util", str(a.gpu_util), "--max-seqs", str(a.max_seqs),
               "--batched-tokens", str(a.batched_tokens), "--tp", str(a.tp)]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"), -9
        line = [l for l in out.splitlines() if l.startswith("RESULT ")]
        if rc or not line:
            print(f"[{name}] FAILED rc={rc} ({time.time() - t0:.0f}s)\n{out[-2500:]}", flush=True)
            rows.append({"model": a.model, "config": name, "tp": a.tp, "error": out[-800:]})
        else:
            rows.append(json.loads(line[0][7:]))
            print(f"[{name}] {rows[-1]} ({time.time() - t0:.0f}s)", flush=True)
        json.dump(rows, open(a.out + ".partial", "w"))
    res = {"gpu": torch.cuda.get_device_name(0), "rows": rows}
    json.dump(res, open(a.out, "w"), indent=1)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("one", one), ("run", run)):
        s = sub.add_parser(name)
        s.add_argument("--model", default="qwen3-8b-like", choices=sorted(d.name for d in (HERE / "models").iterdir()))
        s.add_argument("--contexts", default="8192,32768")
        s.add_argument("--gen", type=int, default=64, help="decode tokens per request in the timed pass")
        s.add_argument("--gpu-util", type=float, default=0.9)
        s.add_argument("--max-seqs", type=int, default=64, help="same for every config (the Kakeya tail pool scales with it)")
        s.add_argument("--batched-tokens", type=int, default=8192)
        s.add_argument("--tp", type=int, default=1)
        s.set_defaults(fn=fn)
        if name == "one":
            s.add_argument("--config", required=True, choices=sorted(CONFIGS))
        else:
            s.add_argument("--configs", default="flash_bf16,fp8,int4_per_token_head,kakeya_k4v3")
            s.add_argument("--out", default="benchmarks/results/serving.json")
            s.add_argument("--timeout", type=int, default=900)
    sv = sub.add_parser("server", help="TPOT/TTFT sweep through the OpenAI server (one config)")
    sv.add_argument("--config", required=True, choices=sorted(CONFIGS))
    sv.add_argument("--model", default="qwen3-8b-like")
    sv.add_argument("--tokenizer", default="/tmp/models/SmolLM2-135M-Instruct")
    sv.add_argument("--input-len", type=int, default=8192)
    sv.add_argument("--output-len", type=int, default=128)
    sv.add_argument("--num-prompts", type=int, default=64)
    sv.add_argument("--rates", default="1,4,16")
    sv.add_argument("--gpu-util", type=float, default=0.9)
    sv.add_argument("--max-seqs", type=int, default=64)
    sv.add_argument("--tp", type=int, default=1)
    sv.add_argument("--startup-s", type=int, default=600)
    sv.set_defaults(fn=server)
    a = p.parse_args()
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
