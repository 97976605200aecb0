"""precision="int8": fastclip's int8 CPU mode beside ONNX Runtime's and OpenVINO's int8, same weights, same run.

    pytest bench/bench_int8.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

Rows per group: fastclip int8, ONNX Runtime int8 (``quantize_dynamic`` of the exported open_clip tower;
bench/peers/ times its per-tensor and per-channel variants and keeps the faster one with cosine >= 0.99),
OpenVINO int8 (NNCF post-training quantisation of the same export, ``model_type=TRANSFORMER``, calibrated
on inputs of the benchmark's kind; f32 elsewhere; the faster of the LATENCY and THROUGHPUT hints), and
fastclip fp32 / ONNX Runtime fp32 / OpenVINO fp32 for scale. OpenVINO rows are skipped with the reason
where openvino or nncf is not installed. Every row's output is checked against open_clip eager
fp32 on the benchmark's own input before it is timed; int8 rows carry ``min_cosine_to_fp32`` and
``mean_cosine_to_fp32`` (per item) in ``extra_info``, all rows ``items_per_s``. The last test runs the
rows in turn, round after round, and prints each one's speed as a ratio to ONNX Runtime int8 (the
number to quote on a shared machine). Compare rows of one group only.
"""
import statistics
import time

import pytest
import torch

from conftest import rate
from peers import PeerSet, precision, unavailable

IMPLS = ["fastclip-int8", "ort-int8", "ov-int8", "fastclip", "ort-fp32", "ov-fp32"]
PARAMS = [pytest.param(impl, marks=[pytest.mark.skip(reason=unavailable(impl))] if unavailable(impl) else [])
          for impl in IMPLS]
AVAILABLE = [impl for impl in IMPLS if not unavailable(impl)]
CAPTIONS = [
    "a photo of a cat sitting on a windowsill",
    "two dogs playing with a red ball in the park",
    "an aerial view of a city at night with lights",
    "a bowl of ramen with an egg and green onions",
] * 16  # 64 captions of typical length


@pytest.fixture(scope="module")
def peers():
    return PeerSet("ViT-B-32")


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _record(benchmark, peers, impl: str, tower: str, items: int) -> None:
    rate(benchmark, items)
    benchmark.extra_info.update(impl=impl, precision=precision(impl))
    benchmark.extra_info.update(peers.info.get(f"{impl} {tower}", {}))


@pytest.mark.parametrize("impl", PARAMS)
def test_images(benchmark, peers, pixels, impl):
    benchmark.group = "int8: ViT-B-32 images, batch 32"
    fn = peers.image_encoder(impl, pixels)
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(pixels,), rounds=5, warmup_rounds=1)
    _record(benchmark, peers, impl, "image", pixels.shape[0])


@pytest.mark.parametrize("impl", PARAMS)
def test_captions(benchmark, peers, impl):
    benchmark.group = "int8: ViT-B-32 text, 64 captions (tokenisation included)"
    fn = peers.text_encoder(impl, CAPTIONS)
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(CAPTIONS,), rounds=5, warmup_rounds=1)
    _record(benchmark, peers, impl, "text", len(CAPTIONS))


def test_interleaved_ratios_to_ort_int8(peers, pixels, capsys):
    """Each row's speed as a ratio to ONNX Runtime int8, from rounds that run every implementation in
    turn (so a load change on a shared machine hits all of them alike): median, min and max over rounds,
    beside the pytest-benchmark rows above. Printed only; speed is never asserted."""
    if "ort-int8" not in AVAILABLE:
        pytest.skip(unavailable("ort-int8"))
    rounds = 8
    for tower, inputs, items in (("image", pixels, pixels.shape[0]), ("text", CAPTIONS, len(CAPTIONS))):
        build = peers.image_encoder if tower == "image" else peers.text_encoder
        fns = {impl: build(impl, inputs) for impl in AVAILABLE}
        seconds = {impl: [] for impl in AVAILABLE}
        with torch.inference_mode():
            for _ in range(rounds):
                for impl, fn in fns.items():
                    start = time.perf_counter()
                    fn(inputs)
                    seconds[impl].append(time.perf_counter() - start)
        base = seconds["ort-int8"]
        with capsys.disabled():
            print(f"\n{tower} ({items} items), speed vs ort-int8 over {rounds} interleaved rounds:")
            for impl, times in seconds.items():
                ratios = sorted(b / t for b, t in zip(base, times, strict=True))
                print(f"  {impl:14} median {statistics.median(ratios):.2f}x (min {ratios[0]:.2f}, max {ratios[-1]:.2f}), "
                      f"{items / statistics.median(times):.1f} items/s; {peers.info.get(f'{impl} {tower}', '')}")
