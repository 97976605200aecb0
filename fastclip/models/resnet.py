"""OpenAI's ResNet CLIP image towers (RN50, RN101, RN50x4, RN50x16, RN50x64): open_clip's ``ModifiedResNet``.
Registered as vision tower type ``resnet`` (an OpenCLIP ``vision_cfg`` whose ``layers`` is a list).

* Stem: three 3x3 convolutions (the first with stride 2), each BatchNorm + ReLU, then a 2x2 average pool.
* Four stages of Bottleneck blocks (1x1, 3x3, 1x1 convolutions, 4x expansion). A block's stride is an average
  pool after its 3x3 convolution; its downsample branch is an average pool, a 1x1 convolution and BatchNorm.
* ``AttentionPool2d``: the mean of the final feature map's tokens is prepended, a learned position embedding
  ((S/32)² + 1, 32·width) added, and that one mean token attends to every token (q / k / v projections with
  bias, ``c_proj`` out) -> (B, embed_dim).

Every convolution runs through ``ops.conv2d_act`` on channels-last feature maps, its inference-mode BatchNorm
folded into its weight and bias once per version of the weights (fastclip/backends/weight_packs.py), the
block's residual add and ReLU fused into its last convolution. The attention pool runs ``ops.linear`` and
``ops.attention``. The average pools and the pool's mean token are plain torch calls (``F.avg_pool2d``,
``Tensor.mean``): single memory-bound passes, small beside the convolutions around them.

``pixel_norm`` (raw uint8 levels): the per-channel 1/std is folded into the first convolution's weight and the
mean is subtracted from the levels as they are converted to floats. The mean cannot go into the bias as in
vit.py: the stem convolution zero-pads its input, and a zero of the normalised image is not a zero level.

Parameter and buffer names are open_clip's and OpenAI's (``conv1``, ``bn1``, ..., ``layer{1..4}.{i}.conv{1,2,3}``,
``bn{1,2,3}``, ``downsample.0`` / ``downsample.1``, ``attnpool.positional_embedding``,
``attnpool.{q,k,v,c}_proj``), so their state dicts load with no renaming.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.dispatch import OpTable
from ..backends.weight_packs import DerivedWeights
from .registry import check_options, register_tower
from .vit import PixelNorm

BN_EPS = 1e-5  # open_clip's nn.BatchNorm2d default
EXPANSION = 4  # Bottleneck output channels / planes


@dataclass(frozen=True)
class ResNetConfig:
    """ModifiedResNet image tower.  Pixels (B, 3, S, S) -> feature map (B, 32·width, S/32, S/32) -> (B, E)."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # Bottleneck blocks per stage
    width: int = 64  # stem width; stage i has width·2^i planes, 4x that many output channels
    head_width: int = 64  # attention-pool head width
    image_size: int = 224
    act: str = "relu"  # ReLU throughout; a quick_gelu config or pretrained tag sets this (it changes nothing here)
    type: str = "resnet"  # the tower type (fastclip/models/registry.py)

    @property
    def feature_width(self) -> int:
        return self.width * 8 * EXPANSION  # channels of the final feature map (32·width)

    @property
    def heads(self) -> int:
        return self.feature_width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // 32


def parse_resnet_config(name: str, raw: dict, quick_gelu: bool) -> ResNetConfig:
    """OpenCLIP's ``vision_cfg`` with ``layers`` a list of four block counts -> ResNetConfig; errors name the model."""
    check_options(name, "vision_cfg", raw)
    layers = raw.get("layers")
    if not isinstance(layers, (list, tuple)) or len(layers) != 4 or not all(isinstance(n, int) and n > 0 for n in layers):
        raise ValueError(f"model config {name!r}: vision_cfg.layers of a ResNet must be four positive block counts, "
                         f"got {layers!r}")
    cfg = ResNetConfig(layers=tuple(int(n) for n in layers), width=int(raw.get("width", 64)),
                       head_width=int(raw.get("head_width", 64)), image_size=int(raw.get("image_size", 224)),
                       act="quick_gelu" if quick_gelu else "relu")
    problems = []
    if cfg.width < 2 or cfg.width % 2:
        problems.append(f"vision width {cfg.width} must be even (the stem's first convolutions have width/2)")
    if cfg.image_size < 32 or cfg.image_size % 32:
        problems.append(f"image_size {cfg.image_size} is not a multiple of 32 (the ResNet's total stride)")
    if cfg.head_width < 1 or cfg.feature_width % cfg.head_width:
        problems.append(f"feature width {cfg.feature_width} (32 x width) is not a multiple of head_width {cfg.head_width}")
    if problems:
        raise ValueError(f"model config {name!r}: " + "; ".join(problems))
    return cfg


# ---------------------------------------------------------------- BatchNorm folding
def _fold(weight, gamma, beta, mean, var, pixel_norm: PixelNorm | None = None):
    """(weight (C', C, kh, kw) channels-last, bias (C',)) of conv -> BatchNorm (gamma, beta, mean, var: (C',)),
    with ``pixel_norm``'s per-channel scale / std folded into the input channels (the stem's first convolution),
    in the weight's dtype: bn(conv(w, x)) == conv(w', x) + b'. Made outside inference mode (see vit.py)."""
    with torch.inference_mode(False), torch.no_grad():
        w = weight.float()
        if pixel_norm is not None:
            scale, _, std = pixel_norm
            std = torch.as_tensor(std, dtype=torch.float32, device=w.device)  # (3,)
            w = w * (float(scale) / std).view(1, 3, 1, 1)
        s = gamma.float() / torch.sqrt(var.float() + BN_EPS)  # (C',)
        b = beta.float() - mean.float() * s
        w = (w * s.view(-1, 1, 1, 1)).to(weight.dtype).contiguous(memory_format=torch.channels_last)
        return w, b.to(weight.dtype)


_FOLDED = DerivedWeights(_fold)  # each (conv, bn) pair's folded (weight, bias), keyed by its tensors and pixel_norm


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, pixel_norm: PixelNorm | None = None):
    """(weight (C', C, kh, kw), bias (C',)) of ``conv`` followed by ``bn`` (inference mode), folded."""
    tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    got = _FOLDED.get(*tensors, extra=pixel_norm)
    return got if got is not None else _fold(*tensors, pixel_norm)


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, ops: OpTable, act: str,
            residual: torch.Tensor | None = None, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
    """act(bn(conv(x)) + residual).  x: (B, C, H, W) channels-last -> (B, C', H', W') channels-last."""
    weight, bias = folded(conv, bn, pixel_norm)
    return ops.conv2d_act(x, weight, bias, conv.stride, conv.padding, act, residual)


# ---------------------------------------------------------------- the tower
class Bottleneck(nn.Module):
    """open_clip's Bottleneck: 1x1 -> 3x3 -> [avg pool] -> 1x1 (x4 channels), + identity or downsample, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, eps=BN_EPS)
        self.downsample = None
        if stride > 1 or inplanes != out:  # open_clip's downsample.-1 is the average pool (no parameters)
            self.downsample = nn.ModuleDict({"0": nn.Conv2d(inplanes, out, 1, bias=False),
                                             "1": nn.BatchNorm2d(out, eps=BN_EPS)})

    def apply_op(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """x: (B, C, H, W) channels-last -> (B, 4·planes, H/stride, W/stride) channels-last."""
        out = conv_bn(x, self.conv1, self.bn1, ops, "relu")  # (B, planes, H, W)
        out = conv_bn(out, self.conv2, self.bn2, ops, "relu")
        if self.stride > 1:
            out = F.avg_pool2d(out, self.stride)  # (B, planes, H/s, W/s), channels-last kept
        identity = x
        if self.downsample is not None:
            pooled = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
            identity = conv_bn(pooled, self.downsample["0"], self.downsample["1"], ops, "none")
        return conv_bn(out, self.conv3, self.bn3, ops, "relu", residual=identity)  # relu(bn3(conv3) + identity)


class AttentionPool2d(nn.Module):
    """open_clip's AttentionPool2d: the mean token queries all (grid² + 1) tokens.  (B, C, g, g) -> (B, E)."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def int8_linears(self):
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            yield layer.weight, layer.bias

    def apply_op(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """x: (B, C, g, g) channels-last feature map -> (B, E)."""
        B, C, h, w = x.shape
        H = self.heads
        Dh = C // H
        tokens = x.permute(0, 2, 3, 1).reshape(B, h * w, C)  # (B, g², C), row-major as open_clip flattens
        t = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, L = g² + 1, C)
        t = t + self.positional_embedding.to(t.dtype)
        L = t.shape[1]
        q = ops.linear(t[:, 0], self.q_proj.weight, self.q_proj.bias)  # (B, C): the mean token's query only
        k = ops.linear(t, self.k_proj.weight, self.k_proj.bias)  # (B, L, C)
        v = ops.linear(t, self.v_proj.weight, self.v_proj.bias)  # (B, L, C)
        out = ops.attention(q.view(B, 1, H, Dh).transpose(1, 2),  # (B, H, 1, Dh)
                            k.view(B, L, H, Dh).transpose(1, 2), v.view(B, L, H, Dh).transpose(1, 2))  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(B, C)  # (B, H, 1, Dh) -> (B, C)
        return ops.linear(out, self.c_proj.weight, self.c_proj.bias)  # (B, E)


class ModifiedResNet(nn.Module):
    """The ResNet image tower.  Pixels (B, 3, S, S) -> embeddings (B, embed_dim)."""

    def __init__(self, cfg: ResNetConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.trim_last_block = True  # the ImageTower attribute; a ResNet has no token blocks to trim
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2, eps=BN_EPS)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2, eps=BN_EPS)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w, eps=BN_EPS)
        inplanes = w
        for i, blocks in enumerate(cfg.layers):
            planes, stride = w * 2**i, 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)] + [Bottleneck(planes * EXPANSION, planes)
                                                              for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * EXPANSION
        self.attnpool = AttentionPool2d(cfg.grid, cfg.feature_width, cfg.heads, embed_dim)
        # convolutions stay fp32 under precision="int8" (only the attention pool's linears are int8)
        self.int8_exempt = tuple(n for n, p in self.named_parameters() if p.ndim == 4) + ("attnpool.positional_embedding",)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, pixels: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) normalised floats, or uint8 levels with ``pixel_norm`` -> (B, width, S/4, S/4)."""
        dtype = self.conv1.weight.dtype
        if pixel_norm is None:
            x = pixels.to(dtype)
        elif pixels.dtype != torch.uint8:
            raise ValueError(f"pixel_norm expects raw uint8 pixels, got {pixels.dtype}")
        else:
            scale, mean, _ = pixel_norm  # normalised = (scale / std) * (level - mean / scale)
            shift = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device) / float(scale)  # (3,)
            x = (pixels.float() - shift.view(1, 3, 1, 1)).to(dtype)  # the 1/std is in conv1's folded weight
        x = x.contiguous(memory_format=torch.channels_last)
        x = conv_bn(x, self.conv1, self.bn1, ops, "relu", pixel_norm=pixel_norm)  # (B, w/2, S/2, S/2)
        x = conv_bn(x, self.conv2, self.bn2, ops, "relu")
        x = conv_bn(x, self.conv3, self.bn3, ops, "relu")  # (B, w, S/2, S/2)
        return F.avg_pool2d(x, 2)  # (B, w, S/4, S/4)

    def features(self, pixels: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) -> the final feature map (B, 32·width, S/32, S/32), channels-last."""
        x = self.stem(pixels, ops, pixel_norm)
        for stage in self.stages:
            for block in stage:
                x = block.apply_op(x, ops)
        return x

    def apply_op(self, pixels: torch.Tensor, ops: OpTable, normalize: bool = False,
                 pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) normalised floats, or raw uint8 levels with ``pixel_norm`` -> (B, embed_dim)."""
        expected = (3, self.cfg.image_size, self.cfg.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"expected pixels of shape (B, {', '.join(map(str, expected))}), got {tuple(pixels.shape)}")
        y = self.attnpool.apply_op(self.features(pixels, ops, pixel_norm), ops)  # (B, E)
        return ops.l2_normalize(y) if normalize else y


register_tower("vision", "resnet", parse_resnet_config, ModifiedResNet)
