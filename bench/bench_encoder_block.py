"""The fused ``encoder_block`` (csrc/encoder_block.cpp) against the same blocks op by op: ViT-B-32 (random
weights) in int8 at batch 1 and 32 and in fp32 at batch 1 (at batch 32 fp32 blocks have too many rows for
the packed-panel kernel and are not fused), both tables on one model in one run.

    pytest bench/bench_encoder_block.py --benchmark-group-by=group

``test_block_rows`` times each table (``items_per_s``); ``test_interleaved_ratio`` alternates them, round
after round, and prints the fused table's speed over the op-by-op one's from the lower of the rounds' medians
(the figure to quote on a shared machine). The results are equal bit for bit (tests/kernels/test_encoder_block.py).
"""
import dataclasses
import statistics
import time

import pytest
import torch

import fastclip
from conftest import rate

CASES = [("int8", 1), ("int8", 32), ("fp32", 1)]  # (precision, batch)
TABLES = ("fused", "ops")
_MODELS: dict = {}


def _model(precision: str):
    if precision not in _MODELS:
        _MODELS.clear()
        _MODELS[precision] = fastclip.create_model("ViT-B-32", seed=0, backend="cpu", precision=precision)
    return _MODELS[precision]


def _tables(model) -> dict:
    return {"fused": model.ops, "ops": dataclasses.replace(model.ops, encoder_block=None)}


def _pixels(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("precision, batch", CASES)
def test_block_rows(benchmark, precision, batch, table):
    model = _model(precision)
    tables, pixels = _tables(model), _pixels(batch)
    benchmark.group = f"ViT-B-32 {precision} images, batch {batch}"
    model.ops = tables[table]
    try:
        with torch.inference_mode():
            benchmark.pedantic(model.encode_image, args=(pixels,), rounds=20 if batch == 1 else 3, warmup_rounds=1)
    finally:
        model.ops = tables["fused"]
    rate(benchmark, batch)
    benchmark.extra_info.update(table=table)


@pytest.mark.parametrize("precision, batch", CASES)
def test_interleaved_ratio(precision, batch, capsys):
    model = _model(precision)
    tables, pixels = _tables(model), _pixels(batch)
    calls = 15 if batch == 1 else 2
    medians: dict[str, list[float]] = {name: [] for name in tables}
    try:
        with torch.inference_mode():
            for _ in range(6):
                for name, table in tables.items():
                    model.ops = table
                    model.encode_image(pixels)
                    times = []
                    for _ in range(calls):
                        start = time.perf_counter()
                        model.encode_image(pixels)
                        times.append(time.perf_counter() - start)
                    medians[name].append(statistics.median(times))
    finally:
        model.ops = tables["fused"]
    best = {name: min(m) for name, m in medians.items()}
    with capsys.disabled():
        print(f"\nViT-B-32 {precision} batch {batch}: fused {best['fused'] * 1e3:.1f} ms, op by op {best['ops'] * 1e3:.1f} ms, "
              f"fused speed {best['ops'] / best['fused']:.2f}x")
