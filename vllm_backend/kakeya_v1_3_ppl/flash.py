"""KAKEYA_EXACT_ATTENTION=flash: exact (bf16) layers served by vLLM 0.26's own FlashAttention backend.

Why: greedy decoding is sensitive to rounding, so "exact mode reproduces FLASH_ATTN token for token" holds only
if exact layers run FLASH_ATTN's own code. The layer keeps its place in Kakeya's single KV-cache group
(``UniformTypeKVCacheSpecs``: one block id for every layer, per-layer page sizes) and gets
``FlashAttentionBackend`` as its backend class and a ``FlashAttentionImpl`` as its impl. vLLM then gives it its
own attention group inside that KV-cache group (groups are keyed by backend class + layer spec:
``v1/worker/gpu/attn_utils.py`` ``init_attn_backend``), FA's metadata builder fed the group's common block table
and slot mapping (``build_attn_metadata``), FA's view of the layer's page memory (``_reshape_kv_cache``:
``get_kv_cache_shape`` + ``get_kv_cache_stride_order``; 512 is a multiple of FA's 16), and FA's cache write
(``forward_includes_kv_cache_update`` is False, so ``Attention.forward`` calls ``do_kv_cache_update``). Each
layer of that group owns one tensor of num_blocks x its page bytes (``v1/core/kv_cache_utils.py``
``get_kv_cache_config_from_groups``), so FA's view starts aligned. CUDA graphs: vLLM takes the minimum support over
attention groups; FA's (ALWAYS with FA3, UNIFORM_BATCH with FA2) is above ours, so with compressed layers present
the mode stays what our builder reports; with KAKEYA_FORMAT=exact only FA groups exist and vLLM graphs them as it
does for FLASH_ATTN.

The swap happens in the ``get_kv_cache_spec`` hook (patches.py), which vLLM runs before memory profiling, graph
capture or compilation, so every forward pass already sees the FA backend. Imports vLLM lazily.
"""
from __future__ import annotations

import logging
import math

from kakeya_kv.config import EXACT, ConfigError
from kakeya_kv.format import BLOCK_TOKENS

from .pages import page_bytes

logger = logging.getLogger("kakeya_kv.vllm")

_FIX = "set KAKEYA_EXACT_ATTENTION=triton (our exact kernel)"


def flash_backend(head_size: int) -> type:
    """vLLM's FlashAttentionBackend, or a one-line refusal naming the knob when it cannot serve here."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    except ImportError as e:   # the kit ships vllm_flash_attn (FA3 on sm_90; FA2 only if built --with-fa2)
        raise ConfigError(f"KAKEYA_EXACT_ATTENTION=flash: vLLM's FlashAttention cannot be imported ({e}); {_FIX}") \
            from None
    version = get_flash_attn_version(head_size=head_size)
    if version is None:
        raise ConfigError(f"KAKEYA_EXACT_ATTENTION=flash: no FlashAttention version available on this platform; {_FIX}")
    if not FlashAttentionBackend.supports_head_size(head_size):
        raise ConfigError(f"KAKEYA_EXACT_ATTENTION=flash: FlashAttention does not support head_dim {head_size}; {_FIX}")
    return FlashAttentionBackend


def check_page_view(backend: type, num_kv_heads: int, head_size: int, block_size: int = BLOCK_TOKENS) -> None:
    """The backend's kv-cache view must cover exactly the layer's bf16 page (page_bytes(EXACT)): the page size vLLM
    allocates comes from our spec, the view from the backend. Checked against the real class at the swap."""
    shape = backend.get_kv_cache_shape(2, block_size, num_kv_heads, head_size, cache_dtype_str="auto")
    got = math.prod(shape) * 2   # bf16
    want = 2 * page_bytes(EXACT, block_size, num_kv_heads, head_size)
    if got != want:
        raise ConfigError(f"KAKEYA_EXACT_ATTENTION=flash: {backend.__name__}'s kv-cache view {tuple(shape)} holds "
                          f"{got // 2} bytes per page, the exact page is {want // 2}; {_FIX}")


def make_impl(layer, vllm_config):
    """A FlashAttentionImpl built as Attention.__init__ builds one (check_layer already refused ALiBi, sliding
    windows, soft-caps, non-decoder attention and KV sharing for this layer)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    old = layer.impl
    with set_current_vllm_config(vllm_config):   # FA reads the config (FA version override, DCP) at construction
        return FlashAttentionImpl(old.num_heads, old.head_size, old.scale, old.num_kv_heads, None, None,
                                  old.kv_cache_dtype, None, AttentionType.DECODER, None)


_LOGGED = False


def serve_with_flash(layer, backend: type, vllm_config) -> None:
    """Give an exact layer (its impl a bound KakeyaImpl) ``backend`` (flash_backend's) and a FlashAttentionImpl."""
    check_page_view(backend, layer.num_kv_heads, layer.head_size)
    layer.impl = make_impl(layer, vllm_config)
    layer.attn_backend = backend
    layer._kakeya_exact_flash = True
    global _LOGGED
    if not _LOGGED:
        _LOGGED = True
        logger.warning("Kakeya KV: exact bf16 layers are served by vLLM's FlashAttention (KAKEYA_EXACT_ATTENTION="
                       "flash), first: %s", layer.layer_name)
