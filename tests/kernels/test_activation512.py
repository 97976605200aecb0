"""The zmm activations (csrc/activation512.h) of the fused linear epilogues against bias_act's 8-float code:
bit for bit, on ordinary values and on the edges (NaN, +-inf, the exp and erf clamps, large magnitudes).
The int8 kernel's zmm paths (avx512_vnni, avx512) and the fp32 linear kernel's AVX-512 path each run with the
activation fused and, for comparison, with the activation applied afterwards by bias_act; on a CPU without
AVX-512 the fused epilogues are the 8-float code itself and the same equalities hold."""
from __future__ import annotations

import platform

import pytest
import torch

if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("fastclip._C is built on Linux x86-64 only", allow_module_level=True)

from fastclip.backends.cpu import linear_int8 as int8_kernel  # noqa: E402
from fastclip.backends.cpu import ops as cpu_ops  # noqa: E402

ACTS = ("gelu", "gelu_tanh", "quick_gelu")
EDGES = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 4.0, -4.0, 44.0, -44.0, 51.3, -51.3, 88.7, -88.7,
         1e30, -1e30, 1e-30]


def _inputs(M: int, K: int, N: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 3
    weight = torch.randn(N, K, generator=gen) * 0.05
    bias = torch.randn(N, generator=gen)
    return x, weight, bias


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("path", int8_kernel.paths())
def test_int8_fused_activation_is_bias_act(act, path):
    x, weight, bias = _inputs(37, 256, 100, seed=len(act))
    pack = int8_kernel.pack_int8(weight, bias)
    with int8_kernel.use_path(path):
        fused = int8_kernel.linear_int8(x, pack, act)
        plain = int8_kernel.linear_int8(x, pack, "none")
    assert torch.equal(fused, cpu_ops.bias_act(plain, torch.zeros(100), act))


@pytest.mark.parametrize("act", ACTS)
def test_linear_fused_activation_is_bias_act(act):
    x, weight, bias = _inputs(37, 256, 100, seed=7)
    x[0, :len(EDGES)] = torch.tensor(EDGES)  # row 0: NaN / inf outputs through the epilogue
    with torch.inference_mode():
        fused = cpu_ops.linear_act(x, weight, bias, act)
        plain = cpu_ops.bias_act(cpu_ops.linear(x, weight, None), bias, act)
    assert torch.equal(fused.isnan(), plain.isnan())
    assert torch.equal(fused.nan_to_num(), plain.nan_to_num())


@pytest.mark.parametrize("act", ACTS)
def test_edge_values_through_an_identity_layer(act):
    """An identity weight and zero bias put chosen values into the activation of the epilogue (an infinite
    input also makes NaN in its row, inf * 0, as the unfused layer does)."""
    values = torch.tensor(EDGES + torch.linspace(-12, 12, 48).tolist())  # (64,)
    x = torch.diag(values)  # (64, 64): row i holds values[i] in column i
    with torch.inference_mode():
        fused = cpu_ops.linear_act(x, torch.eye(64), torch.zeros(64), act)
        plain = cpu_ops.bias_act(cpu_ops.linear(x, torch.eye(64), None), torch.zeros(64), act)
    assert torch.equal(fused.isnan(), plain.isnan())
    assert torch.equal(fused.nan_to_num(), plain.nan_to_num())
