"""KAKEYA_TAIL_STORAGE=pages (GPU-run since session 14; not the default yet): the knob, the tail-page count the scheduler and the workers
both derive from the config, and the vLLM glue (patches 6a / 6b) against stand-ins of vLLM's classes. The data path
itself is tests/test_vllm_runtime.py (tails in pages == the pool, bit for bit)."""
import types

import pytest

from kakeya_kv.config import ConfigError, KakeyaConfig
from kakeya_v1_3_ppl import patches
from kakeya_v1_3_ppl.pages import tail_pages


def test_knob_and_page_count():
    assert KakeyaConfig.from_env({}).tail_storage == "pool"
    assert tail_pages(KakeyaConfig.from_env({}), 128) == 0
    cfg = KakeyaConfig.from_env({"KAKEYA_TAIL_STORAGE": "Pages"})
    assert cfg.tail_storage == "pages" and tail_pages(cfg, 128) == 5 and tail_pages(cfg, 64) == 5
    # the widest need over the served widths (a 3/2 layer needs 6 at head_dim 128)
    wide = KakeyaConfig.from_env({"KAKEYA_TAIL_STORAGE": "pages", "KAKEYA_LAYER_BITS": "3:3/2"}, num_layers=8)
    assert tail_pages(wide, 128) == 6
    with pytest.raises(ConfigError, match="KAKEYA_TAIL_STORAGE"):
        KakeyaConfig.from_env({"KAKEYA_TAIL_STORAGE": "disk"})
    for fmt in ("v13", "exact"):
        with pytest.raises(ConfigError, match="KAKEYA_FORMAT=kakeya"):
            KakeyaConfig.from_env({"KAKEYA_TAIL_STORAGE": "pages", "KAKEYA_FORMAT": fmt})


def test_unset_knob_takes_the_default_for_kakeya_only(monkeypatch):
    """KAKEYA_TAIL_STORAGE unset: config.TAIL_STORAGE_DEFAULT for the kakeya format; exact and v13 have no tails
    in pages whatever the default (an explicit pages with them is still refused, above)."""
    import kakeya_kv.config as config
    monkeypatch.setattr(config, "TAIL_STORAGE_DEFAULT", "pages")
    assert KakeyaConfig.from_env({}).tail_storage == "pages"
    assert KakeyaConfig.from_env({"KAKEYA_TAIL_STORAGE": " "}).tail_storage == "pages"
    assert KakeyaConfig.from_env({"KAKEYA_TAIL_STORAGE": "pool"}).tail_storage == "pool"
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "exact"}).tail_storage == "pool"
    assert KakeyaConfig.from_env({"KAKEYA_FORMAT": "v13"}).tail_storage == "pool"
    monkeypatch.setattr(config, "TAIL_STORAGE_DEFAULT", "pool")
    assert KakeyaConfig.from_env({}).tail_storage == "pool"


def test_tail_storage_is_refused_in_additional_config():
    """The scheduler's allocation follows each process's environment (patched at registration): a value given
    only through --additional-config could reach the layers but not the scheduler."""
    from kakeya_v1_3_ppl.checks import additional_env
    assert additional_env({"kakeya": {"k_bits": 3}}) == {"KAKEYA_K_BITS": "3"}
    for key in ("tail_storage", "KAKEYA_TAIL_STORAGE"):
        with pytest.raises(ConfigError, match="cannot be set in --additional-config"):
            additional_env({"kakeya": {key: "pages"}})


class FakeManager:
    """The two FullAttentionManager calls the patch changes, recording the token counts they receive."""
    def __init__(self, kv_cache_spec, block_pool=None, **kw):
        self.block_size, self.kw, self.calls = kv_cache_spec.block_size, kw, []

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, *rest, **kw):
        self.calls.append(("count", num_tokens))
        return -(-num_tokens // self.block_size)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        self.calls.append(("alloc", num_tokens, num_tokens_main_model))
        return -(-num_tokens // self.block_size)


class FakeSpec:
    def __init__(self, block_size=512, head_size=128):
        self.block_size, self.head_size = block_size, head_size


def test_manager_adds_the_tail_pages_after_the_full_blocks():
    m = patches.tail_manager(FakeManager, 5)(FakeSpec())
    # 1000 tokens: 1 full block + 5 tail pages (the partial block's tokens are the tail); 1024: 2 + 5; 0: 5
    assert m.get_num_blocks_to_allocate("r", 1000, []) == 6
    assert m.allocate_new_blocks("r", 1024, 1024) == 7
    assert m.get_num_blocks_to_allocate("r", 0, []) == 5
    assert m.calls == [("count", 3072), ("alloc", 3584, 3584), ("count", 2560)]
    assert patches.tail_tokens(511, 5, 512) == 2560 and patches.tail_tokens(512, 5, 512) == 3072


def test_coordinator_patch_picks_the_tail_manager_for_512_token_full_attention_only():
    class Full(FakeSpec):
        pass

    made = []

    def factory(kv_cache_spec, max_in_flight_tokens, max_model_len, **kw):
        made.append("vllm")
        return FakeManager(kv_cache_spec, **kw)

    mod = types.SimpleNamespace(get_manager_for_kv_cache_spec=factory)
    patches.apply_tail_pages(mod, Full, FakeManager, 512, lambda spec: 5 if spec.head_size == 128 else 0)
    patches.apply_tail_pages(mod, Full, FakeManager, 512, lambda spec: 99)      # idempotent: first patch stays
    get = mod.get_manager_for_kv_cache_spec
    m = get(kv_cache_spec=Full(), max_in_flight_tokens=1, max_model_len=2, block_pool="pool", kv_cache_group_id=0)
    assert type(m).kakeya_tail_pages == 5 and m.kw == {"kv_cache_group_id": 0} and made == []
    assert not hasattr(get(kv_cache_spec=Full(head_size=64), max_in_flight_tokens=1, max_model_len=2),
                       "kakeya_tail_pages")                                      # 0 pages: vLLM's own manager
    assert not hasattr(get(kv_cache_spec=Full(block_size=16), max_in_flight_tokens=1, max_model_len=2),
                       "kakeya_tail_pages")
    assert not hasattr(get(kv_cache_spec=FakeSpec(), max_in_flight_tokens=1, max_model_len=2), "kakeya_tail_pages")
    assert made == ["vllm"] * 3


def test_coordinator_patch_gives_tail_pages_to_kakeya_spec_types_only():
    """Another backend's 512-token full-attention group in the same process (FLASH_ATTN at block size 512) keeps
    vLLM's manager; a Kakeya group is recognised by either of its spec types (compressed, or the marked exact layer
    that vLLM may pick as the group's representative)."""
    class Full(FakeSpec):                 # vLLM's FullAttentionSpec
        pass

    class Compressed(Full):               # spec.KakeyaAttentionSpec
        pass

    class MarkedExact(Full):              # spec.KakeyaExactSpec
        pass

    mod = types.SimpleNamespace(get_manager_for_kv_cache_spec=lambda kv_cache_spec, max_in_flight_tokens,
                                max_model_len, **kw: FakeManager(kv_cache_spec, **kw))
    patches.apply_tail_pages(mod, (Compressed, MarkedExact), FakeManager, 512, lambda spec: 5)
    get = mod.get_manager_for_kv_cache_spec
    for spec, want in ((Compressed(), 5), (MarkedExact(), 5), (Full(), None)):
        m = get(kv_cache_spec=spec, max_in_flight_tokens=1, max_model_len=2)
        assert getattr(type(m), "kakeya_tail_pages", None) == want, type(spec).__name__


def test_runner_block_tables_get_the_tail_columns():
    class BlockTables:
        def __init__(self, block_sizes, max_num_reqs, max_num_blocks_per_group, device=None):
            self.widths = max_num_blocks_per_group

    mod = types.SimpleNamespace(BlockTables=BlockTables)
    patches.widen_block_tables(mod, 512, 0)
    assert mod.BlockTables is BlockTables                                       # nothing to add: untouched
    patches.widen_block_tables(mod, 512, 5)
    patches.widen_block_tables(mod, 512, 5)                                     # idempotent
    t = mod.BlockTables(block_sizes=[512, 16], max_num_reqs=4, max_num_blocks_per_group=[64, 2048], device="cpu")
    assert t.widths == [69, 2048]


def test_pages_without_the_registration_patches_is_refused(monkeypatch):
    """Set only through --additional-config, the knob reaches the layers but not the scheduler's patched allocation
    (installed at plugin registration from the environment): the layers refuse to start."""
    monkeypatch.setattr(patches, "_TAIL_PAGES_PATCHED", False)
    patches.require_tail_patches("pool")
    with pytest.raises(ConfigError, match="must be set in the environment"):
        patches.require_tail_patches("pages")
    monkeypatch.setattr(patches, "_TAIL_PAGES_PATCHED", True)
    patches.require_tail_patches("pages")
