"""The reused output buffers of the CPU ops (fastclip/backends/cpu/buffers.py) against plain allocation, same
model, same input, same run: ViT-B-32 and ViT-B-16 images at batch 32 (ViT-B-16's MLP hidden layer is 77 MB,
ViT-B-32's 20 MB) in int8 and fp32.

    pytest bench/bench_buffers.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds -s

Rows: ``pool`` (the default) and ``malloc`` (the pool's limit set to 0: every output from torch.empty, i.e.
glibc's malloc, which maps fresh zeroed pages for each block above its mmap threshold). The last test runs
the two in turn, round after round, and prints malloc's time over the pool's (the figure to quote on a shared
machine); both give the same embeddings (checked, bit for bit).
"""
import statistics
import time

import pytest
import torch

import fastclip
from conftest import rate
from fastclip.backends.cpu import buffers

MODES = {"pool": buffers.POOL.limit_bytes or 1024 << 20, "malloc": 0}
BATCH = 32


@pytest.fixture(scope="module", params=[(arch, precision) for arch in ("ViT-B-32", "ViT-B-16")
                                         for precision in ("int8", "fp32")], ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request):
    arch, precision = request.param
    torch.manual_seed(0)
    model = fastclip.create_model(arch, precision=precision)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return f"{arch} {precision}", model, pixels


def _encode(model, pixels, limit: int) -> torch.Tensor:
    buffers.POOL.limit_bytes = limit
    try:
        with torch.inference_mode():
            return model.encode_image(pixels)
    finally:
        buffers.POOL.limit_bytes = MODES["pool"]


@pytest.mark.parametrize("mode", list(MODES))
def test_encode(benchmark, setup, mode):
    label, model, pixels = setup
    benchmark.group = f"{label} images, batch {BATCH}"
    limit = MODES[mode]
    _encode(model, pixels, limit)  # warm: packs made, pool filled
    benchmark.pedantic(_encode, args=(model, pixels, limit), rounds=3, warmup_rounds=1)
    rate(benchmark, BATCH)
    benchmark.extra_info.update(impl=mode, model=label)


def test_interleaved_ratio(setup):
    label, model, pixels = setup
    ref = _encode(model, pixels, MODES["malloc"])
    assert torch.equal(_encode(model, pixels, MODES["pool"]), ref)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(3):
        for mode, limit in MODES.items():
            start = time.perf_counter()
            _encode(model, pixels, limit)
            times[mode].append(time.perf_counter() - start)
    pool, malloc = (statistics.median(times[m]) for m in MODES)
    print(f"\n{label} batch {BATCH}: pool {pool * 1e3:.0f} ms, malloc {malloc * 1e3:.0f} ms, "
          f"malloc / pool = {malloc / pool:.2f}x ({torch.get_num_threads()} threads)")
