"""Per-layer bit widths (KAKEYA_LAYER_BITS) in vLLM on the lent GPU — NOT YET RUN on a GPU.

Checks: each layer binds its widths and backend class (also when set through --additional-config); with a fixed KV budget the number of pages vLLM allocates
follows the per-layer page layout (pages.model_pages) against uniform k3v2; greedy copy-task output through
per-layer pages is as correct as uniform k3v2. Run with ``pytest -m gpu tests/test_vllm_perlayer_gpu.py`` after
``source .gpukit/setup.sh`` and ``source scripts/device_install.sh``.
"""
import random

import pytest

from tests.vllm_gpu_common import MODEL, copy_prompt, inproc_llm, record, require_vllm_gpu

pytestmark = pytest.mark.gpu
require_vllm_gpu()

UNIFORM = {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2", "KAKEYA_BOUNDARY_SKIP_LAYERS": "", "KAKEYA_LAYER_BITS": ""}
PER_LAYER = dict(UNIFORM, KAKEYA_BOUNDARY_SKIP_LAYERS="0", KAKEYA_LAYER_BITS="17-18:4/3,23-24:5/4")
KV_BYTES = 512 * 2**20


def _run(env: dict, **llm_kwargs) -> dict:
    rng = random.Random(7)
    prompts = [copy_prompt(rng, n) for n in (1300, 1700, 2100)]
    with inproc_llm(env, model=MODEL, attention_backend="KAKEYA", enforce_eager=True, kv_cache_memory_bytes=KV_BYTES,
                    max_model_len=4096, max_num_batched_tokens=256, max_num_seqs=8, **llm_kwargs) as llm:
        from vllm import SamplingParams
        layers = llm.apply_model(lambda model: sorted(
            (m.impl.layer_idx, m.impl.bits, m.attn_backend.__name__) for m in model.modules()
            if type(m).__name__ == "Attention" and hasattr(m.impl, "bits")))
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, detokenize=False))
        blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    hits = 0
    for p, o in zip(prompts, outs):
        seg = max(8, min(len(p) // 3, 800))
        want = [p[(len(p) + i) % seg] for i in range(32)]   # the copy continues the repeated segment
        hits += sum(a == b for a, b in zip(o.outputs[0].token_ids, want))
    return {"layers": layers[0] if layers and isinstance(layers[0], list) else layers, "blocks": blocks,
            "copy_hits": hits, "copy_total": 32 * len(prompts)}


def test_per_layer_widths_pages_and_output():
    from kakeya_kv.config import KakeyaConfig
    from kakeya_v1_3_ppl.pages import model_pages
    uni, mix = _run(UNIFORM), _run(PER_LAYER)
    record("perlayer", uniform=uni, per_layer={k: v for k, v in mix.items() if k != "layers"})
    by_layer = {i: (tuple(b) if isinstance(b, (list, tuple)) else b, name) for i, b, name in mix["layers"]}
    assert by_layer[0] == ("exact", "KakeyaExactBackend")
    assert by_layer[17] == ((4, 3), "KakeyaBackend_k4v3") and by_layer[24] == ((5, 4), "KakeyaBackend_k5v4")
    assert by_layer[1] == ((3, 2), "KakeyaBackend")
    L, H, D = len(by_layer), 3, 64   # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
    want = (model_pages(KakeyaConfig.from_env(UNIFORM, num_layers=L), L, H, D)["bytes_per_block"]
            / model_pages(KakeyaConfig.from_env(PER_LAYER, num_layers=L), L, H, D)["bytes_per_block"])
    assert mix["blocks"] / uni["blocks"] == pytest.approx(want, abs=2 / uni["blocks"])
    # More bits on some layers and one exact layer must not copy worse than uniform k3v2.
    assert mix["copy_hits"] >= uni["copy_hits"] - 2 and uni["copy_hits"] >= 0.8 * uni["copy_total"]


def test_additional_config_sets_the_same_layers_as_the_environment():
    """--additional-config '{"kakeya": {...}}' (LLM(additional_config=...)) serves exactly what the KAKEYA_* variables
    would: same per-layer widths and backend classes, same number of pages."""
    import os
    short = {k[len("KAKEYA_"):].lower(): v for k, v in PER_LAYER.items()}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("KAKEYA_")}
    try:
        via_config = _run({}, additional_config={"kakeya": short})
    finally:   # the backend exports the settings into this process's environment: undo that for later tests
        for k in [k for k in os.environ if k.startswith("KAKEYA_")]:
            del os.environ[k]
        os.environ.update(saved)
    via_env = _run(PER_LAYER)
    record("additional_config", blocks=via_config["blocks"], env_blocks=via_env["blocks"])
    assert via_config["layers"] == via_env["layers"] and via_config["blocks"] == via_env["blocks"]
