"""Shared scenario builder for kernel parity tests and the GPU parity record."""
from __future__ import annotations

import math

import torch

from kakeya_kv.codecs.kakeya import KakeyaCodec


def kv_data(hkv, L, d, g):
    """Random K (per-channel spread and offset, like real keys) and V [Hkv, L, D] in bf16."""
    K = (torch.randn(hkv, L, d, generator=g) * (torch.rand(d, generator=g) * 2 + 0.2)
         + torch.randn(d, generator=g) * 3).bfloat16()
    return K, torch.randn(hkv, L, d, generator=g).bfloat16()


def build_paged(kk, lens, hkv, d, g, ref_decode, device="cpu", real_kv=None, tail_rows=None):
    """Requests with given lengths, for any format's kernels ``kk``: sealed blocks in shuffled pages, tails exact.

    ref_decode(slots [ns, Hkv, slot_bytes]) -> reference (K, V) [Hkv, ns * 512, D] decoded from the very bytes the
    seal wrote. tail_rows: rows per tail slot (default: the longest tail + 1).
    Returns (scenario dict, reference K/V per request as float64 on CPU).
    real_kv: optional (k, v) [Hkv, T, D] tensors to take data from (captured model KV).
    """
    nblk = [L // 512 for L in lens]
    maxb = max(max(nblk), 1)
    pages = torch.randperm(len(lens) * maxb, generator=g)
    bt = pages.view(len(lens), maxb).to(torch.int32)
    cache = torch.zeros(len(lens) * maxb, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=device)
    tmax = tail_rows or max(L - n * 512 for L, n in zip(lens, nblk)) + 1
    tail_k = torch.zeros(len(lens), hkv, tmax, d, dtype=torch.bfloat16, device=device)
    tail_v = torch.zeros_like(tail_k)
    refs = []
    for r, (L, ns) in enumerate(zip(lens, nblk)):
        if real_kv is not None:
            off = int(torch.randint(0, real_kv[0].shape[1] - L + 1, (1,), generator=g))
            K, V = real_kv[0][:hkv, off:off + L].bfloat16(), real_kv[1][:hkv, off:off + L].bfloat16()
        else:
            K, V = kv_data(hkv, L, d, g)
        kd, vd = K.double(), V.double()
        if ns:
            tmp = torch.zeros(ns, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=device)
            kk.seal(K[:, :ns * 512].reshape(hkv, ns, 512, d).transpose(0, 1).to(device),
                    V[:, :ns * 512].reshape(hkv, ns, 512, d).transpose(0, 1).to(device), tmp)
            cache[bt[r, :ns].long().to(device)] = tmp
            dk, dv = ref_decode(tmp.cpu())
            kd[:, :ns * 512], vd[:, :ns * 512] = dk.double(), dv.double()
        tail_k[r, :, :L - ns * 512] = K[:, ns * 512:].to(device)
        tail_v[r, :, :L - ns * 512] = V[:, ns * 512:].to(device)
        refs.append((kd, vd))
    sc = dict(cache=cache, block_table=bt.to(device), n_sealed=torch.tensor(nblk, dtype=torch.int32, device=device),
              seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), tail_k=tail_k, tail_v=tail_v,
              tail_slot=torch.arange(len(lens), dtype=torch.int32, device=device))
    return sc, refs


def build(lens, hkv, gqa, d, kb=4, vb=3, device="cpu", seed=0, real_kv=None):
    """The default format's kernels and a build_paged scenario, references from the CPU reference codec.

    Returns (kernels, scenario dict, reference K/V per request as float64 on CPU).
    """
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    g = torch.Generator().manual_seed(seed)
    kk = KakeyaKernels(d, kb, vb, device)
    codec = KakeyaCodec(kb, vb)
    sc, refs = build_paged(kk, lens, hkv, d, g, lambda slots: codec.decode(slots.transpose(0, 1), d), device, real_kv)
    return kk, sc, refs


def ref_attention(q, pos, kv, gqa):
    """float64 reference: q [Hq, D] at absolute position pos against reference K/V [Hkv, L, D]."""
    k, v = kv
    k = k.repeat_interleave(gqa, 0)
    v = v.repeat_interleave(gqa, 0)
    s = torch.einsum("hd,hld->hl", q.double().cpu(), k) / math.sqrt(q.shape[-1])
    s[:, pos + 1:] = -float("inf")
    return torch.einsum("hl,hld->hd", torch.softmax(s, -1), v)


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def ref_flash_varlen(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k=None, block_table=None,
                     softmax_scale=None, causal=False, fa_version=3, out=None, **_):
    """FlashAttention's paged varlen call, in torch (float32), for machines without vLLM's FlashAttention: batch
    entry b = query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] against its first seqused_k[b] keys in pages
    block_table[b] of k / v [pages, page, Hkv, D] (strided views allowed), causal aligned bottom-right (its queries
    are the last ones), query head h reading KV head h // (Hq / Hkv). Checks the bounds FA assumes."""
    assert causal and k.stride(-1) == 1 and v.stride(-1) == 1 and q.dtype == k.dtype == torch.bfloat16
    assert cu_seqlens_q.dtype == seqused_k.dtype == block_table.dtype == torch.int32
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    page, hkv, d = k.shape[1:]
    g = q.shape[1] // hkv
    cu, used = cu_seqlens_q.tolist(), seqused_k.tolist()
    assert cu[-1] == q.shape[0] and len(used) == block_table.shape[0] == len(cu) - 1
    for b, L in enumerate(used):
        qs = q[cu[b]:cu[b + 1]].float()
        n = qs.shape[0]
        assert 0 < n <= min(L, max_seqlen_q) and L <= max_seqlen_k
        pages = block_table[b, :-(-L // page)].long()
        kk = k[pages].reshape(-1, hkv, d)[:L].float().repeat_interleave(g, dim=1)
        vv = v[pages].reshape(-1, hkv, d)[:L].float().repeat_interleave(g, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, kk) * softmax_scale
        qpos = L - n + torch.arange(n, device=q.device)
        s = s.masked_fill(torch.arange(L, device=q.device)[None, None, :] > qpos[None, :, None], float("-inf"))
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv).to(q.dtype)
    return out
