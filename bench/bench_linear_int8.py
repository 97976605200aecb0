"""The small-M int8 GEMM (csrc/linear_int8.cpp) beside torch's int8 linears and fp32, on ViT-B shapes.

    pytest bench/bench_linear_int8.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds
    pytest bench/bench_linear_int8.py -k ratios -s      # same-run ratios only (the numbers to quote)

Rows: this kernel on each path the CPU runs (``int8-avx512_vnni``, ``int8-avx512``, ``int8-avx_vnni``,
``int8-avx2``, selected with ``linear_int8.use_path``); ``torch.ops.quantized.linear_dynamic`` with weights
packed for the fbgemm engine (what precision="int8" runs today: per-channel weights, one activation scale
per call, reduce_range where the CPU lacks VNNI, as fastclip/backends/int8.py) and for the onednn engine;
fp32 ``F.linear``. Shapes: 768 -> 2304 (qkv), 768 -> 768 (attention out), 768 -> 3072 (MLP in), 3072 -> 768
(MLP out) at M = 1, 50, 100, 197 rows (an image of ViT-B-32 at batch 1, two at batch 2, ViT-B-16 at batch
1). Each timed call runs LAYERS distinct weights of the shape, as the 12 blocks of a model do, so the
weights come from memory (or a large L3) as they do there, not from L1/L2. The stack group runs all four
linears of a 12-layer ViT-B in turn (MLP in with its GELU fused where the impl can), as bench_cpu_ops.py's
streamed-weights group does for fp32: 85 MB of int8 weights, 340 MB of fp32.

The machine is usually shared and noisy: compare rows of one group only, and quote the ratios that
``test_ratios`` prints -- it runs every impl in turn, round after round, in one process, so a load change
hits them all alike. Speed is never asserted.
"""
import contextlib
import statistics
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import rate

li8 = pytest.importorskip("fastclip.backends.cpu.linear_int8")
if not li8.available():
    pytest.skip("this CPU lacks AVX2/FMA: no int8 kernel", allow_module_level=True)

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (K, N)
ROWS = [1, 50, 100, 197]
LAYERS = 12
ENGINES = [e for e in ("fbgemm", "onednn") if e in torch.backends.quantized.supported_engines]
# 7-bit activations for fbgemm where its kernels sum u8*s8 pairs in int16 (no VNNI), as fastclip/backends/int8.py.
REDUCE_RANGE = not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported())
PATHS = li8.paths()
IMPLS = [f"int8-{p}" for p in PATHS] + ENGINES + ["fp32"]
BASE = "fbgemm" if "fbgemm" in ENGINES else "fp32"  # the ratios' reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _engine(name: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _torch_pack(engine: str, w: torch.Tensor, b: torch.Tensor):
    """Per-channel symmetric int8 weight prepacked for ``engine`` (fastclip/backends/int8.py's pack_linear)."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wq = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    with _engine(engine):
        return torch.ops.quantized.linear_prepack(wq, b)


class _Layers:
    """(K, N, act) layers, fp32 weights and each impl's packs of them; ``run(impl, xs)`` applies every layer
    once to the x of its K (``xs``: {K: (M, K) tensor})."""

    def __init__(self, specs: list[tuple[int, int, str]], seed: int):
        self.specs, self.fp32, self.packs = specs, [], {}
        for i, (K, N, _) in enumerate(specs):
            g = _gen(seed + i)
            self.fp32.append((torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g) * 0.1))
        self.packs["int8"] = [li8.pack_int8(w, b) for w, b in self.fp32]
        for e in ENGINES:
            self.packs[e] = [_torch_pack(e, w, b) for w, b in self.fp32]

    def runner(self, impl: str):
        acts = [a for _, _, a in self.specs]
        if impl.startswith("int8-"):
            name, packs = impl[len("int8-"):], self.packs["int8"]

            def run(xs):
                with li8.use_path(name):
                    for p, act in zip(packs, acts, strict=True):
                        li8.linear_int8(xs[p.K], p, act)
            return run
        if impl in ENGINES:
            packs = self.packs[impl]

            def run(xs):
                for p, (w, _), act in zip(packs, self.fp32, acts, strict=True):
                    y = torch.ops.quantized.linear_dynamic(xs[w.shape[1]], p, REDUCE_RANGE)
                    if act != "none":
                        F.gelu(y)
            return run

        def run(xs):
            for (w, b), act in zip(self.fp32, acts, strict=True):
                y = F.linear(xs[w.shape[1]], w, b)
                if act != "none":
                    F.gelu(y)
        return run


_CACHE: dict = {}


def _layers(key, specs, seed: int) -> _Layers:
    """One set of layers at a time (the fp32 ViT-B stack alone is 340 MB)."""
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _Layers(specs, seed)
    return _CACHE[key]


def _shape_layers(K: int, N: int) -> _Layers:
    return _layers((K, N), [(K, N, "none")] * LAYERS, seed=K * 7 + N)


def _vit_b_layers() -> _Layers:
    block = [(768, 2304, "none"), (768, 768, "none"), (768, 3072, "gelu"), (3072, 768, "none")]
    return _layers("vit-b", block * 12, seed=1)


def _xs(M: int) -> dict:
    return {K: torch.randn(M, K, generator=_gen(M + K)) for K in (768, 3072)}


def _bench(benchmark, group: str, run, xs, items: int, flops: float) -> None:
    benchmark.group = group
    with torch.inference_mode():
        benchmark.pedantic(run, args=(xs,), rounds=15, warmup_rounds=2)
    rate(benchmark, items, flops_per_item=flops / items)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("K,N", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
def test_linear(benchmark, K, N, M, impl):
    layers = _shape_layers(K, N)
    _bench(benchmark, f"linear {K} -> {N}, M = {M}, {LAYERS} weights", layers.runner(impl), _xs(M), M * LAYERS,
           2.0 * M * K * N * LAYERS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", [50, 197])
def test_vit_b_stack(benchmark, M, impl):
    """All 48 linears of a 12-layer ViT-B in turn at M rows (ViT-B-32 / ViT-B-16 batch 1)."""
    layers = _vit_b_layers()
    flops = sum(2.0 * M * K * N for K, N, _ in layers.specs)
    _bench(benchmark, f"12-layer ViT-B linears, M = {M}", layers.runner(impl), _xs(M), M, flops)


def _interleaved(layers: _Layers, xs: dict, rounds: int, clock) -> dict[str, list[float]]:
    """Seconds per round of every impl by ``clock``, the impls run in turn within each round."""
    runs = {impl: layers.runner(impl) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    with torch.inference_mode():
        for run in runs.values():
            run(xs)  # warm-up (and first-touch of the packs)
        for _ in range(rounds):
            for impl, run in runs.items():
                start = clock()
                run(xs)
                times[impl].append(clock() - start)
    return times


def test_ratios(capsys):
    """Each impl's speed as a ratio to fbgemm (its time over this impl's, > 1: faster than fbgemm), median
    over rounds that run every impl in turn in this one process, per shape and M and for the ViT-B stack.
    With one thread (FASTCLIP_BENCH_THREADS=1) the times are the thread's CPU time, which time spent
    descheduled on a loaded machine does not inflate; else wall time. Printed only; never asserted."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    cases = [(f"{K}->{N}", M, _shape_layers, (K, N)) for K, N in SHAPES for M in ROWS]
    cases += [("ViT-B x12", M, None, None) for M in (50, 197)]
    lines = [f"{'shape':>10} {'M':>4}  {BASE + ' ms/layer':>16}  " + " ".join(f"{i:>16}" for i in IMPLS)]
    for name, M, make, args in cases:
        layers = make(*args) if make else _vit_b_layers()
        times = _interleaved(layers, _xs(M), rounds=9, clock=clock)
        base = times[BASE]
        ratios = {i: statistics.median(b / t for b, t in zip(base, times[i], strict=True)) for i in IMPLS}
        per_layer = statistics.median(base) / len(layers.specs) * 1e3
        lines.append(f"{name:>10} {M:>4}  {per_layer:16.3f}  " + " ".join(f"{ratios[i]:16.2f}" for i in IMPLS))
    with capsys.disabled():
        print(f"\nspeed vs {BASE} (median of per-round ratios, impls interleaved; threads {torch.get_num_threads()}, "
              f"{'thread CPU' if clock is time.thread_time else 'wall'} time; fbgemm reduce_range={REDUCE_RANGE}):")
        print("\n".join(lines))
