"""Fused LayerNorm over the last dim, with an optional residual add (Triton).

    y = layer_norm(x, weight, bias, eps)                       # y: x's shape and dtype
    y, s = layer_norm(x, weight, bias, eps, residual=r)        # s = x + r (the residual stream), y = LN(s)

Reference: ``fastclip.ref.layer_norm`` (statistics in fp32 for every input dtype, as OpenCLIP's
LayerNormFp32). With a residual, ``s`` is rounded to x's dtype first and normalised from that rounded
value, so the fused op equals the unfused ``s = x + r; y = ref.layer_norm(s, ...)`` of the model code.

Kernel layout: each program normalises ``BLOCK_M`` whole rows held in registers as a (BLOCK_M, BLOCK_N)
tile, BLOCK_N = next_power_of_2(width) with a column mask, so any width works (768, 1024, 1152, 1280,
1664, ...). Statistics use two passes over the registers (mean, then the centred sum of squares), which
is as accurate as torch's Welford and costs nothing extra in memory traffic.

Block heuristic (no autotune; LayerNorm is memory-bound and the best tile is predictable):
- BLOCK_N covers the row so each element is read once and written once (x [+ r] in, y [+ s] out):
  2 (with a residual, 4) passes over the tensor, the roofline minimum. Widths up to 16384 fit (a
  16384 fp32 row over 8 warps is 64 values per thread; ptxas: 146 registers, no spills).
- BLOCK_M = max(1, 4096 // BLOCK_N) rows per program: a 4096-element tile gives each of 128 threads 32
  elements = 4 x 16-byte vector loads in fp16, enough bytes in flight per SM to saturate HBM on
  A100 (2.0 TB/s, 108 SMs) and H100 (3.35 TB/s, 132 SMs) once the grid has a few waves. For CLIP
  widths (768-1664) this is 2-4 rows per program; ViT-B/16 at batch 256 has 50k rows -> >10k programs.
- num_warps 4 up to 4096-element tiles, 8 above (wide rows), so per-thread register use stays <= 64
  floats per live tile and there are no spills. num_stages is irrelevant (no loop to pipeline): 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpret_bf16, interpreting, round_to

MAX_WIDTH = 16384


@triton.jit
def _layer_norm_kernel(
    X,  # (M, N) input rows, row stride stride_x, unit column stride
    R,  # (M, N) residual rows (unused unless HAS_RESIDUAL)
    W,  # (N,) weight (any float dtype; unused unless HAS_WEIGHT)
    B,  # (N,) bias (unused unless HAS_BIAS)
    Y,  # (M, N) output, contiguous, x's dtype
    S,  # (M, N) output x + r, contiguous, x's dtype (unused unless HAS_RESIDUAL)
    M, N,  # rows, width
    stride_x, stride_r,  # row strides of X and R (elements)
    eps,  # float
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows per program, next_power_of_2(N)
    INTERPRET_BF16: tl.constexpr,  # interpreter-only bf16 rounding fix (see round_to)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)  # M * N can exceed 2**31 for big batches
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = round_to(x.to(tl.float32) + r.to(tl.float32), S.dtype.element_ty, INTERPRET_BF16)  # as torch's x + r
        tl.store(S + rows64[:, None] * N + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1) / N  # (BLOCK_M,)
    xc = tl.where(mask, xf - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], round_to(y, Y.dtype.element_ty, INTERPRET_BF16), mask=mask)


def block_config(width: int) -> dict:
    """Launch parameters for a row width (see the module docstring for the rationale)."""
    block_n = triton.next_power_of_2(width)
    block_m = max(1, 4096 // block_n)
    num_warps = 4 if block_m * block_n <= 4096 else 8
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": 1}


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, weight, bias, residual) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"layer_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x needs a non-empty last dim, got shape {tuple(x.shape)}")
    if x.device.type != "cuda" and not (interpreting() and x.device.type == "cpu"):
        raise ValueError(f"layer_norm: x is on {x.device}; the Triton kernel needs a CUDA tensor "
                         "(or a CPU tensor with TRITON_INTERPRET=1)")
    width = x.shape[-1]
    if width > MAX_WIDTH:
        raise ValueError(f"layer_norm: width {width} exceeds the single-block limit {MAX_WIDTH}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (width,):
            raise ValueError(f"layer_norm: {name} must have shape ({width},), got {tuple(p.shape)}")
        if p.device != x.device or not p.is_floating_point():
            raise ValueError(f"layer_norm: {name} must be a float tensor on {x.device}, got {p.dtype} on {p.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"layer_norm: residual must match x ({x.dtype} on {x.device}), "
                             f"got {residual.dtype} on {residual.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x, weight, bias, eps, residual):
    _check(x, weight, bias, residual)
    x2 = _rows(x)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    s = torch.empty((M, N), dtype=x.dtype, device=x.device) if residual is not None else y
    r2 = _rows(residual) if residual is not None else x2
    if M:
        cfg = block_config(N)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        _layer_norm_kernel[grid](
            x2, r2, weight if weight is not None else x2, bias if bias is not None else x2, y, s,
            M, N, x2.stride(0), r2.stride(0), float(eps),
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            INTERPRET_BF16=interpret_bf16(x.dtype), **cfg,
        )
    return y.view(x.shape), s.view(x.shape)


@torch.library.custom_op("fastclip::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _launch(x, weight, bias, eps, None)[0]


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastclip::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, weight, bias, eps, residual)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None, upcast: bool = False):
    """LayerNorm over the last dim.  x: (..., N), weight/bias: (N,) or None.

    Returns y (x's shape and dtype); with ``residual`` (x's shape and dtype) returns (y, x + residual)
    where y = LN(x + residual). ``upcast`` (the reference ops' test switch) computes from fp32 copies and
    returns x's dtype.
    """
    if upcast and x.dtype != torch.float32:
        out = layer_norm(x.float(), None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps,
                         None if residual is None else residual.float())
        return tuple(t.to(x.dtype) for t in out) if residual is not None else out.to(x.dtype)
    if residual is None:
        return _layer_norm_op(x, weight, bias, float(eps))
    return _add_layer_norm_op(x, residual, weight, bias, float(eps))


def _compile_specs() -> list[dict]:
    """Every (dtype, CLIP width, residual) variant the model launches, plus the widest row accepted,
    for the sm_80/sm_90 compile checks (kernels/compile_check.py)."""
    cases = [(d, w, r) for d in ("fp32", "fp16", "bf16") for w in (768, 1024, 1152, 1280, 1664) for r in (False, True)]
    cases += [("fp32", MAX_WIDTH, True), ("bf16", MAX_WIDTH, True)]
    specs = []
    for dtype, width, residual in cases:
        ty, cfg = f"*{dtype}", block_config(width)
        specs.append({
            "name": f"layer_norm_{dtype}_w{width}{'_residual' if residual else ''}",
            "kernel": _layer_norm_kernel,
            "signature": {"X": ty, "R": ty, "W": ty, "B": ty, "Y": ty, "S": ty, "M": "i32", "N": "i32",
                          "stride_x": "i32", "stride_r": "i32", "eps": "fp32"},
            "constexprs": {"HAS_RESIDUAL": residual, "HAS_WEIGHT": True, "HAS_BIAS": True,
                           "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "INTERPRET_BF16": False},
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            # 16-byte aligned pointers and the multiple-of-16 ints the JIT marks so at CLIP widths
            "aligned": ["X", "R", "W", "B", "Y", "S", "N", "stride_x", "stride_r"],
        })
    return specs


COMPILE_SPECS = _compile_specs()
