"""Fused bias + activation (Triton): y = act(x + bias), computed in fp32, stored in x's dtype.

    y = bias_act(x, bias, act)      # x: (..., N), bias: (N,) or None, act in ACTIVATIONS

Reference: ``fastclip.ref.bias_act``. The MLP of every block calls ``linear`` without its bias (a
cuBLAS GEMM) and then this op, so the bias add and the activation cost one read and one write of the
(tokens, mlp_width) activation instead of three of each.

Activations (all in fp32, one rounding to the output dtype):
- ``gelu``: x * 0.5 * (1 + erf(x / sqrt(2)))      (torch.nn.functional.gelu)
- ``gelu_tanh``: 0.5 * x * (1 + tanh(u)) with u = sqrt(2/pi) * (x + 0.044715 x^3), written as
  x * sigmoid(2u), the same function without a tanh intrinsic and without overflow for large |x|
- ``quick_gelu``: x * sigmoid(1.702 x)            (OpenAI CLIP)
- ``none``: x (+ bias)
- ``swiglu`` (gated): x = [gate; value] halves of the last dim (N = 2 x output width), y = silu(gate) * value
  (EVA-02's SwiGLU MLP: one fc1 GEMM of both halves, then this op)

Tiling heuristic (no autotune; an elementwise op is memory-bound and its best tile is predictable):
each program handles a (BLOCK_M, BLOCK_N) tile, grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), so the
bias column index needs no integer modulo. BLOCK_N = min(next_power_of_2(N), 512): a 512-column row
segment is 1 KiB in fp16, two full 512-byte warp transactions, and a width that is not a multiple
(SO400M's 4304) wastes at most one partly-masked tile per row band (~6 %). BLOCK_M = 4096 // BLOCK_N
keeps 4096 elements per program = 32 per thread at 4 warps = 4 x 16-byte vector loads in fp16, enough
bytes in flight to saturate HBM on A100/H100 once there are a few waves (ViT-B/16 at batch 256:
50k x 3072 -> ~38k programs). num_stages is irrelevant (no loop): 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpret_bf16, interpreting, round_to

# The activations of fastclip.ref.ACTIVATION_TABLE this kernel implements (all of them; "swiglu" gated).
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu", "swiglu")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _bias_act_kernel(
    X,  # (M, N) input (gated: (M, 2N) rows [gate; value]), row stride stride_x, unit column stride
    Bias,  # (N,) bias (gated: (2N,)) (any float dtype; unused unless HAS_BIAS)
    Y,  # (M, N) output, contiguous, x's dtype
    M, N,  # rows, output columns
    stride_x,  # row stride of X (elements)
    ACT: tl.constexpr,  # "none" | "gelu" | "gelu_tanh" | "quick_gelu" | "swiglu"
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,  # interpreter-only bf16 rounding fix (see round_to)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)  # tokens x mlp_width exceeds 2**31 at large batch
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == "swiglu":
        u = tl.load(X + rows64[:, None] * stride_x + N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u = u + tl.load(Bias + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x = x * tl.sigmoid(x) * u
    elif ACT == "gelu":
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) * (x + 0.044715 x^3)
        x = x * tl.sigmoid(2.0 * u)  # 0.5 * (1 + tanh(u)) == sigmoid(2u)
    elif ACT == "quick_gelu":
        x = x * tl.sigmoid(1.702 * x)
    tl.store(Y + rows64[:, None] * N + cols[None, :], round_to(x, Y.dtype.element_ty, INTERPRET_BF16), mask=mask)


def block_config(width: int) -> dict:
    """Launch parameters for a row width (see the module docstring for the rationale)."""
    block_n = min(triton.next_power_of_2(width), 512)
    return {"BLOCK_M": max(1, 4096 // block_n), "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}


def _check(x: torch.Tensor, bias, act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"bias_act: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("bias_act: x must have at least one dim (..., N), got a 0-d tensor")
    if x.device.type != "cuda" and not (interpreting() and x.device.type == "cpu"):
        raise ValueError(f"bias_act: x is on {x.device}; the Triton kernel needs a CUDA tensor "
                         "(or a CPU tensor with TRITON_INTERPRET=1)")
    if act == "swiglu" and x.shape[-1] % 2:
        raise ValueError(f"bias_act: gated activation 'swiglu' needs an even last dim (gate, value), got {x.shape[-1]}")
    if bias is not None:
        if bias.shape != (x.shape[-1],):
            raise ValueError(f"bias_act: bias must have shape ({x.shape[-1]},) to match x's last dim, "
                             f"got {tuple(bias.shape)}")
        if bias.device != x.device or not bias.is_floating_point():
            raise ValueError(f"bias_act: bias must be a float tensor on {x.device}, got {bias.dtype} on {bias.device}")


def _launch(x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    _check(x, bias, act)
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], x2.shape[1] // 2 if act == "swiglu" else x2.shape[1]  # N: output columns
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel():
        cfg = block_config(N)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
        _bias_act_kernel[grid](
            x2, bias if bias is not None else x2, y, M, N, x2.stride(0),
            ACT=act, HAS_BIAS=bias is not None,
            INTERPRET_BF16=interpret_bf16(x.dtype), **cfg,
        )
    return y.view(*x.shape[:-1], N)


@torch.library.custom_op("fastclip::bias_act", mutates_args=())
def _bias_act_op(x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    return _launch(x, bias, act)


@_bias_act_op.register_fake
def _(x, bias, act):
    width = x.shape[-1] // 2 if act == "swiglu" else x.shape[-1]
    return x.new_empty((*x.shape[:-1], width))


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False) -> torch.Tensor:
    """act(x + bias).  x: (..., N), bias: (N,) or None -> (..., N) in x's dtype, or (..., N/2) for the
    gated ``swiglu`` (silu of the first half times the second).

    The kernel always computes in fp32; ``upcast`` (the reference ops' test switch) is accepted for
    signature compatibility and changes nothing.
    """
    return _bias_act_op(x, bias, act)


def _compile_specs() -> list[dict]:
    """Every (dtype, activation) variant at the CLIP MLP widths' tile, for the sm_80/sm_90 compile checks."""
    specs = []
    cfg = block_config(3072)  # every MLP width >= 512 gets the same tile
    for dtype in ("fp32", "fp16", "bf16"):
        for act in ACTIVATIONS:
            specs.append({
                "name": f"bias_act_{dtype}_{act}",
                "kernel": _bias_act_kernel,
                "signature": {"X": f"*{dtype}", "Bias": f"*{dtype}", "Y": f"*{dtype}", "M": "i32", "N": "i32",
                              "stride_x": "i32"},
                "constexprs": {"ACT": act, "HAS_BIAS": True, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                               "INTERPRET_BF16": False},
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                "aligned": ["X", "Bias", "Y", "N", "stride_x"],  # as the JIT marks them at MLP widths
            })
    return specs


COMPILE_SPECS = _compile_specs()
