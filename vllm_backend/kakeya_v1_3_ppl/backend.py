"""vLLM 0.26 attention backend: compressed 512-token pages + an exact per-request tail.

* Compressed layers (``KakeyaBackend``; ``KakeyaBackend_k{K}v{V}`` for layers whose KAKEYA_LAYER_BITS
  widths differ from KAKEYA_K_BITS/V_BITS): a page is one sealed block per KV head in the
  ``kakeya`` format of the layer's widths; the request's unsealed tokens live in a bf16 tail slot (one per
  persistent request row, allocated at model load so vLLM's profiler counts it).
* Exact layers (boundary layers, or KAKEYA_FORMAT=exact), by KAKEYA_EXACT_ATTENTION:
  ``triton`` (default): ``KakeyaExactBackend``, bf16 pages in the ``exact`` layout, written in place, no tail, read
  by our Triton kernel; ``flash`` (opt-in, not yet run on a GPU): vLLM's own ``FlashAttentionBackend`` and
  ``FlashAttentionImpl`` (FA's page layout, builder and kernels, so FLASH_ATTN's rounding), swapped onto the layer
  by :mod:`.flash` in the spec hook; same page bytes, same KV-cache group and block table.

Our layers read the cache through the Triton kernels in ``kakeya_kernels``; the per-step plan (phases,
tail writes, seals) is made on the CPU by :mod:`.plan`.
"""
from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata)

from kakeya_kv.config import EXACT, cuda_graphs_for
from kakeya_kv.format import ALLOWED_BITS, BLOCK_TOKENS, SUPPORTED_HEAD_DIMS

from . import context
from .checks import check_capacity, check_layer, check_selection, check_tail_pool, settings
from .memlog import memory_log
from .pages import describe, kv_cache_shape
from .plan import DecodeBuffers, Launches, TailState, plan_step, plan_step_chunked, read_only_rows, to_device
from .runtime import forward_compressed, forward_decode, forward_exact

logger = logging.getLogger("kakeya_kv.vllm")

_KERNELS: dict = {}
_OWNER: list = [None]    # weak reference to the engine (VllmConfig) whose kernel sets _KERNELS holds


def _owned_by(owner) -> None:
    """_KERNELS serves one engine at a time: a new engine in this process (in-process engines, one after the other)
    drops the previous one's kernel sets, so their GPU buffers (the prefill scratch reservation) are freed and the
    new engine's reservation is allocated, and counted, during its own memory profiling."""
    if owner is None:
        return
    held = _OWNER[0]() if _OWNER[0] is not None else None
    if held is not owner:
        _KERNELS.clear()
        _OWNER[0] = weakref.ref(owner)


def kernels(head_dim: int, k_bits: int, v_bits: int, device, cal=None, owner=None):
    """One kernel set per (head_dim, widths, device, bundle) of the engine ``owner``: layers of equal widths share it;
    layers of every width share one decode scratch per (head_dim, device) (bf16 pages either way; the layers run
    one after the other), sized by KAKEYA_SCRATCH_MIB."""
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    _owned_by(owner)
    mib, k_grid = settings().scratch_mib, settings().k_grid
    key = (head_dim, k_bits, v_bits, str(device), None if cal is None else cal.source, mib, k_grid)
    if key not in _KERNELS:
        kt, vt = (None, None) if cal is None else cal.tables(k_bits, v_bits)
        if k_grid == "uniform":
            if kt is not None:
                raise ValueError(f"KAKEYA_K_GRID=uniform, but the calibration bundle {cal.source} has a fitted "
                                 f"{k_bits}-bit K table: use one or the other")
            from kakeya_kv import lloyd_max
            kt = lloyd_max.uniform_table(k_bits)
        kk = KakeyaKernels(head_dim, k_bits, v_bits, device, k_table=kt, v_table=vt, scratch_mib=mib)
        kk.scratch = _KERNELS.setdefault(("scratch", head_dim, str(device), mib), kk.scratch)
        _KERNELS[key] = kk
    return _KERNELS[key]


def v13_kernels(head_dim: int, k_bits: int, v_bits: int, device, scratch_mib: int, attn: str):
    """KAKEYA_FORMAT=v13: one kernel set (and, for attn="scratch", one decode scratch) per geometry, shared by its
    layers."""
    from kakeya_kernels.v13_triton import V13Kernels
    key = ("v13", head_dim, k_bits, v_bits, str(device), attn)
    if key not in _KERNELS:
        _KERNELS[key] = V13Kernels(head_dim, k_bits, v_bits, device, scratch_mib=scratch_mib, attn=attn)
    return _KERNELS[key]


class KakeyaBackend(AttentionBackend):
    # (k_bits, v_bits) of this class's pages; None = KAKEYA_K_BITS / KAKEYA_V_BITS (see backend_for_bits).
    kakeya_bits: ClassVar[tuple[int, int] | None] = None
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True   # writes, attention and seals are ordered inside forward
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"   # vLLM resolves AttentionBackendEnum[get_name()]; KAKEYA is an alias of CUSTOM

    @staticmethod
    def get_impl_cls():
        return KakeyaImpl

    @staticmethod
    def get_builder_cls():
        return KakeyaMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes():
        return [BLOCK_TOKENS]

    @classmethod
    def get_kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        bits = cls.kakeya_bits
        if bits is None:
            cfg = settings()
            bits = (cfg.k_bits, cfg.v_bits)
        return kv_cache_shape(bits, num_blocks, block_size, num_kv_heads, head_size, settings().format)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in SUPPORTED_HEAD_DIMS

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        # vLLM's own refusal is a bare list of reasons; ours says what to do instead.
        reasons = super().validate_configuration(*args, **kwargs)
        check_selection(reasons)
        return reasons


class KakeyaExactBackend(KakeyaBackend):
    """Exact bf16 pages (boundary layers / exact mode): [blocks, Hkv, K|V, 512, D]."""

    @classmethod
    def get_kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return kv_cache_shape(EXACT, num_blocks, block_size, num_kv_heads, head_size)


def backend_for_bits(k_bits: int, v_bits: int) -> type[KakeyaBackend]:
    """The backend class of layers stored at these widths. A class per width gives each width its own vLLM
    attention group (its own metadata builder and kv-cache shape). Created on demand and kept as a module
    attribute, so it pickles by name; the module ``__getattr__`` recreates it in any other process."""
    name = f"KakeyaBackend_k{k_bits}v{v_bits}"
    cls = globals().get(name)
    if cls is None:
        fmt = settings().format
        if k_bits not in ALLOWED_BITS[fmt]["k"] or v_bits not in ALLOWED_BITS[fmt]["v"]:
            raise ValueError(f"{fmt}: no {k_bits}-bit K / {v_bits}-bit V format (allowed {ALLOWED_BITS[fmt]})")
        cls = type(name, (KakeyaBackend,), {"kakeya_bits": (k_bits, v_bits), "__module__": __name__,
                                            "__qualname__": name})
        globals()[name] = cls
    return cls


def backend_for_layer(bits, head_size: int | None = None) -> type:
    """bits: KakeyaConfig.bits_for(layer). Layers at the default widths keep KakeyaBackend itself; exact layers get
    KakeyaExactBackend, or vLLM's FlashAttentionBackend with KAKEYA_EXACT_ATTENTION=flash (head_size required)."""
    cfg = settings()
    if bits == EXACT:
        if cfg.exact_attention == "flash":
            if head_size is None:
                raise ValueError("backend_for_layer: KAKEYA_EXACT_ATTENTION=flash needs the layer's head_size")
            from .flash import flash_backend
            return flash_backend(head_size)
        return KakeyaExactBackend
    return KakeyaBackend if tuple(bits) == (cfg.k_bits, cfg.v_bits) else backend_for_bits(*bits)


def __getattr__(name: str):
    m = re.fullmatch(r"KakeyaBackend_k(\d+)v(\d+)", name)
    if m is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return backend_for_bits(int(m[1]), int(m[2]))


@dataclass
class KakeyaMetadata:
    num_actual_tokens: int
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    phases: list[dict] = field(default_factory=list)   # compressed layers
    span: dict | None = None                            # KAKEYA_PREFILL_ATTEND=chunk: prefill rows (plan.Span)
    exact: dict | None = None                           # exact layers: one phase over the pages
    decode: dict | None = None                          # pure-decode step planned on the GPU (DecodeBuffers)
    dummy: bool = False


def _gpu_decode(vllm_config) -> bool:
    """Pure-decode steps planned on the GPU (capturable as full graphs): KAKEYA_CUDA_GRAPHS, auto = not eager."""
    return cuda_graphs_for(settings(), bool(vllm_config.model_config.enforce_eager))


class KakeyaMetadataBuilder(AttentionMetadataBuilder[KakeyaMetadata]):
    # Prefill/mixed steps are planned on the host (attention eager between piecewise graphs); pure-decode
    # steps are planned on the GPU into persistent buffers (KAKEYA_CUDA_GRAPHS, default auto: whenever vLLM does
    # not run eager), so vLLM captures them as full graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return (AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if _gpu_decode(vllm_config)
                else AttentionCGSupport.NEVER)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from .spec import KakeyaAttentionSpec
        self.compressed = isinstance(kv_cache_spec, KakeyaAttentionSpec)
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        self.gqa = mc.get_num_attention_heads(pc) // kv_cache_spec.num_kv_heads
        # Compressed layers (kakeya_kernels.variants): requests with one new token launch KAKEYA_DECODE_VARIANT, prefill
        # chunks KAKEYA_PREFILL_VARIANT (default tuned; a mixed step's phase runs both, Launches.phase); exact pages
        # keep the baseline launch.
        self.launches = Launches(settings().decode_variant if self.compressed else "baseline",
                                 kv_cache_spec.head_size, kv_cache_spec.num_kv_heads, device,
                                 prefill=settings().prefill_variant if self.compressed else "baseline",
                                 scratch_mib=settings().scratch_mib,
                                 int8_k=self.compressed and settings().int8_k_scores)
        self.bm = self.launches.base["bm"]
        self.chunk_exact = self.compressed and settings().prefill_attend == "chunk"
        self.state = TailState()
        self.dec = DecodeBuffers(vllm_config.scheduler_config.max_num_seqs, self.gqa, self.launches.decode["bm"],
                                 device)
        self.gpu_decode = _gpu_decode(vllm_config)
        self.memlog = memory_log(settings().memory_log)
        cc = vllm_config.cache_config
        check_capacity(cc.num_gpu_blocks, cc.block_size, mc.max_model_len)
        if self.compressed:
            _log_startup(vllm_config, kv_cache_spec)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KakeyaMetadata:
        cam = common_attn_metadata
        if self.memlog is not None:
            self.memlog.tick(self.device)
        B, T = cam.num_reqs, cam.num_actual_tokens
        ident = context.current()
        meta = KakeyaMetadata(num_actual_tokens=T, block_table=cam.block_table_tensor, seq_lens=cam.seq_lens,
                              slot_mapping=cam.slot_mapping)
        if ident is None:
            raise RuntimeError("kakeya: no batch identity from the model runner; the backend needs vLLM's V2 model "
                               "runner (VLLM_USE_V2_MODEL_RUNNER=1)")
        if ident.dummy:
            meta.dummy = True
            return meta
        qsl = cam.query_start_loc_cpu.numpy()[:B + 1].astype(np.int64)
        seq = (cam.seq_lens_cpu_upper_bound if cam.seq_lens_cpu_upper_bound is not None else cam.seq_lens.cpu())
        seq = np.asarray(seq)[:B].astype(np.int64)
        # GPU-planned decode steps are CPU-tested for equivalence but not yet run in vLLM on a GPU: opt-in.
        decode = self.gpu_decode and cam.max_query_len == 1 and ident.req_idx_gpu is not None
        max_blocks = int(cam.block_table_tensor.shape[1])
        if self.compressed:
            # The CPU plan always runs: it keeps TailState current and checks consistency.
            if self.chunk_exact:
                span, phases = plan_step_chunked(qsl, seq, ident.req_idx[:B], ident.req_ids[:B], self.state)
                if span is not None:
                    meta.span = self.launches.span(span, self.device, self.gqa, max_blocks)
            else:
                phases = plan_step(qsl, seq, ident.req_idx[:B], ident.req_ids[:B], self.state)
            if not decode:
                meta.phases = [self.launches.phase(ph, self.device, self.gqa, max_blocks,
                                                   decode_step=cam.max_query_len == 1) for ph in phases]
        elif not decode:
            (ph,) = plan_step(qsl, seq, ident.req_idx[:B], ident.req_ids[:B], None)
            meta.exact = to_device(ph, self.device, self.gqa, self.bm)
        if decode:
            meta.decode = self._fill_decode(B, cam, ident.req_idx_gpu,
                                            read_only_rows(phases, B) if self.compressed else None)
        return meta

    def _fill_decode(self, B: int, cam: CommonAttentionMetadata, req_rows, read_only=None) -> dict:
        d = self.dec.fill(B, cam.seq_lens, cam.block_table_tensor, req_rows, read_only)
        # The split count depends on the batch size and the block table's width only: fixed per captured graph.
        return self.launches.attach(d, self.launches.decode, int(cam.block_table_tensor.shape[1])) \
            if self.compressed else d

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KakeyaMetadata:
        """Capture batch (pure decode, no live requests): GPU-planned metadata over rows 0..B-1."""
        cam = common_attn_metadata
        B = cam.num_reqs
        meta = KakeyaMetadata(num_actual_tokens=cam.num_actual_tokens, block_table=cam.block_table_tensor,
                              seq_lens=cam.seq_lens, slot_mapping=cam.slot_mapping)
        meta.decode = self._fill_decode(B, cam, torch.arange(B, dtype=torch.int32, device=cam.seq_lens.device))
        return meta


_LOGGED = False


def _log_startup(vllm_config, spec) -> None:
    global _LOGGED
    if _LOGGED:   # one builder per width: log the whole model once
        return
    _LOGGED = True
    from .checks import tail_pool_bytes
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    L = mc.get_num_layers(pc)
    cfg = settings(L)
    blocks = vllm_config.cache_config.num_gpu_blocks
    cap = f"{blocks * vllm_config.cache_config.block_size} tokens" if blocks else "unknown"
    n_seq = vllm_config.scheduler_config.max_num_seqs
    pool = (0 if cfg.tail_storage == "pages" else
            tail_pool_bytes(n_seq, spec.num_kv_heads, spec.head_size, L - len(cfg.boundary_skip_layers)))
    logger.warning(
        "Kakeya KV: format %s (K grid %s), layers %s, exact attention %s, calibration %s, exact-tail pool %.0f MiB "
        "(max_num_seqs %d; tails in %s), launches decode %s / prefill %s, KV capacity %s", cfg.format, cfg.k_grid,
        describe(cfg, L, spec.num_kv_heads, spec.head_size), cfg.exact_attention, cfg.calibration or "none (data-free)",
        pool / 2**20, n_seq, cfg.tail_storage,
        cfg.decode_variant + (" (int8 K scores)" if cfg.int8_k_scores and cfg.decode_variant == "tuned" else ""),
        cfg.prefill_variant, cap)


class KakeyaImpl(AttentionImpl[KakeyaMetadata]):
    supports_quant_query_input: bool = False

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **kwargs):
        check_layer(head_size=head_size, alibi=alibi_slopes is not None, sliding_window=sliding_window,
                    logits_soft_cap=logits_soft_cap, attn_type=getattr(attn_type, "value", attn_type), kv_cache_dtype=kv_cache_dtype,
                    kv_sharing=kv_sharing_target_layer_name is not None)
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        vc = get_current_vllm_config()
        self.owner = vc      # the engine: kernel sets are cached per engine (see kernels())
        self.max_slots = vc.scheduler_config.max_num_seqs
        self.num_layers = vc.model_config.get_num_layers(vc.parallel_config)
        self.cfg = settings(self.num_layers)
        # Validated here so a wrong bundle fails at model construction with a message naming the mismatch.
        from .calib import resolve
        mc = vc.model_config
        self.cal = resolve(self.cfg, num_layers=self.num_layers, num_kv_heads=mc.get_total_num_kv_heads(),
                           head_dim=head_size, model_config=mc.hf_config.to_dict())
        self.k_weight = None
        self.layer_name: str | None = None
        self.exact = self.cfg.format == "exact"
        self.bits = EXACT if self.exact else (self.cfg.k_bits, self.cfg.v_bits)   # until bind() knows the layer
        self.tail_k = self.tail_v = None
        # The prefill launch's decode scratch, if it has one: False, True (our exact-page kernel) or "flash".
        self.scratch_kind = False
        if self.cfg.format == "kakeya":
            from kakeya_kernels.variants import prefill_variant
            self.scratch_kind = prefill_variant(self.cfg.prefill_variant, head_size).get("scratch", False)
            if self.scratch_kind and self.cfg.tail_storage == "pages":
                raise ValueError(f"KAKEYA_PREFILL_VARIANT={self.cfg.prefill_variant} reads the exact tails from "
                                 "per-request rows; with KAKEYA_TAIL_STORAGE=pages they live in the requests' pages, "
                                 "which only the tuned launches read: drop one of the two")
        if self.scratch_kind == "flash" and torch.cuda.is_available():
            from kakeya_kernels.scratch import flash_varlen
            flash_varlen(head_size)   # candidate:scratch_fa: refuse before the weights are loaded
        if self.cfg.exact_attention == "flash" and torch.cuda.is_available():
            from .flash import flash_backend
            flash_backend(head_size)   # refuse at model construction, not after the weights are loaded
        self.tail_geom = None     # KAKEYA_TAIL_STORAGE=pages: the layer's tailpages.TailGeometry (set at allocation)
        if self.cfg.format == "kakeya":
            from .patches import require_tail_patches
            require_tail_patches(self.cfg.tail_storage)
        if self.cfg.format != "exact" and self.cfg.tail_storage == "pool" and torch.cuda.is_available():
            n_comp = self.num_layers - len(self.cfg.boundary_skip_layers)
            self.tail_pool_bytes = check_tail_pool(self.max_slots, self.num_kv_heads, head_size, n_comp,
                                                   torch.cuda.get_device_properties(0).total_memory)

    def bind(self, layer_name: str) -> None:
        """Learn which layer this is (vLLM passes no layer name to the impl's constructor)."""
        from vllm.model_executor.models.utils import extract_layer_index
        if self.layer_name == layer_name:
            return
        self.layer_name = layer_name
        self.layer_idx = extract_layer_index(layer_name)
        self.bits = self.cfg.bits_for(self.layer_idx)
        self.exact = self.bits == EXACT

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # Runs before vLLM's memory profiling: the tail pool is counted as non-KV memory.
        if self.exact or self.tail_k is not None:
            return
        dev = torch.device("cuda", torch.cuda.current_device())
        # One extra slot: padding rows of a captured decode batch write there (DecodeBuffers.scratch).
        shape = (self.max_slots + 1, self.num_kv_heads, BLOCK_TOKENS, self.head_size)
        # kernels() first: it drops a previous engine's entries of _KERNELS, where the shared tail scratch lives too
        self.kk = (v13_kernels(self.head_size, *self.bits, dev, self.cfg.scratch_mib, self.cfg.v13_attention)
                   if self.cfg.format == "v13" else kernels(self.head_size, *self.bits, dev, self.cal, self.owner))
        if self.cfg.tail_storage == "pages":
            # Tails live in the requests' pages; the layers share one scratch a full block is copied into to seal.
            from .pages import layer_layout
            from .tailpages import TailGeometry
            self.tail_geom = TailGeometry.of(layer_layout(self.bits, self.head_size, self.cfg.format))
            key = ("tail_scratch", shape, str(dev))
            if key not in _KERNELS:
                _KERNELS[key] = (torch.zeros(shape, dtype=torch.bfloat16, device=dev),
                                 torch.zeros(shape, dtype=torch.bfloat16, device=dev))
            self.tail_k, self.tail_v = _KERNELS[key]
        else:
            self.tail_k = torch.zeros(shape, dtype=torch.bfloat16, device=dev)
            self.tail_v = torch.zeros(shape, dtype=torch.bfloat16, device=dev)
        if self.scratch_kind:
            # Here, not at the first prefill: vLLM's profiling then counts it (one buffer per head_dim and device).
            self.kk.scratch.reserve(self.num_kv_heads, dev)
        w = self.cal.weight(self.layer_idx)
        self.k_weight = None if w is None else w.float().to(dev)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("Kakeya backend: fused output quantization is not supported")
        if attn_metadata is None or attn_metadata.dummy:   # profiling / warm-up
            return output.zero_()
        m = attn_metadata
        if self.exact:
            return self._forward_exact(query, key, value, kv_cache, m, output)
        if m.decode is not None:
            return forward_decode(self.kk, query, key, value, kv_cache, self.tail_k, self.tail_v, m.decode,
                                  m.block_table, self.scale, output, self.k_weight, tail_pages=self.tail_geom)
        return forward_compressed(self.kk, query, key, value, kv_cache, self.tail_k, self.tail_v, m.phases,
                                  m.block_table, self.scale, output, self.k_weight, tail_pages=self.tail_geom,
                                  span=m.span)

    def _forward_exact(self, query, key, value, kv_cache, m, output):
        if not hasattr(self, "kk"):
            self.kk = kernels(self.head_size, self.cfg.k_bits, self.cfg.v_bits, query.device, owner=self.owner)
        return forward_exact(self.kk, query, key, value, kv_cache, m.decode if m.decode is not None else m.exact,
                             m.block_table, m.seq_lens, m.slot_mapping, m.num_actual_tokens, self.scale, output)
