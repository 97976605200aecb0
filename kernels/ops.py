"""The triton backend's op table (``fastclip.backends.dispatch.get_ops("triton")`` calls ``op_table()``).

Every function has its reference signature (fastclip/ref.py), possibly with extra keyword arguments:
``layer_norm(..., residual=None)`` (fused residual add), ``normalize_project(..., index=None)`` (pooled
token gather), ``attention(..., key_padding_mask=None)``. Each calls a ``torch.library.custom_op``
(``torch.ops.fastclip.*``), so ``torch.compile`` sees one opaque node per kernel.

Not here, on purpose: ``linear`` stays ``F.linear`` (cuBLAS GEMMs with fused epilogues beat a Triton
GEMM at these shapes and need no tuning), and ``l2_normalize`` stays the reference (``F.normalize`` on a
(B, E) matrix is negligible; the model's normalised paths go through ``normalize_project``).
``conv2d_act`` (ResNet towers) stays the reference too: ``F.conv2d`` runs cuDNN on CUDA tensors.
"""
from __future__ import annotations

import torch

from .. import ref
from .bias_act import ACTIVATIONS
from .bias_act import bias_act as bias_act_kernel
from .layer_norm import _layer_norm_kernel, layer_norm
from .normalize_project import normalize_project
from .rotary import rotary as rotary_kernel


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, upcast: bool = False,
              key_padding_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
              rotary: tuple | None = None) -> torch.Tensor:
    """Fused flash attention (kernels/attention.py) with the reference signature.

    q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh) -> (B, H, Lq, Dh). ``upcast`` runs the kernel on fp32 copies.
    ``key_mask`` (B, Lk) bool, True = a real key (the reference's mask) is the kernel's key-padding mask
    inverted; ``key_padding_mask`` (True = ignored) is the kernel's own. ``rotary`` (cos, sin, start): q and k
    rotated by position (kernels/rotary.py) before the kernel (see ``fastclip.ref.attention``).
    """
    from .attention import attention_op  # imported on first use: the attention module is the largest

    if rotary is not None:
        q, k = ref.rotary_positions(q, *rotary, op=rotary_kernel), ref.rotary_positions(k, *rotary, op=rotary_kernel)
    if key_mask is not None:
        if key_padding_mask is not None:
            raise ValueError("attention: pass key_mask or key_padding_mask, not both")
        if key_mask.dtype != torch.bool:
            raise ValueError(f"attention: key_mask must be a bool tensor, got {key_mask.dtype}")
        key_padding_mask = ~key_mask  # (B, Lk) True = padded

    if upcast and q.dtype != torch.float32:
        return attention_op(q.float(), k.float(), v.float(), causal, key_padding_mask).to(q.dtype)
    return attention_op(q, k, v, causal, key_padding_mask)


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False) -> torch.Tensor:
    """act(x + bias) by the kernel (kernels/bias_act.py); activations it does not implement (the gated ones)
    run the reference op.  x: (..., N), bias: (N,) or None -> (..., N), or (..., N/2) if gated."""
    if act not in ACTIVATIONS:
        return ref.bias_act(x, bias, act, upcast=upcast)
    return bias_act_kernel(x, bias, act, upcast=upcast)


def interpreted() -> bool:
    """True if the kernels were decorated under TRITON_INTERPRET=1 (so they run on CPU tensors).

    Triton decides interpreted vs compiled when ``@triton.jit`` runs, i.e. at import; setting the
    variable later does not turn already-imported kernels into interpreted ones.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_layer_norm_kernel, InterpretedFunction)


def op_table() -> dict:
    """{op name: function} overriding the reference ops for the triton backend."""
    return {
        "layer_norm": layer_norm,
        "bias_act": bias_act,
        "attention": attention,
        "normalize_project": normalize_project,
        "rotary": rotary_kernel,
    }
