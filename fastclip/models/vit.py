"""The ViT image tower (OpenAI CLIP, OpenCLIP, SigLIP): its config, its parser from OpenCLIP's JSON shape,
and the tower. Registered as vision tower type ``vit``.

Folded pixel normalisation (exact): ``VisionTransformer.apply_op(..., pixel_norm=(scale, mean, std))``
takes raw uint8 levels x and applies the patch embedding with weights folded so that
conv(w', x) + b' = conv(w, (scale * x - mean) / std) (see ``fold_pixel_norm``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends.dispatch import OpTable
from ..backends.weight_packs import DerivedWeights
from .registry import act_problem, check_options, register_tower, tower_act
from .transformer import AttentionPool, LayerNorm, Transformer


@dataclass(frozen=True)
class VisionConfig:
    """ViT image tower.  Tokens: (B, 1 + (image_size/patch_size)^2, width) with a class token."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    class_token: bool = True
    ln_pre: bool = True
    patch_bias: bool = False
    pool_type: str = "tok"  # "tok" (class token), "avg" (mean of patch tokens), "map" (attention pooling head)
    final_ln_after_pool: bool = False
    proj: bool = True  # project the pooled token to embed_dim
    type: str = "vit"  # the tower type (fastclip/models/registry.py)

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio + 1e-4)  # ratios stored as rounded decimals (4304/1152)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + int(self.class_token)


def parse_vision_config(name: str, raw: dict, quick_gelu: bool) -> VisionConfig:
    """OpenCLIP's ``vision_cfg`` (plus fastclip's SigLIP keys) -> VisionConfig; errors name the model."""
    check_options(name, "vision_cfg", raw)
    cfg = VisionConfig(
        image_size=int(raw.get("image_size", 224)),
        patch_size=int(raw.get("patch_size", 16)),
        width=int(raw.get("width", 768)),
        layers=int(raw.get("layers", 12)),
        head_width=int(raw.get("head_width", 64)),
        mlp_ratio=float(raw.get("mlp_ratio", 4.0)),
        act=tower_act(raw, quick_gelu),
        norm_eps=float(raw.get("norm_kwargs", {}).get("eps", 1e-5)),
        class_token=bool(raw.get("class_token", True)),
        ln_pre=not raw.get("no_ln_pre", False),
        patch_bias=bool(raw.get("patch_bias", False)),
        pool_type=raw.get("pool_type", "tok"),
        final_ln_after_pool=bool(raw.get("final_ln_after_pool", False)),
        proj=bool(raw.get("proj", True)),
    )
    problems = []
    if cfg.image_size < cfg.patch_size:
        problems.append(f"image_size {cfg.image_size} is smaller than patch_size {cfg.patch_size}")
    if cfg.width % cfg.head_width:
        problems.append(f"vision width {cfg.width} is not a multiple of head_width {cfg.head_width}")
    if cfg.pool_type not in ("tok", "avg", "map"):
        problems.append(f"vision pool_type {cfg.pool_type!r} is not one of tok, avg, map")
    if cfg.pool_type == "tok" and not cfg.class_token:
        problems.append("vision pool_type 'tok' needs a class token")
    if act_problem(cfg.act):
        problems.append(act_problem(cfg.act))
    if problems:
        raise ValueError(f"model config {name!r}: " + "; ".join(problems))
    return cfg


PixelNorm = tuple  # (scale, mean (3,), std (3,)): normalised = (scale * level - mean) / std per channel


def fold_pixel_norm(weight: torch.Tensor, bias: torch.Tensor | None, pixel_norm: PixelNorm):
    """Fold a per-channel pixel normalisation into a patch-embedding convolution.

    weight: (W, 3, P, P), bias: (W,) or None; pixel_norm = (scale, mean, std) with
    normalised = (scale * level - mean) / std per input channel. Returns (w', b') in float32 with
    conv(w', level) + b' == conv(w, normalised) + bias:
    w' = w * scale / std[c] and b' = bias - sum over (c, i, j) of w * mean[c] / std[c].
    """
    scale, mean, std = pixel_norm
    w = weight.float()
    mean = torch.as_tensor(mean, dtype=torch.float32, device=w.device)  # (3,)
    std = torch.as_tensor(std, dtype=torch.float32, device=w.device)  # (3,)
    folded_bias = -(w.sum(dim=(2, 3)) @ (mean / std))  # (W, 3) @ (3,) -> (W,)
    if bias is not None:
        folded_bias = folded_bias + bias.float()
    return w * (float(scale) / std).view(1, 3, 1, 1), folded_bias


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, pixel_norm: PixelNorm):
    """fold_pixel_norm in the weight's dtype, made outside inference mode (inference tensors cannot be
    packed: they have no version counter)."""
    with torch.inference_mode(False), torch.no_grad():
        w, b = fold_pixel_norm(weight, bias, pixel_norm)
        return w.to(weight.dtype), b.to(weight.dtype)


_FOLDED = DerivedWeights(_fold)  # conv1's folded (weight, bias), keyed by conv1 and the pixel_norm


class VisionTransformer(nn.Module):
    """ViT image tower.  Pixels (B, 3, S, S) -> embeddings (B, embed_dim)."""

    int8_exempt = ("conv1.weight", "positional_embedding", "proj")  # patch embedding, positions, pooled projection

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.trim_last_block = True  # exact; False runs the last block on every token (tests, benchmarks)
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.num_tokens, w))
        if cfg.ln_pre:
            self.ln_pre = LayerNorm(w, eps=cfg.norm_eps)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_width, cfg.act, cfg.norm_eps)
        self.ln_post = LayerNorm(w, eps=cfg.norm_eps)
        if cfg.pool_type == "map":
            self.attn_pool = AttentionPool(w, cfg.heads, cfg.mlp_width, cfg.act, cfg.norm_eps)
        self.proj = nn.Parameter(torch.empty(w, embed_dim)) if cfg.proj else None

    def patch_embed(self, pixels: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) -> patch tokens (B, grid*grid, W).

        conv1 (kernel = stride = P, no padding) is one GEMM over the flattened patches, run through
        ``ops.linear``: the same sums as the convolution, without a convolution library's per-call cost.
        Normalised float pixels use conv1's weights as they are; with ``pixel_norm`` the pixels are raw
        levels (uint8) and the normalisation is folded into the weights (fold_pixel_norm).
        """
        B, P, g, W = pixels.shape[0], self.cfg.patch_size, self.cfg.grid, self.cfg.width
        dtype = self.conv1.weight.dtype
        if pixel_norm is None:
            weight, bias = self.conv1.weight, self.conv1.bias
        elif pixels.dtype != torch.uint8:
            raise ValueError(f"pixel_norm expects raw uint8 pixels, got {pixels.dtype}")
        else:
            weight, bias = self._folded_conv(pixel_norm)
        cells = pixels[:, :, : g * P, : g * P].reshape(B, 3, g, P, g, P)  # (B, 3, gy, py, gx, px)
        patches = cells.permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, 3 * P * P).to(dtype)  # (B·g², 3·P·P)
        out = ops.linear(patches, weight.reshape(W, 3 * P * P), bias)  # (B·g², W)
        return out.view(B, g * g, W)

    def _folded_conv(self, pixel_norm: PixelNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """conv1's (weight, bias) with ``pixel_norm`` folded in, in conv1's dtype.

        Kept until conv1 or ``pixel_norm`` changes (fastclip/backends/weight_packs.py), so the backend finds
        the folded weight's packed copy on the next call instead of repacking it.
        """
        folded = _FOLDED.get(self.conv1.weight, self.conv1.bias, extra=pixel_norm)
        return folded if folded is not None else _fold(self.conv1.weight, self.conv1.bias, pixel_norm)

    def tokens(self, pixels: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) -> final tokens before pooling (B, T, W), or (B, W) for class-token
        pooling with ``trim_last_block`` (the final state of token 0 only)."""
        x = self.patch_embed(pixels, ops, pixel_norm)  # (B, grid*grid, W)
        if self.cfg.class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + grid*grid, W)
        x = x + self.positional_embedding.to(x.dtype)
        if self.cfg.ln_pre:
            x = self.ln_pre.apply_op(x, ops)
        index = None
        if self.cfg.pool_type == "tok" and self.trim_last_block:
            index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # (B,) row 0 is pooled
        return self.transformer.apply_op(x, ops, causal=False, index=index)

    def apply_op(self, pixels: torch.Tensor, ops: OpTable, normalize: bool = False,
                 pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) normalised floats, or raw uint8 levels with ``pixel_norm`` -> (B, embed_dim)."""
        cfg = self.cfg
        expected = (3, cfg.image_size, cfg.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"expected pixels of shape (B, {', '.join(map(str, expected))}), got {tuple(pixels.shape)}")
        x = self.tokens(pixels, ops, pixel_norm)  # (B, T, W), or (B, W) when trimmed
        ln = self.ln_post
        if cfg.pool_type == "map":
            pooled = self.attn_pool.apply_op(ln.apply_op(x, ops), ops)  # (B, W)
            return _project(pooled, self.proj, None, ops, normalize)
        if cfg.pool_type == "tok":
            # LayerNorm is per token, so normalising the class token alone is exact.
            pooled = x if x.ndim == 2 else x[:, 0]  # (B, W)
            return ops.normalize_project(pooled, ln.weight, ln.bias, ln.eps, self.proj, None, normalize)
        patches = x[:, int(cfg.class_token):]  # (B, grid*grid, W)
        if cfg.final_ln_after_pool:
            return ops.normalize_project(patches.mean(dim=1), ln.weight, ln.bias, ln.eps, self.proj, None, normalize)
        return _project(ln.apply_op(patches, ops).mean(dim=1), self.proj, None, ops, normalize)


def _project(x, proj, bias, ops: OpTable, normalize: bool) -> torch.Tensor:
    if proj is not None:
        x = x @ proj
    if bias is not None:
        x = x + bias
    return ops.l2_normalize(x) if normalize else x


register_tower("vision", "vit", parse_vision_config, VisionTransformer)
