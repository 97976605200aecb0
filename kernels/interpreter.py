"""Triton interpreter gaps (Triton 3.8, ``TRITON_INTERPRET=1`` on CPU tensors), handled in one place.

1. ``tl.dot`` on bf16 operands returns garbage -> ``mma_operand`` feeds the dot exact fp32 copies of
   the bf16 values (products of bf16 values are exact in fp32, as in the tensor cores).
2. fp32 -> bf16 casts truncate instead of rounding to nearest even -> ``round_to`` rounds by hand on
   the bits, as ``cvt.rn.bf16`` does on a GPU.

Kernels take one constexpr, ``INTERPRET_BF16``, which launchers set with ``interpret_bf16(dtype)``:
True only when interpreting bf16 data. Compiled kernels always get False, so the real bf16
tensor-core path is what the compile checks build and what runs on a GPU.
"""
import torch
import triton
import triton.language as tl
from triton import knobs


def interpreting() -> bool:
    """Kernels are being run by Triton's interpreter (TRITON_INTERPRET was set when Triton loaded)."""
    return bool(knobs.runtime.interpret)


def interpret_bf16(dtype: torch.dtype) -> bool:
    """The value of the INTERPRET_BF16 constexpr for data of ``dtype``."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def mma_operand(x, INTERPRET_BF16: tl.constexpr):
    """A tl.dot operand: unchanged, or an exact fp32 copy of bf16 data under the interpreter."""
    if INTERPRET_BF16:
        x = x.to(tl.float32)
    return x


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even (by hand for bf16 under the interpreter)."""
    if INTERPRET_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
