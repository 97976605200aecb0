"""``fastclip serve`` throughput and latency at concurrency 1, 8 and 64, dynamic batching on and off,
side by side (server in a child process on 127.0.0.1, random weights).

    pytest bench/bench_serve.py --benchmark-group-by=group --benchmark-columns=mean,rounds

Model: FASTCLIP_SERVE_MODEL (architecture name, default ViT-B-32). Requests per cell:
FASTCLIP_SERVE_REQUESTS (default 200 text / 64 image requests, one item each). Each row's
``extra_info`` holds req_per_s, items_per_s, p50_ms, p99_ms and errors; compare rows of one group.
"""
import asyncio
import os

import pytest

from soak_serve import ServerProcess, drive, image_uri, summary

MODEL = os.environ.get("FASTCLIP_SERVE_MODEL", "ViT-B-32")
REQUESTS = {"text": int(os.environ.get("FASTCLIP_SERVE_REQUESTS", 200)),
            "image": int(os.environ.get("FASTCLIP_SERVE_REQUESTS", 64))}
MODES = {"batching": ("--max-batch", "32", "--max-wait-ms", "5"), "no-batching": ("--no-batching",)}


@pytest.fixture(scope="module", params=list(MODES))
def server(request):
    with ServerProcess(MODEL, *MODES[request.param]) as srv:
        yield request.param, srv


@pytest.fixture(scope="module")
def images():
    return [image_uri(s) for s in range(8)]


@pytest.mark.parametrize("modality", ["text", "image"])
@pytest.mark.parametrize("concurrency", [1, 8, 64])
def test_serve(benchmark, server, images, modality, concurrency):
    mode, srv = server
    benchmark.group = f"serve {MODEL} {modality}, concurrency {concurrency}"
    benchmark.name = f"{mode}"
    asyncio.run(drive(srv.url, min(concurrency, 8), modality, requests=16, images=images))  # warm-up
    results = []

    def run():
        results.append(asyncio.run(drive(srv.url, concurrency, modality, requests=REQUESTS[modality],
                                         images=images)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    info = summary(results[-1])
    benchmark.extra_info.update(info, mode=mode, concurrency=concurrency, modality=modality)
    print(f"\n{MODEL} {modality:5s} c={concurrency:<3d} {mode:12s} {info}")
    assert info["errors"] == 0
