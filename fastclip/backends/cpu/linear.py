"""``linear`` and ``linear_act`` of the ``cpu`` backend: GEMMs on weights packed once.

The GEMM is chosen by the number of rows M of x (tokens x batch):

* M <= KERNEL_MAX_ROWS[panel width], on any CPU with AVX2 + FMA: the kernel of csrc/linear.cpp, on its
  AVX-512 path (32-column panels) while AVX-512 is enabled, else its AVX2 path (16-column panels). The
  weight is packed once (about its own size; the pack records its panel width and is remade if the path
  changes) and, while one panel is multiplied, the next is prefetched into L2. At such M a weight is used
  by only a few row tiles, so streaming it from memory is what limits MKL here: over a 12-layer ViT-B
  stack at M = 50 (340 MB of weights, streamed from memory as in the model) the AVX-512 path reaches about
  0.87 of the sgemm rate against 0.61 for MKL's packed GEMM (bench/bench_cpu_ops.py, the streamed-weights
  group; Intel Xeon with AVX-512). The AVX2 path, forced on a 2-core Zen 4 under .ci/emulate-avx2 (oneDNN,
  the large-M GEMM there, held to AVX2 too), runs the same stack at 1.14x oneDNN's rate at M = 50 (173
  against 151 GFLOP/s), 1.10x at 100, 0.99x at 197 and 1.02x at 400, and at 0.90-0.95 of its own AVX-512
  path with the weights hot (0.74 before its inner step was written in asm: csrc/linear_avx2.h). Hence
  the same limit on both paths, 128 rows (ViT-B-32 at batch 1-2, the text tower at batch 1). MKL on AMD
  CPUs does worse at small M (fastclip's ViT-B-32 at batch 1 on a 2-core Zen 3 with every linear on MKL:
  183 ms, ONNX Runtime 90 ms).
  ``linear_act`` applies the bias and the activation in the kernel's epilogue -- the same code as
  ``bias_act`` -- so the MLP's hidden layer is written once.
* Larger M (``LARGE_GEMM``; ``FASTCLIP_LARGE_GEMM=mkl|onednn`` overrides the choice): on Intel CPUs MKL's
  packed-weight GEMM (``torch.ops.mkl._mkl_linear`` on a weight reordered once by
  ``_mkl_reorder_linear_weight``), which is faster once each weight is reused by many rows. MKL packs for
  one M, so a weight is packed when the same M is seen twice in a row (varying text lengths never repack on
  every call). On other CPUs (AMD), oneDNN's GEMM on a weight reordered once for any M
  (fastclip/backends/cpu/onednn.py): on a 2-core Zen 4 it ran a streamed ViT-B stack at 1.27-1.34x MKL's
  rate from 197 to 1600 rows. Either way ``linear_act`` then adds ``bias_act``.

Packs are made on first use and dropped when the weight changes in place or is freed
(fastclip/backends/weight_packs.py); each costs about as much memory as its weight. FASTCLIP_MKL_PACK=0 turns
them all off (plain F.linear, as the reference; ``linear_act`` then adds ``bias_act``). Anything the C++ ops do not take -- other dtypes,
autograd, empty inputs -- runs the reference ops, as everywhere in the cpu backend.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from ... import _C, ref
from ..weight_packs import DerivedWeights
from . import buffers, onednn
from .bias_act import bias_act
from .common import ACT_CODES, native, ptr, unit_last

_OFF = ("0", "false", "no", "off")
MKL_PACK_AVAILABLE = (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
                      and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))
_PACKING = os.environ.get("FASTCLIP_MKL_PACK", "1").strip().lower() not in _OFF
_MKL_PACK = MKL_PACK_AVAILABLE and _PACKING
KERNEL_AVAILABLE = _C.linear_supported()
_KERNEL = KERNEL_AVAILABLE and _PACKING
# Rows up to which the kernel runs, per path (its panel width, _C.linear_panel_width()), from the streamed
# 12-layer ViT-B stack (module docstring): AVX-512 leads MKL by 1.4x at M = 50 and 1.04x at M = 100, MKL
# leads from M = 200; AVX2 (against oneDNN held to AVX2) leads by 1.14x at M = 50 and 1.10x at 100, at par at 197.
KERNEL_MAX_ROWS = {32: 128, 16: 128}
LARGE_GEMMS = ("mkl", "onednn")


def _cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...), or "" where /proc/cpuinfo does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def choose_large_gemm(setting: str | None = None) -> str:
    """The GEMM for calls above the kernel's rows: ``setting`` ("mkl", "onednn"; ""/"auto"/None: oneDNN on
    CPUs not made by Intel, where MKL does not run its fast code -- fastclip/backends/cpu/onednn.py has the
    measurements -- MKL on Intel's). ValueError for an unknown name or oneDNN missing from this torch."""
    name = (setting or "auto").strip().lower()
    if name == "auto":
        return "onednn" if onednn.AVAILABLE and _cpu_vendor() not in ("GenuineIntel", "") else "mkl"
    if name not in LARGE_GEMMS:
        raise ValueError(f"FASTCLIP_LARGE_GEMM={setting!r}: expected one of {', '.join(LARGE_GEMMS)} or auto")
    if name == "onednn" and not onednn.AVAILABLE:
        raise ValueError("FASTCLIP_LARGE_GEMM=onednn: this PyTorch build has no oneDNN linear ops")
    return name


def _large_gemm_from_env() -> str:
    """FASTCLIP_LARGE_GEMM's choice; a bad value warns (naming it) and the default choice runs."""
    try:
        return choose_large_gemm(os.environ.get("FASTCLIP_LARGE_GEMM"))
    except ValueError as exc:
        warnings.warn(f"{exc}; using {choose_large_gemm(None)}", RuntimeWarning, stacklevel=2)
        return choose_large_gemm(None)


LARGE_GEMM = _large_gemm_from_env()


# ---------------------------------------------------------------------------------------- the kernel
def _pack_for_kernel(weight: torch.Tensor, panel: int) -> torch.Tensor:
    """(N, K) weight -> its panels of ``panel`` columns (csrc/linear.cpp), a flat fp32 tensor."""
    w = unit_last(weight.detach())
    N, K = w.shape
    packed = torch.empty(_C.linear_packed_size(N=N, K=K, panel=panel), dtype=torch.float32)
    _C.linear_pack(w=w.data_ptr(), ldw=w.stride(0), N=N, K=K, panel=panel, out=packed.data_ptr())
    return packed


class _KernelPack:
    """A weight's kernel pack and its layout: ``pack`` = (panel width, packed tensor), or None before the first."""

    __slots__ = ("pack",)

    def __init__(self):
        self.pack: tuple[int, torch.Tensor] | None = None


_KERNEL_PACKS = DerivedWeights(lambda weight: _KernelPack())


def kernel_packed(weight: torch.Tensor, panel: int) -> torch.Tensor | None:
    """``weight`` packed for the path of ``panel`` columns, or None (an inference tensor: no cache). A pack
    of the other layout (the AVX-512 path switched on or off since) is replaced, never used."""
    entry = _KERNEL_PACKS.get(weight)
    if entry is None:
        return None
    pack = entry.pack  # read once: (width, tensor) stay together whatever another thread stores meanwhile
    if pack is None or pack[0] != panel:
        entry.pack = None  # free the other layout's pack before making this one
        pack = entry.pack = (panel, _pack_for_kernel(weight, panel))
    return pack[1]


def _kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: int) -> torch.Tensor | None:
    """act(x @ weight.T + bias) by the kernel, or None when it does not apply (too many rows for the path
    that runs now, an inference-tensor weight)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    panel = _C.linear_panel_width()
    if M > KERNEL_MAX_ROWS.get(panel, 0):
        return None
    packed = kernel_packed(weight, panel)
    if packed is None:
        return None
    x2 = unit_last(x2)
    sx = x2.stride(0) if M > 1 else K  # a single row's stride is arbitrary; 0 (a broadcast row) is fine
    b = None if bias is None else bias.contiguous()
    y = buffers.empty((M, N))
    _C.linear(x=x2.data_ptr(), sx=sx, packed=packed.data_ptr(), panel=panel, bias=ptr(b), y=y.data_ptr(), sy=N,
              M=M, N=N, K=K, act=act)
    return y.view(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------- MKL
class _MklPack:
    """A weight's MKL pack for one batch size ``m``, and the last batch size it was called with."""

    __slots__ = ("m", "packed", "last_m")

    def __init__(self):
        self.m, self.packed, self.last_m = -1, None, -1


_MKL_PACKS = DerivedWeights(lambda weight: _MklPack())


def _mkl_packed(weight: torch.Tensor, M: int):
    """MKL-packed ``weight`` for batch size M, or None (use F.linear)."""
    entry = _MKL_PACKS.get(weight) if weight.is_contiguous() else None
    if entry is None:
        return None  # an inference tensor (no version counter to watch) or a strided weight
    if entry.m == M:
        return entry.packed
    seen_twice, entry.last_m = entry.last_m == M, M
    if not seen_twice:
        return None
    entry.packed, entry.m = None, -1  # free the old pack before making the new one
    entry.packed, entry.m = torch.ops.mkl._mkl_reorder_linear_weight(weight, M), M
    return entry.packed


def _mkl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    packed = _mkl_packed(weight, x2.shape[0]) if _MKL_PACK else None
    if packed is None:
        return F.linear(x, weight, bias)
    y = torch.ops.mkl._mkl_linear(x2 if x2.is_contiguous() else x2.contiguous(), packed, weight, bias, x2.shape[0])
    return y.view(*x.shape[:-1], weight.shape[0])


def _large(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias above the kernel's rows: oneDNN or MKL (``LARGE_GEMM``), plain F.linear unpacked."""
    if LARGE_GEMM == "onednn" and _PACKING:
        y = onednn.gemm(x, weight, bias)
        if y is not None:
            return y
    return _mkl(x, weight, bias)


def clear_packed_weights() -> None:
    """Drop every packed weight (needed only after writing weights behind torch's back, e.g. via numpy)."""
    _MKL_PACKS.clear()
    _KERNEL_PACKS.clear()
    onednn.PACKS.clear()


# ---------------------------------------------------------------------------------------- the ops
def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The C++ path takes these operands (else the reference op runs, and raises for bad shapes)."""
    return (weight.ndim == 2 and x.ndim >= 1 and x.shape[-1] == weight.shape[1] and native(x, weight, bias)
            and (bias is None or bias.shape == weight.shape[:1]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, upcast: bool = False):
    """y = x @ weight.T + bias.  x: (..., K), weight: (N, K), bias: (N,) -> (..., N)."""
    if upcast or not _takes(x, weight, bias):
        return ref.linear(x, weight, bias, upcast=upcast)
    y = _kernel(x, weight, bias, 0) if _KERNEL else None
    return y if y is not None else _large(x, weight, bias)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False):
    """act(x @ weight.T + bias).  x: (..., K), weight: (N, K), bias: (N,) or None -> (..., N); act as in
    ``bias_act`` (none / gelu / gelu_tanh / quick_gelu, fused), or a gated one (..., N/2) after ``linear``."""
    code = ACT_CODES.get(act)
    if code is None and not upcast and act in ref.ACTIVATIONS and _takes(x, weight, bias):
        return bias_act(linear(x, weight, None), bias, act)  # a gated act (SwiGLU): this GEMM, then the gate kernel
    if upcast or code is None or not _takes(x, weight, bias):
        return ref.linear_act(x, weight, bias, act, upcast=upcast)
    y = _kernel(x, weight, bias, code) if _KERNEL else None
    return y if y is not None else bias_act(_large(x, weight, None), bias, act)
