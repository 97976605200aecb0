"""Reference ops: plain, readable PyTorch. The source of truth for every fused kernel.

Every op takes ``upcast=False``; with ``upcast=True`` it computes in float32 and returns the input
dtype, which is what the tests use to build the fp32 reference for low-precision kernels.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """An activation of ``bias_act`` / ``linear_act`` / the MLPs, by name.

    ``gated``: the input's last dim holds two halves ``[gate, value]`` (..., 2N) and the result is
    ``fn(gate) * value`` (..., N) -- SwiGLU's packed layout (timm's ``SwiGLUPacked``, ``x.chunk(2)``), so a
    gated MLP is one ``linear_act`` over a (2N, K) weight, with no op of its own.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    gated: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.fn(x)
        if x.shape[-1] % 2:
            raise ValueError(f"gated activation {self.name!r} needs an even last dim (gate, value), got {x.shape[-1]}")
        gate, value = x.chunk(2, dim=-1)
        return self.fn(gate) * value


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# Every activation fastclip knows, declared once. Backends implement a subset (the C++ kernels export
# theirs as _C.activation_codes(), the Triton kernel lists its own) and run the others here.
ACTIVATION_TABLE: dict[str, Activation] = {a.name: a for a in (
    Activation("none", lambda x: x),
    Activation("gelu", F.gelu),
    Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    Activation("quick_gelu", _quick_gelu),
    Activation("swiglu", F.silu, gated=True),
)}
ACTIVATIONS = tuple(ACTIVATION_TABLE)


def _maybe_upcast(upcast: bool, *tensors):
    if not upcast:
        return tensors
    return tuple(None if t is None else t.float() for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, upcast: bool = False):
    """y = x @ weight.T + bias.  x: (..., K), weight: (N, K), bias: (N,) -> (..., N)."""
    dtype = x.dtype
    x, weight, bias = _maybe_upcast(upcast, x, weight, bias)
    return F.linear(x, weight, bias).to(dtype)


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """Activation by name (see ACTIVATION_TABLE).  x: (..., N) -> (..., N), or (..., N/2) if gated."""
    if act not in ACTIVATION_TABLE:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return ACTIVATION_TABLE[act](x)


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False) -> torch.Tensor:
    """act(x + bias).  x: (..., N), bias: (N,) or None -> (..., N), or (..., N/2) for a gated act."""
    dtype = x.dtype
    x, bias = _maybe_upcast(upcast, x, bias)
    if bias is not None:
        x = x + bias
    return activation(x, act).to(dtype)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False):
    """act(x @ weight.T + bias): ``bias_act(linear(x, weight), bias, act)``, which backends may fuse.

    x: (..., K), weight: (N, K), bias: (N,) or None -> (..., N), or (..., N/2) for a gated act.
    """
    return bias_act(linear(x, weight, None, upcast=upcast), bias, act, upcast=upcast)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None, upcast: bool = False):
    """LayerNorm over the last dim.  x: (..., D), weight/bias: (D,) -> (..., D), in x's dtype.

    With ``residual`` (same shape as x) the input is ``s = x + residual`` and the result is the pair
    ``(layer_norm(s), s)``, so a pre-norm block keeps its residual stream. Low-precision inputs are
    normalised in float32 (as OpenCLIP's LayerNormFp32 does).
    """
    if residual is not None:
        s = x + residual
        return layer_norm(s, weight, bias, eps, upcast=upcast), s
    dtype = x.dtype
    if upcast or dtype in (torch.float16, torch.bfloat16):
        x, weight, bias = x.float(), weight.float(), bias.float()
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, upcast: bool = False):
    """softmax(q k^T / sqrt(Dh) [+ causal mask]) v.

    q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh) -> (B, H, Lq, Dh). With ``causal``, query i sees keys
    0..i (Lq == Lk required).
    """
    dtype = q.dtype
    q, k, v = _maybe_upcast(upcast, q, k, v)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Lq, Lk)
    if causal:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"causal attention needs Lq == Lk, got {q.shape[-2]} and {k.shape[-2]}")
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(future, float("-inf"))
    # softmax in at least fp32: low-precision scores are upcast, float64 ones stay float64
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
    return torch.matmul(probs, v).to(dtype)


def normalize_project(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    proj: torch.Tensor | None,
    proj_bias: torch.Tensor | None = None,
    normalize: bool = False,
    upcast: bool = False,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final head of a tower: LayerNorm -> x @ proj (+ proj_bias) -> optional L2 normalisation.

    x: (B, W) pooled tokens, or (B, L, W) token states with ``index`` (B,) giving each row's pooled
    position (the norm is applied to the pooled rows only); proj: (W, E) or None (identity),
    proj_bias: (E,) -> (B, E).
    """
    if index is not None:
        x = x[torch.arange(x.shape[0], device=x.device), index]  # (B, W)
    dtype = x.dtype
    x, ln_weight, ln_bias, proj, proj_bias = _maybe_upcast(upcast, x, ln_weight, ln_bias, proj, proj_bias)
    y = layer_norm(x, ln_weight, ln_bias, eps)
    if proj is not None:
        y = y @ proj
    if proj_bias is not None:
        y = y + proj_bias
    if normalize:
        y = F.normalize(y, dim=-1)
    return y.to(dtype)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation.  x: (B, E) -> (B, E)."""
    return F.normalize(x, dim=-1)
