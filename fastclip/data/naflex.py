"""SigLIP 2 NaFlex preprocessing: each image keeps its aspect ratio, resized to a patch budget, patchified.

``NaflexPreprocess(NaflexConfig(...))`` equals transformers' ``Siglip2ImageProcessor`` (the torchvision
backend of transformers >= 5) on the same RGB PIL images:

1. the target size: the largest scale whose (H, W) -- each side rounded up to a multiple of the patch size,
   at least one patch -- holds at most ``max_num_patches`` patches, found by the processor's bisection
   over the scale (``target_size``);
2. the resize to (H, W): torch's antialiased ``interpolate`` on uint8, as ``tvF.resize`` runs it on a CPU
   (fastclip.data.preprocess, ``numerics="hf"``), then ``(x - 255 * mean) / (255 * std)``;
3. patches: (h * w, P * P * 3), each flattened (row, column, channel), in row-major patch order, padded
   with zeros to ``max_num_patches`` rows; ``mask`` marks the h * w real rows, ``spatial_shapes`` is (h, w).

``raw=True`` (``batch``) stops before the normalisation: uint8 patches of levels, for a tower given
``pixel_norm`` (it folds the normalisation into its patch embedding).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ImageLoadError
from .budget import DEFAULT_INFLIGHT_PIXELS, DecodeLimits
from .images import DEFAULT_MAX_PIXELS, load_image, map_items
from .preprocess import INCEPTION_MEAN, INCEPTION_STD, Preprocess, PreprocessConfig, hf_resample

__all__ = ["NaflexConfig", "NaflexBatch", "NaflexPreprocess", "batch_of_pixels", "pad_sequences", "target_size"]


@dataclass(frozen=True)
class NaflexConfig:
    """patch_size, max_num_patches: the patch grid and its budget; mean / std on the [0, 1] scale;
    interpolation "bilinear" (the processor's default) or "bicubic"; rescale_factor as HF's."""

    patch_size: int = 16
    max_num_patches: int = 256
    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD
    interpolation: str = "bilinear"
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.patch_size < 1 or self.max_num_patches < 1:
            raise ValueError(f"patch_size and max_num_patches must be positive, got {self.patch_size} and "
                             f"{self.max_num_patches}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")

    @classmethod
    def from_hf(cls, preprocessor_config: dict) -> NaflexConfig:
        """From a ``Siglip2ImageProcessor`` ``preprocessor_config.json`` (missing keys: the class defaults)."""
        d = dict(preprocessor_config)
        interpolation = hf_resample(d, "NaFlex preprocessor config", 2)
        return cls(patch_size=int(d.get("patch_size", 16)), max_num_patches=int(d.get("max_num_patches", 256)),
                   mean=tuple(d.get("image_mean", INCEPTION_MEAN)), std=tuple(d.get("image_std", INCEPTION_STD)),
                   interpolation=interpolation, rescale_factor=float(d.get("rescale_factor", 1 / 255)))

    @classmethod
    def from_file(cls, path: Path, default: NaflexConfig) -> NaflexConfig:
        """``from_hf`` of a preprocessor_config.json if it exists, else ``default``."""
        import json

        return cls.from_hf(json.loads(path.read_text())) if path.is_file() else default


def target_size(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """(H, W) multiples of ``patch_size`` (at least one patch each) for an image of (height, width): the size
    at the largest scale s in [eps / 10, 100] (bisected to ``eps``) with (H / P) * (W / P) <= max_num_patches,
    each side ``ceil(side * s / P) * P``."""
    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch_size) * (side(mid, width) / patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


@dataclass
class NaflexBatch:
    """B images as padded patch sequences.

    pixel_values: (B, N, P*P*3) float32 normalised (or uint8 levels); mask: (B, N) bool, True = a real patch;
    spatial_shapes: (B, 2) int64, the (h, w) patch grid of each image (its h * w patches come first).
    """

    pixel_values: torch.Tensor
    mask: torch.Tensor
    spatial_shapes: torch.Tensor

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def to(self, target) -> NaflexBatch:
        """A device moves all three tensors; a floating dtype casts float pixel values (uint8 levels stay)."""
        if isinstance(target, torch.dtype):
            pv = self.pixel_values
            return NaflexBatch(pv.to(target) if pv.is_floating_point() else pv, self.mask, self.spatial_shapes)
        return NaflexBatch(self.pixel_values.to(target), self.mask.to(target), self.spatial_shapes.to(target))

    def __getitem__(self, rows) -> NaflexBatch:
        return NaflexBatch(self.pixel_values[rows], self.mask[rows], self.spatial_shapes[rows])


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(H, W, C) -> (H/P * W/P, P * P * C): patches in row-major order, each flattened (row, column, channel)."""
    H, W, C = image.shape
    h, w, P = H // patch_size, W // patch_size, patch_size
    cells = image.reshape(h, P, w, P, C).permute(0, 2, 1, 3, 4)  # (h, w, P, P, C)
    return cells.reshape(h * w, P * P * C)


def batch_of_pixels(pixels: torch.Tensor, patch_size: int) -> NaflexBatch:
    """Images already at a patch-multiple size as a NaflexBatch without padding.

    pixels: (B, 3, H, W), H and W multiples of ``patch_size`` (normalised floats or uint8 levels) ->
    pixel_values (B, H/P * W/P, P*P*3), mask all True, spatial_shapes (H/P, W/P) for every image.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % patch_size or pixels.shape[3] % patch_size:
        raise ValueError(f"expected pixels (B, 3, H, W) with H and W multiples of the patch size {patch_size}, "
                         f"got {tuple(pixels.shape)}")
    B, _, H, W = pixels.shape
    h, w, P = H // patch_size, W // patch_size, patch_size
    cells = pixels.reshape(B, 3, h, P, w, P).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, 3)
    values = cells.reshape(B, h * w, P * P * 3)
    mask = torch.ones(B, h * w, dtype=torch.bool, device=pixels.device)
    shapes = torch.tensor([[h, w]], dtype=torch.long, device=pixels.device).expand(B, 2)
    return NaflexBatch(values, mask, shapes)


class NaflexPreprocess(DecodeLimits):
    """Callable NaFlex preprocessing: image item -> (patches (h*w, P*P*3) float32, (h, w)); ``batch`` pads.

    ``threads``: workers of ``batch`` (default: CPU count; 1 = no thread pool). ``max_inflight_pixels`` /
    ``max_image_pixels``: as ``Preprocess``'s -- one ``budget`` (``fastclip.data.budget.PixelBudget``) shared by
    every decode of this preprocess (all threads of all ``sequences`` / ``batch`` calls, and ``__call__``), and
    the pixel limit above which images are refused from their header.
    """

    def __init__(self, cfg: NaflexConfig, threads: int | None = None,
                 max_inflight_pixels: int | None = DEFAULT_INFLIGHT_PIXELS,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS):
        self.cfg = cfg
        self.threads = threads
        self._set_decode_limits(max_inflight_pixels, max_image_pixels)

    def __repr__(self) -> str:
        return f"NaflexPreprocess({self.cfg!r}, threads={self.threads!r})"

    @property
    def pixel_norm(self) -> tuple[float, tuple[float, float, float], tuple[float, float, float]]:
        """(scale, mean, std): normalised = (scale * level - mean) / std per channel."""
        return self.cfg.rescale_factor, tuple(self.cfg.mean), tuple(self.cfg.std)

    @lru_cache(maxsize=64)  # noqa: B019  (one small Preprocess per output size; the instance lives with its model)
    def _resizer(self, hw: tuple[int, int]) -> Preprocess:
        c = self.cfg
        return Preprocess(PreprocessConfig(hw, c.mean, c.std, resize_mode="squash", interpolation=c.interpolation,
                                           numerics="hf", rescale_factor=c.rescale_factor), threads=1,
                          max_inflight_pixels=None)  # only resizes / normalises: decodes hold self.budget

    def levels(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """RGB PIL image -> (uint8 (H, W, 3) resized to its patch budget, (h, w) patches)."""
        c = self.cfg
        hw = target_size(image.height, image.width, c.patch_size, c.max_num_patches)
        return self._resizer(hw).resize_crop(image), (hw[0] // c.patch_size, hw[1] // c.patch_size)

    def _patches(self, a: np.ndarray, hw: tuple[int, int], raw: bool) -> torch.Tensor:
        if raw:
            return patchify(torch.from_numpy(np.require(a, requirements=["C", "W"])), self.cfg.patch_size)  # uint8 (h*w, P*P*3)
        pixels = self._resizer(a.shape[:2]).normalise(a)  # (3, H, W) float32
        return patchify(pixels.permute(1, 2, 0), self.cfg.patch_size)  # (h*w, P*P*3)

    def load_levels(self, image: Any, *, index: int | None = None, max_image_pixels: int | None = None
                    ) -> tuple[np.ndarray, tuple[int, int]]:
        """One item (any kind ``load_image`` accepts) -> ``levels`` of its RGB image; decode and resize hold its
        pixels in ``budget``; ``max_image_pixels`` (None: this preprocess's) refuses larger images."""
        return load_image(image, index=index, max_pixels=self._pixel_limit(max_image_pixels), budget=self.budget, transform=self.levels)

    def __call__(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image (a PIL image or any item ``load_image`` accepts) -> (patches (h*w, P*P*3) float32, (h, w))."""
        a, hw = self.load_levels(image)
        return self._patches(a, hw, raw=False), hw

    def sequences(self, items: Sequence[Any], *, on_error: str = "raise", progress: bool = False,
                  index_offset: int = 0, raw: bool = False, max_image_pixels: int | None = None
                  ) -> tuple[list[tuple[torch.Tensor, tuple[int, int]]], list[int], list[ImageLoadError]]:
        """Decode + preprocess many items in threads, unpadded -> ([(patches (h*w, P*P*3), (h, w))] of the
        items that loaded, their indices in ``items``, the errors of the others). ``raw=True``: uint8 levels.
        Full-size decoded pixels in flight stay within ``budget``; ``max_image_pixels`` (None: this
        preprocess's) refuses larger images from their header (an ``ImageLoadError``)."""
        def one(item, i):
            a, hw = self.load_levels(item, index=index_offset + i, max_image_pixels=max_image_pixels)
            return self._patches(a, hw, raw), hw

        results, errors = map_items(one, items, threads=self.threads, on_error=on_error, progress=progress,
                                    desc="preprocess")
        kept = [i for i, r in enumerate(results) if r is not None]
        return [results[i] for i in kept], kept, errors

    def batch(self, items: Sequence[Any], *, on_error: str = "raise", progress: bool = False,
              index_offset: int = 0, raw: bool = False, max_image_pixels: int | None = None
              ) -> tuple[NaflexBatch, list[int], list[ImageLoadError]]:
        """Decode + preprocess many items in threads -> (NaflexBatch of the items that loaded, their indices in
        ``items``, the errors of the others) -- the contract of ``Preprocess.batch``. Sequences are padded to
        ``max_num_patches``, as the processor pads them; ``raw=True``: uint8 patches of levels (see ``pixel_norm``)."""
        seqs, kept, errors = self.sequences(items, on_error=on_error, progress=progress, index_offset=index_offset,
                                            raw=raw, max_image_pixels=max_image_pixels)
        dtype = torch.uint8 if raw else torch.float32
        return pad_sequences(seqs, self.cfg.max_num_patches, 3 * self.cfg.patch_size**2, dtype), kept, errors


def pad_sequences(seqs: Sequence[tuple[torch.Tensor, tuple[int, int]]], length: int | None = None,
                  patch_dim: int | None = None, dtype: torch.dtype | None = None) -> NaflexBatch:
    """[(patches (h*w, D), (h, w))] -> NaflexBatch (B, N, D) zero-padded to ``length`` (default: the longest
    sequence, so a batch of similar sizes carries little padding); ``patch_dim`` / ``dtype`` for an empty list."""
    lengths = [hw[0] * hw[1] for _, hw in seqs]
    n = max(lengths, default=0) if length is None else length
    if lengths and max(lengths) > n:
        raise ValueError(f"a sequence of {max(lengths)} patches does not fit a padded length of {n}")
    D = seqs[0][0].shape[-1] if seqs else patch_dim
    values = torch.zeros(len(seqs), n, D, dtype=seqs[0][0].dtype if seqs else dtype)  # (B, N, D)
    for i, (patches, _) in enumerate(seqs):
        values[i, : patches.shape[0]] = patches
    shapes = torch.tensor([list(hw) for _, hw in seqs], dtype=torch.long).reshape(len(seqs), 2)  # (B, 2)
    mask = torch.arange(n)[None, :] < shapes.prod(-1)[:, None]  # (B, N)
    return NaflexBatch(values, mask, shapes)


def attach_naflex_preprocess(model, preprocessor_file: Path | None = None):
    """Give a model with a NaFlex image tower its NaflexPreprocess: from a ``Siglip2ImageProcessor``
    preprocessor_config.json when there is one, else (or with no file, e.g. random weights) the tower's patch
    size and budget with the model's mean / std. Returns the model."""
    vision, spec = model.cfg.vision, model.cfg.preprocess
    default = NaflexConfig(vision.patch_size, vision.max_num_patches, tuple(spec.mean), tuple(spec.std))
    cfg = default if preprocessor_file is None else NaflexConfig.from_file(preprocessor_file, default)
    if cfg.patch_size != vision.patch_size:
        raise ValueError(f"{preprocessor_file}: patch_size {cfg.patch_size} differs from the model's "
                         f"{vision.patch_size}")
    model.preprocess = NaflexPreprocess(cfg)
    return model
