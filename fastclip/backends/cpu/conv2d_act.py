"""``conv2d_act`` of the cpu backend: oneDNN's convolution through torch (``torch.ops.mkldnn``), the bias,
residual add and ReLU fused into it.

``torch.ops.mkldnn._convolution_pointwise`` (unary post-op ``relu``) and its ``.binary`` overload (post-ops
``add`` of the residual, then ``relu``) are the calls inductor's CPU fusion makes for conv + add + ReLU: the
output is written once, instead of a convolution then one or two elementwise passes over it. ``FUSED`` picks
them over plain ``F.conv2d`` + in-place ``add_`` / ``relu_``; ``PACK_WEIGHTS`` additionally hands oneDNN
weights reordered once into its blocked layout (``torch.ops.mkldnn._reorder_convolution_weight``, kept per
weight version in a ``DerivedWeights`` cache, fastclip/backends/weight_packs.py). ``bench/bench_conv2d_act.py``
runs the three variants at RN50's shapes in one session. On a 2-core AMD EPYC (Zen 4, AVX-512), fused on packed
weights against plain: at batch 1, 1.0-1.2x on the stem and layers 1-3 and 2.2-4.0x on layer 4 (7 x 7 maps,
where reordering a 2048-channel weight on every call costs more than the convolution); at batch 32, 0.96-1.16x
(layer 1's 1x1 + residual 0.87x). So the default is fused and packed. All three give the same sums (one oneDNN
kernel); tests/test_resnet.py checks each against the reference op.

Inputs the fused call does not take (non-fp32, autograd, oneDNN missing, ``upcast``) run ``ref.conv2d_act``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import ref
from ..weight_packs import DerivedWeights
from .common import native

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
FUSED = True  # oneDNN post-ops (bias, residual add, ReLU) in the convolution; False: F.conv2d + add_ / relu_
PACK_WEIGHTS = True  # weights reordered once into oneDNN's blocked layout (only with FUSED)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _pack(weight: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """(C', C, kh, kw) fp32 weight -> its oneDNN-blocked copy for ``geometry`` = (stride, padding, input size
    (1, C, H, W)). One copy serves every batch size: the batch of the size hint changed neither the results nor
    the speed (within 6%) of RN50's convolutions at batch 1 and 32, so the cache holds one copy per weight and map
    size, not per batch size."""
    stride, padding, size = geometry
    return torch.ops.mkldnn._reorder_convolution_weight(weight.detach().contiguous(), list(padding), list(stride),
                                                       [1, 1], 1, list(size))


PACKS = DerivedWeights(_pack)


def takes(x: torch.Tensor, weight: torch.Tensor, bias, residual, act: str, upcast: bool) -> bool:
    """The fused oneDNN call can run these operands (else the reference op runs, and raises for bad ones)."""
    if upcast or not AVAILABLE or act not in ref.CONV_ACTS or not native(x, weight, bias, residual):
        return False
    return x.ndim == 4 and weight.ndim == 4 and x.shape[1] == weight.shape[1] and (bias is None or bias.ndim == 1)


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, act: str,
               residual: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """act(conv2d(x, weight) + bias + residual).  x: (B, C, H, W) channels-last, weight: (C', C, kh, kw),
    bias: (C',) or None, residual: (B, C', H', W') or None -> (B, C', H', W') channels-last (see fastclip.ref)."""
    if not takes(x, weight, bias, residual, act, upcast):
        return ref.conv2d_act(x, weight, bias, stride, padding, act, residual, upcast=upcast)
    x = x.contiguous(memory_format=torch.channels_last)
    stride, padding = _pair(stride), _pair(padding)
    if residual is not None:
        out_hw = [(x.shape[2 + i] + 2 * padding[i] - weight.shape[2 + i]) // stride[i] + 1 for i in range(2)]
        if tuple(residual.shape) != (x.shape[0], weight.shape[0], *out_hw):
            return ref.conv2d_act(x, weight, bias, stride, padding, act, residual)  # raises the shape error
        residual = residual.contiguous(memory_format=torch.channels_last)
    if not FUSED:
        y = F.conv2d(x, weight, bias, stride, padding)  # (B, C', H', W') channels-last
        if residual is not None:
            y.add_(residual)
        return y.relu_() if act == "relu" else y
    w = weight
    if PACK_WEIGHTS:
        packed = PACKS.get(weight, extra=(tuple(stride), tuple(padding), (1, *x.shape[1:])))
        w = packed if packed is not None else weight
    unary = "relu" if act == "relu" else None
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, w, bias, padding, stride, [1, 1], 1, unary or "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, w, bias, padding, stride, [1, 1], 1, "add", None,
                                                          unary, [], None)
