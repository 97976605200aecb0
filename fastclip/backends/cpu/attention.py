"""``attention`` of the cpu backend (csrc/attention.cpp)."""
from __future__ import annotations

import math

import torch

from ... import _C, ref
from . import buffers
from .common import native, unit_last


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, upcast: bool = False,
              key_mask: torch.Tensor | None = None):
    """softmax(q k^T / sqrt(Dh) [+ causal mask]) v.  q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh) -> (B, H, Lq, Dh).

    The result is a (B, H, Lq, Dh) view of a (B, Lq, H, Dh) buffer, so ``out.transpose(1, 2).reshape(B, Lq,
    H * Dh)`` (what the model does next) is free. ``key_mask`` (B, Lk) bool (True = a real key): a prefix
    mask (each row's real keys first, as NaFlex pads) runs in the kernel as per-row key counts; any other mask
    runs the reference op.
    """
    lengths = None if key_mask is None else _prefix_lengths(key_mask, k)
    if key_mask is not None and lengths is None:
        return ref.attention(q, k, v, causal=causal, upcast=upcast, key_mask=key_mask)
    if upcast or not native(q, k, v) or q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        return ref.attention(q, k, v, causal=causal, upcast=upcast, key_mask=key_mask)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D or (causal and Lq != Lk):
        return ref.attention(q, k, v, causal=causal)  # raises the reference's error for bad shapes
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    out = buffers.empty((B, Lq, H, D), q.dtype).transpose(1, 2)
    _C.attention(q=q.data_ptr(), q_strides=q.stride()[:3], k=k.data_ptr(), k_strides=k.stride()[:3], v=v.data_ptr(),
                 v_strides=v.stride()[:3], out=out.data_ptr(), out_strides=out.stride()[:3], B=B, H=H, Lq=Lq, Lk=Lk,
                 D=D, causal=bool(causal), scale=1.0 / math.sqrt(D),
                 key_lengths=0 if lengths is None else lengths.data_ptr())
    return out


def _prefix_lengths(key_mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """(B,) int32 counts of real keys if ``key_mask`` (B, Lk) bool is a prefix mask on the CPU, else None."""
    if key_mask.dtype != torch.bool or key_mask.ndim != 2 or k.ndim != 4 or key_mask.shape != (k.shape[0], k.shape[2]):
        return None  # the reference op raises its error for a bad mask
    lengths = key_mask.sum(dim=1, dtype=torch.int32)  # (B,)
    prefix = torch.arange(key_mask.shape[1]) < lengths[:, None]  # (B, Lk)
    return lengths.contiguous() if torch.equal(prefix, key_mask) else None
