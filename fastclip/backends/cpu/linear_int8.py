"""``linear_int8``: a small-M int8 GEMM with per-row (per-token) activation scales (csrc/linear_int8.cpp).

``pack_int8(weight, bias)`` quantises an (N, K) fp32 weight once, symmetric per output channel
(``w_scale[n] = max|W[n]| / 127``, ``qW = round(W / w_scale)`` in -127..127), and packs it into panels of 16
output columns with k grouped by 4 bytes (the vpdpbusd layout, K padded to a multiple of 4), beside the
per-column sums of ``qW``; ``pack_int8_quantized`` packs a weight quantised elsewhere. ``linear_int8(x, pack,
act)`` quantises each row of x in the call -- asymmetric, scale and zero point from the row's min and max
(with 0 in the range) -- sums the int8 products in int32 (exact) and dequantises in the epilogue:
``y[m, n] = act(s[m] * w_scale[n] * (acc[m, n] - z[m] * colsum[n]) + bias[n])``, act fused.

Paths (``path()``, picked at each call from the CPU and two switches):

* ``avx512_vnni``: zmm vpdpbusd, u8 activations (255 levels);
* ``avx512``: zmm vpmaddubsw + vpmaddwd, u7 activations (127 levels) -- AVX-512BW without VNNI;
* ``avx_vnni``: ymm vpdpbusd (AVX-VNNI), u8;
* ``avx2``: ymm vpmaddubsw + vpmaddwd, u7. Without VNNI the u8 x s8 pair sums are int16 and saturate with
  8-bit activations; with 7-bit ones a pair is at most 2 * 127 * 128 = 32512, so the sums stay exact.

``_C.set_avx512(False)`` / FASTCLIP_DISABLE_AVX512=1 drop the two avx512 paths; ``_C.linear_int8_set_vnni(False)``
/ FASTCLIP_DISABLE_VNNI=1 drop the two VNNI ones (``use_path`` sets both for one path). At small M the weight
streams from memory once per call, and int8 weights are a quarter of fp32's bytes. No autograd: x is read
as data.

The GEMM of ``precision="int8"`` where the CPU has AVX-512 VNNI (fastclip/backends/int8.py chooses; fbgemm's
``linear_dynamic`` elsewhere until the AVX2 paths are measured against it on an AVX2-only CPU). Outputs come
from the reused buffers of fastclip/backends/cpu/buffers.py.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ... import _C
from . import buffers
from .common import ACT_CODES

PANEL = 16  # output columns per panel
K_GROUP = 4  # k values per 4-byte group
MAX_K = 65536  # int32 sums stay exact: 255 * 128 * 65536 < 2^31
WEIGHT_LEVELS = 127  # symmetric int8 weights: -127..127
# The largest quantised activation per path (u8 on VNNI, u7 where vpmaddubsw's int16 pair sums would saturate).
LEVELS = {"avx512_vnni": 255, "avx512": 127, "avx_vnni": 255, "avx2": 127}
MIN_ACT_SCALE = 1e-30  # csrc/linear_int8.cpp's kMinScale: an all-zero row quantises to q = z = 0
# (set_avx512, set_vnni) that select each path where the CPU has it
_SWITCHES = {"avx512_vnni": (True, True), "avx512": (True, False), "avx_vnni": (False, True), "avx2": (False, False)}


def available() -> bool:
    """True if this CPU runs the kernel (AVX2 + FMA at least)."""
    return _C.linear_int8_path() != ""


_AVAILABLE = available()  # the CPU's (the switches only move between paths)


def path() -> str:
    """The path the kernel runs now: "avx512_vnni", "avx512", "avx_vnni", "avx2", or "" (no AVX2/FMA)."""
    return _C.linear_int8_path()


def levels(name: str | None = None) -> int:
    """The largest quantised activation value of path ``name`` (default: the active one): 255 or 127."""
    return LEVELS[name or path()]


@contextlib.contextmanager
def use_path(name: str) -> Iterator[None]:
    """Run ``name`` in the block (tests, benchmarks); ValueError if this CPU (or FASTCLIP_DISABLE_*) cannot."""
    avx512, vnni = _SWITCHES[name]
    was_avx512, was_vnni = _C.set_avx512(avx512), _C.linear_int8_set_vnni(vnni)
    try:
        if path() != name:
            raise ValueError(f"linear_int8: path {name!r} does not run here (this CPU gets {path()!r})")
        yield
    finally:
        _C.set_avx512(was_avx512)
        _C.linear_int8_set_vnni(was_vnni)


def paths() -> list[str]:
    """Every path this CPU runs (the switches' four settings), the default one first."""
    found = [path()] if available() else []
    for name in _SWITCHES:
        with contextlib.suppress(ValueError), use_path(name):
            found += [name] if name not in found else []
    return found


@dataclass(frozen=True)
class Int8Pack:
    """An (N, K) weight quantised and packed for ``linear_int8``.

    packed: int8 (ceil(N/16) * ceil(K/4) * 64,); w_scale, bias: fp32 (16 * ceil(N/16),); colsum: int32, the same
    size; padding is zero. ``qweight`` (N, K) int8 (W ~ w_scale[:N, None] * qweight), kept for references, or
    None where the packer dropped it (``keep_qweight=False``)."""

    packed: torch.Tensor
    w_scale: torch.Tensor
    colsum: torch.Tensor
    bias: torch.Tensor
    qweight: torch.Tensor | None
    N: int
    K: int
    ptrs: tuple[int, int, int, int] = field(init=False, repr=False, compare=False)  # the kernel's operands

    def __post_init__(self):
        object.__setattr__(self, "ptrs", (self.packed.data_ptr(), self.w_scale.data_ptr(), self.colsum.data_ptr(),
                                          self.bias.data_ptr()))

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per call besides x (the packed weight and the per-column vectors)."""
        return self.packed.numel() + 12 * self.w_scale.numel()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) fp32 -> (int8 (N, K) in -127..127, fp32 (N,) scales); an all-zero row gets scale 1."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / WEIGHT_LEVELS, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-WEIGHT_LEVELS, WEIGHT_LEVELS).to(torch.int8)
    return q, scale


def pack_int8_quantized(qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                        keep_qweight: bool = True) -> Int8Pack:
    """Pack an already quantised weight: ``qweight`` (N, K) int8 (any of -128..127), ``w_scale`` (N,), ``bias``
    (N,) or None; the layer is ``x @ (w_scale[:, None] * qweight).T + bias``. ``keep_qweight=False`` leaves
    ``qweight`` out of the pack (a model's packs: the kernel reads only ``packed``)."""
    if qweight.ndim != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"pack_int8: qweight must be (N, K) int8, got {tuple(qweight.shape)} {qweight.dtype}")
    N, K = qweight.shape
    if N == 0 or not 0 < K <= MAX_K:
        raise ValueError(f"pack_int8: need N > 0 and 0 < K <= {MAX_K}, got ({N}, {K})")
    if tuple(w_scale.shape) != (N,) or (bias is not None and tuple(bias.shape) != (N,)):
        raise ValueError(f"pack_int8: w_scale and bias must be ({N},)")
    q = qweight.detach().cpu()
    P, G = -(-N // PANEL), -(-K // K_GROUP)
    padded = torch.zeros(P * PANEL, G * K_GROUP, dtype=torch.int8)
    padded[:N, :K] = q
    # (P, 16, G, 4) -> (P, G, 16, 4): panel p, group g holds 16 columns x 4 consecutive k
    packed = padded.view(P, PANEL, G, K_GROUP).permute(0, 2, 1, 3).contiguous().view(-1)

    def pad(v: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(P * PANEL, dtype=dtype)
        if v is not None:
            out[:N] = v.detach().cpu()
        return out

    return Int8Pack(packed=packed, w_scale=pad(w_scale.float(), torch.float32),
                    colsum=pad(q.sum(1, dtype=torch.int32), torch.int32), bias=pad(bias, torch.float32),
                    qweight=q.contiguous() if keep_qweight else None, N=N, K=K)


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Pack:
    """Quantise (``quantize_weight``) and pack ``weight`` (N, K) fp32 and ``bias`` (N,) or None once."""
    if weight.ndim != 2:
        raise ValueError(f"pack_int8: weight must be (N, K), got {tuple(weight.shape)}")
    q, scale = quantize_weight(weight)
    return pack_int8_quantized(q, scale, bias)


def linear_int8(x: torch.Tensor, pack: Int8Pack, act: str = "none", x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """act((x * x_scale) @ W^T + bias) in int8: x (..., K) fp32 CPU -> (..., N) fp32, act in
    none/gelu/gelu_tanh/quick_gelu; ``x_scale``: (K,) fp32 per-channel input scales applied as each row is
    quantised (run-time smoothing), or None. Each row of x gets its own scale; a row with NaN or inf gives
    NaN outputs."""
    code = ACT_CODES.get(act)
    if code is None:
        raise ValueError(f"linear_int8: unknown activation {act!r} (have {sorted(ACT_CODES)})")
    if x.dtype != torch.float32 or not x.is_cpu or x.layout != torch.strided:
        raise TypeError(f"linear_int8: x must be a strided fp32 CPU tensor, got {x.dtype} on {x.device}")
    shape = x.shape
    if not shape or shape[-1] != pack.K:
        raise ValueError(f"linear_int8: x (..., {pack.K}) expected, got {tuple(shape)}")
    if not _AVAILABLE:
        raise RuntimeError("linear_int8: this CPU lacks AVX2/FMA")
    if x_scale is not None and (x_scale.shape != (pack.K,) or x_scale.dtype != torch.float32 or not x_scale.is_cpu
                                or not x_scale.is_contiguous()):
        raise ValueError(f"linear_int8: x_scale must be a contiguous ({pack.K},) fp32 CPU tensor")
    x2 = x if len(shape) == 2 else x.reshape(-1, pack.K)  # (M, K): a view where the layout allows
    if x2.stride(1) != 1 and pack.K > 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = buffers.empty((M, pack.N))
    if M > 0:
        sx = x2.stride(0) if M > 1 else pack.K  # a single row's stride is arbitrary; 0 (a broadcast row) is fine
        packed, w_scale, colsum, bias = pack.ptrs
        _C.linear_int8(x=x2.data_ptr(), sx=sx, packed=packed, w_scale=w_scale, colsum=colsum, bias=bias,
                       y=y.data_ptr(), sy=pack.N, M=M, N=pack.N, K=pack.K, act=code,
                       x_scale=0 if x_scale is None else x_scale.data_ptr())
    return y if len(shape) == 2 else y.view(*shape[:-1], pack.N)
