"""Helpers for the server tests: a real uvicorn server on a loopback port in a thread, image payloads,
metric parsing and a model wrapper whose encoder can be slowed down or held."""
from __future__ import annotations

import base64
import contextlib
import io
import threading
import time

import numpy as np
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0):
    """Serve ``app`` with uvicorn on 127.0.0.1 and a free port; yields (base_url, server).

    On exit the server is asked to stop (graceful shutdown) and its thread joined."""
    config = uvicorn.Config(app, host=HOST, port=0, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=20)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{HOST}:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_ready(client, timeout: float = 30.0) -> None:
    """Poll /ready until it answers 200 (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/ready")
        if r.status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"/ready never became OK: {r.status_code} {r.text}")


def noise_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A distinct random RGB image (W x H = size) per seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def metric_samples(text: str, name: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} for every sample of the metric family ``name``."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def batches_above_one(metrics_text: str, modality: str) -> float:
    """How many encoder calls of ``modality`` had more than one item (from the batch-size histogram)."""
    s = metric_samples(metrics_text, "fastclip_batch_size")
    count = s[("fastclip_batch_size_count", (("modality", modality),))]
    ones = s[("fastclip_batch_size_bucket", (("le", "1.0"), ("modality", modality)))]
    return count - ones


class SlowModel:
    """Wraps a model; every encoder call first waits on ``gate`` (if set) then sleeps ``delay`` s.
    ``entered`` is set when an encoder call starts."""

    def __init__(self, model, delay: float = 0.0):
        self._model, self.delay = model, delay
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _wait(self):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay)

    def embed_texts(self, *args, **kwargs):
        self._wait()
        return self._model.embed_texts(*args, **kwargs)

    def embed_images(self, *args, **kwargs):
        self._wait()
        return self._model.embed_images(*args, **kwargs)
