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
"""
from __future__ import annotations

import functools

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from kakeya_kv.config import EXACT
    from kakeya_kv.format import BLOCK_TOKENS

    from . import context
    from .backend import KakeyaExactBackend, KakeyaImpl, backend_for_layer
    from .checks import apply_additional_config, check_block_size
    from .flash import serve_with_flash
    from .spec import layer_spec

    orig_spec = Attention.get_kv_cache_spec

    @functools.wraps(orig_spec)
    def get_kv_cache_spec(self, vllm_config):
        if getattr(self, "_kakeya_exact_flash", False):   # swapped to FlashAttention by an earlier call
            return layer_spec(EXACT, vllm_config.cache_config.block_size, self.num_kv_heads, self.head_size,
                              self.head_size_v)
        if not isinstance(getattr(self, "impl", None), KakeyaImpl):
            return orig_spec(self, vllm_config)
        apply_additional_config(vllm_config.additional_config)     # also outside a model-building context
        self.impl.bind(self.layer_name)
        block_size = vllm_config.cache_config.block_size
        check_block_size(block_size, BLOCK_TOKENS)
        # The layer's backend class decides its kv-cache shape and attention group: exact, default or per width.
        bits, fmt = self.impl.bits, self.impl.cfg.format
        backend = backend_for_layer(bits, self.head_size)
        if bits == EXACT and backend is not KakeyaExactBackend:   # KAKEYA_EXACT_ATTENTION=flash: impl replaced
            serve_with_flash(self, backend, vllm_config)
        self.attn_backend = backend
        return layer_spec(bits, block_size, self.num_kv_heads, self.head_size, self.head_size_v, fmt)

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

    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention.process_weights_after_loading = process_weights_after_loading
    DefaultModelState.prepare_attn = prepare_attn
    InputBatch.make_dummy = make_dummy
    _APPLIED = True
