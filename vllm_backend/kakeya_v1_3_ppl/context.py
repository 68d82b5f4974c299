"""The batch identity of the current step (request ids and persistent request rows), stashed by the
model-runner hook so the metadata builder can key tail slots by request (vLLM's
CommonAttentionMetadata carries neither)."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

_local = threading.local()


@dataclass
class BatchIdentity:
    req_ids: list[str]
    req_idx: np.ndarray   # persistent request row per batch row (< max_num_seqs)
    dummy: bool           # warm-up / profiling batch: no real request state
    req_idx_gpu: object = None   # the same rows on the GPU (torch tensor), for GPU-planned decode steps


def set_current(req_ids, req_idx, dummy: bool, req_idx_gpu=None) -> None:
    _local.batch = BatchIdentity(list(req_ids), np.asarray(req_idx, dtype=np.int64), bool(dummy), req_idx_gpu)


def current() -> BatchIdentity | None:
    return getattr(_local, "batch", None)
