"""The C++ CPU ops (backend "cpp") beside the reference ops, torch SDPA, and open_clip, same run.

    pytest bench/bench_cpu_ops.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

Per-op groups use ViT-B-32 (batch 32: 50 tokens -> 1600 rows) and ViT-B-16 (batch 8: 197 tokens ->
1576 rows) shapes, width 768, MLP 3072, 12 heads of 64, and the text tower's causal 77 tokens.
Compare rows of one group only: ``extra_info.vs_ref`` is the reference op's mean time over this row's
(> 1: faster than the reference), attention and linear rows also carry GFLOP/s. One linear group runs
every layer of a 12-layer ViT-B stack at 1, 50, 100, 197, 400 and 1600 rows, weights streamed from memory as
in the model (F.linear, MKL's packed GEMM, oneDNN's, the packed-panel kernel's AVX-512 and AVX2 paths); run it under
.ci/emulate-avx2 to hold MKL to AVX2 as well, as on an AVX-512-less CPU (the AVX-512 kernel row then
skips). The last group is the whole ViT-B-32 image tower at batch 32 (``extra_info.items_per_s`` =
images/s) with backend cpp, backend ref and open_clip on the same weights. Set FASTCLIP_MKL_PACK=0 to run the cpp rows without packed
weights (then the cpp linear rows are F.linear too).
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import rate
from fastclip import _C, ref
from fastclip.backends.cpu import linear as cpu_linear
from fastclip.backends.cpu import ops as cpu_ops
from fastclip.backends.dispatch import compose_linear_act

_REF_MEAN: dict[str, float] = {}


def _mean(benchmark) -> float | None:
    """Mean round time, or None under --benchmark-disable (each function then runs once, as a smoke test)."""
    return benchmark.stats.stats.mean if benchmark.stats else None


def _run(benchmark, group: str, impl: str, fn, rounds: int = 20) -> None:
    benchmark.group = group
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2)
    mean = _mean(benchmark)
    if mean is None:
        return
    if impl == "ref":
        _REF_MEAN[group] = mean
    if group in _REF_MEAN:
        benchmark.extra_info["vs_ref"] = round(_REF_MEAN[group] / mean, 3)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- attention
ATTN_SHAPES = {  # name: (B, H, L, Dh, causal)
    "ViT-B-32 image, batch 32": (32, 12, 50, 64, False),
    "ViT-B-16 image, batch 8": (8, 12, 197, 64, False),
    "text, 32 x 77 causal": (32, 8, 77, 64, True),
}


@pytest.mark.parametrize("impl", ["ref", "cpp", "cpp-avx2", "sdpa"])  # ref first: the others report vs_ref
@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
def test_attention(benchmark, shape, impl):
    """cpp: the kernel's AVX-512 tiles where the CPU has them; cpp-avx2: its AVX2 tiles."""
    B, H, L, D, causal = ATTN_SHAPES[shape]
    qkv = torch.randn(B, L, 3 * H * D, generator=_gen(0)).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # strided views of the packed projection, as in the model
    fns = {"ref": lambda: ref.attention(q, k, v, causal), "cpp": lambda: cpu_ops.attention(q, k, v, causal),
           "cpp-avx2": lambda: cpu_ops.attention(q, k, v, causal),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    _C.set_avx512(impl != "cpp-avx2")
    try:
        _run(benchmark, f"attention: {shape}", impl, fns[impl])
    finally:
        _C.set_avx512(True)
    flops = 4 * B * H * L * L * D / (2 if causal else 1)
    if _mean(benchmark):
        benchmark.extra_info["gflop_per_s"] = round(flops / _mean(benchmark) / 1e9, 1)


# ---------------------------------------------------------------------------------------- layer norm
ROWS = {"ViT-B-32 batch 32": 1600, "ViT-B-16 batch 8": 1576}


@pytest.mark.parametrize("impl", ["ref", "cpp"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows", list(ROWS))
def test_layer_norm(benchmark, rows, residual, impl):
    R = ROWS[rows]
    x, r = torch.randn(R, 768, generator=_gen(0)), torch.randn(R, 768, generator=_gen(1))
    w, b = torch.randn(768, generator=_gen(2)), torch.randn(768, generator=_gen(3))
    op = cpu_ops.layer_norm if impl == "cpp" else ref.layer_norm
    res = r if residual else None
    _run(benchmark, f"layer_norm{' + residual' if residual else ''}: {rows}, {R} x 768", impl,
         lambda: op(x, w, b, 1e-5, residual=res), rounds=50)


# ---------------------------------------------------------------------------------------- bias + activation
@pytest.mark.parametrize("impl", ["ref", "cpp"])
@pytest.mark.parametrize("act", ["gelu", "quick_gelu", "gelu_tanh"])
def test_bias_act(benchmark, act, impl):
    x, bias = torch.randn(1600, 3072, generator=_gen(0)), torch.randn(3072, generator=_gen(1))
    op = cpu_ops.bias_act if impl == "cpp" else ref.bias_act
    _run(benchmark, f"bias_act {act}: ViT-B-32 batch 32 MLP, 1600 x 3072", impl, lambda: op(x, bias, act))


# ---------------------------------------------------------------------------------------- normalize_project
@pytest.mark.parametrize("impl", ["ref", "cpp"])
@pytest.mark.parametrize("head", ["image", "text"])
def test_normalize_project(benchmark, head, impl):
    op = cpu_ops.normalize_project if impl == "cpp" else ref.normalize_project
    if head == "image":  # class token of (32, 50, 768) -> 512, normalised
        tokens, W, index = torch.randn(32, 50, 768, generator=_gen(0)), 768, None
        x = tokens[:, 0]
    else:  # pooled rows of (32, 77, 512) text states gathered by index -> 512
        tokens, W = torch.randn(32, 77, 512, generator=_gen(0)), 512
        x, index = tokens, torch.randint(0, 77, (32,), generator=_gen(1))
    w, b = torch.randn(W, generator=_gen(2)), torch.randn(W, generator=_gen(3))
    proj = torch.randn(W, 512, generator=_gen(4)) * W ** -0.5
    _run(benchmark, f"normalize_project: {head} head, 32 x {W} -> 512", impl,
         lambda: op(x, w, b, 1e-5, proj, None, True, index=index), rounds=100)


# ---------------------------------------------------------------------------------------- linear
LINEARS = {"qkv 768 -> 2304": (768, 2304), "out 768 -> 768": (768, 768), "mlp 768 -> 3072": (768, 3072),
           "mlp 3072 -> 768": (3072, 768)}


@pytest.fixture
def linear_path(request):
    """For a cpu-backend linear row named "...-avx2": the kernel's AVX2 path (set_avx512(False)); else as the
    CPU has it. Skips the AVX-512 kernel row where it cannot run (no AVX-512F, or FASTCLIP_DISABLE_AVX512)."""
    impl = request.node.callspec.params["impl"]
    if impl == "kernel" and not _C.avx512_present():
        pytest.skip("no AVX-512 path here (CPU lacks AVX-512F, or FASTCLIP_DISABLE_AVX512 is set): see kernel-avx2")
    _C.set_avx512(not impl.endswith("avx2"))
    yield
    _C.set_avx512(True)


@pytest.mark.parametrize("impl", ["ref", "cpp", "cpp-avx2"])
@pytest.mark.parametrize("rows", [50, 1600])
@pytest.mark.parametrize("layer", list(LINEARS))
def test_linear(benchmark, linear_path, layer, rows, impl):
    """F.linear (reference) vs the cpu backend's linear on packed weights (packed during the warm-up
    rounds): the kernel at 50 rows (ViT-B-32, batch 1; cpp: its AVX-512 path where the CPU has it, cpp-avx2:
    its AVX2 path), MKL's packed GEMM at 1600 (batch 32). The weights are hot in cache here; inside a model
    they are not (see the streamed group below and fastclip/backends/cpu/linear.py)."""
    if impl == "cpp-avx2" and rows > cpu_linear.KERNEL_MAX_ROWS[16]:
        pytest.skip("above the AVX2 path's row limit: MKL, as the cpp row")
    K, N = LINEARS[layer]
    x, w, b = torch.randn(rows, K, generator=_gen(0)), torch.randn(N, K, generator=_gen(1)), torch.randn(N)
    op = ref.linear if impl == "ref" else cpu_linear.linear
    batch = 1 if rows == 50 else 32
    _run(benchmark, f"linear {layer}: ViT-B-32 batch {batch}, {rows} rows", impl, lambda: op(x, w, b), rounds=10)
    if _mean(benchmark):
        benchmark.extra_info["gflop_per_s"] = round(2 * rows * K * N / _mean(benchmark) / 1e9, 1)


@pytest.fixture(scope="module")
def vit_b_layer_weights():
    """12 layers of ViT-B linear weights (qkv, out, fc, proj; 340 MB): more than the caches hold, as in a model."""
    layers = []
    for i in range(12):
        for K, N in LINEARS.values():
            layers.append((torch.randn(N, K, generator=_gen(i)) / K ** 0.5, torch.randn(N)))
    return layers


@pytest.mark.parametrize("impl", ["ref", "mkl-packed", "onednn-packed", "kernel", "kernel-avx2"])
@pytest.mark.parametrize("rows", [1, 50, 100, 197, 400, 1600])
def test_linear_streamed_weights(benchmark, vit_b_layer_weights, linear_path, monkeypatch, rows, impl):
    """Every linear layer of a 12-layer ViT-B stack at ``rows`` rows (50: ViT-B-32 at batch 1, 197: ViT-B-16
    at batch 1, 1600: ViT-B-32 at batch 32), one after another, so each weight comes from memory as it does in
    the model: F.linear, MKL's packed GEMM, oneDNN's (fastclip/backends/cpu/onednn.py) and the packed-panel
    kernel on its AVX-512 path (kernel) and its AVX2 path (kernel-avx2), cpu_linear's paths called directly,
    the kernel at any number of rows (its row limits set aside). Under .ci/emulate-avx2 MKL and oneDNN are
    held to AVX2 too, as on an AVX2-only CPU."""
    for panel in cpu_linear.KERNEL_MAX_ROWS:
        monkeypatch.setitem(cpu_linear.KERNEL_MAX_ROWS, panel, rows)
    xs = {K: torch.randn(rows, K, generator=_gen(K)) for K in (768, 3072)}
    layers = [(xs[w.shape[1]], w, b) for w, b in vit_b_layer_weights]
    kernel = lambda x, w, b: cpu_linear._kernel(x, w, b, 0)  # noqa: E731
    onednn = lambda x, w, b: cpu_linear.onednn.gemm(x, w, b)  # noqa: E731
    op = {"ref": ref.linear, "mkl-packed": cpu_linear._mkl, "onednn-packed": onednn, "kernel": kernel,
          "kernel-avx2": kernel}[impl]

    def stack():
        for x, w, b in layers:
            op(x, w, b)

    stack(), stack()  # pack (MKL packs on the second call with the same rows; the kernel repacks for its path)
    _run(benchmark, f"linear: 12 ViT-B layers streamed from memory, {rows} rows", impl, stack,
         rounds=10 if rows <= 100 else 5 if rows <= 400 else 3)
    if _mean(benchmark):
        flops = sum(2 * rows * w.shape[0] * w.shape[1] for _, w, _ in layers)
        benchmark.extra_info["gflop_per_s"] = round(flops / _mean(benchmark) / 1e9, 1)


# ---------------------------------------------------------------------------------------- whole image tower
@pytest.fixture(scope="module")
def b32_models():
    """(open_clip ViT-B-32-quickgelu, fastclip model with the same weights), eval mode."""
    import open_clip

    import fastclip
    from fastclip.loading import keymaps
    from fastclip.loading.factory import _build

    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-32-quickgelu").eval()
    cfg = fastclip.get_model_config("ViT-B-32-quickgelu")
    fc = _build(cfg, keymaps.from_openclip(dict(oc.state_dict())), "open_clip", "cpu", "fp32", "ref")
    return oc, fc


@pytest.mark.parametrize("impl", ["ref", "cpp", "cpp-F.linear", "open_clip"])
def test_vit_b32_image_tower(benchmark, b32_models, impl):
    """cpp-F.linear: the C++ kernels with the reference's F.linear (no packed weights)."""
    oc, fc = b32_models
    pixels = torch.randn(32, 3, 224, 224, generator=_gen(0))
    if impl == "open_clip":
        fn = lambda: oc.encode_image(pixels)  # noqa: E731
    else:
        fc.set_backend(impl.split("-")[0])
        if impl == "cpp-F.linear":
            fc.ops = dataclasses.replace(fc.ops, linear=ref.linear,
                                         linear_act=compose_linear_act(ref.linear, fc.ops.bias_act), encoder_block=None)
        fn = lambda: fc.encode_image(pixels)  # noqa: E731
    _run(benchmark, "ViT-B-32 image tower, batch 32", impl, fn, rounds=5)
    if _mean(benchmark):
        rate(benchmark, 32)
