"""``normalize_project`` of the cpu backend (csrc/normalize_project.cpp)."""
from __future__ import annotations

import torch

from ... import _C, ref
from .common import native, ptr, unit_last, vector


def normalize_project(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                      proj: torch.Tensor | None, proj_bias: torch.Tensor | None = None, normalize: bool = False,
                      upcast: bool = False, index: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm -> @ proj (+ proj_bias) -> optional L2 normalisation, on pooled rows.

    x: (B, W), or (B, L, W) with ``index`` (B,) the pooled position of each row (gathered in the kernel);
    proj: (W, E) or None; proj_bias: (E,) -> (B, E).
    """
    def fallback():
        return ref.normalize_project(x, ln_weight, ln_bias, eps, proj, proj_bias, normalize, upcast, index)

    if upcast or x.ndim != (2 if index is None else 3) or not native(x, ln_weight, ln_bias, proj, proj_bias):
        return fallback()
    B, W = x.shape[0], x.shape[-1]
    E = W if proj is None else proj.shape[-1]
    w, b = vector(ln_weight, W), vector(ln_bias, W)
    pb = vector(proj_bias, E) if proj_bias is not None else None
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
    x = unit_last(x)
    if index is not None:
        sxl = x.stride(1)
    p = unit_last(proj) if proj is not None else None
    out = torch.empty((B, E), dtype=x.dtype)
    _C.normalize_project(x=x.data_ptr(), B=B, sxb=x.stride(0), sxl=sxl, index=ptr(idx), ln_w=w.data_ptr(),
                         ln_b=b.data_ptr(), eps=float(eps), W=W, proj=ptr(p), sp=p.stride(0) if p is not None else 0,
                         E=E, proj_bias=ptr(pb), normalize=bool(normalize), out=out.data_ptr())
    return out
