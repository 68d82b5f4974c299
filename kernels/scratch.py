"""Decode-then-attend, shared by the formats: the sealed blocks one attention launch reads are decoded ONCE into a
bf16 scratch of exact pages (one page per attended sealed block + one per request for its exact tail), then the
exact-page attention kernel runs over the scratch. Each format supplies its block decoder; this module does the
host-side sizing (from the planner's sealed-block counts: no host sync), the bounded reusable buffer and the tail
copy.

Worth it where attention is compute-bound and every sealed block is read by many query tiles (prefill chunks:
``KAKEYA_PREFILL_VARIANT=candidate:scratch`` of the default format); for decode it only adds a write and a read of
bf16 pages per step (v13's ``KAKEYA_V13_ATTENTION=scratch`` fallback uses it there too).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from kakeya_kv.format import BLOCK_TOKENS, exact_layout

SCRATCH_KNOB = "KAKEYA_SCRATCH_MIB"


class ScratchPages:
    """One bf16 buffer [pages, H, 2, 512, D] (per head K rows then V rows: the exact page layout), grown on demand
    with headroom, reused by every call (a kernel object serves its layers one after the other), capped."""

    def __init__(self, head_dim: int, cap_mib: int, knob: str = SCRATCH_KNOB):
        self.D, self.cap_bytes, self.knob = head_dim, cap_mib << 20, knob
        self.page_bytes_per_head = exact_layout(head_dim).slot_bytes
        self.buf: torch.Tensor | None = None

    def capacity_pages(self, H: int) -> int:
        """Pages of H heads the cap holds (the planner's bound for a decode-then-attend phase)."""
        return self.cap_bytes // (H * self.page_bytes_per_head)

    def reserve(self, H: int, device) -> torch.Tensor:
        """Allocate the whole cap now. The vLLM backend calls this while loading weights, so vLLM's memory profiling
        counts the scratch as non-KV memory instead of it being allocated out of the KV budget at the first prefill."""
        return self.get(self.capacity_pages(H), H, device, "scratch reservation")

    def get(self, pages: int, H: int, device, what: str) -> torch.Tensor:
        need = pages * H * self.page_bytes_per_head
        if need > self.cap_bytes:
            raise RuntimeError(f"kakeya {what}: one attention phase needs a {need / 2**20:.0f} MiB decode scratch "
                               f"({pages} pages), over {self.knob} = {self.cap_bytes >> 20} MiB; raise it or lower "
                               "--max-num-seqs / --max-num-batched-tokens")
        s = self.buf
        want = torch.device(device)
        if want.type == "cuda" and want.index is None:    # "cuda" and "cuda:N" name the same buffer's device
            want = torch.device("cuda", torch.cuda.current_device())
        if s is None or s.shape[0] < pages or s.shape[1] != H or s.device != want:
            # Headroom, so a slowly growing context does not reallocate every step.
            cap = min(max(pages, int(pages * 1.25) + 1), self.capacity_pages(H))
            self.buf = s = torch.empty(cap, H, 2, BLOCK_TOKENS, self.D, dtype=torch.bfloat16, device=device)
        return s


def layout(n_sealed: torch.Tensor, plan: dict | None, n_sealed_host, device) -> dict:
    """Where each request's pages go in the scratch. Host counts: ``n_sealed_host`` or ``plan["n_sealed_host"]``
    (the backend's planner sets them per launch; -1 = a request of the phase this launch does not attend: no pages),
    else n_sealed is read back (one host sync). Derived from plan["n_sealed_host"], the result is cached in the plan
    (one plan serves every layer of a step, so the index copies happen once per step; a CUDA-graph capture after a
    warm-up call copies nothing)."""
    keep = n_sealed_host is None and plan is not None and plan.get("n_sealed_host") is not None
    if keep and "scratch_layout" in plan:
        return plan["scratch_layout"]
    host = plan["n_sealed_host"] if keep else n_sealed_host
    R = int(n_sealed.shape[0])
    ns = np.asarray(n_sealed.cpu() if host is None else host, dtype=np.int64).reshape(R)
    used = ns >= 0
    ns = np.maximum(ns, 0)
    per = np.where(used, ns + 1, 0)                       # sealed pages + one tail page per attended request
    base = np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64)
    r_idx = np.repeat(np.arange(R), ns)
    b_idx = np.arange(int(ns.sum())) - np.repeat(np.cumsum(ns) - ns, ns)   # block index within its request
    width = int(ns.max(initial=0)) + 1
    sbt = base[:, None] + np.minimum(np.arange(width)[None, :], ns[:, None])   # column ns[r] = the tail page
    att = np.nonzero(used)[0]

    def to(a, dt=torch.int32):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt, non_blocking=True)
    out = dict(pages=int(per.sum()), n_blocks=len(r_idx), r=to(r_idx, torch.int64), b=to(b_idx, torch.int64),
               dst=to(base[r_idx] + b_idx), tail_req=to(att, torch.int64),
               tail_page=to(base[att] + ns[att], torch.int64), block_table=to(sbt))
    if keep:
        plan["scratch_layout"] = out
    return out


@functools.lru_cache(maxsize=None)
def flash_varlen(head_dim: int):
    """(vLLM's FlashAttention varlen function, its version for head_dim) for the ``flash`` scratch attention; a
    RuntimeError naming the fix where vLLM's FlashAttention is not importable (no vLLM, or a CPU). Resolved once
    per process (the first call is the engine-start check in the vLLM backend)."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError(f"scratch attention 'flash' needs vLLM's FlashAttention ({e}); use the candidate "
                           "'scratch' (our exact-page kernel) instead") from None
    version = get_flash_attn_version(head_size=head_dim)
    if version is None:
        raise RuntimeError("scratch attention 'flash': vLLM reports no FlashAttention version for this GPU / "
                           f"head_dim {head_dim}; use the candidate 'scratch' instead")
    return flash_attn_varlen_func, version


def flash_meta(lay: dict, plan: dict | None, q_req, seq_lens, device) -> dict:
    """Varlen metadata of one launch for FlashAttention over the scratch: its requests in token order (the planner
    groups a request's tokens, ascending request index), their query counts and causal key ends. From the plan's
    host arrays (``q_count_host``, ``seq_end_host``: the backend's planner; cached in the plan with the layout)
    or, without them, read back (a host sync: benches and tests). A phase's queries of a request are its last ones
    before seq_end (plan_step), i.e. FlashAttention's bottom-right causal alignment."""
    if "flash_meta" in lay:      # cached with the layout (in the plan only where the layout is)
        return lay["flash_meta"]
    host = plan is not None and plan.get("q_count_host") is not None
    if not host:
        qr = q_req.cpu().numpy()
        if len(qr) > 1 and (np.diff(qr) < 0).any():
            raise ValueError("scratch flash attention: a request's query tokens must be contiguous, in request order")
    cnt = np.asarray(plan["q_count_host"] if host else np.bincount(qr, minlength=len(seq_lens)))
    end = np.asarray(plan["seq_end_host"] if host else seq_lens.cpu().numpy()).astype(np.int64)
    reqs = np.nonzero(cnt > 0)[0]
    cu = np.concatenate([[0], np.cumsum(cnt[reqs])]).astype(np.int32)

    def to(a, dt=torch.int32):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt, non_blocking=True)
    r = to(reqs, torch.int64)
    out = dict(cu_q=to(cu), seq_used=to(end[reqs]), block_table=lay["block_table"][r].contiguous(),
               max_q=int(cnt[reqs].max(initial=1)), max_k=int(end[reqs].max(initial=1)))
    lay["flash_meta"] = out
    return out


def attend(pages: ScratchPages, decode, exact_attention, what: str, q, q_pos, q_req, cache, block_table, n_sealed,
           seq_lens, tail_k, tail_v, tail_slot, plan: dict | None = None, n_sealed_host=None, flash: bool = False,
           **kw):
    """decode(cache, src_pages, scratch, dst_idx): the format's block decoder (int32 device indices).
    exact_attention(q, q_pos, q_req, pages_u8, block_table, seq_lens, plan=..., **kw): exact-page attention.
    flash: vLLM's FlashAttention varlen over the scratch pages instead (paged K / V views of the same buffer;
    kw's scale, out, out_dtype used, the exact kernel's knobs ignored)."""
    H, dev = cache.shape[1], q.device
    lay = layout(n_sealed, plan, n_sealed_host, dev)
    buf = pages.get(lay["pages"], H, dev, what)
    if lay["n_blocks"]:
        decode(cache, block_table[lay["r"], lay["b"]].to(torch.int32), buf, lay["dst"])
    if len(lay["tail_req"]):
        slots = tail_slot.long()[lay["tail_req"]]
        n_t = min(tail_k.shape[2], BLOCK_TOKENS)
        # index_copy_ into the strided view: no host sync (the bench times this under CUDA-graph capture)
        buf[:, :, 0, :n_t].index_copy_(0, lay["tail_page"], tail_k[slots, :, :n_t].to(torch.bfloat16))
        buf[:, :, 1, :n_t].index_copy_(0, lay["tail_page"], tail_v[slots, :, :n_t].to(torch.bfloat16))
    if flash:
        fn, version = flash_varlen(q.shape[-1])
        m = flash_meta(lay, plan, q_req, seq_lens, dev)
        # [pages, 512, H, D] views: the page layout keeps a head's 512 K rows then its 512 V rows (strides as
        # vLLM's HND cache layout, head stride 2 x 512 x D); FlashAttention takes strided paged caches.
        k, v = buf[:, :, 0].transpose(1, 2), buf[:, :, 1].transpose(1, 2)
        out = kw.get("out")
        direct = out is not None and out.dtype == torch.bfloat16 and out.is_contiguous()
        o = fn(q.to(torch.bfloat16), k, v, max_seqlen_q=m["max_q"], cu_seqlens_q=m["cu_q"], max_seqlen_k=m["max_k"],
               seqused_k=m["seq_used"], block_table=m["block_table"], softmax_scale=kw["scale"],
               causal=True, fa_version=version, out=out if direct else None)
        if out is not None:
            if not direct:
                out.copy_(o)
            return out
        return o.to(kw.get("out_dtype") or q.dtype)
    pages_u8 = buf.view(torch.uint8).view(buf.shape[0], H, -1)
    return exact_attention(q, q_pos, q_req, pages_u8, lay["block_table"], seq_lens, plan=plan, **kw)
