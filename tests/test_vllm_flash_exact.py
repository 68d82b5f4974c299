"""KAKEYA_EXACT_ATTENTION=flash on CPU: the knob, the per-layer backend choice, the spec hook's swap to vLLM's
FlashAttention backend and impl, and the FA view of an exact layer's page memory - under stand-ins of the few vLLM
names involved (vLLM is not installed on the CPU machines). The stand-in FA backend copies vLLM 0.26's kv-cache
shape and stride order (v1/attention/backends/flash_attn.py: get_kv_cache_shape, get_kv_cache_stride_order, NHD);
the GPU run (tests/test_vllm_lifecycle.py, not yet run) checks the real classes."""
import math
import sys
import types
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from kakeya_kv.config import EXACT, ConfigError, KakeyaConfig
from kakeya_v1_3_ppl.checks import additional_env, known_env_names, settings
from kakeya_v1_3_ppl.pages import page_bytes
from tests.test_vllm_perlayer import glue  # noqa: F401 - pytest fixture (backend + spec under vLLM stand-ins)

H, D = 3, 64   # SmolLM2-135M: 3 KV heads, head_dim 64


# --- the knob ---------------------------------------------------------------------------------------------------

def test_knob_values_and_refusals():
    assert KakeyaConfig.from_env({}).exact_attention == "triton"
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "exact", "KAKEYA_EXACT_ATTENTION": " Flash "}).exact_attention \
        == "flash"
    assert KakeyaConfig.from_env({"KAKEYA_BOUNDARY_SKIP_LAYERS": "0,29",
                                  "KAKEYA_EXACT_ATTENTION": "flash"}).exact_attention == "flash"
    assert KakeyaConfig.from_env({"KAKEYA_EXACT_ATTENTION": ""}).exact_attention == "triton"   # empty = default
    with pytest.raises(ConfigError, match=r"KAKEYA_EXACT_ATTENTION='fa3': must be one of triton, flash"):
        KakeyaConfig.from_env({"KAKEYA_FORMAT": "exact", "KAKEYA_EXACT_ATTENTION": "fa3"})
    with pytest.raises(ConfigError, match="KAKEYA_EXACT_ATTENTION=flash has no effect: no layer is exact") as e:
        KakeyaConfig.from_env({"KAKEYA_EXACT_ATTENTION": "flash"})
    assert "\n" not in str(e.value) and "unset it" in str(e.value)
    assert KakeyaConfig.from_env({"KAKEYA_EXACT_ATTENTION": "triton"}).exact_attention == "triton"


def test_knob_through_additional_config():
    """--additional-config '{"kakeya": {"exact_attention": "flash"}}' reaches every process as the same setting."""
    assert "KAKEYA_EXACT_ATTENTION" in known_env_names()
    env = additional_env({"kakeya": {"format": "exact", "exact_attention": "flash"}})
    assert env == {"KAKEYA_FORMAT": "exact", "KAKEYA_EXACT_ATTENTION": "flash"}
    assert settings(30, env).exact_attention == "flash"
    with pytest.raises(ConfigError, match="KAKEYA_EXACT_ATTENTIONS is not a Kakeya setting"):
        additional_env({"kakeya": {"exact_attentions": "flash"}})


# --- vLLM stand-ins for FlashAttention and the hooked classes ------------------------------------------------------

class FlashAttentionBackend:
    """vLLM 0.26's FA backend, as far as the swap and the kv-cache view use it."""
    forward_includes_kv_cache_update = False

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        if block_size % 16 != 0:
            raise ValueError("Block size must be a multiple of 16.")
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension=False):
        return (0, 2, 1, 3)   # NHD: physical (num_blocks, block_size, num_kv_heads, 2*head_size)

    @classmethod
    def supports_head_size(cls, head_size):
        return head_size % 8 == 0 and head_size <= 256


class FlashAttentionImpl:
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None):
        self.args = (num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                     logits_soft_cap, attn_type, kv_sharing_target_layer_name)


class Attention:
    """vLLM's Attention layer: its own spec method (the hook falls back to it for other impls)."""

    def __init__(self, layer, impl):
        self.layer_name = f"model.layers.{layer}.self_attn.attn"
        self.impl, self.num_kv_heads, self.head_size, self.head_size_v = impl, H, D, D
        self.attn_backend = "the selected backend"

    def get_kv_cache_spec(self, vllm_config):
        return "vLLM's own spec"

    def process_weights_after_loading(self, act_dtype):
        pass


class _Batch:
    @classmethod
    def make_dummy(cls, *a, **k):
        return cls()


class _ModelState:
    def prepare_attn(self, *a, **k):
        pass


@pytest.fixture
def fa(glue, monkeypatch):  # noqa: F811 - pytest fixture
    """(backend module, spec module, patches module, vllm config) with FA stand-ins and the hooks applied to the
    stand-in Attention; KAKEYA_* = test_vllm_perlayer.ENV (k3v2, layer 0 exact, per-layer widths) + flash."""
    backend, spec = glue
    seen = {}
    fa_mod = types.ModuleType("vllm.v1.attention.backends.flash_attn")
    fa_mod.FlashAttentionBackend, fa_mod.FlashAttentionImpl = FlashAttentionBackend, FlashAttentionImpl
    fa_utils = types.ModuleType("vllm.v1.attention.backends.fa_utils")
    fa_utils.get_flash_attn_version = lambda head_size=None, **k: seen.setdefault("version", 3)
    mods = {"vllm.v1.attention.backends": types.ModuleType("vllm.v1.attention.backends"),
            "vllm.v1.attention.backends.flash_attn": fa_mod, "vllm.v1.attention.backends.fa_utils": fa_utils}
    for name in ("vllm.model_executor.layers", "vllm.model_executor.layers.attention", "vllm.v1.worker",
                 "vllm.v1.worker.gpu", "vllm.v1.worker.gpu.model_states"):
        mods[name] = types.ModuleType(name)
    mods["vllm.model_executor.layers.attention.attention"] = types.ModuleType("a")
    mods["vllm.model_executor.layers.attention.attention"].Attention = Attention
    mods["vllm.v1.worker.gpu.input_batch"] = types.ModuleType("b")
    mods["vllm.v1.worker.gpu.input_batch"].InputBatch = _Batch
    mods["vllm.v1.worker.gpu.model_states.default"] = types.ModuleType("c")
    mods["vllm.v1.worker.gpu.model_states.default"].DefaultModelState = _ModelState
    mods["vllm.engine"] = types.ModuleType("vllm.engine")
    mods["vllm.engine.arg_utils"] = types.ModuleType("d")
    mods["vllm.engine.arg_utils"].EngineArgs = type("EngineArgs", (), {
        "_set_default_max_num_seqs_and_batched_tokens_args": lambda self, *a: None})
    mods["vllm.platforms"] = types.ModuleType("e")
    mods["vllm.platforms"].current_platform = SimpleNamespace(get_device_total_memory=lambda: 80 << 30)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)

    @contextmanager
    def set_current_vllm_config(vc):
        seen["config_during_impl"] = vc
        yield

    monkeypatch.setattr(sys.modules["vllm.config"], "set_current_vllm_config", set_current_vllm_config, raising=False)
    monkeypatch.setattr(sys.modules["vllm.v1.attention.backend"], "AttentionType",
                        SimpleNamespace(DECODER="decoder"))
    monkeypatch.setenv("KAKEYA_EXACT_ATTENTION", "flash")
    for cls in (Attention, _Batch, _ModelState):   # the hooks replace these methods: restore them afterwards
        for name in ("get_kv_cache_spec", "process_weights_after_loading", "make_dummy", "prepare_attn"):
            if name in cls.__dict__:
                monkeypatch.setattr(cls, name, cls.__dict__[name])
    from kakeya_v1_3_ppl import flash, patches
    monkeypatch.setattr(patches, "_APPLIED", False)
    monkeypatch.setattr(flash, "_LOGGED", True)
    patches.apply()
    vc = SimpleNamespace(additional_config={}, cache_config=SimpleNamespace(block_size=512))
    yield backend, spec, seen, vc


def _layer(backend, layer):
    impl = backend.KakeyaImpl(num_heads=9, head_size=D, scale=0.125, num_kv_heads=H)
    return Attention(layer, impl)


def test_backend_for_layer_picks_flash_for_exact_layers_only(fa, monkeypatch):
    backend, _, _, _ = fa
    assert backend.backend_for_layer(EXACT, D) is FlashAttentionBackend
    with pytest.raises(ValueError, match="needs the layer's head_size"):
        backend.backend_for_layer(EXACT)
    assert backend.backend_for_layer((3, 2), D) is backend.KakeyaBackend          # compressed: unchanged
    assert backend.backend_for_layer((4, 3), D) is backend.backend_for_bits(4, 3)
    monkeypatch.setenv("KAKEYA_EXACT_ATTENTION", "triton")
    assert backend.backend_for_layer(EXACT, D) is backend.KakeyaExactBackend


def test_spec_hook_swaps_exact_layers_to_flash_attention(fa):
    backend, spec, seen, vc = fa
    exact, comp = _layer(backend, 0), _layer(backend, 5)
    s0 = exact.get_kv_cache_spec(vc)
    assert exact.attn_backend is FlashAttentionBackend and isinstance(exact.impl, FlashAttentionImpl)
    # Built as Attention.__init__ builds it, inside the engine's config (FA reads it at construction).
    assert exact.impl.args == (9, D, 0.125, H, None, None, "auto", None, "decoder", None)
    assert seen["config_during_impl"] is vc
    assert s0 == spec.layer_spec(EXACT, 512, H, D, D) and s0.real_page_size_bytes == page_bytes(EXACT, 512, H, D)
    assert exact.get_kv_cache_spec(vc) == s0      # later calls (impl no longer ours) give the same spec
    s5 = comp.get_kv_cache_spec(vc)
    assert comp.attn_backend is backend.KakeyaBackend and isinstance(comp.impl, backend.KakeyaImpl)
    assert s5 == spec.layer_spec((3, 2), 512, H, D, D)
    other = Attention(3, impl=object())           # not a Kakeya layer: vLLM's own method
    assert other.get_kv_cache_spec(vc) == "vLLM's own spec" and other.attn_backend == "the selected backend"


def test_spec_hook_keeps_our_exact_backend_with_triton(fa, monkeypatch):
    backend, spec, _, vc = fa
    monkeypatch.setenv("KAKEYA_EXACT_ATTENTION", "triton")
    exact = _layer(backend, 0)
    assert exact.get_kv_cache_spec(vc) == spec.layer_spec(EXACT, 512, H, D, D)
    assert exact.attn_backend is backend.KakeyaExactBackend and isinstance(exact.impl, backend.KakeyaImpl)


def test_flash_unavailable_is_refused_in_one_line(fa, monkeypatch):
    from kakeya_v1_3_ppl.flash import flash_backend
    monkeypatch.setattr(sys.modules["vllm.v1.attention.backends.fa_utils"], "get_flash_attn_version",
                        lambda **k: None)
    with pytest.raises(ConfigError, match="KAKEYA_EXACT_ATTENTION=flash: no FlashAttention version") as e:
        flash_backend(D)
    assert "\n" not in str(e.value) and "KAKEYA_EXACT_ATTENTION=triton" in str(e.value)
    monkeypatch.delitem(sys.modules, "vllm.v1.attention.backends.flash_attn")
    monkeypatch.setitem(sys.modules, "vllm.v1.attention.backends.flash_attn", None)   # import fails
    with pytest.raises(ConfigError, match="KAKEYA_EXACT_ATTENTION=flash: vLLM's FlashAttention cannot be imported"):
        flash_backend(D)


def test_unsupported_head_dim_is_refused(fa):
    from kakeya_v1_3_ppl.flash import flash_backend
    with pytest.raises(ConfigError, match="does not support head_dim 300"):
        flash_backend(300)


# --- the FA view of the layer's page memory ------------------------------------------------------------------------

def _vllm_view(raw: torch.Tensor, backend, num_blocks: int):
    """vLLM 0.26's non-packed per-layer view (v1/worker/gpu/attn_utils.py _reshape_attention_kv_cache): one raw
    int8 tensor per layer of num_blocks x page bytes (the UniformTypeKVCacheSpecs branch of
    v1/core/kv_cache_utils.py get_kv_cache_config_from_groups), viewed in the backend's stride order."""
    shape = backend.get_kv_cache_shape(num_blocks, 512, H, D)
    order = backend.get_kv_cache_stride_order()
    inv = [order.index(i) for i in range(len(order))]
    return raw.view(torch.bfloat16).view(tuple(shape[i] for i in order)).permute(*inv)


def test_flash_view_fills_the_exact_page_and_block_ids_address_pages():
    """FA's view covers exactly num_blocks x page_bytes(EXACT), and a token written at slot block*512+offset (how
    FA's reshape_and_cache_flash addresses the cache) lands in that block's page and nowhere else."""
    from kakeya_v1_3_ppl.flash import check_page_view
    check_page_view(FlashAttentionBackend, H, D)
    n, page = 5, page_bytes(EXACT, 512, H, D)
    raw = torch.zeros(n * page, dtype=torch.int8)
    kv = _vllm_view(raw, FlashAttentionBackend, n)
    assert math.prod(kv.shape) * 2 == raw.numel() and kv.shape == (n, H, 512, 2 * D)
    key_cache, value_cache = kv.transpose(1, 2).split(D, dim=-1)    # FA's do_kv_cache_update: (B, N, H, D) each
    for block, offset in ((0, 0), (3, 511), (4, 17)):
        raw.zero_()
        key_cache[block, offset] = 1.0
        value_cache[block, offset] = -2.0
        touched = raw.view(n, page).ne(0).any(dim=1)
        assert touched.tolist() == [b == block for b in range(n)]
        assert kv[block, :, offset, :D].eq(1.0).all() and kv[block, :, offset, D:].eq(-2.0).all()


def test_page_view_mismatch_is_refused():
    from kakeya_v1_3_ppl.flash import check_page_view

    class HalfPage(FlashAttentionBackend):
        @staticmethod
        def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
            return (num_blocks, num_kv_heads, block_size, head_size)

    with pytest.raises(ConfigError, match="HalfPage's kv-cache view .* the exact page is"):
        check_page_view(HalfPage, H, D)
