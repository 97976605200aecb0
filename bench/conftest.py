"""Shared fixtures for the benchmarks: thread count, the machine's sgemm rate, the peer sets, and
``rate``, which writes each row's throughput figures into pytest-benchmark's ``extra_info``."""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FASTCLIP_BENCH_THREADS", os.cpu_count() or 1)))


def rate(benchmark, items: int, flops_per_item: float | None = None, sgemm_gflops: float | None = None,
         peak: float | None = None) -> None:
    """Record items/s and the mean call time (``latency_ms``) beside pytest-benchmark's timings; with
    ``flops_per_item`` also GFLOP/s, with ``sgemm_gflops`` that rate as a fraction of the machine's sgemm
    rate, and with ``peak`` (G ops/s) as a fraction of the arithmetic peak of the row's precision
    (``peak_rates``). Does nothing under ``--benchmark-disable`` (no timings then)."""
    if not benchmark.stats:
        return
    mean = benchmark.stats.stats.mean
    info = benchmark.extra_info
    info["items"] = items
    info["items_per_s"] = round(items / mean, 2)
    info["latency_ms"] = round(mean * 1e3, 2)
    if flops_per_item:
        gflops = flops_per_item * items / mean / 1e9
        info["gflop_per_item"] = round(flops_per_item / 1e9, 4)
        info["gflops_per_s"] = round(gflops, 1)
        if sgemm_gflops:
            info["sgemm_gflops"] = sgemm_gflops
            info["fraction_of_sgemm"] = round(gflops / sgemm_gflops, 3)
        if peak:
            info["peak_gops"] = peak
            info["fraction_of_peak"] = round(gflops / peak, 3)


@pytest.fixture(scope="session")
def sgemm_gflops() -> float:
    """This machine's sgemm rate (GFLOP/s), measured once per session (bench/sgemm.py)."""
    from sgemm import measure_sgemm

    return measure_sgemm()["best"]


@pytest.fixture(scope="session")
def peak_rates() -> dict[str, float]:
    """This machine's arithmetic peaks, {"fp32": GFLOP/s, "int8": GOP/s}, measured once (bench/sgemm.py)."""
    from sgemm import measure_peaks

    return measure_peaks()


class _LatestPeerSet:
    """Hands out the PeerSet of an architecture, keeping only the latest one alive (ViT-L-14's peers
    hold several GiB); tests are ordered by architecture so each is built once."""

    def __init__(self):
        self.arch, self.peers = None, None

    def __call__(self, arch: str):
        from peers import PeerSet

        if arch != self.arch:
            self.arch, self.peers = None, None  # free the previous architecture first
            self.peers, self.arch = PeerSet(arch), arch
        return self.peers


@pytest.fixture(scope="session")
def peer_set():
    """``peer_set(arch)`` -> bench/peers/'s PeerSet: every implementation on one set of weights."""
    return _LatestPeerSet()
