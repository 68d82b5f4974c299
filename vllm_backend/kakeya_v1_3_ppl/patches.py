"""The few places where vLLM 0.26 offers no hook; each patch is idempotent and touches only
layers whose impl is Kakeya's.

1. ``Attention.get_kv_cache_spec``: compressed layers get a :class:`KakeyaAttentionSpec` (page
   bytes from the layer's block format and widths) and the backend class of those widths, exact
   layers a bf16 spec and the exact backend class (KAKEYA_EXACT_ATTENTION=flash: vLLM's FlashAttention
   backend class and impl, :mod:`.flash`).
2. ``Attention.process_weights_after_loading``: tell the impl its layer name before it allocates
   (the impl constructor gets none).
3. ``DefaultModelState.prepare_attn``: stash the step's request ids / persistent rows for the
   builder (tail slots are keyed by them).
4. ``InputBatch.make_dummy``: mark warm-up batches so they never touch request state.
5. ``EngineArgs._set_default_max_num_seqs_and_batched_tokens_args``: with the KAKEYA backend and no explicit
   --max-num-seqs, vLLM's default (1024 rows on H100/H200) is lowered so the exact-tail pool fits
   KAKEYA_TAIL_POOL_PERCENT of the GPU (:func:`cap_default_max_num_seqs`), instead of a start-up refusal.
6. KAKEYA_TAIL_STORAGE=pages only (GPU-run since session 14): the scheduler's managers of Kakeya's 512-token
   full-attention groups allocate ``tail_pages`` pages per request beyond ``num_tokens // 512``
   (:func:`tail_manager`; the scheduler sees one layer's spec of a group, so exact layers of such engines carry the
   marker spec.KakeyaExactSpec), and the V2 runner's block tables are that much wider (:func:`widen_block_tables`).
"""
from __future__ import annotations

import functools
import logging

_APPLIED = False
_TAIL_PAGES_PATCHED = False    # patches 6a / 6b installed in this process (KAKEYA_TAIL_STORAGE=pages in the env)


def _is_kakeya(args) -> bool:
    """--attention-backend KAKEYA (an alias of CUSTOM, which this plugin registers) or CUSTOM itself."""
    for b in (getattr(args, "attention_backend", None), getattr(getattr(args, "attention_config", None), "backend", None)):
        name = getattr(b, "name", b)
        if isinstance(name, str) and name.upper() in ("KAKEYA", "CUSTOM"):
            return True
    return False


def cap_default_max_num_seqs(args, model_config, parallel_config, gpu_total_bytes: int, log) -> None:
    """Engine args after vLLM set its defaults: lower max_num_seqs to what the exact-tail pool may take
    (checks.default_max_num_seqs), with one log line; formats without tails (exact) keep vLLM's default."""
    from .checks import default_max_num_seqs, settings, tail_pool_bytes
    L = model_config.get_num_layers(parallel_config)
    cfg = settings(L)
    if cfg.format == "exact" or cfg.tail_storage == "pages":     # no pool: tails take the requests' own pages
        return
    tp = max(1, getattr(parallel_config, "tensor_parallel_size", 1))
    hkv = max(1, model_config.get_total_num_kv_heads() // tp)
    per_row = tail_pool_bytes(1, hkv, model_config.get_head_size(), L - len(cfg.boundary_skip_layers))
    cap = default_max_num_seqs(args.max_num_seqs, per_row, gpu_total_bytes, cfg.tail_pool_percent)
    if cap < args.max_num_seqs:
        log.warning("Kakeya KV: --max-num-seqs not set: lowering vLLM's default %d to %d so the exact-tail pool "
                    "(%.0f MiB per request row) takes <= %d %% of GPU memory (set --max-num-seqs or "
                    "KAKEYA_TAIL_POOL_PERCENT to change it)", args.max_num_seqs, cap, per_row / 2**20,
                    cfg.tail_pool_percent)
        args.max_num_seqs = cap


def apply_engine_defaults(engine_args_cls, total_memory, log) -> None:
    """Patch 5 (idempotent): ``total_memory()`` = the device's bytes (vLLM's current_platform, no CUDA init)."""
    orig = engine_args_cls._set_default_max_num_seqs_and_batched_tokens_args
    if getattr(orig, "_kakeya", False):
        return

    @functools.wraps(orig)
    def set_defaults(self, usage_context, model_config, parallel_config):
        user_set = self.max_num_seqs is not None
        orig(self, usage_context, model_config, parallel_config)
        if not user_set and _is_kakeya(self):
            cap_default_max_num_seqs(self, model_config, parallel_config, total_memory(), log)

    set_defaults._kakeya = True
    engine_args_cls._set_default_max_num_seqs_and_batched_tokens_args = set_defaults


def tail_tokens(num_tokens: int, pages: int, block_size: int) -> int:
    """The token count whose cdiv gives a request's pages with ``pages`` tail pages after its sealed blocks."""
    return (num_tokens // block_size + pages) * block_size


def tail_manager(full_manager_cls, pages: int):
    """A FullAttentionManager subclass giving each request ``pages`` pages after its full blocks (its exact tail;
    pages = kakeya_v1_3_ppl.pages.tail_pages). Only the two allocation counts change: hashing, prefix hits and
    freeing see ordinary blocks (tail pages are never full, so never cached)."""

    class KakeyaTailManager(full_manager_cls):
        kakeya_tail_pages = pages

        def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs):
            return super().get_num_blocks_to_allocate(
                request_id, tail_tokens(num_tokens, pages, self.block_size), *args, **kwargs)

        def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
            return super().allocate_new_blocks(request_id, tail_tokens(num_tokens, pages, self.block_size),
                                               tail_tokens(num_tokens_main_model, pages, self.block_size))

    return KakeyaTailManager


def apply_tail_pages(coordinator_module, spec_types, full_manager_cls, block_tokens: int, pages_for) -> None:
    """Patch 6a (idempotent): ``pages_for(spec)`` = tail pages of a group spec of one of ``spec_types`` (Kakeya's
    spec classes; 0 = leave it to vLLM)."""
    orig = coordinator_module.get_manager_for_kv_cache_spec
    if getattr(orig, "_kakeya", False):
        return

    @functools.wraps(orig)
    def get_manager(kv_cache_spec, *args, **kwargs):
        n = pages_for(kv_cache_spec) if (isinstance(kv_cache_spec, spec_types)
                                         and kv_cache_spec.block_size == block_tokens) else 0
        if not n:
            return orig(kv_cache_spec, *args, **kwargs)
        kwargs.pop("max_admission_blocks_per_request", None)
        for k in ("max_in_flight_tokens", "max_model_len"):   # the factory's own arguments, not the manager's
            kwargs.pop(k, None)
        return tail_manager(full_manager_cls, n)(kv_cache_spec, **kwargs)

    get_manager._kakeya = True
    coordinator_module.get_manager_for_kv_cache_spec = get_manager


def widen_block_tables(runner_module, block_tokens: int, pages: int) -> None:
    """Patch 6b (idempotent): the V2 runner's BlockTables get ``pages`` more columns for 512-token groups."""
    orig = runner_module.BlockTables
    if getattr(orig, "_kakeya", False) or not pages:
        return

    class WideBlockTables(orig):
        _kakeya = True

        def __init__(self, *args, block_sizes, max_num_blocks_per_group, **kwargs):
            wide = [m + pages if b == block_tokens else m for b, m in zip(block_sizes, max_num_blocks_per_group)]
            super().__init__(*args, block_sizes=block_sizes, max_num_blocks_per_group=wide, **kwargs)

    runner_module.BlockTables = WideBlockTables


def require_tail_patches(tail_storage: str) -> None:
    """KAKEYA_TAIL_STORAGE=pages needs patches 6a / 6b, installed at plugin registration from the environment: a
    value given only through --additional-config arrives after that, and the scheduler would then allocate no tail
    pages while the layers address them. Refuse instead."""
    from kakeya_kv.config import ConfigError
    if tail_storage == "pages" and not _TAIL_PAGES_PATCHED:
        raise ConfigError("KAKEYA_TAIL_STORAGE=pages must be set in the environment of every vLLM process (the "
                          "scheduler's page allocation is patched when the plugin registers, before "
                          "--additional-config is read); export it instead of passing it in --additional-config")


def apply() -> None:
    global _APPLIED, _TAIL_PAGES_PATCHED
    if _APPLIED:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    apply_engine_defaults(EngineArgs, current_platform.get_device_total_memory, logging.getLogger("kakeya_kv.vllm"))
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from kakeya_kv.config import EXACT, TAIL_STORAGE_DEFAULT
    from kakeya_kv.format import BLOCK_TOKENS

    from . import context
    from .backend import KakeyaExactBackend, KakeyaImpl, backend_for_layer
    from .checks import apply_additional_config, check_block_size
    from .flash import serve_with_flash
    from .pages import tails_in_pages
    from .spec import KAKEYA_SPECS, layer_spec

    orig_spec = Attention.get_kv_cache_spec

    @functools.wraps(orig_spec)
    def get_kv_cache_spec(self, vllm_config):
        if getattr(self, "_kakeya_exact_flash", False):   # swapped to FlashAttention by an earlier call
            return layer_spec(EXACT, vllm_config.cache_config.block_size, self.num_kv_heads, self.head_size,
                              self.head_size_v, tails_in_pages=getattr(self, "_kakeya_tails_in_pages", False))
        if not isinstance(getattr(self, "impl", None), KakeyaImpl):
            return orig_spec(self, vllm_config)
        apply_additional_config(vllm_config.additional_config)     # also outside a model-building context
        self.impl.bind(self.layer_name)
        block_size = vllm_config.cache_config.block_size
        check_block_size(block_size, BLOCK_TOKENS)
        # The layer's backend class decides its kv-cache shape and attention group: exact, default or per width.
        bits, fmt = self.impl.bits, self.impl.cfg.format
        self._kakeya_tails_in_pages = in_pages = tails_in_pages(self.impl.cfg)
        backend = backend_for_layer(bits, self.head_size)
        if bits == EXACT and backend is not KakeyaExactBackend:   # KAKEYA_EXACT_ATTENTION=flash: impl replaced
            serve_with_flash(self, backend, vllm_config)
        self.attn_backend = backend
        return layer_spec(bits, block_size, self.num_kv_heads, self.head_size, self.head_size_v, fmt,
                          tails_in_pages=in_pages)

    orig_pwal = Attention.process_weights_after_loading

    @functools.wraps(orig_pwal)
    def process_weights_after_loading(self, act_dtype):
        if isinstance(getattr(self, "impl", None), KakeyaImpl):
            self.impl.bind(self.layer_name)
        return orig_pwal(self, act_dtype)

    orig_prep = DefaultModelState.prepare_attn

    @functools.wraps(orig_prep)
    def prepare_attn(self, input_batch, *args, **kwargs):
        context.set_current(input_batch.req_ids, input_batch.idx_mapping_np,
                            getattr(input_batch, "_kakeya_dummy", False), input_batch.idx_mapping)
        return orig_prep(self, input_batch, *args, **kwargs)

    orig_dummy = InputBatch.make_dummy.__func__

    @classmethod
    @functools.wraps(orig_dummy)
    def make_dummy(cls, *args, **kwargs):
        batch = orig_dummy(cls, *args, **kwargs)
        batch._kakeya_dummy = True
        return batch

    import os
    # The env itself, not settings(): a bad KAKEYA_* value must not fail the plugin's registration in engines
    # that do not use this backend (the backend validates every knob when it is built).
    # Unset or blank means the default, as in kakeya_kv.config._tail_storage.
    if ((os.environ.get("KAKEYA_TAIL_STORAGE") or "").strip().lower() or TAIL_STORAGE_DEFAULT) == "pages":
        from kakeya_kv.format import SUPPORTED_HEAD_DIMS

        from .checks import settings
        import vllm.v1.core.kv_cache_coordinator as coordinator
        import vllm.v1.worker.gpu.model_runner as runner
        from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

        from .pages import tail_pages
        # Kakeya's groups only (spec.KakeyaExactSpec marks their exact layers): another backend's 512-token
        # full-attention group in the same process keeps vLLM's own manager.
        apply_tail_pages(coordinator, KAKEYA_SPECS, FullAttentionManager, BLOCK_TOKENS,
                         lambda spec: tail_pages(settings(), spec.head_size))
        # The runner's groups are known only inside initialize_kv_cache; every 512-token group is ours here.
        widen_block_tables(runner, BLOCK_TOKENS, max(tail_pages(settings(), d) for d in SUPPORTED_HEAD_DIMS))
        _TAIL_PAGES_PATCHED = True

    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention.process_weights_after_loading = process_weights_after_loading
    DefaultModelState.prepare_attn = prepare_attn
    InputBatch.make_dummy = make_dummy
    _APPLIED = True
