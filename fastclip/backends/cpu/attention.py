"""``attention`` of the cpu backend (csrc/attention.cpp)."""
from __future__ import annotations

import math

import torch

from ... import _C, ref
from . import buffers
from .common import native, unit_last


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, upcast: bool = False):
    """softmax(q k^T / sqrt(Dh) [+ causal mask]) v.  q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh) -> (B, H, Lq, Dh).

    The result is a (B, H, Lq, Dh) view of a (B, Lq, H, Dh) buffer, so ``out.transpose(1, 2).reshape(B, Lq,
    H * Dh)`` (what the model does next) is free.
    """
    if upcast or not native(q, k, v) or q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        return ref.attention(q, k, v, causal=causal, upcast=upcast)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D or (causal and Lq != Lk):
        return ref.attention(q, k, v, causal=causal)  # raises the reference's error for bad shapes
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    out = buffers.empty((B, Lq, H, D), q.dtype).transpose(1, 2)
    _C.attention(q=q.data_ptr(), q_strides=q.stride()[:3], k=k.data_ptr(), k_strides=k.stride()[:3], v=v.data_ptr(),
                 v_strides=v.stride()[:3], out=out.data_ptr(), out_strides=out.stride()[:3], B=B, H=H, Lq=Lq, Lk=Lk,
                 D=D, causal=bool(causal), scale=1.0 / math.sqrt(D))
    return out
