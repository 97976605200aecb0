"""The SigLIP 2 NaFlex image tower: images at their own aspect ratio, as padded patch sequences. Registered as
vision tower type ``naflex``.

Input: a ``NaflexBatch`` (fastclip/data/naflex.py): ``pixel_values`` (B, N, P*P*3) patches flattened
(row, column, channel) as transformers' ``Siglip2ImageProcessor`` makes them, ``mask`` (B, N) bool (True =
a real patch; the h*w real patches of image b come first) and ``spatial_shapes`` (B, 2) = (h, w) patches.

The tower (transformers' ``Siglip2VisionModel`` with its pooling head): a linear patch embedding, the learned
(G, G) position grid resized to each image's (h, w) (``ops.resample_positions``), pre-norm blocks whose
attention sees real patches only (``key_mask``), the final LayerNorm and the attention-pooling head over the
real patches. No projection: the pooled row is the embedding.

Exact speed-ups: the sequence is cut to the batch's longest image (padding beyond it is seen by no query),
and a batch without padding runs unmasked. With ``pixel_norm`` the patches are raw uint8 levels and the
pixel normalisation is folded into the patch embedding (fastclip.models.vit.fold_pixel_norm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..backends.dispatch import OpTable
from ..backends.weight_packs import DerivedWeights
from .registry import act_problem, check_options, register_tower
from .transformer import AttentionPool, LayerNorm, Transformer
from .vit import PixelNorm, fold_pixel_norm


@dataclass(frozen=True)
class NaflexVisionConfig:
    """NaFlex image tower.  Tokens: (B, N, width), N <= max_num_patches patches, no class token."""

    patch_size: int = 16
    position_grid: int = 16  # the learned positions: a (grid, grid) table, resized per image
    max_num_patches: int = 256  # the default patch budget of the preprocessing (any budget runs)
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    type: str = "naflex"  # the tower type (fastclip/models/registry.py)

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio + 1e-4)

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2

    @property
    def image_size(self) -> int:
        """The square side the position grid was learned at (what square-image tools use)."""
        return self.position_grid * self.patch_size


def parse_naflex_config(name: str, raw: dict, quick_gelu: bool) -> NaflexVisionConfig:
    """``vision_cfg`` of type "naflex" -> NaflexVisionConfig; errors name the model."""
    check_options(name, "vision_cfg", raw)
    cfg = NaflexVisionConfig(
        patch_size=int(raw.get("patch_size", 16)),
        position_grid=int(raw.get("position_grid", 16)),
        max_num_patches=int(raw.get("max_num_patches", 256)),
        width=int(raw.get("width", 768)),
        layers=int(raw.get("layers", 12)),
        head_width=int(raw.get("head_width", 64)),
        mlp_ratio=float(raw.get("mlp_ratio", 4.0)),
        act=raw.get("act", "quick_gelu" if quick_gelu else "gelu_tanh"),
        norm_eps=float(raw.get("norm_kwargs", {}).get("eps", 1e-6)),
    )
    problems = []
    for key in ("patch_size", "position_grid", "max_num_patches", "width", "layers", "head_width"):
        if getattr(cfg, key) < 1:
            problems.append(f"vision {key} must be positive, got {getattr(cfg, key)}")
    if cfg.head_width > 0 and cfg.width % cfg.head_width:
        problems.append(f"vision width {cfg.width} is not a multiple of head_width {cfg.head_width}")
    if act_problem(cfg.act):
        problems.append(act_problem(cfg.act))
    if problems:
        raise ValueError(f"model config {name!r}: " + "; ".join(problems))
    return cfg


def fold_patch_norm(weight: torch.Tensor, bias: torch.Tensor, pixel_norm: PixelNorm):
    """fold_pixel_norm for a linear patch embedding over (row, column, channel) patches.

    weight: (W, P*P*3), bias: (W,) -> (w', b') in weight's dtype, with
    linear(level, w', b') == linear((scale * level - mean[c]) / std[c], weight, bias).
    """
    W, D = weight.shape
    P = math.isqrt(D // 3)
    with torch.inference_mode(False), torch.no_grad():
        conv = weight.reshape(W, P, P, 3).permute(0, 3, 1, 2)  # (W, 3, P, P)
        w, b = fold_pixel_norm(conv, bias, pixel_norm)
        w = w.permute(0, 2, 3, 1).reshape(W, D)  # back to (W, P*P*3)
        return w.to(weight.dtype), b.to(weight.dtype)


_FOLDED = DerivedWeights(fold_patch_norm)  # patch_embed's folded (weight, bias), keyed by it and the pixel_norm


class NaflexVisionTransformer(nn.Module):
    """NaFlex image tower.  NaflexBatch of B images -> embeddings (B, width)."""

    int8_exempt = ("patch_embed.weight", "positional_embedding")  # patch embedding and positions stay fp32

    def __init__(self, cfg: NaflexVisionConfig, embed_dim: int):
        super().__init__()
        if embed_dim != cfg.width:
            raise ValueError(f"a NaFlex tower has no projection: embed_dim {embed_dim} must equal width {cfg.width}")
        self.cfg = cfg
        self.trim_last_block = True  # nothing to trim: attention pooling reads every token of the last block
        w = cfg.width
        self.patch_embed = nn.Linear(cfg.patch_dim, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.position_grid**2, w))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_width, cfg.act, cfg.norm_eps)
        self.ln_post = LayerNorm(w, eps=cfg.norm_eps)
        self.attn_pool = AttentionPool(w, cfg.heads, cfg.mlp_width, cfg.act, cfg.norm_eps)

    def _check(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel_values (B, N, D), mask (B, N) bool, spatial_shapes (B, 2) long) of a NaflexBatch, checked.
        A (B, 3, H, W) tensor of images at a patch-multiple size is taken as unpadded sequences."""
        if isinstance(batch, torch.Tensor):
            from ..data.naflex import batch_of_pixels

            batch = batch_of_pixels(batch, self.cfg.patch_size)
        for field in ("pixel_values", "mask", "spatial_shapes"):
            if not hasattr(batch, field):
                raise TypeError(f"a NaFlex image tower takes a NaflexBatch (fastclip.data.naflex) or (B, 3, H, W) "
                                f"pixels, got {type(batch).__name__}")
        x, mask, shapes = batch.pixel_values, batch.mask, batch.spatial_shapes
        B, D = x.shape[0], self.cfg.patch_dim
        if x.ndim != 3 or x.shape[-1] != D:
            raise ValueError(f"expected pixel_values of shape (B, N, {D}), got {tuple(x.shape)}")
        if tuple(mask.shape) != tuple(x.shape[:2]) or tuple(shapes.shape) != (B, 2):
            raise ValueError(f"expected mask (B, N) = {tuple(x.shape[:2])} and spatial_shapes (B, 2), got "
                             f"{tuple(mask.shape)} and {tuple(shapes.shape)}")
        mask, shapes = mask.to(x.device).bool(), shapes.to(x.device).long()
        lengths = shapes.prod(-1)  # (B,) real patches per image
        expected = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, N) prefix masks
        if not torch.equal(mask, expected):
            raise ValueError("mask must mark the first h * w patches of each image (spatial_shapes (h, w)) as real "
                             "and the rest as padding")
        return x, mask, shapes

    def _patch_weights(self, pixels: torch.Tensor, pixel_norm: PixelNorm | None):
        weight, bias = self.patch_embed.weight, self.patch_embed.bias
        if pixel_norm is None:
            return weight, bias
        if pixels.dtype != torch.uint8:
            raise ValueError(f"pixel_norm expects raw uint8 patches, got {pixels.dtype}")
        folded = _FOLDED.get(weight, bias, extra=pixel_norm)
        return folded if folded is not None else fold_patch_norm(weight, bias, pixel_norm)

    def tokens(self, batch, ops: OpTable, pixel_norm: PixelNorm | None = None):
        """NaflexBatch -> (final tokens (B, L, W), key mask (B, L) bool or None), L = the longest image."""
        x, mask, shapes = self._check(batch)
        L = int(shapes.prod(-1).max())
        x, mask = x[:, :L], mask[:, :L]  # padding beyond the longest image is seen by no query
        weight, bias = self._patch_weights(x, pixel_norm)
        h = ops.linear(x.to(weight.dtype), weight, bias)  # (B, L, W)
        G = self.cfg.position_grid
        grid = self.positional_embedding.reshape(G, G, -1)  # (G, G, W)
        h = h + ops.resample_positions(grid, shapes, L).to(h.dtype)  # (B, L, W)
        key_mask = None if bool(mask.all()) else mask
        return self.transformer.apply_op(h, ops, causal=False, key_mask=key_mask), key_mask

    def apply_op(self, pixels, ops: OpTable, normalize: bool = False,
                 pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: a NaflexBatch, or (B, 3, H, W) images with H, W multiples of the patch size (normalised
        floats, or raw uint8 levels with ``pixel_norm``) -> (B, W)."""
        x, key_mask = self.tokens(pixels, ops, pixel_norm)
        pooled = self.attn_pool.apply_op(self.ln_post.apply_op(x, ops), ops, key_mask)  # (B, W)
        return ops.l2_normalize(pooled) if normalize else pooled


register_tower("vision", "naflex", parse_naflex_config, NaflexVisionTransformer)


def _siglip2_naflex(width: int, layers: int, heads: int, mlp_width: int) -> dict:
    """The OpenCLIP-shaped config of a transformers SigLIP 2 NaFlex repo: both towers of the same size, a
    16-pixel patch, a 16 x 16 position grid, a 256-patch budget, Gemma's 256k vocabulary and 64 tokens."""
    tower = {"width": width, "layers": layers, "mlp_ratio": mlp_width / width, "act": "gelu_tanh",
             "norm_kwargs": {"eps": 1e-6}}
    return {
        "embed_dim": width, "init_logit_bias": -10, "family": "siglip", "tokenizer": "hf",
        "vision_cfg": {**tower, "type": "naflex", "patch_size": 16, "position_grid": 16, "max_num_patches": 256,
                       "head_width": width // heads},
        "text_cfg": {**tower, "context_length": 64, "vocab_size": 256000, "heads": heads, "no_causal_mask": True,
                     "pool_type": "last", "proj_bias": True},
        "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"},  # NaFlex:
        # only mean / std apply (data/naflex.py resizes to the patch budget, as the repo's processor config says)
    }


# Named NaFlex architectures (open_clip has no NaFlex configs): registered beside configs/*.json, their
# weights are the transformers repos of loading/pretrained.json (google/siglip2-*-naflex, tag "webli").
NAMED_CONFIGS: dict[str, dict] = {
    "ViT-B-16-SigLIP2-naflex": _siglip2_naflex(768, 12, 12, 3072),
    "ViT-SO400M-16-SigLIP2-naflex": _siglip2_naflex(1152, 27, 16, 4304),
}
