"""The ``cpu`` backend (alias ``cpp``): host-side checks, then the fp32 AVX2/FMA kernels of ``fastclip._C`` (csrc/).

Every op has the signature of its reference in fastclip/ref.py. A call runs the C++ kernel when all
tensors are float32, strided, on the CPU, no gradient is being recorded for them (the kernels have no
backward) and ``upcast`` is False; anything else -- bf16/fp16, autograd, meta tensors, empty inputs --
runs the reference op, so results never depend on the path. Inner dims must have unit stride; a
tensor that does not is made contiguous here. Outer strides are passed to the kernels, so views such as
q/k/v of a packed qkv tensor or the class-token rows ``x[:, 0]`` are read in place. The kernels run on
torch's own OpenMP thread pool (see csrc/common.h), so ``torch.set_num_threads`` governs them too.

``linear`` and ``linear_act`` (fastclip/cpu_linear.py) run on pre-packed weights: the AVX-512 kernel of
csrc/linear.cpp for small batches, MKL's packed GEMM for large ones.

Importing this module fails with ImportError when ``fastclip._C`` is not built or the CPU lacks
AVX2/FMA; ``backend="auto"`` then falls back to the reference ops (fastclip/ops.py).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from . import _C, ref

if not _C.cpu_supported():
    raise ImportError("fastclip._C kernels need a CPU with AVX2 and FMA; this one lacks them")

_ACT_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}


def _native(*tensors: torch.Tensor | None) -> bool:
    """All given tensors are non-empty fp32 strided CPU tensors and no autograd graph is being built."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.layout != torch.strided or t.numel() == 0:
            return False
        if grad and t.requires_grad:
            return False
    return True


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dim has unit stride (or size 1), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) as a (R, D) tensor with unit stride on D (a view when the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return _unit_last(x2)


def _vector(t: torch.Tensor, n: int) -> torch.Tensor | None:
    """A (n,) parameter as a contiguous vector, or None if it is not (n,)."""
    if t.ndim != 1 or t.shape[0] != n:
        return None
    return t.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, upcast: bool = False):
    """softmax(q k^T / sqrt(Dh) [+ causal mask]) v.  q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh) -> (B, H, Lq, Dh).

    The result is a (B, H, Lq, Dh) view of a (B, Lq, H, Dh) buffer, so ``out.transpose(1, 2).reshape(B, Lq,
    H * Dh)`` (what the model does next) is free.
    """
    if upcast or not _native(q, k, v) or q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        return ref.attention(q, k, v, causal=causal, upcast=upcast)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D or (causal and Lq != Lk):
        return ref.attention(q, k, v, causal=causal)  # raises the reference's error for bad shapes
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = torch.empty((B, Lq, H, D), dtype=q.dtype).transpose(1, 2)
    _C.attention(q.data_ptr(), q.stride()[:3], k.data_ptr(), k.stride()[:3], v.data_ptr(), v.stride()[:3],
                 out.data_ptr(), out.stride()[:3], B, H, Lq, Lk, D, bool(causal), 1.0 / math.sqrt(D))
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None, upcast: bool = False):
    """LayerNorm over the last dim.  x: (..., D), weight/bias: (D,) -> (..., D); with ``residual`` (same
    shape as x) -> (layer_norm(x + residual), x + residual), the sum computed once."""
    D = x.shape[-1] if x.ndim else 0
    w = _vector(weight, D) if weight is not None else None
    b = _vector(bias, D) if bias is not None else None
    if (upcast or w is None or b is None or not _native(x, w, b, residual)
            or (residual is not None and residual.shape != x.shape)):
        return ref.layer_norm(x, weight, bias, eps, residual=residual, upcast=upcast)
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype)
    if residual is None:
        _C.layer_norm(x2.data_ptr(), x2.stride(0), 0, 0, w.data_ptr(), b.data_ptr(), y.data_ptr(), D, 0, 0,
                      x2.shape[0], D, float(eps))
        return y
    r2 = _rows(residual)
    s = torch.empty(x.shape, dtype=x.dtype)
    _C.layer_norm(x2.data_ptr(), x2.stride(0), r2.data_ptr(), r2.stride(0), w.data_ptr(), b.data_ptr(), y.data_ptr(),
                  D, s.data_ptr(), D, x2.shape[0], D, float(eps))
    return y, s


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False) -> torch.Tensor:
    """act(x + bias).  x: (..., N), bias: (N,) or None -> (..., N); act in none/gelu/gelu_tanh/quick_gelu."""
    code = _ACT_CODES.get(act)
    N = x.shape[-1] if x.ndim else 0
    b = _vector(bias, N) if bias is not None else None
    if upcast or code is None or (bias is not None and b is None) or not _native(x, b):
        return ref.bias_act(x, bias, act, upcast=upcast)
    if code == 0 and b is None:
        return x
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype)
    _C.bias_act(x2.data_ptr(), x2.stride(0), _ptr(b), y.data_ptr(), N, x2.shape[0], N, code)
    return y


def normalize_project(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                      proj: torch.Tensor | None, proj_bias: torch.Tensor | None = None, normalize: bool = False,
                      upcast: bool = False, index: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm -> @ proj (+ proj_bias) -> optional L2 normalisation, on pooled rows.

    x: (B, W), or (B, L, W) with ``index`` (B,) the pooled position of each row (gathered in the kernel);
    proj: (W, E) or None; proj_bias: (E,) -> (B, E).
    """
    def fallback():
        return ref.normalize_project(x, ln_weight, ln_bias, eps, proj, proj_bias, normalize, upcast, index)

    if upcast or x.ndim != (2 if index is None else 3) or not _native(x, ln_weight, ln_bias, proj, proj_bias):
        return fallback()
    B, W = x.shape[0], x.shape[-1]
    E = W if proj is None else proj.shape[-1]
    w, b = _vector(ln_weight, W), _vector(ln_bias, W)
    pb = _vector(proj_bias, E) if proj_bias is not None else None
    if (w is None or b is None or (proj_bias is not None and pb is None)
            or (proj is not None and (proj.ndim != 2 or proj.shape[0] != W))):
        return fallback()
    sxl, idx = 0, None
    if index is not None:
        L = x.shape[1]
        if index.dtype not in (torch.int64, torch.int32, torch.int16) or index.shape != (B,):
            return fallback()
        idx = index.to(device="cpu", dtype=torch.int64)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -L or hi >= L:
            return fallback()  # the reference raises its IndexError
        idx = (torch.where(idx < 0, idx + L, idx) if lo < 0 else idx).contiguous()
    x = _unit_last(x)
    if index is not None:
        sxl = x.stride(1)
    p = _unit_last(proj) if proj is not None else None
    out = torch.empty((B, E), dtype=x.dtype)
    _C.normalize_project(x.data_ptr(), B, x.stride(0), sxl, _ptr(idx), w.data_ptr(), b.data_ptr(), float(eps), W,
                         _ptr(p), p.stride(0) if p is not None else 0, E, _ptr(pb), bool(normalize), out.data_ptr())
    return out


def op_table() -> dict:
    """{op name: C++-backed op} for fastclip.ops (ops not listed here run the reference)."""
    from .cpu_linear import linear, linear_act

    return {"attention": attention, "layer_norm": layer_norm, "bias_act": bias_act,
            "normalize_project": normalize_project, "linear": linear, "linear_act": linear_act}
