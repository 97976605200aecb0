"""This machine's single-precision GEMM rate, the yardstick for every GFLOP/s figure in the benches.

    python bench/sgemm.py          # prints the rate of each shape and the best

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


if __name__ == "__main__":
    for name, value in measure_sgemm().items():
        print(f"{name:>22}: {value:7.1f} GFLOP/s ({torch.get_num_threads()} threads)")
