"""KAKEYA_FORMAT=v13 in the vLLM backend, on CPU: page math from format.py's v13 layout, the backend/spec glue under
the stand-ins of test_vllm_perlayer, and the runtime data path (plan -> tail -> v13 attention -> v13 seal)."""
import numpy as np
import pytest
import torch

from kakeya_kv.codecs.v13 import V13Codec, decode_stream
from kakeya_kv.config import EXACT, KakeyaConfig
from kakeya_kv.format import v13_layout
from kakeya_kv.formats import from_config
from kakeya_v1_3_ppl.pages import kv_cache_shape, model_pages, page_bytes
from tests.kernel_cases import ref_attention, rel_err
from tests.test_vllm_perlayer import glue  # noqa: F401  (fixture)

V13_ENV = {"KAKEYA_FORMAT": "v13", "KAKEYA_BOUNDARY_SKIP_LAYERS": "0", "KAKEYA_LAYER_BITS": "17-18:4/3"}


def test_v13_pages_follow_the_v13_layout_and_the_harness_ratio():
    L, H, D = 30, 3, 64
    cfg = KakeyaConfig.from_env(V13_ENV, num_layers=L)
    m = model_pages(cfg, L, H, D)
    assert m["bits"][1] == (3, 2) and m["bits"][17] == (4, 3) and m["bits"][0] == EXACT
    assert m["page_bytes"][1] == H * v13_layout(D).slot_bytes == H * 31708   # the seed's 20012 + 11696 B
    assert m["page_bytes"][17] == H * v13_layout(D, k_bits=4, v_bits=3).slot_bytes
    assert m["ratio_vs_bf16"] == pytest.approx(from_config(cfg, L, "x").ratio_vs_bf16(L, H, D))
    assert V13Codec().bytes_per_token_head(D) * 512 == v13_layout(D).slot_bytes
    shape = kv_cache_shape((3, 2), 7, 512, H, 128, "v13")
    assert shape == (7, H, v13_layout(128).slot_bytes) and 7 * page_bytes((3, 2), 512, H, 128, "v13") == np.prod(shape)


def test_v13_knobs_validated():
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13", "KAKEYA_V13_SCRATCH_MIB": "64"}).scratch_mib == 64
    from kakeya_kv.config import ConfigError
    for env, msg in (({"KAKEYA_V13_SCRATCH_MIB": "64"}, "only applies to KAKEYA_FORMAT=v13"),
                     ({"KAKEYA_FORMAT": "v13", "KAKEYA_V13_SCRATCH_MIB": "lots"}, "not an integer"),
                     ({"KAKEYA_FORMAT": "v13", "KAKEYA_V13_SCRATCH_MIB": "0"}, "1..1048576")):
        with pytest.raises(ConfigError, match=msg):
            KakeyaConfig.from_env(env)
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13"}).v13_attention == "fused"
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13", "KAKEYA_V13_ATTENTION": "scratch"}).v13_attention == "scratch"
    for env, msg in (({"KAKEYA_V13_ATTENTION": "fused"}, "only applies to KAKEYA_FORMAT=v13"),
                     ({"KAKEYA_FORMAT": "v13", "KAKEYA_V13_ATTENTION": "fast"}, "must be one of fused, scratch")):
        with pytest.raises(ConfigError, match=msg):
            KakeyaConfig.from_env(env)


def test_v13_backend_classes_and_spec(glue, monkeypatch):  # noqa: F811
    backend, spec = glue
    for k, v in V13_ENV.items():
        monkeypatch.setenv(k, v)
    B = backend
    assert B.backend_for_layer((3, 2)) is B.KakeyaBackend
    k1 = B.backend_for_bits(1, 1)                               # 1-bit streams exist in v13, not in kakeya
    for bits, cls in (((3, 2), B.KakeyaBackend), ((1, 1), k1), (EXACT, B.KakeyaExactBackend)):
        s = spec.layer_spec(bits, 512, 3, 64, 64, "v13")
        assert s.real_page_size_bytes == page_bytes(bits, 512, 3, 64, "v13")
        itemsize = 2 if bits == EXACT else 1
        assert torch.Size(cls.get_kv_cache_shape(5, 512, 3, 64)).numel() * itemsize == 5 * s.real_page_size_bytes
    assert spec.layer_spec((3, 2), 512, 3, 64, 64, "v13").kakeya_format == "v13-k3v2"
    with pytest.raises(ValueError, match="allowed"):
        B.backend_for_bits(5, 4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("attn", ["fused", "scratch"])
def test_v13_runtime_prefill_then_decode(attn):
    """Planner -> tail -> v13 attention -> v13 seal over a chunked prefill crossing a block boundary and decode
    steps; outputs checked against float64 attention over the CPU reference decode of the pages actually sealed."""
    from kakeya_kernels.v13_triton import V13Kernels
    from kakeya_v1_3_ppl.plan import TailState, plan_step, to_device
    from kakeya_v1_3_ppl.runtime import forward_compressed
    d, hkv, gqa, T = 64, 1, 3, 530
    g = torch.Generator().manual_seed(11)
    kk = V13Kernels(d, 3, 2, "cpu", attn=attn)
    K = (torch.randn(T, hkv, d, generator=g) + torch.randn(d, generator=g) * 2).bfloat16()
    V = torch.randn(T, hkv, d, generator=g).bfloat16()
    Q = torch.randn(T, hkv * gqa, d, generator=g).bfloat16()
    cache = torch.zeros(2, hkv, kk.lay.slot_bytes, dtype=torch.uint8)
    bt = torch.tensor([[1, 0]], dtype=torch.int32)
    tail_k = torch.zeros(2, hkv, 512, d, dtype=torch.bfloat16)
    tail_v = torch.zeros_like(tail_k)
    state, outs = TailState(), {}
    steps = [(0, 300), (300, 526), (526, 527), (527, 528)]     # prefill chunks (one seals block 0), then decode
    for a, b in steps:
        qsl, seq = np.array([0, b - a]), np.array([b])
        phases = plan_step(qsl, seq, np.array([1]), ["r"], state)
        decode = b - a == 1   # decode steps as the backend launches them: 4-row tiles + the default format's knobs
        dev = [to_device(ph, "cpu", gqa, 4 if decode else 16) for ph in phases]
        for dd, ph in zip(dev, phases):
            dd["plan"]["n_sealed_host"] = ph.n_sealed
            if decode:
                dd["launch"] = dict(lut=2, fused=True, tt=64, num_warps=4, maxnreg=None, splits=3)
        out = torch.zeros(b - a, hkv * gqa, d, dtype=torch.bfloat16)
        forward_compressed(kk, Q[a:b], K[a:b], V[a:b], cache, tail_k, tail_v, dev, bt, d ** -0.5, out, precise=True)
        for i in range(a, b, 37):
            outs[i] = out[i - a]
    ks = kk.lay.k.size
    kref, vref = K.double().permute(1, 0, 2).clone(), V.double().permute(1, 0, 2).clone()
    for h in range(hkv):   # block 0 (page 1) sealed: positions < 512 are read compressed by queries after it
        kref[h, :512] = decode_stream(cache[1, h, :ks], kk.lay.k).double()
        vref[h, :512] = decode_stream(cache[1, h, ks:], kk.lay.v).double()
    exact = (K.double().permute(1, 0, 2), V.double().permute(1, 0, 2))
    for i, o in outs.items():
        # Block 0's queries attended it exactly (before its seal); later ones read it compressed.
        ref = ref_attention(Q[i], i, exact if i < 512 else (kref, vref), gqa)
        assert rel_err(o.float(), ref) < 1e-2, i
