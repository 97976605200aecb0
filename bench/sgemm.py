"""This machine's single-precision GEMM rate, the yardstick for every GFLOP/s figure in the benches, and
its arithmetic peaks (``measure_peaks``: what no GEMM can exceed).

    python bench/sgemm.py          # prints the rate of each shape, the best, and the peaks

The rate is the best of several timed ``torch.mm`` calls per shape, on torch's own thread pool (the
threads the benches use), and the machine's sgemm rate is the best over the shapes: a square 2048³
product and the encoder's largest linear layer (ViT-B-32 batch 32: 1600 x 768 @ 768 x 3072).
"""
from __future__ import annotations

import time

import torch

SHAPES = {  # name: (M, K, N)
    "2048^3": (2048, 2048, 2048),
    "1600x768 @ 768x3072": (1600, 768, 3072),
}


def gemm_gflops(m: int, k: int, n: int, repeats: int = 7) -> float:
    """Best-of-``repeats`` GFLOP/s of an (m, k) @ (k, n) fp32 product (2·m·k·n FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm-up: thread pool, MKL dispatch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def measure_sgemm() -> dict[str, float]:
    """GFLOP/s per shape and ``best`` (the rate the benches divide by)."""
    rates = {name: round(gemm_gflops(*shape), 1) for name, shape in SHAPES.items()}
    rates["best"] = max(rates.values())
    return rates


def measure_peaks(repeats: int = 10) -> dict[str, float]:
    """{"fp32": GFLOP/s of FMA, "int8": GOP/s of the int8 dot-product step (vpdpbusd with AVX-512 VNNI, else
    vpmaddubsw)} on torch's threads, best of ``repeats`` (fastclip._C.peak_rate, csrc/peak.cpp); {} without
    the C++ extension."""
    try:
        from fastclip import _C
    except ImportError:
        return {}
    kinds = _C.peak_kinds()
    int8 = "int8_vpdpbusd" if "int8_vpdpbusd" in kinds else "int8_vpmaddubsw"
    chosen = {"fp32": "fp32_fma", "int8": int8}
    return {name: round(max(_C.peak_rate(kind, 3_000_000) for _ in range(repeats)) / 1e9, 1)
            for name, kind in chosen.items() if kind in kinds}


if __name__ == "__main__":
    threads = torch.get_num_threads()
    for name, value in measure_sgemm().items():
        print(f"{name:>22}: {value:7.1f} GFLOP/s ({threads} threads)")
    for name, value in measure_peaks().items():
        print(f"{name + ' peak':>22}: {value:7.1f} {'GFLOP/s' if name == 'fp32' else 'GOP/s'} ({threads} threads)")
