"""The server under load, on localhost only: concurrent clients against a real uvicorn process.

`run_load` is also what benchmarks/server_load.py runs (with more requests) to write
benchmarks/server_load.json. Requests use tiny settings (3 denoising steps, 32x32, 4 tokens), so the
test measures the serving machinery (queue, threads, encoding, memory), not the model.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image
from test_server import KEY, start_server, stop

AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS = 8
REQUESTS = 104  # 13 per client


def _png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (220, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def request_kwargs(i: int) -> dict[str, Any]:
    """The i-th request of the mix: generation, text chat, chat about an image, image edit (in turn)."""
    kind = i % 4
    if kind == 0:
        return {"url": "/v1/images/generations",
                "json": {"prompt": "a red circle", "size": "32x32", "num_inference_steps": 3, "seed": i}}
    if kind == 1:
        return {"url": "/v1/chat/completions",
                "json": {"messages": [{"role": "user", "content": "what color is the circle?"}], "max_tokens": 4}}
    if kind == 2:
        return {"url": "/v1/chat/completions", "json": {"max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": DATA_URL}}, {"type": "text", "text": "what is this?"}]}]}}
    return {"url": "/v1/images/edits", "files": {"image": ("a.png", PNG, "image/png")},
            "data": {"prompt": "make it blue", "num_inference_steps": "3", "seed": str(i)}}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def run_load(base_url: str, clients: int, requests: int, headers: dict[str, str] | None = None,
             timeout_s: float = 120) -> dict[str, Any]:
    """`requests` requests from `clients` threads (each with its own connection); latencies and statuses."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    status = http.post(**request_kwargs(i)).status_code
                except httpx.HTTPError as exc:
                    status = -1
                    with lock:
                        failures.append(f"request {i}: {type(exc).__name__}: {exc}")
                elapsed = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(elapsed)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {"clients": clients, "requests": requests, "ok": ok, "rejected_429": statuses.get(429, 0),
            "errors": requests - ok - statuses.get(429, 0),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "p50_ms": round(1000 * percentile(latencies, 50), 1) if latencies else None,
            "p99_ms": round(1000 * percentile(latencies, 99), 1) if latencies else None,
            "max_ms": round(1000 * max(latencies), 1) if latencies else None,
            "wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 2), "failures": failures[:5]}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    proc, url = start_server(tiny_checkpoint, tmp_path_factory.mktemp("db") / "sessions.sqlite3",
                             "--max-body-mb", "1", "--queue-size", "16")
    yield proc, url
    stop(proc)


def test_percentile():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0


def test_concurrent_clients(server):
    proc, url = server
    warm = run_load(url, clients=1, requests=4, headers=AUTH)  # one of each kind: first-use allocations
    assert warm["ok"] == 4, warm
    rss_before = rss_mb(proc.pid)
    stats = run_load(url, clients=CLIENTS, requests=REQUESTS, headers=AUTH)
    rss_after = rss_mb(proc.pid)
    print(f"\nload: {stats['clients']} clients, {stats['requests']} requests, {stats['ok']} ok, "
          f"{stats['rejected_429']} rejected (429), {stats['errors']} errors; p50 {stats['p50_ms']} ms, "
          f"p99 {stats['p99_ms']} ms, {stats['requests_per_s']} req/s; RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    # The queue (16) holds every client (8): nothing may be rejected or fail.
    assert stats["ok"] == REQUESTS and stats["errors"] == 0 and stats["rejected_429"] == 0, stats
    assert rss_after - rss_before < 150, f"RSS grew from {rss_before:.0f} to {rss_after:.0f} MB"
    assert httpx.get(f"{url}/health").json()["queued"] == 0


def _queued(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=5).json()["queued"]


def test_a_client_that_disconnects_frees_its_slot(server):
    """A 1000-step 256x256 generation whose client hangs up is cancelled; its slot and the model are free."""
    _, url = server
    slow = {"prompt": "a red circle", "size": "256x256", "num_inference_steps": 1000}
    with httpx.Client(base_url=url, headers=AUTH, timeout=1.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/images/generations", json=slow)  # gives up after 1 s and closes the connection
    deadline = time.monotonic() + 15
    while _queued(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _queued(url) == 0, "the slot of the disconnected client was not freed"
    t0 = time.monotonic()
    fast = httpx.post(f"{url}/v1/images/generations", headers=AUTH, timeout=60,
                      json={"prompt": "a square", "size": "32x32", "num_inference_steps": 3})
    assert fast.status_code == 200
    assert time.monotonic() - t0 < 20, "the model thread was still busy with the abandoned request"


def test_streamed_body_over_the_limit_is_refused(server):
    """No Content-Length (chunked upload): the limit is enforced while the body streams in."""
    _, url = server

    def chunks():
        for _ in range(40):
            yield b" " * 2**16  # 40 x 64 KB = 2.5 MB > 1 MB

    r = httpx.post(f"{url}/v1/images/generations", headers={**AUTH, "Content-Type": "application/json"},
                   content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{url}/health").status_code == 200
