"""`vllm serve` on 127.0.0.1 for tests and the soak: started in its own process group, a bounded wait until it
answers /health, stopped as a whole group (engine core and workers included); HTTP and /metrics helpers.
Standard library only: the lent GPU host has no pip."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from kakeya_kv.subproc import gpu_name, kill_group  # noqa: F401  (gpu_name: re-exported for soak.py)

# The runtime must never reach the network: no hub lookups, no usage reports.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# SmolLM2's ChatML, for a model folder whose tokenizer carries no template (the gpu-kit converts a GGUF).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_chat_template(model_dir: str) -> bool:
    p = Path(model_dir)
    if (p / "chat_template.jinja").is_file():
        return True
    cfg = p / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def request(port: int, method: str, path: str, payload=None, timeout: float = 300) -> tuple[int, dict | str]:
    """One HTTP request to the local server -> (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = None if payload is None else json.dumps(payload)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode(errors="replace")
        try:
            return r.status, json.loads(text)
        except json.JSONDecodeError:
            return r.status, text
    finally:
        conn.close()


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: value summed over label sets} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def gpu_memory_used_mb() -> float | None:
    """Memory in use on the visible GPUs (all processes: the server's engine lives in child processes)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
        return sum(float(x) for x in r.stdout.split())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


class Server:
    """``with Server(model, args) as s:`` -> s.port; the process group is killed on exit, whatever happened."""

    def __init__(self, model: str, args=(), env: dict | None = None, log_path: str | None = None,
                 startup_s: float = 300, port: int | None = None):
        self.model, self.args, self.startup_s = model, list(args), startup_s
        self.env = {**os.environ, **OFFLINE_ENV, **(env or {})}
        self.port = port or free_port()
        self.log_path = log_path or f"/tmp/vllm_serve_{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)    # own process group: stop() reaches every child

    def wait_ready(self) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if request(self.port, "GET", "/health", timeout=5)[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve not ready after {self.startup_s:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30) -> None:
        if self.proc is not None:
            kill_group(self.proc, grace_s, kill_wait_s=10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        status, text = request(self.port, "GET", "/metrics", timeout=30)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_prometheus(text if isinstance(text, str) else json.dumps(text))
