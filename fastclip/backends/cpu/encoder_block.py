"""``encoder_block`` of int8 models on the cpu backend (csrc/encoder_block.cpp): one pre-norm transformer block
in one call -- LayerNorm, the int8 q/k/v projection, attention, the int8 output projection with the residual
add, LayerNorm, the int8 MLP -- the same kernels with the same arguments as the op-by-op path, so the same
bits, without a return to Python between them. At batch 1 that return costs more than the arithmetic of
the small ops: each op's Python runs with caches the GEMMs just flushed.
"""
from __future__ import annotations

import torch

from ... import _C
from . import buffers
from .common import ACT_CODES, ptr
from .linear_int8 import Int8Pack


def layer(pack: Int8Pack, x_scale: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """The kernel's pointers of one int8 layer: its pack's (packed, w_scale, colsum, bias) and x_scale (K,) or 0."""
    return (*pack.ptrs, ptr(x_scale))


def encoder_block_int8(x: torch.Tensor, pending: torch.Tensor | None, ln_1: tuple, ln_2: tuple, layers: tuple,
                       heads: int, mlp: int, act: str, causal: bool, key_lengths: torch.Tensor | None,
                       bf16_dots: bool):
    """(s, m) of the block on ``x + pending``: s = x + pending + attention output, m = the MLP output.

    x, pending: (B, L, W) contiguous fp32 CPU (pending may be None); ``ln_1`` / ``ln_2``: (gain (W,), bias (W,),
    eps) contiguous fp32; ``layers``: ``layer()`` of q/k/v (3W, W), output (W, W), MLP in (mlp, W, with its
    bias, followed by ``act``) and MLP out (W, mlp); ``key_lengths``: (B,) int32 real keys per row, or None -> s, m:
    (B, L, W)."""
    B, L, W = x.shape
    M = B * L
    s = buffers.empty((B, L, W))
    m = buffers.empty((B, L, W))
    scratch = buffers.empty((M, 2 * W + max(4 * W, mlp)))
    (w1, b1, eps1), (w2, b2, eps2) = ln_1, ln_2
    _C.encoder_block_int8(x=x.data_ptr(), pending=ptr(pending), s_out=s.data_ptr(), m_out=m.data_ptr(),
                          scratch=scratch.data_ptr(), B=B, L=L, W=W, H=heads, mlp=mlp, ln1_w=w1.data_ptr(),
                          ln1_b=b1.data_ptr(), ln1_eps=float(eps1), ln2_w=w2.data_ptr(), ln2_b=b2.data_ptr(),
                          ln2_eps=float(eps2), qkv=layers[0], out=layers[1], fc=layers[2], proj=layers[3],
                          act=ACT_CODES[act], causal=bool(causal), key_lengths=ptr(key_lengths), bf16_dots=bf16_dots)
    return s, m
