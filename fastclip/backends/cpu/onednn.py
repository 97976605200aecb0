"""oneDNN's GEMM on weights reordered once (``torch.ops.mkldnn``): the large-batch fp32 GEMM of the ``cpu``
backend on CPUs where it beats MKL's, and the bf16 GEMM of bf16 models (fastclip/backends/cpu/linear_bf16.py).

A weight is reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, kept
in the cache of derived weights, fastclip/backends/weight_packs.py, dropped when the weight changes or is
freed) and multiplied by ``torch.ops.mkldnn._linear_pointwise`` (fp32 or bf16 operands, fp32 accumulation,
the bias and GELU fused where asked). oneDNN picks its kernels by the CPU's instruction sets whoever made
the CPU; MKL's fast paths are for Intel CPUs. Every linear of a 12-layer ViT-B stack, weights streamed
from memory (``pytest bench/bench_cpu_ops.py -k streamed``), 2-core AMD EPYC (Zen 4, AVX-512), fp32 GFLOP/s,
oneDNN vs MKL's packed GEMM: 165 vs 124 at 197 rows, 176 vs 131 at 400, 191 vs 151 at 1600 (1.27-1.34x); at 50
rows 135 vs 80, where the packed-panel kernel (145) runs.
"""
from __future__ import annotations

import torch

from ..weight_packs import DerivedWeights

AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
             and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
# The row count oneDNN is told to expect when it reorders a weight (the layout serves any row count).
_ROWS_HINT = 64
# fastclip activations oneDNN fuses into the GEMM: name -> (oneDNN attr, algorithm).
FUSED = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) fp32 or bf16 weight -> its oneDNN-blocked copy (an mkldnn tensor of the same size)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)


PACKS = DerivedWeights(_pack)


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none") -> torch.Tensor | None:
    """act(x @ weight.T + bias) by oneDNN, act in ``FUSED``.  x: (..., K), weight: (N, K), bias: (N,) or None,
    one dtype (fp32 or bf16) -> (..., N); None for an inference-tensor weight (nothing to watch for changes,
    so not cached: the caller computes it another way)."""
    packed = PACKS.get(weight)
    if packed is None:
        return None
    attr, algorithm = FUSED[act]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    y = torch.ops.mkldnn._linear_pointwise(x2 if x2.is_contiguous() else x2.contiguous(), packed, bias, attr, [],
                                           algorithm)  # (M, N)
    return y.view(*x.shape[:-1], weight.shape[0])
