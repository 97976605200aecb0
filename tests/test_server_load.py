"""fastclip serve under load: 64 concurrent clients (nothing lost or misordered, batches > 1), batching
off, the bounded queue's 429, graceful shutdown finishing in-flight requests, mounting in another app."""
import asyncio
import contextlib
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

import fastclip
from fastclip import tolerance
from fastclip.server import create_app
from helpers.server_utils import (
    SlowModel,
    batches_above_one,
    data_uri,
    metric_samples,
    noise_image,
    png_bytes,
    running_server,
    wait_ready,
)

ATOL = tolerance.SAME_MODEL_ATOL  # fp32; batching changes GEMM summation order slightly


@pytest.fixture(scope="module")
def model(tiny_config_dir):
    return fastclip.create_model("tiny-avgpool-quickgelu", seed=0)


def _plan(clients: int, rounds: int):
    """Per (client, round): a list of ("text", str) / ("image", seed) items; text-only, image-only, mixed."""
    plan = {}
    for c in range(clients):
        for r in range(rounds):
            n = 1 + (c + r) % 3
            kinds = [("text", "image", "text" if k % 2 else "image")[c % 3] for k in range(n)]
            plan[c, r] = [("text", f"client {c} round {r} caption {k} of a small red boat")
                          if kind == "text" else ("image", 10_000 + 100 * c + 10 * r + k) for k, kind in enumerate(kinds)]
    return plan


async def _run_clients(url: str, plan: dict, clients: int, rounds: int):
    """Each client sends its rounds one after another; all clients at once. Returns {(c, r): response}."""
    out = {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one(c):
            for r in range(rounds):
                items = [v if kind == "text" else data_uri(noise_image(v)) for kind, v in plan[c, r]]
                out[c, r] = await client.post("/v1/embeddings", json={"input": items})

        await asyncio.wait_for(asyncio.gather(*(one(c) for c in range(clients))), timeout=120)
    return out


def _expected(model, plan) -> dict:
    texts = sorted({v for items in plan.values() for kind, v in items if kind == "text"})
    seeds = sorted({v for items in plan.values() for kind, v in items if kind == "image"})
    t = dict(zip(texts, model.embed_texts(texts), strict=True))
    i = dict(zip(seeds, model.embed_images([png_bytes(noise_image(s)) for s in seeds]), strict=True))
    return {("text", k): v for k, v in t.items()} | {("image", k): v for k, v in i.items()}


def test_64_concurrent_clients_nothing_lost_or_misordered(model):
    clients, rounds = 64, 2
    plan = _plan(clients, rounds)
    expected = _expected(model, plan)
    app = create_app(model, max_batch=16, max_wait_ms=20)
    with running_server(app) as (url, _), httpx.Client(base_url=url) as client:
        wait_ready(client)
        responses = asyncio.run(_run_clients(url, plan, clients, rounds))
        metrics = client.get("/metrics").text
    assert len(responses) == clients * rounds
    for key, items in plan.items():
        r = responses[key]
        assert r.status_code == 200, (key, r.text)
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(len(items)))
        got = np.array([d["embedding"] for d in data], dtype=np.float32)
        np.testing.assert_allclose(got, np.stack([expected[item] for item in items]), atol=ATOL,
                                   err_msg=f"client {key[0]} round {key[1]}")
    assert batches_above_one(metrics, "text") > 0 and batches_above_one(metrics, "image") > 0
    items = metric_samples(metrics, "fastclip_items")
    n_text = sum(kind == "text" for v in plan.values() for kind, _ in v)
    n_image = sum(kind == "image" for v in plan.values() for kind, _ in v)
    assert items[("fastclip_items_total", (("modality", "text"),))] == n_text + 1  # + the readiness probe
    assert items[("fastclip_items_total", (("modality", "image"),))] == n_image + 1


def test_batching_off_encodes_one_item_at_a_time(model):
    plan = _plan(8, 1)
    expected = _expected(model, plan)
    with running_server(create_app(model, max_batch=1)) as (url, _), httpx.Client(base_url=url) as client:
        wait_ready(client)
        responses = asyncio.run(_run_clients(url, plan, 8, 1))
        metrics = client.get("/metrics").text
    for key, items in plan.items():
        got = np.array([d["embedding"] for d in responses[key].json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, np.stack([expected[item] for item in items]), atol=ATOL)
    assert batches_above_one(metrics, "text") == 0 and batches_above_one(metrics, "image") == 0


def _post_in_thread(url: str, body: dict, results: dict, key):
    def run():
        results[key] = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _queue_depth(client, modality="text") -> float:
    return metric_samples(client.get("/metrics").text, "fastclip_queue_depth")[
        ("fastclip_queue_depth", (("modality", modality),))]


def test_full_queue_answers_429_with_retry_after(model):
    slow = SlowModel(model)
    app = create_app(slow, max_queue=1, max_items=1, max_batch=1)
    with running_server(app) as (url, _), httpx.Client(base_url=url) as client:
        wait_ready(client)
        slow.gate, slow.entered = threading.Event(), threading.Event()
        results = {}
        first = _post_in_thread(url, {"input": ["first"]}, results, "first")
        _wait_for(slow.entered.is_set)  # the encoder holds "first"; the queue is empty again
        second = _post_in_thread(url, {"input": ["second"]}, results, "second")
        _wait_for(lambda: _queue_depth(client) == 1)
        r = client.post("/v1/embeddings", json={"input": ["third"]})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        assert client.get("/health").status_code == 200
        slow.gate.set()
        first.join(30)
        second.join(30)
        for key in ("first", "second"):
            assert results[key].status_code == 200
            np.testing.assert_allclose(results[key].json()["data"][0]["embedding"],
                                       model.embed_texts([key])[0], atol=ATOL)
        errors = metric_samples(client.get("/metrics").text, "fastclip_errors")
        assert errors[("fastclip_errors_total", (("kind", "queue_full"),))] == 1


def test_graceful_shutdown_finishes_in_flight_requests(model):
    slow = SlowModel(model)
    app = create_app(slow, max_batch=1)
    with running_server(app) as (url, server):
        with httpx.Client(base_url=url) as client:
            wait_ready(client)
            slow.gate, slow.entered = threading.Event(), threading.Event()
            results = {}
            running = _post_in_thread(url, {"input": ["in the encoder"]}, results, "running")
            _wait_for(slow.entered.is_set)
            queued = _post_in_thread(url, {"input": ["still queued"]}, results, "queued")
            _wait_for(lambda: _queue_depth(client) == 1)
        server.should_exit = True  # what SIGTERM / Ctrl-C do
        time.sleep(0.3)
        slow.gate.set()
        running.join(30)
        queued.join(30)
    for key, text in (("running", "in the encoder"), ("queued", "still queued")):
        assert results[key].status_code == 200, results[key].text
        np.testing.assert_allclose(results[key].json()["data"][0]["embedding"], model.embed_texts([text])[0],
                                   atol=ATOL)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def test_mounted_inside_another_app(model):
    sub = create_app(model)

    @contextlib.asynccontextmanager
    async def lifespan(host):
        async with sub.router.lifespan_context(sub):
            yield

    host = FastAPI(lifespan=lifespan)
    host.mount("/clip", sub)
    with running_server(host) as (url, _), httpx.Client(base_url=url + "/clip") as client:
        wait_ready(client)
        r = client.post("/v1/embeddings", json={"input": ["a lighthouse"]})
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], model.embed_texts(["a lighthouse"])[0], atol=ATOL)
        counts = metric_samples(client.get("/metrics").text, "fastclip_requests")
        assert counts[("fastclip_requests_total", (("endpoint", "/v1/embeddings"), ("status", "200")))] == 1
