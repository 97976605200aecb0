"""Batch-1 latency of fastclip and its fastest peers, in short bursts interleaved round by round in one process.

    python -m pytest bench/bench_e2e_interleaved.py -s                 # ViT-B-32 and ViT-B-16, batch 1
    FASTCLIP_BENCH_ROUNDS=40 python -m pytest bench/bench_e2e_interleaved.py -s -k ViT-B-32

bench/bench_e2e.py times each implementation in its own row, one after another: at batch 1 a call takes
tens of milliseconds, and on a shared machine the load moves between rows by more than the differences
being measured. Here every round gives each implementation one burst (the order rotating from round to
round), so a change of load hits them all alike; the table gives each one's median latency and the median
of the per-round ratios of fastclip's latency (fp32 and int8) to the peer's -- the figures to quote.

A burst is ``SETTLE_S`` of idle time, one untimed call, then ``BURST`` timed calls (their median is the
round's figure): back-to-back calls, as in a batch-1 loop. The idle time matters. Each runtime's worker
threads keep spinning for a while after a call (ONNX Runtime's thread pool, OpenMP's and OpenVINO's
workers), and with calls back to back across runtimes they take a core from whichever implementation runs
next: on a 2-core Zen 4, fastclip int8 at batch 1 took 31.6 ms right after ONNX Runtime's call and 15.8 ms
after 0.2 s of idle time. The same weights, inputs and output checks as bench/bench_e2e.py (bench/peers/).
Speed is never asserted.
"""
import os
import statistics
import time

import pytest
import torch

from peers import unavailable

PEERS = ["ort-fp32", "ov-fp32", "ort-int8", "ov-int8"]
OURS = {"fp32": "fastclip", "int8": "fastclip-int8"}
ROUNDS = int(os.environ.get("FASTCLIP_BENCH_ROUNDS", "25"))
BURST = int(os.environ.get("FASTCLIP_BENCH_BURST", "3"))  # timed calls per burst
SETTLE_S = float(os.environ.get("FASTCLIP_BENCH_SETTLE_S", "0.2"))  # idle time before each burst


def _burst(fn, pixels) -> float:
    """The median latency of BURST back-to-back calls, after SETTLE_S idle and one untimed call (seconds)."""
    time.sleep(SETTLE_S)
    fn(pixels)
    latencies = []
    for _ in range(BURST):
        start = time.perf_counter()
        fn(pixels)
        latencies.append(time.perf_counter() - start)
    return statistics.median(latencies)


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16"])
def test_batch1_latency_interleaved(peer_set, arch):
    peers = peer_set(arch)
    size = peers.cfg.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    impls = [*OURS.values(), *(p for p in PEERS if unavailable(p) is None)]
    fns = {impl: peers.image_encoder(impl, pixels) for impl in impls}  # each checked against open_clip
    with torch.inference_mode():
        for fn in fns.values():
            fn(pixels)
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for r in range(ROUNDS):
            for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
                times[impl].append(_burst(fns[impl], pixels))
    print(f"\n{arch}, batch 1, {ROUNDS} rounds interleaved, bursts of {BURST} calls after {SETTLE_S} s idle, "
          f"{torch.get_num_threads()} threads "
          "(ratio: the peer's latency over fastclip's of the same precision, median of the per-round ratios; "
          "> 1: fastclip is faster)")
    print("| implementation | median latency (ms) | fastclip's speed-up over it |\n|---|---|---|")
    for impl in impls:
        ours = OURS["int8" if "int8" in impl else "fp32"]
        ratio = statistics.median(p / o for p, o in zip(times[impl], times[ours], strict=True))
        print(f"| {impl} | {1e3 * statistics.median(times[impl]):.1f} | {ratio:.2f}x |")
