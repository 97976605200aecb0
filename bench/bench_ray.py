"""Ray Data overhead: ``map_batches(ImageEmbedder)`` beside ``embed_images`` in one process, same files, same model.

    python -m pytest bench/bench_ray.py --benchmark-json /tmp/ray.json && python bench/report.py /tmp/ray.json
    python -m pytest bench/bench_ray.py --benchmark-disable           # smoke check: every row once
    FASTCLIP_BENCH_RAY_IMAGES=1024 python -m pytest bench/bench_ray.py -k "embed_images or ray-bytes"  # longer run
    FASTCLIP_BENCH_RAY_IMAGES=4096 FASTCLIP_BENCH_RAY_ROUNDS=1 python -m pytest bench/bench_ray.py   # ~15 min

256 JPEGs (bench/bench_jpeg.py's ``make_jpegs``: sample photographs cropped and resized to 200-1600 px, written
once under FASTCLIP_BENCH_CACHE) through one ViT-B-32 with random weights (a checkpoint written there once and
read with ``fastclip.load`` by the process and by the actor). A local Ray cluster of as many CPUs as the benchmark
threads (bench/conftest.py: FASTCLIP_BENCH_THREADS, default all) runs one actor (``concurrency=1``) given all of
them (``num_cpus``), so the actor and the in-process row use the same threads. Rows:

- ``embed_images``: ``model.embed_images(paths, batch_size=32)`` in this process;
- ``ray-paths``: ``ray.data.from_items([{"key", "image": path}])`` -> ``map_batches(ImageEmbedder,
  batch_size=128, batch_format="pyarrow")`` -> ``take_all()``: the actor opens the files;
- ``ray-bytes``: the same with the files' bytes in the rows (read by this process beforehand, not timed),
  shipped through Ray's object store.

Each timed Ray call is a whole Dataset execution: actor start and model load included, as a job pays them.
A Ray row's ``extra_info``: ``overhead_ratio`` (the ``embed_images`` row's images/s over the row's; 1.0 = no
overhead), ``startup_s`` (one execution over a single image: actor start, ``fastclip.load``, one batch) and
``steady_overhead_ratio`` (the same ratio with ``startup_s`` taken off the row's time). Every Ray row's output
is checked against the in-process embeddings, by key, at fastclip.tolerance.SAME_MODEL_ATOL.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from bench_jpeg import make_jpegs
from conftest import rate
from peers import CACHE

ARCH, BATCH, RAY_BATCH = "ViT-B-32", 32, 128
N_IMAGES = int(os.environ.get("FASTCLIP_BENCH_RAY_IMAGES", 256))  # more images amortise the actor start-up
ROUNDS = int(os.environ.get("FASTCLIP_BENCH_RAY_ROUNDS", 3))  # timed executions per row (1 for long runs)
IMPLS = ["embed_images", "ray-paths", "ray-bytes"]  # in-process first: the Ray rows divide by it
_RATE: dict[str, float] = {}


def random_checkpoint():
    """A safetensors checkpoint (fastclip's own names) of ViT-B-32 with random weights, written once."""
    import safetensors.torch

    import fastclip

    path = CACHE / f"{ARCH}-random-seed0.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in fastclip.create_model(ARCH, seed=0).state_dict().items()}
        staging = path.with_name(path.name + ".partial")
        safetensors.torch.save_file(sd, str(staging))
        staging.rename(path)
    return path


@pytest.fixture(scope="module")
def setup():
    """(model in this process, checkpoint path, JPEG paths, their bytes, the in-process embeddings), with a local
    Ray cluster of torch's thread count up for the module."""
    import ray

    import fastclip

    threads = torch.get_num_threads()
    ckpt = random_checkpoint()
    model = fastclip.load(ARCH, pretrained=ckpt)
    paths = make_jpegs(N_IMAGES, seed=1)
    blobs = [open(p, "rb").read() for p in paths]
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    reference = model.embed_images(paths, batch_size=BATCH)  # (N, 512)
    yield model, ckpt, paths, blobs, reference
    ray.shutdown()


def _ray_run(ckpt, items, threads: int):
    """One Dataset execution: rows {"key", "image"} -> ImageEmbedder on one actor of ``threads`` CPUs -> rows."""
    import ray

    from fastclip.ray import ImageEmbedder

    # one block per Ray batch, as read_parquet / read_webdataset hand over whole row groups and shards (from_items'
    # default blocks would leave a few-row batch beside each full one)
    ds = ray.data.from_items([{"key": i, "image": item} for i, item in enumerate(items)],
                             override_num_blocks=max(1, -(-len(items) // RAY_BATCH)))
    return ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"model": ARCH, "pretrained": str(ckpt),
                                                                "batch_size": BATCH, "key_column": "key"},
                          concurrency=1, num_cpus=threads, batch_size=RAY_BATCH, batch_format="pyarrow").take_all()


def _check(rows, reference: np.ndarray) -> None:
    from fastclip.tolerance import SAME_MODEL_ATOL

    assert len(rows) == len(reference) and not any(r["error"] for r in rows), [r["error"] for r in rows if r["error"]]
    got = np.stack([np.asarray(r["embedding"], np.float32) for r in sorted(rows, key=lambda r: r["key"])])
    np.testing.assert_allclose(got, reference, atol=SAME_MODEL_ATOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_ray_overhead(benchmark, setup, impl):
    model, ckpt, paths, blobs, reference = setup
    threads = torch.get_num_threads()
    benchmark.group = f"{ARCH} images from {len(paths)} JPEG files, {threads} CPUs"
    benchmark.extra_info.update(impl=impl, arch=ARCH, workload="jpeg", batch=BATCH, threads=threads)
    if impl == "embed_images":
        # setup's reference call is this row's warm-up: the same call on the same files
        out = benchmark.pedantic(model.embed_images, args=(paths,), kwargs={"batch_size": BATCH}, rounds=ROUNDS)
        np.testing.assert_array_equal(out, reference)  # the same call as the reference
    else:
        items = paths if impl == "ray-paths" else blobs
        start = time.perf_counter()
        _ray_run(ckpt, items[:1], threads)  # also warms Ray's worker pool for the timed calls
        startup = time.perf_counter() - start
        rows = benchmark.pedantic(_ray_run, args=(ckpt, items, threads), rounds=ROUNDS)
        _check(rows, reference)
        benchmark.extra_info.update(startup_s=round(startup, 2), ray_batch=RAY_BATCH)
    rate(benchmark, len(paths))
    if not benchmark.stats:
        return
    if impl == "embed_images":
        _RATE["embed_images"] = benchmark.extra_info["items_per_s"]
    elif "embed_images" in _RATE:
        info = benchmark.extra_info
        info["overhead_ratio"] = round(_RATE["embed_images"] / info["items_per_s"], 3)
        steady = max(benchmark.stats.stats.mean - info["startup_s"], 1e-9)
        info["steady_overhead_ratio"] = round(_RATE["embed_images"] * steady / len(paths), 3)
