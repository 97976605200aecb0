"""``linear`` and ``linear_act`` of the ``cpu`` backend for bf16 models: oneDNN GEMMs on weights packed once.

A bf16 weight is reordered once into oneDNN's blocked layout and multiplied by oneDNN
(fastclip/backends/cpu/onednn.py): bf16 inputs, fp32 accumulation (AMX tiles or AVX512-BF16 dot products),
bf16 output, with the bias and GELU fused where oneDNN has them.
``F.linear`` on the same bf16 tensors reorders the weight on every call; on a Sapphire Rapids core at
ViT-B widths and 50 rows the packed GEMM takes about half its time (345 vs 629 us for 768 -> 3072).

Only bf16 operands on a CPU with oneDNN bf16 support take this path; anything else runs the reference op.
"""
from __future__ import annotations

import torch

from ... import ref
from . import onednn

AVAILABLE = onednn.AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """bf16 CPU operands this path takes (no autograd; shapes checked by the reference op otherwise)."""
    if not AVAILABLE or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.ndim != 2:
        return False
    if x.device.type != "cpu" or x.numel() == 0 or x.shape[-1] != weight.shape[1]:
        return False
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != weight.shape[:1]):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias.  x: (..., K), weight: (N, K), bias: (N,), all bf16 -> (..., N) bf16."""
    y = onednn.gemm(x, weight, bias, "none")
    return ref.linear(x, weight, bias) if y is None else y


def linear_act_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x @ weight.T + bias), GELU fused; other activations (quick_gelu, the gated swiglu) after the GEMM,
    whose epilogue adds the bias in fp32 (one rounding to bf16, and no separate pass over the output: for
    EVA02-B-16's SwiGLU at 32 images, 6304 x 4096, the bias pass alone took as long as the gate). Shapes as
    ``linear_bf16`` ((..., N/2) for a gated act)."""
    y = onednn.gemm(x, weight, bias, act) if act in onednn.FUSED else None
    if y is not None:
        return y
    return ref.bias_act(linear_bf16(x, weight, bias), None, act)

