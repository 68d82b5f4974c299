"""Run a command with a wall-clock limit, streaming its output lines; on timeout kill its whole
process group (vLLM's engine core and workers are grandchildren that would otherwise keep the GPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Finished:
    rc: int | None              # None when killed for the time limit
    timed_out: bool
    elapsed_s: float
    stdout: list[str] = field(default_factory=list)
    stderr_tail: str = ""


def run_streaming(cmd: list[str], timeout_s: float, env: dict | None = None, on_line=None, on_err=None,
                  keep_stderr: int = 4000, finished=None, grace_s: float = 20.0) -> Finished:
    """Run cmd; call on_line(line) for each stdout line (on_err for stderr) as it arrives; stop it
    after timeout_s, or grace_s after finished() turns true (a child that has delivered everything
    but hangs in its teardown is not waited for)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    out: list[str] = []
    err: list[str] = []

    def read_out():
        for line in p.stdout:
            line = line.rstrip("\n")
            out.append(line)
            if on_line is not None:
                on_line(line)

    def read_err():          # drained continuously so a chatty child never blocks on a full pipe
        for line in p.stderr:
            err.append(line)
            if on_err is not None:
                on_err(line.rstrip("\n"))
            while len(err) > 400:
                err.pop(0)

    threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    timed_out, done_at = False, None
    while p.poll() is None:
        now = time.monotonic()
        if done_at is None and finished is not None and finished():
            done_at = now
        if now - t0 > timeout_s or (done_at is not None and now - done_at > grace_s):
            timed_out = done_at is None
            kill_group(p)
            break
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=10)
    return Finished(None if timed_out else p.returncode, timed_out, time.monotonic() - t0, out,
                    "".join(err)[-keep_stderr:])


def kill_group(p: subprocess.Popen, grace_s: float = 10.0, kill_wait_s: float = 0.0) -> None:
    """SIGTERM the child's process group (vLLM shuts its engine down), SIGKILL what is left after grace_s
    (waiting up to kill_wait_s for it to vanish), then reap the leader. Used also after a clean exit:
    vLLM's engine-core and worker processes can outlive their parent."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        if _group_gone_within(p, wait):
            break
    p.wait()


def _group_gone_within(p: subprocess.Popen, wait_s: float) -> bool:
    t0 = time.monotonic()
    while True:
        p.poll()                       # reap the leader, else its zombie keeps the group alive
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() - t0 >= wait_s:
            return False
        time.sleep(0.2)


def gpu_name() -> str:
    """The visible card(s) as nvidia-smi names them ("NVIDIA H200", "2x NVIDIA H200"; "unknown" without one),
    without creating a CUDA context in this process (it would hold GPU memory that the measured engines count
    against)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    names = r.stdout.strip().splitlines() if r.returncode == 0 else []
    if not names:
        return "unknown"
    return names[0] if len(names) == 1 else f"{len(names)}x {names[0]}"
