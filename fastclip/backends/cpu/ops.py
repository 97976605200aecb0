"""The cpu backend's op table (``fastclip.backends.dispatch.get_ops("cpu")`` calls ``op_table()``), as
kernels/ops.py is the triton backend's."""
from __future__ import annotations

import torch

from . import linear as fp32_linear
from . import linear_bf16
from .attention import attention  # first import of .common: ImportError where the kernels cannot run
from .bias_act import bias_act
from .conv2d_act import conv2d_act
from .encoder_block import encoder_block
from .layer_norm import layer_norm
from .normalize_project import normalize_project
from .rotary import rotary


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, upcast: bool = False):
    """y = x @ weight.T + bias.  x: (..., K), weight: (N, K), bias: (N,) -> (..., N): the fp32 kernels
    (fastclip/backends/cpu/linear.py), oneDNN's packed bf16 GEMM for bf16 operands (linear_bf16.py)."""
    if not upcast and linear_bf16.takes(x, weight, bias):
        return linear_bf16.linear_bf16(x, weight, bias)
    return fp32_linear.linear(x, weight, bias, upcast=upcast)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False):
    """act(x @ weight.T + bias).  x: (..., K), weight: (N, K), bias: (N,) or None -> (..., N); as ``linear``."""
    if not upcast and linear_bf16.takes(x, weight, bias):
        return linear_bf16.linear_act_bf16(x, weight, bias, act)
    return fp32_linear.linear_act(x, weight, bias, act, upcast=upcast)


def op_table() -> dict:
    """{op name: C++-backed op} for the dispatcher (ops not listed here run the reference)."""
    return {"attention": attention, "layer_norm": layer_norm, "bias_act": bias_act,
            "normalize_project": normalize_project, "linear": linear, "linear_act": linear_act,
            "rotary": rotary, "conv2d_act": conv2d_act, "encoder_block": encoder_block}
