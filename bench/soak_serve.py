"""Soak run of ``fastclip serve``: clients send mixed text and image requests for a fixed time while the
server process's resident memory is sampled; prints a table (time, RSS MiB, requests done).

    python bench/soak_serve.py --minutes 10 [--model ViT-B-32] [--concurrency 8] [--interval 10]

The server runs as a separate process (``fastclip serve --random-weights`` on 127.0.0.1); the
model is FASTCLIP_SERVE_MODEL or --model (an architecture name, random weights). Everything is
loopback only and bounded by --minutes. This module also holds the helpers bench_serve.py uses.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

CAPTIONS = ["a photo of a cat sitting on a windowsill", "two dogs playing with a red ball in the park",
            "an aerial view of a city at night with lights", "a bowl of ramen with an egg and green onions"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``fastclip serve`` in a child process on 127.0.0.1; ``with`` waits for /ready (bounded) and
    stops it with SIGTERM (graceful) on exit."""

    def __init__(self, model: str, *extra: str, ready_timeout: float = 300.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "fastclip.cli", "serve", "--model", model, "--random-weights",
                    "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *extra]
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastclip serve exited: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("fastclip serve did not become ready in time")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def image_uri(seed: int, size: int = 256) -> str:
    """A random RGB JPEG (size x size) as a data URI."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def make_body(i: int, modality: str, images: list[str]) -> dict:
    """Request i: one caption ("text"), one image ("image") or one of each ("mixed")."""
    if modality == "text":
        return {"input": [f"{CAPTIONS[i % len(CAPTIONS)]} #{i}"]}
    if modality == "image":
        return {"input": [images[i % len(images)]]}
    return {"input": [f"{CAPTIONS[i % len(CAPTIONS)]} #{i}", images[i % len(images)]]}


async def drive(url: str, concurrency: int, modality: str, *, requests: int | None = None,
                seconds: float | None = None, images: list[str] | None = None, on_done=None) -> dict:
    """``concurrency`` clients send requests back to back until ``requests`` are done or ``seconds``
    pass (at least one bound is required). Returns counts, wall time and per-request latencies (s)."""
    if requests is None and seconds is None:
        raise ValueError("drive needs requests= or seconds= (the run must be bounded)")
    images = images or [image_uri(s) for s in range(8)]
    latencies, errors, items, counter = [], 0, 0, 0
    stop_at = time.monotonic() + seconds if seconds is not None else float("inf")
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            nonlocal errors, items, counter
            while time.monotonic() < stop_at and (requests is None or counter < requests):
                i = counter
                counter += 1
                body = make_body(i, modality, images)
                t0 = time.perf_counter()
                r = await client.post("/v1/embeddings", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code == 200:
                    items += len(body["input"])
                else:
                    errors += 1
                if on_done is not None:
                    on_done()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "items": items, "wall_s": wall, "latencies": latencies}


def summary(result: dict) -> dict:
    lat = np.asarray(result["latencies"]) * 1000.0
    return {"requests": result["requests"], "errors": result["errors"],
            "req_per_s": round(result["requests"] / result["wall_s"], 2),
            "items_per_s": round(result["items"] / result["wall_s"], 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


async def _soak(server: ServerProcess, minutes: float, concurrency: int, interval: float) -> list[tuple]:
    import psutil

    proc = psutil.Process(server.proc.pid)
    done = [0]
    rows: list[tuple] = []
    start = time.monotonic()
    load = asyncio.create_task(drive(server.url, concurrency, "mixed", seconds=minutes * 60,
                                     on_done=lambda: done.__setitem__(0, done[0] + 1)))
    print(f"{'time s':>8} {'RSS MiB':>9} {'requests':>9}", flush=True)
    while not load.done():
        rss = proc.memory_info().rss / 2**20
        rows.append((time.monotonic() - start, rss, done[0]))
        print(f"{rows[-1][0]:8.0f} {rss:9.1f} {done[0]:9d}", flush=True)
        await asyncio.wait({load}, timeout=interval)
    result = load.result()
    rows.append((time.monotonic() - start, proc.memory_info().rss / 2**20, done[0]))
    print(f"{rows[-1][0]:8.0f} {rows[-1][1]:9.1f} {done[0]:9d}")
    print("load:", summary(result))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--model", default=os.environ.get("FASTCLIP_SERVE_MODEL", "ViT-B-32"))
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    args = p.parse_args(argv)
    with ServerProcess(args.model) as server:
        rows = asyncio.run(_soak(server, args.minutes, args.concurrency, args.interval))
    warm = [r for r in rows if r[0] >= min(60.0, rows[-1][0] / 2)] or rows
    print(f"RSS MiB: first {rows[0][1]:.1f}, after warm-up {warm[0][1]:.1f}, last {rows[-1][1]:.1f}, "
          f"max {max(r[1] for r in rows):.1f}; growth after warm-up {rows[-1][1] - warm[0][1]:+.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
