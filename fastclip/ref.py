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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, upcast: bool = False,
              key_mask: torch.Tensor | None = None, rotary: tuple | None = None):
    """softmax(q k^T / sqrt(Dh) [+ causal mask] [+ key mask]) v.

    q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh) -> (B, H, Lq, Dh). With ``causal``, query i sees keys
    0..i (Lq == Lk required). ``key_mask``: (B, Lk) bool, True = a real key; the others are seen by no
    query (padding). A query that sees no key at all gets zeros (as the flash kernels give).
    ``rotary``: (cos, sin, start), each (at least max(Lq, Lk) - start, Dh/2): q and k rotated first by
    ``rotary_positions`` (query / key i at position i), which backends fuse into the attention kernel.
    """
    if rotary is not None:
        q, k = rotary_positions(q, *rotary), rotary_positions(k, *rotary)
    dtype = q.dtype
    q, k, v = _maybe_upcast(upcast, q, k, v)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Lq, Lk)
    if causal:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"causal attention needs Lq == Lk, got {q.shape[-2]} and {k.shape[-2]}")
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(future, float("-inf"))
    if key_mask is not None:
        B, Lk = q.shape[0], k.shape[-2]
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, Lk):
            raise ValueError(f"attention: key_mask must be a bool tensor of shape (B, Lk) = {(B, Lk)}, "
                             f"got {key_mask.dtype} {tuple(key_mask.shape)}")
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))  # (B, 1, 1, Lk) broadcast
    # softmax in at least fp32: low-precision scores are upcast, float64 ones stay float64
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
    if key_mask is not None:  # rows with every score -inf (no visible key) are NaN: make them zeros
        probs = probs.masked_fill((scores == float("-inf")).all(-1, keepdim=True), 0.0)
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


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0, upcast: bool = False) -> torch.Tensor:
    """Rotary position embedding on the tokens ``start:`` of q or k, in the interleaved pair layout.

    x: (B, H, L, Dh); cos / sin: (L - start, Dh/2), the angle of each (token, pair) -> (B, H, L, Dh) in x's
    dtype. Pair i of a token is the channels (2i, 2i+1), rotated by its angle a:
    ``(x[2i] cos a - x[2i+1] sin a, x[2i+1] cos a + x[2i] sin a)``; tokens before ``start`` (class token)
    pass unchanged. Products are made in the promoted dtype of x and cos/sin (timm's apply_rot_embed).
    """
    L, Dh = x.shape[-2:]
    if Dh % 2 or tuple(cos.shape) != (L - start, Dh // 2) or cos.shape != sin.shape:
        raise ValueError(f"rotary: x {tuple(x.shape)} with start {start} needs cos and sin of shape "
                         f"({L - start}, {Dh // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    dtype = x.dtype
    rest = x[..., start:, :].unflatten(-1, (Dh // 2, 2))  # (B, H, L - start, Dh/2, 2)
    if upcast:
        rest, cos, sin = rest.float(), cos.float(), sin.float()
    x0, x1 = rest.unbind(-1)  # (B, H, L - start, Dh/2) each
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).to(dtype)
    return torch.cat([x[..., :start, :], rotated], dim=-2)


def rotary_positions(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, op=None) -> torch.Tensor:
    """``rotary`` of x (B, H, L, Dh) whose token i sits at position i, with angles for positions ``start``
    onward: cos / sin (N, Dh/2), N >= L - start rows (a pooled query, L = 1 < start, passes unchanged).
    ``op``: a backend's rotary op in place of this module's."""
    L = x.shape[-2]
    first = min(start, L)
    if cos.shape[0] < L - first:
        raise ValueError(f"rotary: {L} tokens from position {start} need {L - first} rows of angles, got {cos.shape[0]}")
    return (op or rotary)(x, cos[:L - first], sin[:L - first], start=first)


def _antialias_bilinear_weights(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) float32 weights of a 1-D ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=True)`` resize: a triangle filter widened by the downscale factor, each row summing to 1."""
    scale = size_in / size_out
    support = max(scale, 1.0)
    center = (torch.arange(size_out, dtype=torch.float32) + 0.5) * scale  # (size_out,) in source pixel units
    source = torch.arange(size_in, dtype=torch.float32) + 0.5  # (size_in,) source pixel centres
    weights = (1 - (source[None, :] - center[:, None]).abs() / support).clamp(min=0)  # (size_out, size_in)
    return weights / weights.sum(-1, keepdim=True)


def resample_positions(grid: torch.Tensor, spatial_shapes: torch.Tensor, max_length: int,
                       upcast: bool = False) -> torch.Tensor:
    """A learned position grid resized to each image's patch grid (SigLIP 2 NaFlex), padded.

    grid: (Gh, Gw, W); spatial_shapes: (B, 2) int, the (h, w) patches of each image, h * w <= max_length
    -> (B, max_length, W) in grid's dtype: row b holds the grid resized to (h, w) by antialiased bilinear
    interpolation (``F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)``) in
    float32, flattened row-major, then its first row repeated over the padding (as transformers'
    ``Siglip2VisionEmbeddings.resize_positional_embeddings``). ``upcast`` is accepted for the op signature
    (the resize always runs in float32).
    """
    if grid.ndim != 3 or spatial_shapes.ndim != 2 or spatial_shapes.shape[-1] != 2:
        raise ValueError(f"resample_positions: grid must be (Gh, Gw, W) and spatial_shapes (B, 2), got "
                         f"{tuple(grid.shape)} and {tuple(spatial_shapes.shape)}")
    shapes = [tuple(s) for s in spatial_shapes.tolist()]
    bad = [s for s in shapes if min(s) < 1 or s[0] * s[1] > max_length]
    if bad:
        raise ValueError(f"resample_positions: every (h, w) must be positive with h * w <= max_length "
                         f"{max_length}, got {bad}")
    Gh, Gw, W = grid.shape
    flat = grid.float()
    out = torch.empty(len(shapes), max_length, W, dtype=torch.float32, device=grid.device)
    resized: dict[tuple[int, int], torch.Tensor] = {}
    for b, (h, w) in enumerate(shapes):
        if (h, w) not in resized:
            wy = _antialias_bilinear_weights(Gh, h).to(grid.device)  # (h, Gh)
            wx = _antialias_bilinear_weights(Gw, w).to(grid.device)  # (w, Gw)
            resized[h, w] = torch.einsum("hi,ijc,wj->hwc", wy, flat, wx).reshape(h * w, W)  # (h*w, W)
        r = resized[h, w]
        out[b, : h * w] = r
        out[b, h * w:] = r[0]
    return out.to(grid.dtype)


# activations ``conv2d_act`` takes (the ResNet towers' convolutions: ReLU or none)
CONV_ACTS = ("none", "relu")


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, act: str,
               residual: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding) + bias + residual), channels-last.

    x: (B, C, H, W) (channels-last memory format; another layout is converted), weight: (C', C, kh, kw),
    bias: (C',) or None, stride / padding: int or (sh, sw) / (ph, pw), residual: (B, C', H', W') or None,
    act in ``CONV_ACTS`` -> (B, C', H', W') in x's dtype, channels-last memory format.
    """
    if act not in CONV_ACTS:
        raise ValueError(f"conv2d_act: activation {act!r} is not one of {CONV_ACTS}")
    if x.ndim != 4 or weight.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d_act: x must be (B, C, H, W) and weight (C', C, kh, kw) with the same C, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    dtype = x.dtype
    x, weight, bias, residual = _maybe_upcast(upcast, x, weight, bias, residual)
    y = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, stride, padding)  # (B, C', H', W')
    if residual is not None:
        if residual.shape != y.shape:
            raise ValueError(f"conv2d_act: residual {tuple(residual.shape)} does not match the output "
                             f"{tuple(y.shape)}")
        y = y + residual
    if act == "relu":
        y = torch.relu(y)
    return y.to(dtype).contiguous(memory_format=torch.channels_last)
