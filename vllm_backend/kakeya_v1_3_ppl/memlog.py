"""KAKEYA_MEMORY_LOG: the engine worker's torch CUDA memory as JSON lines, at most one line per second.

Why: the GPU memory nvidia-smi reports includes the caching allocator's reserve, which grows to the largest step
seen and is never handed back, so a soak cannot tell a leak from a new peak by it. torch's allocated bytes at an
idle step can: they must come back to the same value once requests are gone.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch


class MemoryLog:
    def __init__(self, path: str, every_s: float = 1.0):
        self.path, self.every_s, self.last = path, every_s, -math.inf

    def tick(self, device) -> None:
        """Called at the start of a step's metadata build (before the step allocates): append a line if the last
        one is at least every_s old, so the first step after an idle second is always logged."""
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        mb = 1 << 20
        line = {"t": time.time(), "pid": os.getpid(), "device": str(device),
                "allocated_mb": torch.cuda.memory_allocated(device) / mb,
                "reserved_mb": torch.cuda.memory_reserved(device) / mb,
                "max_allocated_mb": torch.cuda.max_memory_allocated(device) / mb}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


_LOGS: dict[str, MemoryLog] = {}


def memory_log(path: str | None) -> MemoryLog | None:
    """One log per file in this process (every metadata builder ticks the same one)."""
    if path is None:
        return None
    return _LOGS.setdefault(path, MemoryLog(path))
