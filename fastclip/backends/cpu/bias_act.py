"""``bias_act`` of the cpu backend (csrc/bias_act.cpp)."""
from __future__ import annotations

import torch

from ... import _C, ref
from . import buffers
from .common import ACT_CODES, native, ptr, rows, vector


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False) -> torch.Tensor:
    """act(x + bias).  x: (..., N), bias: (N,) or None -> (..., N); act in none/gelu/gelu_tanh/quick_gelu."""
    code = ACT_CODES.get(act)
    N = x.shape[-1] if x.ndim else 0
    b = vector(bias, N) if bias is not None else None
    if upcast or code is None or (bias is not None and b is None) or not native(x, b):
        return ref.bias_act(x, bias, act, upcast=upcast)
    if code == 0 and b is None:
        return x
    x2 = rows(x)
    y = buffers.empty(x.shape, x.dtype)
    _C.bias_act(x=x2.data_ptr(), sx=x2.stride(0), bias=ptr(b), y=y.data_ptr(), sy=N, rows=x2.shape[0], N=N, act=code)
    return y
