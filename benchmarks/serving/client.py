"""A small streaming client for vLLM's OpenAI /v1/completions (stdlib asyncio only, CPU-tested
against a fake server): the GPU host's kit may lack aiohttp, which `vllm bench serve` needs.

Each request is a token-id prompt (the dummy-weight models have no tokenizer: the server runs with
--skip-tokenizer-init), streamed with return_token_ids so every chunk says how many tokens it holds.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request

from .stats import RequestTrace


def completion_body(model: str, prompt_ids: list[int], max_tokens: int, stream: bool = True) -> dict:
    return {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream, "return_token_ids": True}


async def _read_body(reader: asyncio.StreamReader, headers: dict):
    """Yield body bytes as they arrive: chunked transfer encoding, else until EOF."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)          # CRLF after each chunk
            yield data
    else:
        while data := await reader.read(65536):
            yield data


def chunk_tokens(event: dict) -> int:
    """Tokens in one streamed completion chunk: len(token_ids) when returned, else 1 per choice (vLLM
    sends no chunk without a new token; a usage-only chunk has no choices)."""
    n = 0
    for ch in event.get("choices") or []:
        ids = ch.get("token_ids")
        n += len(ids) if ids is not None else 1
    return n


async def stream_completion(host: str, port: int, body: dict, timeout_s: float,
                            clock=time.perf_counter) -> RequestTrace:
    """POST one streaming completion; record the arrival time and token count of every chunk."""
    payload = json.dumps(body).encode()
    trace = RequestTrace(sent=clock())
    conn = []

    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        conn.append(writer)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Accept: text/event-stream\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                     % (host.encode(), port, len(payload)) + payload)
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace").split(" ", 2)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode(errors="replace").partition(":")
            headers[k.strip().lower()] = v.strip()
        if len(status) < 2 or status[1] != "200":
            body_txt = b"".join([d async for d in _read_body(reader, headers)]).decode(errors="replace")
            trace.error = f"HTTP {' '.join(status[1:]).strip()}: {body_txt[:200]}"
            return
        buf = b""
        async for data in _read_body(reader, headers):
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    msg = line[5:].strip()
                    if msg == b"[DONE]":
                        return
                    obj = json.loads(msg)
                    if "error" in obj:
                        trace.error = str(obj["error"])[:200]
                        return
                    n = chunk_tokens(obj)
                    if n:
                        trace.chunks.append((clock(), n))
        trace.error = "stream ended without [DONE]"

    try:
        await asyncio.wait_for(go(), timeout_s)
    except asyncio.TimeoutError:
        trace.error = f"timeout after {timeout_s:.0f}s"
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        trace.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        for w in conn:
            w.close()
    return trace


async def run_load(host: str, port: int, bodies: list[dict], offsets: list[float], timeout_s: float,
                   clock=time.perf_counter) -> tuple[list[RequestTrace], float]:
    """Send bodies[i] at offsets[i] seconds after the start (open loop); return traces and wall time."""
    t0 = clock()

    async def one(body, off):
        delay = t0 + off - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        return await stream_completion(host, port, body, timeout_s, clock)

    traces = await asyncio.gather(*(one(b, o) for b, o in zip(bodies, offsets)))
    return list(traces), clock() - t0


def post_json(url: str, body: dict, timeout_s: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def wait_healthy(url: str, timeout_s: float, alive=lambda: True, poll_s: float = 2.0) -> bool:
    """Poll GET url until 200; False on timeout or when alive() says the server process died."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if not alive():
            return False
        time.sleep(poll_s)
    return False
