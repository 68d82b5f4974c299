"""Shared scenario builder for kernel parity tests and the GPU parity record."""
from __future__ import annotations

import math

import torch

from kakeya_kv.codecs.kakeya import KakeyaCodec


def build(lens, hkv, gqa, d, kb=4, vb=3, device="cpu", seed=0, real_kv=None):
    """Requests with given lengths: sealed blocks in shuffled pages, tails exact.

    Returns (kernels, scenario dict, reference K/V per request as float64 on CPU).
    real_kv: optional (k, v) [Hkv, T, D] tensors to take data from (captured model KV).
    """
    from kakeya_kernels.kakeya_triton import KakeyaKernels
    g = torch.Generator().manual_seed(seed)
    kk = KakeyaKernels(d, kb, vb, device)
    codec = KakeyaCodec(kb, vb)
    nblk = [L // 512 for L in lens]
    maxb = max(max(nblk), 1)
    pages = torch.randperm(len(lens) * maxb, generator=g)
    bt = pages.view(len(lens), maxb).to(torch.int32)
    cache = torch.zeros(len(lens) * maxb, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=device)
    tmax = max(L - n * 512 for L, n in zip(lens, nblk)) + 1
    tail_k = torch.zeros(len(lens), hkv, tmax, d, dtype=torch.bfloat16, device=device)
    tail_v = torch.zeros_like(tail_k)
    refs = []
    for r, (L, ns) in enumerate(zip(lens, nblk)):
        if real_kv is not None:
            off = int(torch.randint(0, real_kv[0].shape[1] - L + 1, (1,), generator=g))
            K, V = real_kv[0][:hkv, off:off + L].bfloat16(), real_kv[1][:hkv, off:off + L].bfloat16()
        else:
            K = (torch.randn(hkv, L, d, generator=g) * (torch.rand(d, generator=g) * 2 + 0.2)
                 + torch.randn(d, generator=g) * 3).bfloat16()
            V = torch.randn(hkv, L, d, generator=g).bfloat16()
        kd, vd = K.double(), V.double()
        if ns:
            tmp = torch.zeros(ns, hkv, kk.lay.slot_bytes, dtype=torch.uint8, device=device)
            kk.seal(K[:, :ns * 512].reshape(hkv, ns, 512, d).transpose(0, 1).to(device),
                    V[:, :ns * 512].reshape(hkv, ns, 512, d).transpose(0, 1).to(device), tmp)
            cache[bt[r, :ns].long().to(device)] = tmp
            dk, dv = codec.decode(tmp.cpu().transpose(0, 1), d)
            kd[:, :ns * 512], vd[:, :ns * 512] = dk.double(), dv.double()
        tail_k[r, :, :L - ns * 512] = K[:, ns * 512:].to(device)
        tail_v[r, :, :L - ns * 512] = V[:, ns * 512:].to(device)
        refs.append((kd, vd))
    sc = dict(cache=cache, block_table=bt.to(device), n_sealed=torch.tensor(nblk, dtype=torch.int32, device=device),
              seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), tail_k=tail_k, tail_v=tail_v,
              tail_slot=torch.arange(len(lens), dtype=torch.int32, device=device))
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
