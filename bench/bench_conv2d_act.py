"""``conv2d_act`` of the cpu backend (fastclip/backends/cpu/conv2d_act.py) at RN50's convolution shapes: the
three ways it can run, and the reference op, in the same run.

    pytest bench/bench_conv2d_act.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

Rows of a group are one convolution (channels-last fp32 input, BatchNorm already folded into weight and bias):
``plain`` = ``F.conv2d`` then in-place ``add_`` of the residual and ``relu_``; ``fused`` = oneDNN's
``torch.ops.mkldnn._convolution_pointwise`` with the ReLU (and, with a residual, its ``.binary`` overload with
``add`` then ``relu``) as post-ops; ``packed`` = ``fused`` on weights reordered once into oneDNN's blocked layout;
``ref`` = ``fastclip.ref.conv2d_act``. ``extra_info.vs_plain`` is plain's mean time over the row's (> 1: faster),
``gflop_per_s`` the convolution's 2·MACs rate. The module constants ``FUSED`` / ``PACK_WEIGHTS`` of
fastclip/backends/cpu/conv2d_act.py choose what the backend runs from these numbers.
"""
import pytest
import torch

from fastclip import ref
from fastclip.backends.cpu import conv2d_act as cpu_conv
from fastclip.tolerance import SAME_MODEL_ATOL, SAME_MODEL_RTOL

# RN50 at 224 (stem width 64): (label, C, H, C', kernel, stride, padding, act, residual)
SHAPES = [
    ("stem conv1 3x3/2", 3, 224, 32, 3, 2, 1, "relu", False),
    ("stem conv3 3x3", 32, 112, 64, 3, 1, 1, "relu", False),
    ("layer1 conv2 3x3", 64, 56, 64, 3, 1, 1, "relu", False),
    ("layer1 conv3 1x1 + residual", 64, 56, 256, 1, 1, 0, "relu", True),
    ("layer1 downsample 1x1", 64, 56, 256, 1, 1, 0, "none", False),
    ("layer2 conv1 1x1", 512, 28, 128, 1, 1, 0, "relu", False),
    ("layer2 conv2 3x3", 128, 28, 128, 3, 1, 1, "relu", False),
    ("layer3 conv3 1x1 + residual", 256, 14, 1024, 1, 1, 0, "relu", True),
    ("layer3 conv2 3x3", 256, 14, 256, 3, 1, 1, "relu", False),
    ("layer4 conv1 1x1", 2048, 7, 512, 1, 1, 0, "relu", False),
    ("layer4 conv2 3x3", 512, 7, 512, 3, 1, 1, "relu", False),
    ("layer4 conv3 1x1 + residual", 512, 7, 2048, 1, 1, 0, "relu", True),
]
VARIANTS = {"plain": dict(FUSED=False, PACK_WEIGHTS=False), "fused": dict(FUSED=True, PACK_WEIGHTS=False),
            "packed": dict(FUSED=True, PACK_WEIGHTS=True)}
_PLAIN_MEAN: dict[str, float] = {}


def _operands(B, C, H, Co, k, stride, padding, residual):
    gen = torch.Generator().manual_seed(C * 7 + Co)
    x = torch.randn(B, C, H, H, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(Co, C, k, k, generator=gen) / (C * k * k) ** 0.5
    b = torch.randn(Co, generator=gen)
    Ho = (H + 2 * padding - k) // stride + 1
    r = torch.randn(B, Co, Ho, Ho, generator=gen).contiguous(memory_format=torch.channels_last) if residual else None
    return x, w, b, r, Ho


@pytest.mark.parametrize("impl", ["plain", "fused", "packed", "ref"])  # plain first: the others report vs_plain
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0].replace(" ", "_") for s in SHAPES])
def test_conv2d_act(benchmark, shape, batch, impl, monkeypatch):
    label, C, H, Co, k, stride, padding, act, residual = shape
    x, w, b, r, Ho = _operands(batch, C, H, Co, k, stride, padding, residual)
    if impl == "ref":
        def fn():
            return ref.conv2d_act(x, w, b, stride, padding, act, r)
    else:
        for attr, value in VARIANTS[impl].items():
            monkeypatch.setattr(cpu_conv, attr, value)

        def fn():
            return cpu_conv.conv2d_act(x, w, b, stride, padding, act, r)
    group = f"conv2d_act {label}: batch {batch}, {C} x {H}² -> {Co} x {Ho}²"
    benchmark.group = group
    with torch.inference_mode():
        want = ref.conv2d_act(x, w, b, stride, padding, act, r)
        torch.testing.assert_close(fn(), want, rtol=SAME_MODEL_RTOL, atol=SAME_MODEL_ATOL)
        benchmark.pedantic(fn, rounds=10 if batch > 1 else 50, warmup_rounds=2)
    if not benchmark.stats:  # --benchmark-disable: each function ran once, as a smoke test
        return
    mean = benchmark.stats.stats.mean
    if impl == "plain":
        _PLAIN_MEAN[group] = mean
    if group in _PLAIN_MEAN:
        benchmark.extra_info["vs_plain"] = round(_PLAIN_MEAN[group] / mean, 3)
    macs = batch * Co * Ho * Ho * C * k * k
    benchmark.extra_info["gflop_per_s"] = round(2 * macs / mean / 1e9, 1)
