"""``rotary`` of the cpu backend (csrc/rotary.cpp)."""
from __future__ import annotations

import torch

from ... import _C, ref
from . import buffers
from .common import native, unit_last


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0, upcast: bool = False) -> torch.Tensor:
    """Rotary position embedding of tokens ``start:`` in the interleaved pair layout (see ``fastclip.ref.rotary``).

    x: (B, H, L, Dh) (any strides but a unit one on Dh: a view of the packed q/k/v projection);
    cos / sin: (L - start, Dh/2) -> (B, H, L, Dh), a view of a (B, L, H, Dh) buffer (the layout of the
    projection, so the attention kernel reads it as it reads q / k).
    """
    if upcast or not native(x, cos, sin) or x.ndim != 4:
        return ref.rotary(x, cos, sin, start=start, upcast=upcast)
    B, H, L, D = x.shape
    if D % 2 or not 0 <= start <= L or tuple(cos.shape) != (L - start, D // 2) or cos.shape != sin.shape:
        return ref.rotary(x, cos, sin, start=start)  # raises the reference's error
    x = unit_last(x)
    cos, sin = cos.contiguous(), sin.contiguous()
    out = buffers.empty((B, L, H, D), x.dtype).transpose(1, 2)  # (B, H, L, D) view
    _C.rotary(x=x.data_ptr(), x_strides=x.stride()[:3], out=out.data_ptr(), out_strides=out.stride()[:3],
              cos=cos.data_ptr(), sin=sin.data_ptr(), B=B, H=H, L=L, D=D, start=start)
    return out
