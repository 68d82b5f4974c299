"""One subprocess per benchmark configuration, bounded in time (CPU-tested with fake children).

The child prints `PARTIAL {json}` after every finished measurement and `RESULT {json}` at the end,
so a child killed at its time limit still yields what it measured. The child runs in its own
process group and the whole group is killed on timeout and after exit: vLLM's engine-core and
worker processes would otherwise keep the GPU memory (and a pipe open) after the parent dies.
Output goes to a log file, never to a pipe (a killed parent's grandchildren would hold it open).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field

from kakeya_kv.subproc import gpu_name, kill_group  # noqa: F401  (gpu_name: re-exported for serve_bench, decode_step)


def emit(kind: str, obj: dict) -> None:
    """Child side: one machine-readable line (kind = PARTIAL or RESULT)."""
    print(f"{kind} {json.dumps(obj)}", flush=True)


class Deadline:
    """Seconds left of a budget that started at construction (monotonic clock, injectable for tests)."""

    def __init__(self, total_s: float, clock=time.monotonic):
        self.clock = clock
        self.end = clock() + total_s

    def left(self) -> float:
        return self.end - self.clock()

    def budget(self, limit_s: float, reserve_s: float = 0.0) -> float:
        """Time a step may take: its own limit, cut to what is left after `reserve_s` (may be <= 0)."""
        return min(limit_s, self.left() - reserve_s)


@dataclass
class ChildResult:
    rc: int | None
    timed_out: bool
    wall_s: float
    data: dict = field(default_factory=dict)   # RESULT, else the last PARTIAL, else {}
    final: bool = False                        # a RESULT line was seen
    log_tail: str = ""
    log_text: str = ""

    def error_line(self) -> str:
        """The last line that looks like an error, for a one-line reason."""
        lines = [l.strip() for l in self.log_text.splitlines() if l.strip()]
        for l in reversed(lines):
            if "Error" in l or "error" in l or "Traceback" in l:
                return l[:300]
        return lines[-1][:300] if lines else "no output"


def parse_child_output(text: str) -> tuple[dict, bool]:
    """Last RESULT line if any (final=True), else the last PARTIAL line, else {}."""
    last_partial, result = None, None
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = line[7:]
        elif line.startswith("PARTIAL "):
            last_partial = line[8:]
    for raw, final in ((result, True), (last_partial, False)):
        if raw is not None:
            try:
                return json.loads(raw), final
            except json.JSONDecodeError:
                continue
    return {}, False


def run_child(cmd: list[str], log_path: str, timeout_s: float, env: dict | None = None, cwd=None,
              grace_s: float = 10.0, tail_chars: int = 3000) -> ChildResult:
    """Run cmd in a new session with stdout+stderr to log_path; kill its process group at timeout_s."""
    t0 = time.monotonic()
    if timeout_s <= 0:
        return ChildResult(rc=None, timed_out=True, wall_s=0.0, log_tail="not started: no time left")
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        timed_out = False
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        kill_group(p, grace_s)   # also after a clean exit: stray engine/worker processes
        rc = p.wait()
    text = open(log_path, errors="replace").read()
    data, final = parse_child_output(text)
    return ChildResult(rc=None if timed_out else rc, timed_out=timed_out, wall_s=time.monotonic() - t0,
                       data=data, final=final, log_tail=text[-tail_chars:], log_text=text)


_KV_TOKENS = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
_CONCURRENCY = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
_KAKEYA = re.compile(r"Kakeya KV: (format .*)")     # the start-up summary, not the backend's other lines
_POOL = re.compile(r"exact-tail pool (\d+) MiB")


_KV_GIB = re.compile(r"Available KV cache memory: ([\d.]+) GiB")
_LOAD_GIB = re.compile(r"Model loading took ([\d.]+) GiB")


def parse_vllm_log(text: str) -> dict:
    """What vLLM (and the Kakeya backend) log at start-up: KV tokens, max concurrency, Kakeya line."""
    out = {}
    if m := _KV_TOKENS.findall(text):
        out["log_kv_cache_tokens"] = int(m[-1].replace(",", ""))
    if m := _CONCURRENCY.findall(text):
        tokens, x = m[-1]
        out["log_max_concurrency"] = float(x)
        out["log_max_concurrency_tokens"] = int(tokens.replace(",", ""))
    # Memory split (GiB, as vLLM rounds it): the Kakeya tail pool shows up in "model loading", not in KV memory.
    if m := _KV_GIB.findall(text):
        out["log_kv_cache_gib"] = float(m[-1])
    if m := _LOAD_GIB.findall(text):
        out["log_model_load_gib"] = float(m[-1])
    if m := _KAKEYA.findall(text):
        out["kakeya_log"] = m[-1].strip()
        if p := _POOL.findall(m[-1]):
            out["kakeya_tail_pool_mib"] = int(p[-1])
    return out


def gpu_memory_used_mb(run=subprocess.run) -> float | None:
    """MiB in use on the visible GPUs (all processes), from nvidia-smi; None without one."""
    try:
        r = run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True,
                text=True, timeout=30)
        vals = [float(x) for x in r.stdout.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return sum(vals) if r.returncode == 0 and vals else None


def wait_gpu_released(baseline_mb: float | None, slack_mb: float = 1024.0, timeout_s: float = 30.0,
                      used=gpu_memory_used_mb, clock=time.monotonic, sleep=time.sleep) -> dict:
    """Wait until GPU memory is back near `baseline_mb` (what was in use before the first row).

    A killed row's engine processes can hold their memory for a moment after the group is gone; the next
    row's vLLM refuses to start ("Free memory on device ... is less than desired GPU memory utilization")
    when it sees less free memory than --gpu-util asks. Returns what it saw, for the row's record."""
    t0 = clock()
    now = used()
    while baseline_mb is not None and now is not None and now > baseline_mb + slack_mb and clock() - t0 < timeout_s:
        sleep(1.0)
        now = used()
    return {"gpu_mem_used_mb": now, "gpu_mem_wait_s": round(clock() - t0, 1),
            "gpu_mem_released": None if baseline_mb is None or now is None else now <= baseline_mb + slack_mb}


def write_json(path: str, res: dict) -> None:
    """Atomic (tmp + rename): a call killed mid-write leaves the previous complete file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)
