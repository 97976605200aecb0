"""MobileCLIP's convolutional patch stem (timm's ``ConvStem`` of ``vit_base_mci_224``, MobileCLIP2-B), the
patch embedding of an EVA-tower (type ``timm``, fastclip/models/eva.py) trunk with ``EvaConfig.stem``.

timm's stem is a chain of stages, each a convolution whose kernel equals its stride (no padding), then --
on every stage but the last -- BatchNorm and GELU; the last convolution has a bias and no norm. For
vit_base_mci_224: 3 -> 192 (4x4 / 4), 192 -> 192 (2x2 / 2), 192 -> 768 (2x2 / 2): a 16x16 patch per token.

A stage is one GEMM over the non-overlapping k x k cells of the previous stage's feature map (as the
ViT's patch embedding is), run through ``ops.linear_act`` with GELU (``ops.linear`` on the last stage);
the GELUs between stages are why the chain cannot be one convolution. BatchNorm in inference mode is an
affine map per channel, folded into its convolution's weight and bias (and the pixel normalisation into
the first one, as in vit.py) once per version of the weights (fastclip/backends/weight_packs.py).

Parameter and buffer names are timm's: ``backbone.{i}.conv.{weight, bias}``, ``backbone.{i}.bn.{weight,
bias, running_mean, running_var, num_batches_tracked}``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backends.dispatch import OpTable
from ..backends.weight_packs import DerivedWeights
from .vit import PixelNorm, fold_pixel_norm

BN_EPS = 1e-5  # timm's BatchNorm2d (BatchNormAct2d) default


def _fold(weight, bias, gamma, beta, mean, var, pixel_norm: PixelNorm | None = None):
    """One stage's (weight (C', C, k, k), bias (C',)) with the pixel normalisation (first stage) and the
    inference-mode BatchNorm (gamma, beta, mean, var (C',), or all None) folded in, in the weight's dtype:
    bn(conv(w, norm(x)) + b) == conv(w', x) + b'. Made outside inference mode (see vit.py)."""
    with torch.inference_mode(False), torch.no_grad():
        if pixel_norm is not None:
            w, b = fold_pixel_norm(weight, bias, pixel_norm)  # float32
        else:
            w, b = weight.float(), (bias.float() if bias is not None else None)
        if gamma is not None:
            scale = gamma.float() / torch.sqrt(var.float() + BN_EPS)  # (C',)
            shift = beta.float() - mean.float() * scale
            w = w * scale.view(-1, 1, 1, 1)
            b = shift if b is None else b * scale + shift
        return w.to(weight.dtype), (b.to(weight.dtype) if b is not None else None)


_FOLDED = DerivedWeights(_fold)  # each stage's folded (weight, bias), keyed by its tensors and the pixel_norm


class StemStage(nn.Module):
    """One stage: ``conv`` (kernel = stride = k, no padding), then ``bn`` + GELU unless it is the last."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, last: bool):
        super().__init__()
        self.kernel, self.last = kernel, last
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=kernel, bias=last)
        self.bn = None if last else nn.BatchNorm2d(out_ch, eps=BN_EPS)  # holds the running statistics

    def folded(self, pixel_norm: PixelNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (C', C, k, k), bias (C',)) with BatchNorm (and ``pixel_norm``) folded in."""
        c, bn = self.conv, self.bn
        tensors = (c.weight, c.bias) + ((None,) * 4 if bn is None else
                                        (bn.weight, bn.bias, bn.running_mean, bn.running_var))
        if bn is None and pixel_norm is None:
            return c.weight, c.bias
        got = _FOLDED.get(*tensors, extra=pixel_norm)
        return got if got is not None else _fold(*tensors, pixel_norm)

    def apply_op(self, x: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """x: (B, s, s, C) channels-last feature map -> (B, s/k, s/k, C')."""
        B, s, _, C = x.shape
        k, n = self.kernel, s // self.kernel
        weight, bias = self.folded(pixel_norm)
        cells = x[:, : n * k, : n * k].reshape(B, n, k, n, k, C)  # (B, gy, ky, gx, kx, C)
        cells = cells.permute(0, 1, 3, 5, 2, 4).reshape(B * n * n, C * k * k)  # (B·n², C·k·k), conv's (C, ky, kx)
        w = weight.reshape(weight.shape[0], C * k * k)  # (C', C·k·k)
        y = ops.linear(cells, w, bias) if self.last else ops.linear_act(cells, w, bias, "gelu")  # (B·n², C')
        return y.view(B, n, n, -1)


class ConvStem(nn.Module):
    """timm's ConvStem with kernel = stride stages.  Pixels (B, 3, S, S) -> patch tokens (B, g², W),
    g = S / prod(kernels), row-major (as timm's HybridEmbed flattens them)."""

    def __init__(self, stages: tuple[tuple[int, int], ...]):
        """``stages``: (kernel, out_channels) per stage, the last out_channels the tower width."""
        super().__init__()
        chans = [3] + [c for _, c in stages]
        self.backbone = nn.ModuleList([StemStage(chans[i], chans[i + 1], k, last=i == len(stages) - 1)
                                       for i, (k, _) in enumerate(stages)])
        # the convolutions are GEMMs over pixels / stem features: kept fp32 like the ViT's patch embedding
        self.int8_exempt = tuple(f"backbone.{i}.conv.weight" for i in range(len(stages)))

    def apply_op(self, pixels: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) normalised floats, or raw uint8 levels with ``pixel_norm`` -> (B, g², W)."""
        if pixel_norm is not None and pixels.dtype != torch.uint8:
            raise ValueError(f"pixel_norm expects raw uint8 pixels, got {pixels.dtype}")
        x = pixels.permute(0, 2, 3, 1).to(self.backbone[0].conv.weight.dtype)  # (B, S, S, 3) channels-last
        for i, stage in enumerate(self.backbone):
            x = stage.apply_op(x, ops, pixel_norm if i == 0 else None)  # (B, s/k, s/k, C')
        B, g, _, W = x.shape
        return x.reshape(B, g * g, W)
