"""``bias_act`` of the cpu backend (csrc/bias_act.cpp)."""
from __future__ import annotations

import torch

from ... import _C, ref
from . import buffers
from .common import ACT_CODES, native, ptr, rows, vector

# {gated activation name: C++ code} of the gated activations (rows [gate; value]) the kernels implement.
GATED_CODES: dict[str, int] = dict(_C.gated_activation_codes())


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False) -> torch.Tensor:
    """act(x + bias).  x: (..., N), bias: (N,) or None -> (..., N), or (..., N/2) for a gated act (swiglu:
    ``silu(gate) * value`` of the halves [gate; value]); act in none/gelu/gelu_tanh/quick_gelu/swiglu."""
    if act in GATED_CODES:
        return _gated(x, bias, act, upcast)
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


def _gated(x: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool) -> torch.Tensor:
    """x: (..., 2N) rows [gate; value], bias: (2N,) or None -> (..., N)."""
    N2 = x.shape[-1] if x.ndim else 0
    b = vector(bias, N2) if bias is not None else None
    if upcast or N2 % 2 or (bias is not None and b is None) or not native(x, b):
        return ref.bias_act(x, bias, act, upcast=upcast)
    x2 = rows(x)  # (R, 2N)
    y = buffers.empty((*x.shape[:-1], N2 // 2), x.dtype)
    _C.bias_act_gated(x=x2.data_ptr(), sx=x2.stride(0), bias=ptr(b), y=y.data_ptr(), sy=N2 // 2, rows=x2.shape[0],
                      N=N2 // 2, act=GATED_CODES[act])
    return y
