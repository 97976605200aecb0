"""Rotary position embedding (Triton) of q or k, interleaved pairs, computed in fp32, stored in x's dtype.

    y = rotary(x, cos, sin, start)   # x: (B, H, L, Dh), cos / sin: (L - start, Dh/2)

Reference: ``fastclip.ref.rotary``: pair i of token l >= start (channels 2i, 2i+1) is rotated by its
angle, ``(x0 cos - x1 sin, x1 cos + x0 sin)``; tokens before ``start`` (the class token) are copied.

x may be any strided view with a unit stride on Dh (q or k of the packed qkv projection): the kernel reads
it in place and writes a (B, L, H, Dh) buffer, returned as its (B, H, L, Dh) view (the projection's own
layout, which the attention kernel reads as it reads q / k). One program per (batch, BLOCK_L tokens,
head): a (BLOCK_L, Dh/2) tile of even channels and one of odd channels, loaded with stride 2; the op is
memory-bound and each element is read and written once. BLOCK_L = 4096 // next_power_of_2(Dh) keeps
~4096 elements per program at 4 warps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpret_bf16, interpreting, round_to

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotary_kernel(
    X,  # (B, H, L, D) input, strides stride_xb / stride_xh / stride_xl, unit stride on D
    Cos, Sin,  # (L - start, D/2) contiguous fp32 angles' cosines and sines
    Y,  # (B, L, H, D) output, contiguous, x's dtype
    H, L, start,  # heads, tokens, tokens before the rotated ones
    stride_xb, stride_xh, stride_xl,  # element strides of X
    HALF: tl.constexpr,  # D / 2
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,  # tokens per program, next_power_of_2(HALF)
    INTERPRET_BF16: tl.constexpr,  # interpreter-only bf16 rounding fix (see round_to)
):
    b, h = tl.program_id(0) // H, tl.program_id(0) % H
    tok = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    pair = tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    mask = (tok < L)[:, None] & (pair < HALF)[None, :]  # (BLOCK_L, BLOCK_P)
    tok64 = tok.to(tl.int64)
    x_ptr = X + b.to(tl.int64) * stride_xb + h * stride_xh + tok64[:, None] * stride_xl + 2 * pair[None, :]
    x0 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_L, BLOCK_P) even channels
    x1 = tl.load(x_ptr + 1, mask=mask, other=0.0).to(tl.float32)  # odd channels
    rot = tok >= start  # (BLOCK_L,) tokens with an angle
    a_off = (tok64 - start)[:, None] * HALF + pair[None, :]
    a_mask = mask & rot[:, None]
    c = tl.load(Cos + a_off, mask=a_mask, other=1.0)  # cos 1, sin 0: the copied tokens
    s = tl.load(Sin + a_off, mask=a_mask, other=0.0)
    y0 = x0 * c - x1 * s
    y1 = x1 * c + x0 * s
    y_ptr = Y + ((b.to(tl.int64) * L + tok64[:, None]) * H + h) * (2 * HALF) + 2 * pair[None, :]
    tl.store(y_ptr, round_to(y0, Y.dtype.element_ty, INTERPRET_BF16), mask=mask)
    tl.store(y_ptr + 1, round_to(y1, Y.dtype.element_ty, INTERPRET_BF16), mask=mask)


def block_config(head_width: int) -> dict:
    """Launch parameters for a head width (see the module docstring)."""
    block_p = triton.next_power_of_2(max(head_width // 2, 1))
    return {"BLOCK_L": max(1, 2048 // block_p), "BLOCK_P": block_p, "num_warps": 4, "num_stages": 1}


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"rotary: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotary: x must be (B, H, L, Dh) with an even Dh, got {tuple(x.shape)}")
    L, D = x.shape[2:]
    if not 0 <= start <= L or tuple(cos.shape) != (L - start, D // 2) or cos.shape != sin.shape:
        raise ValueError(f"rotary: x {tuple(x.shape)} with start {start} needs cos and sin of shape "
                         f"({L - start}, {D // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if x.device.type != "cuda" and not (interpreting() and x.device.type == "cpu"):
        raise ValueError(f"rotary: x is on {x.device}; the Triton kernel needs a CUDA tensor "
                         "(or a CPU tensor with TRITON_INTERPRET=1)")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"rotary: cos and sin must be on {x.device}, got {cos.device} and {sin.device}")


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
    """-> (B, L, H, D) contiguous."""
    _check(x, cos, sin, start)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, L, D = x.shape
    y = torch.empty((B, L, H, D), dtype=x.dtype, device=x.device)
    if y.numel():
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        cfg = block_config(D)
        grid = (B * H, triton.cdiv(L, cfg["BLOCK_L"]))
        _rotary_kernel[grid](x, cos, sin, y, H, L, start, x.stride(0), x.stride(1), x.stride(2), HALF=D // 2,
                             INTERPRET_BF16=interpret_bf16(x.dtype), **cfg)
    return y


@torch.library.custom_op("fastclip::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
    return _launch(x, cos, sin, start)


@_rotary_op.register_fake
def _(x, cos, sin, start):
    B, H, L, D = x.shape
    return x.new_empty((B, L, H, D))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0, upcast: bool = False) -> torch.Tensor:
    """x: (B, H, L, Dh), cos / sin: (L - start, Dh/2) -> (B, H, L, Dh) in x's dtype (see the module docstring).

    The kernel always computes in fp32; ``upcast`` is accepted for signature compatibility and changes nothing.
    """
    return _rotary_op(x, cos, sin, start).transpose(1, 2)  # (B, L, H, Dh) -> its (B, H, L, Dh) view


def _compile_specs() -> list[dict]:
    """Every dtype at the head widths of the rotary towers (EVA-02 B 64, L 64, E 112; PE-Core 64 / 96 / 88)."""
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for head_width in (64, 88, 96, 112):
            cfg = block_config(head_width)
            specs.append({
                "name": f"rotary_{dtype}_d{head_width}",
                "kernel": _rotary_kernel,
                "signature": {"X": f"*{dtype}", "Cos": "*fp32", "Sin": "*fp32", "Y": f"*{dtype}", "H": "i32",
                              "L": "i32", "start": "i32", "stride_xb": "i32", "stride_xh": "i32", "stride_xl": "i32"},
                "constexprs": {"HALF": head_width // 2, "BLOCK_L": cfg["BLOCK_L"], "BLOCK_P": cfg["BLOCK_P"],
                               "INTERPRET_BF16": False},
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                "aligned": ["X", "Cos", "Sin", "Y", "stride_xb", "stride_xh", "stride_xl"],
            })
    return specs


COMPILE_SPECS = _compile_specs()
