"""Host-side checks shared by the cpu backend's ops: which tensors the C++ kernels take, and how they are passed.

Importing this module fails with ImportError when ``fastclip._C`` is not built or the CPU lacks AVX2/FMA;
``backend="auto"`` then falls back to the reference ops (fastclip/backends/dispatch.py).
"""
from __future__ import annotations

import torch

from ... import _C, ref

if not _C.cpu_supported():
    raise ImportError("fastclip._C kernels need a CPU with AVX2 and FMA; this one lacks them")

# {activation name: C++ code} of the activations the kernels implement (csrc/activation.h declares them);
# other activations of fastclip.ref run the reference op.
ACT_CODES: dict[str, int] = dict(_C.activation_codes())
_unknown = sorted(set(ACT_CODES) - set(ref.ACTIVATIONS))
if _unknown:
    raise ImportError(f"fastclip._C implements activations fastclip.ref does not know: {_unknown}; rebuild it")


def native(*tensors: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> bool:
    """All given tensors are non-empty strided CPU tensors of ``dtype`` (fp32: what the C++ kernels take) and
    no autograd graph is being built."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.dtype != dtype or t.device.type != "cpu" or t.layout != torch.strided or t.numel() == 0:
            return False
        if grad and t.requires_grad:
            return False
    return True


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dim has unit stride (or size 1), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) as a (R, D) tensor with unit stride on D (a view when the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return unit_last(x2)


def vector(t: torch.Tensor, n: int) -> torch.Tensor | None:
    """A (n,) parameter as a contiguous vector, or None if it is not (n,)."""
    if t.ndim != 1 or t.shape[0] != n:
        return None
    return t.contiguous()
