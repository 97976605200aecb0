"""Timing helpers shared by the GPU benches (bench/bench_<op>.py, bench/bench_gpu_e2e.py)."""
from __future__ import annotations

import contextlib


def record(benchmark, ours, peers: dict, flops: float, nbytes: float, graph: bool = False, warmup: int = 25,
           rep: int = 100) -> dict:
    """Time ``ours`` and every peer with ``triton.testing.do_bench`` and record them in extra_info.

    do_bench (CUDA events, L2 cleared before every run, a warm-up, then ~``rep`` ms of runs) gives the
    numbers of record: ``<impl>_ms`` (median; ``_ms_p20``/``_ms_p80`` the 20th/80th percentiles), and
    ``<impl>_tflops`` / ``<impl>_gbps`` = this module's useful FLOPs and minimum HBM bytes of the op
    divided by the median (the same FLOPs and bytes for every implementation, so rates compare like
    for like), and ``speedup_vs_<peer>`` = peer ms / fastclip ms. A peer that cannot run here (e.g.
    SDPA's flash backend on an unsupported GPU) gets ``<peer>_error`` instead. With ``graph`` (ops of a
    few µs, where host-side launch cost exceeds the GPU time) each implementation is also timed inside
    a CUDA graph with ``do_bench_cudagraph``: ``<impl>_graph_ms`` and ``graph_speedup_vs_<peer>``.

    pytest-benchmark's own columns then time ``ours`` from the host, synchronising after every call
    (launch + sync overhead included): a cross-check, not the number to quote for small kernels.
    """
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    info, ms, graph_ms = benchmark.extra_info, {}, {}
    info.update(model_gflop=round(flops / 1e9, 4), model_mb=round(nbytes / 1e6, 3),
                device=torch.cuda.get_device_name())
    for name, fn in {"fastclip": ours, **peers}.items():
        try:
            med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            if graph:
                graph_ms[name] = do_bench_cudagraph(fn, rep=rep, return_mode="median")
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too: let it reach skip_if_oom
            if name == "fastclip" or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            info[f"{name}_error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            continue
        ms[name] = med
        info.update({f"{name}_ms": round(med, 5), f"{name}_ms_p20": round(p20, 5), f"{name}_ms_p80": round(p80, 5),
                     f"{name}_tflops": round(flops / med / 1e9, 2), f"{name}_gbps": round(nbytes / med / 1e6, 1)})
        if name in graph_ms:
            info[f"{name}_graph_ms"] = round(graph_ms[name], 5)
    for name in peers:
        if name in ms:
            info[f"speedup_vs_{name}"] = round(ms[name] / ms["fastclip"], 3)
        if name in graph_ms:
            info[f"graph_speedup_vs_{name}"] = round(graph_ms[name] / graph_ms["fastclip"], 3)

    def synced():
        ours()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
    return ms


@contextlib.contextmanager
def skip_if_oom(what: str):
    """Skip (with the reason) a shape that does not fit this GPU's memory, and free what it allocated."""
    import pytest
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        pytest.skip(f"out of GPU memory ({total:.0f} GiB) for {what}: {str(exc).splitlines()[0][:120]}")


def dtype_params():
    """fp16 and bf16 as pytest params; bf16 skips on GPUs without bf16 support (pre-sm_80)."""
    import pytest
    import torch

    return [pytest.param(torch.float16, id="fp16"),
            pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
                not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16 support"))]


def low_precision_atol(dtype) -> float:
    """Loose sanity tolerance for the benches' one-off output checks (the real numerics tests are in tests/)."""
    import torch

    return 2e-2 if dtype == torch.float16 else 6e-2
