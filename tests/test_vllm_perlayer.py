"""Per-layer bit widths in the vLLM backend, on CPU: page math (no vLLM), and the backend/spec glue under a
minimal stand-in of the few vLLM names those modules import (vLLM is not installed on the CPU machines)."""
import enum
import logging
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from kakeya_kv.config import EXACT, KakeyaConfig
from kakeya_kv.format import BLOCK_TOKENS, exact_layout, kakeya_layout
from kakeya_kv.formats import from_config
from kakeya_v1_3_ppl.pages import describe, kv_cache_shape, model_pages, page_bytes

ENV = {"KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2", "KAKEYA_BOUNDARY_SKIP_LAYERS": "0",
       "KAKEYA_LAYER_BITS": "17-18:4/3,23-24:5/4"}


def test_per_layer_pages_and_capacity_match_the_harness_ratio():
    L, H, D = 30, 3, 64
    cfg = KakeyaConfig.from_env(ENV, num_layers=L)
    m = model_pages(cfg, L, H, D)
    assert m["bits"][0] == EXACT and m["bits"][17] == (4, 3) and m["bits"][24] == (5, 4) and m["bits"][1] == (3, 2)
    assert m["page_bytes"][0] == H * exact_layout(D).slot_bytes == H * 2 * BLOCK_TOKENS * D * 2
    assert m["page_bytes"][18] == H * kakeya_layout(D, 4, 3).slot_bytes
    assert m["page_bytes"][5] == H * kakeya_layout(D, 3, 2).slot_bytes
    assert m["widths"] == [(3, 2), (4, 3), (5, 4)]
    # The backend's pages and the HF harness's byte accounting give the same whole-model ratio.
    assert m["ratio_vs_bf16"] == pytest.approx(from_config(cfg, L, "x").ratio_vs_bf16(L, H, D))
    # vLLM (UniformTypeKVCacheSpecs): blocks = budget // sum of the layers' page sizes, one block id for all layers.
    budget = 40 * 2**30
    blocks, blocks_bf16 = budget // m["bytes_per_block"], budget // (L * page_bytes(EXACT, 512, H, D))
    assert blocks / blocks_bf16 == pytest.approx(m["ratio_vs_bf16"], rel=1e-3)   # whole blocks only
    assert "k3v2: 1-16,19-22,25-29; k4v3: 17-18; k5v4: 23-24; exact bf16: 0" in describe(cfg, L, H, D)


@pytest.mark.parametrize("bits", [(3, 2), (4, 3), (5, 4), (6, 6), EXACT])
def test_kv_cache_shape_fills_the_page_exactly(bits):
    shape = kv_cache_shape(bits, 7, 512, 3, 64)
    itemsize = 2 if bits == EXACT else 1
    assert shape[0] == 7 and torch.Size(shape).numel() * itemsize == 7 * page_bytes(bits, 512, 3, 64)
    with pytest.raises(ValueError, match="block size must be 512"):
        kv_cache_shape(bits, 7, 256, 3, 64)


# --- the vLLM-facing modules under stand-ins -----------------------------------------------------------------


class _Generic:
    def __class_getitem__(cls, item):
        return cls


def _fake_vllm(vc):
    @dataclass(frozen=True, kw_only=True)
    class FullAttentionSpec:
        block_size: int
        num_kv_heads: int
        head_size: int
        head_size_v: int
        dtype: torch.dtype

        @property
        def real_page_size_bytes(self):
            return self.block_size * self.num_kv_heads * (self.head_size + self.head_size_v) * self.dtype.itemsize

        @classmethod
        def merge(cls, specs):
            return specs[0]

    class AttentionBackend:
        @classmethod
        def validate_configuration(cls, *a, **k):
            return []

    class AttentionMetadataBuilder(_Generic):
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            self.kv_cache_spec, self.device = kv_cache_spec, device

    mods = {n: types.ModuleType(n) for n in (
        "vllm", "vllm.config", "vllm.v1", "vllm.v1.attention", "vllm.v1.attention.backend", "vllm.v1.kv_cache_interface",
        "vllm.model_executor", "vllm.model_executor.models", "vllm.model_executor.models.utils")}
    mods["vllm.config"].get_current_vllm_config = lambda: vc
    b = mods["vllm.v1.attention.backend"]
    b.AttentionBackend, b.AttentionMetadataBuilder, b.AttentionImpl = AttentionBackend, AttentionMetadataBuilder, _Generic
    b.AttentionCGSupport = enum.Enum("AttentionCGSupport", "NEVER UNIFORM_SINGLE_TOKEN_DECODE")
    b.AttentionType = SimpleNamespace(DECODER="decoder")
    b.CommonAttentionMetadata = object
    mods["vllm.v1.kv_cache_interface"].FullAttentionSpec = FullAttentionSpec
    mods["vllm.model_executor.models.utils"].extract_layer_index = lambda name: int(name.split(".")[2])
    return mods


@pytest.fixture
def glue(monkeypatch):
    """(backend module, spec module) imported against the stand-ins, with KAKEYA_* = ENV; restored afterwards."""
    import kakeya_v1_3_ppl
    vc = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=4), parallel_config=None,
        model_config=SimpleNamespace(get_num_layers=lambda pc: 30, get_total_num_kv_heads=lambda: 3,
                                     hf_config=SimpleNamespace(to_dict=lambda: {})))
    for name, mod in _fake_vllm(vc).items():
        monkeypatch.setitem(sys.modules, name, mod)
    for k in [k for k in list(__import__("os").environ) if k.startswith("KAKEYA_")]:
        monkeypatch.delenv(k)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    ours = ("kakeya_v1_3_ppl.backend", "kakeya_v1_3_ppl.spec", "kakeya_v1_3_ppl.pages")
    saved = {n: sys.modules.pop(n) for n in ours if n in sys.modules}
    saved_attrs = {n.split(".")[-1]: getattr(kakeya_v1_3_ppl, n.split(".")[-1]) for n in ours
                   if hasattr(kakeya_v1_3_ppl, n.split(".")[-1])}
    import kakeya_v1_3_ppl.backend as backend
    import kakeya_v1_3_ppl.spec as spec
    yield backend, spec
    for n in ours:
        sys.modules.pop(n, None)
        if hasattr(kakeya_v1_3_ppl, n.split(".")[-1]):
            delattr(kakeya_v1_3_ppl, n.split(".")[-1])
    sys.modules.update(saved)
    for k, v in saved_attrs.items():
        setattr(kakeya_v1_3_ppl, k, v)


def test_each_layer_gets_the_backend_class_and_page_of_its_widths(glue):
    backend, spec = glue
    B = backend
    assert B.backend_for_layer(EXACT) is B.KakeyaExactBackend
    assert B.backend_for_layer((3, 2)) is B.KakeyaBackend            # default widths keep the base class
    k4 = B.backend_for_layer((4, 3))
    assert k4 is B.backend_for_bits(4, 3) and issubclass(k4, B.KakeyaBackend) and k4.get_name() == "CUSTOM"
    # Resolvable by module + qualified name (how classes are pickled), also in a process that never made it:
    assert k4.__module__ == B.__name__ and getattr(B, k4.__qualname__) is k4
    del B.__dict__[k4.__qualname__]
    again = getattr(B, "KakeyaBackend_k4v3")
    assert again.kakeya_bits == (4, 3) and again is not k4
    with pytest.raises(AttributeError):
        getattr(B, "KakeyaBackendX")
    with pytest.raises(ValueError, match="allowed"):
        B.backend_for_bits(7, 3)
    for bits in ((3, 2), (4, 3), (5, 4), EXACT):
        cls = B.backend_for_layer(bits)
        s = spec.layer_spec(bits, 512, 3, 64, 64)
        shape = cls.get_kv_cache_shape(5, 512, 3, 64)
        itemsize = 2 if bits == EXACT else 1
        assert s.real_page_size_bytes == page_bytes(bits, 512, 3, 64)
        assert torch.Size(shape).numel() * itemsize == 5 * s.real_page_size_bytes
    assert spec.layer_spec((4, 3), 512, 3, 64, 64).kakeya_format == "kakeya-k4v3"
    assert spec.layer_spec((4, 3), 512, 3, 64, 64) != spec.layer_spec((3, 2), 512, 3, 64, 64)


def test_exact_layers_of_a_tails_in_pages_engine_carry_the_kakeya_marker(glue):
    """With tails in pages the scheduler must tell Kakeya's groups from another backend's (it sees one layer's
    spec per group, often exact layer 0): exact layers then get KakeyaExactSpec, same pages as vLLM's class;
    pool engines keep vLLM's own FullAttentionSpec."""
    _, spec = glue
    plain = spec.layer_spec(EXACT, 512, 3, 64, 64)
    marked = spec.layer_spec(EXACT, 512, 3, 64, 64, tails_in_pages=True)
    assert type(plain) is spec.FullAttentionSpec and type(marked) is spec.KakeyaExactSpec
    assert isinstance(marked, spec.FullAttentionSpec) and marked.real_page_size_bytes == plain.real_page_size_bytes
    assert isinstance(spec.layer_spec((4, 3), 512, 3, 64, 64), spec.KAKEYA_SPECS)
    assert isinstance(marked, spec.KAKEYA_SPECS) and not isinstance(plain, spec.KAKEYA_SPECS)


def test_impl_binds_the_layer_widths(glue):
    backend, _ = glue
    impl = backend.KakeyaImpl(num_heads=9, head_size=64, scale=0.125, num_kv_heads=3)
    got = {}
    for layer in (0, 1, 17, 24):
        impl.bind(f"model.layers.{layer}.self_attn.attn")
        got[layer] = (impl.bits, impl.exact)
    assert got == {0: (EXACT, True), 1: ((3, 2), False), 17: ((4, 3), False), 24: ((5, 4), False)}


def test_calibration_tables_for_every_served_width(tmp_path):
    from kakeya_calibration.bundle import BundleError, write_bundle
    from kakeya_v1_3_ppl.calib import resolve
    t = {"k_table.b3": torch.linspace(-2, 2, 8), "k_table.b4": torch.linspace(-2.5, 2.5, 16),
         "v_table.b2": torch.linspace(-1.5, 1.5, 4), "v_table.b3": torch.linspace(-2, 2, 8)}
    path = write_bundle(tmp_path / "b", t, {"format": "kakeya", "num_layers": 4, "num_kv_heads": 1, "head_dim": 64})
    env = {"KAKEYA_CALIBRATION": str(path), "KAKEYA_K_BITS": "3", "KAKEYA_V_BITS": "2", "KAKEYA_LAYER_BITS": "2:4/3"}
    cal = resolve(KakeyaConfig.from_env(env, num_layers=4), num_layers=4, num_kv_heads=1, head_dim=64,
                  model_config=None)
    k, v = cal.tables(4, 3)
    assert torch.equal(k, t["k_table.b4"]) and torch.equal(v, t["v_table.b3"])
    k, v = cal.tables(3, 2)
    assert torch.equal(k, t["k_table.b3"]) and torch.equal(v, t["v_table.b2"]) and cal.k_table is not None
    with pytest.raises(BundleError, match="k_table.b5"):   # a served width without a fitted table is refused
        resolve(KakeyaConfig.from_env(dict(env, KAKEYA_LAYER_BITS="2:5/3"), num_layers=4), num_layers=4,
                num_kv_heads=1, head_dim=64, model_config=None)


@pytest.mark.parametrize("bits", [(3, 2), (5, 4)])
def test_runtime_data_path_at_other_widths(bits):
    """The runtime end to end (interpreter on CPU) with the kernels of a non-default width: tail writes, a seal
    into that width's page, attention over it — against a float64 reference on the decoded pages."""
    from tests.test_vllm_runtime import _run
    steps = [[(0, 300), (1, 40)], [(0, 230), (1, 1)], [(0, 1), (1, 1)]]   # request 0 seals block 0 in step 2
    assert _run(exact=False, bits=bits, steps=steps) < 8e-3


def test_startup_line_names_the_launches(glue, monkeypatch, caplog):
    """The one start-up line carries the decode and prefill launches, so a serving row's backend log says which
    kernels it measured (the serving rows keep that line as kakeya_log)."""
    backend, _ = glue
    monkeypatch.setattr(backend, "_LOGGED", False)
    vc = SimpleNamespace(model_config=SimpleNamespace(get_num_layers=lambda pc: 30), parallel_config=None,
                         cache_config=SimpleNamespace(num_gpu_blocks=10, block_size=512),
                         scheduler_config=SimpleNamespace(max_num_seqs=4))
    spec = SimpleNamespace(num_kv_heads=3, head_size=64)
    with caplog.at_level("WARNING"):
        backend._log_startup(vc, spec)
    line = [r.getMessage() for r in caplog.records if "Kakeya KV: format" in r.getMessage()]
    assert len(line) == 1 and "launches decode tuned / prefill tuned, KV capacity 5120 tokens" in line[0], line


def test_default_max_num_seqs_is_capped_for_the_tail_pool(glue, monkeypatch, caplog):
    """vLLM 0.26 defaults --max-num-seqs to 1024 on H100/H200: a Qwen3-8B-like model's exact-tail pool would take
    72 GiB and the backend refused to start. Unset (and only then), the default is lowered to what
    KAKEYA_TAIL_POOL_PERCENT (5 %) of the GPU holds; an explicit value and other backends are left alone."""
    from kakeya_v1_3_ppl import checks, patches
    for k in [k for k in __import__("os").environ if k.startswith("KAKEYA_")]:
        monkeypatch.delenv(k)
    assert checks.default_max_num_seqs(1024, 72 << 20, 141 << 30, 5) == 100
    assert checks.default_max_num_seqs(64, 72 << 20, 141 << 30, 5) == 64 and checks.default_max_num_seqs(8, 1 << 40, 1, 5) == 1

    class EngineArgs:
        def __init__(self, backend, max_num_seqs=None):
            self.attention_backend, self.max_num_seqs = backend, max_num_seqs
            self.attention_config = SimpleNamespace(backend=None)

        def _set_default_max_num_seqs_and_batched_tokens_args(self, usage_context, model_config, parallel_config):
            if self.max_num_seqs is None:
                self.max_num_seqs = 1024          # vLLM's H100/H200 default
    patches.apply_engine_defaults(EngineArgs, lambda: 141 << 30, logging.getLogger("kakeya_kv.vllm"))
    patches.apply_engine_defaults(EngineArgs, lambda: 141 << 30, logging.getLogger("kakeya_kv.vllm"))  # idempotent
    qwen = SimpleNamespace(get_num_layers=lambda pc: 36, get_total_num_kv_heads=lambda: 8, get_head_size=lambda: 128)
    pc = SimpleNamespace(tensor_parallel_size=1)
    runs = {}
    with caplog.at_level("WARNING"):
        for name, backend, n in (("kakeya", "KAKEYA", None), ("explicit", "KAKEYA", 512), ("flash", "FLASH_ATTN", None),
                                 ("custom", SimpleNamespace(name="CUSTOM"), None)):
            a = EngineArgs(backend, n)
            a._set_default_max_num_seqs_and_batched_tokens_args(None, qwen, pc)
            runs[name] = a.max_num_seqs
        monkeypatch.setenv("KAKEYA_TAIL_POOL_PERCENT", "10")
        a = EngineArgs("KAKEYA")
        a._set_default_max_num_seqs_and_batched_tokens_args(None, qwen, SimpleNamespace(tensor_parallel_size=2))
        runs["tp2_10pct"] = a.max_num_seqs
        monkeypatch.setenv("KAKEYA_FORMAT", "exact")
        a = EngineArgs("KAKEYA")
        a._set_default_max_num_seqs_and_batched_tokens_args(None, qwen, pc)
        runs["exact"] = a.max_num_seqs
    # 36 layers x 8 KV heads x 512 tokens x 128 x (K+V) x 2 B = 72 MiB per row; 5 % of 141 GiB -> 100 rows
    assert runs == {"kakeya": 100, "explicit": 512, "flash": 1024, "custom": 100, "tp2_10pct": 401, "exact": 1024}
    assert "lowering vLLM's default 1024 to 100" in caplog.text and "72 MiB per request row" in caplog.text
    monkeypatch.setenv("KAKEYA_TAIL_POOL_PERCENT", "40")
    with pytest.raises(Exception, match="KAKEYA_TAIL_POOL_PERCENT"):
        checks.settings(36)


def test_kernel_sets_of_other_widths_share_one_decode_scratch(glue):
    """KAKEYA_LAYER_BITS gives layers of several widths their own kernel set; the prefill decode scratch (bf16 pages
    whatever the widths, reserved whole at model load for candidate:scratch) is one per head_dim and device; both
    are cached per engine."""
    backend, _ = glue

    class Engine:      # stands in for a VllmConfig: the cache key of an engine's kernel sets
        pass
    e1, e2 = Engine(), Engine()
    a, b = backend.kernels(64, 4, 3, "cpu", owner=e1), backend.kernels(64, 3, 2, "cpu", owner=e1)
    assert a is not b and a.scratch is b.scratch and backend.kernels(64, 4, 3, "cpu", owner=e1) is a
    assert backend.kernels(128, 4, 3, "cpu", owner=e1).scratch is not a.scratch
    # A later in-process engine gets its own sets (the earlier engine's scratch reservation is dropped with them).
    c = backend.kernels(64, 4, 3, "cpu", owner=e2)
    assert c is not a and c.scratch is not a.scratch and len(backend._KERNELS) == 2


def test_k_grid_uniform_gives_the_kernels_the_uniform_k_table(glue, monkeypatch):
    """KAKEYA_K_GRID=uniform: the kernel set seals and reads K with lloyd_max.uniform_table (what candidate:ki8
    needs); V keeps Lloyd-Max. A calibration bundle with a fitted K table of that width conflicts: a clear error."""
    backend, _ = glue
    from kakeya_kv import lloyd_max
    from kakeya_v1_3_ppl.calib import Calibration
    monkeypatch.setenv("KAKEYA_K_GRID", "uniform")

    class Engine:
        pass
    kk = backend.kernels(64, 4, 3, "cpu", owner=Engine())
    assert torch.equal(kk.tables["k"].cpu(), lloyd_max.uniform_table(4).float())
    assert torch.equal(kk.tables["v"].cpu(), lloyd_max.gaussian_table(3).float())
    assert kk._ki8_step is not None
    cal = Calibration(k_tables={4: lloyd_max.gaussian_table(4)}, source="/bundles/x")
    with pytest.raises(ValueError, match="KAKEYA_K_GRID=uniform.*fitted 4-bit K table"):
        backend.kernels(64, 4, 3, "cpu", cal=cal, owner=Engine())
