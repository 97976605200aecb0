"""Image preprocessing for CLIP-family models: resize, centre crop, normalise -> (3, H, W) float32.

``Preprocess(PreprocessConfig(...))`` reproduces the reference pipelines with Pillow, numpy and torch
only (torchvision is a test-time dependency):

* ``numerics="open_clip"`` (default) equals ``open_clip.image_transform(image_size, is_train=False,
  mean, std, resize_mode, interpolation)`` applied to the same RGB PIL image, bit for bit:
  Pillow's antialiased ``Image.resize`` (what torchvision calls on PIL inputs) to torchvision's output
  size (``int(S * long / short)`` for the long side), torchvision's centre crop (zero padding when the
  image is smaller than the crop, offsets ``int(round((H - h) / 2))`` with Python's half-to-even
  ``round``), then ``(x / 255 - mean) / std`` in float32. Like open_clip, a non-square ``image_size``
  in "shortest" mode resizes with ``round(side / min_ratio)`` per side and always with bicubic
  (open_clip's ``ResizeKeepRatio(image_size)`` does not receive the interpolation).
* ``numerics="hf"`` equals transformers (>= 5) ``CLIPImageProcessor`` / ``SiglipImageProcessor``
  (the torchvision backend): torch's antialiased ``interpolate`` on uint8 (as ``tvF.resize`` on CPU),
  crop offsets ``int((H - h) / 2)`` (floor), and the fused ``(x - 255 * mean) / (255 * std)``.
* ``numerics="hf_pil"`` equals ``CLIPImageProcessorPil`` / ``SiglipImageProcessorPil`` (and the slow
  processors of transformers 4.x): Pillow resize, floor crop offsets (padding ``ceil`` before), and
  ``(float32(float64(x) * rescale_factor) - mean) / std``.

Images are converted to RGB by ``fastclip.data.images.load_image`` *before* resizing. open_clip applied
directly to a non-RGB PIL image converts *after* resizing, which differs for some modes (P and 1 are
then resized with NEAREST, RGBA with premultiplied alpha, I;16 clipped at 255); for L and opaque RGBA
the two orders agree exactly.

Every pipeline ends in a uint8 (H, W, 3) array, so normalisation is a per-channel 256-entry lookup
table computed once with the reference's own float32 operations (exact by construction).
``Preprocess.raw`` / ``batch(..., raw=True)`` stop before it and return uint8 (3, H, W) levels; a vision
tower given ``pixel_norm`` (= ``Preprocess.pixel_norm``) folds the normalisation into its patch
embedding instead (fastclip.models.vit.fold_pixel_norm), which is what ``embed_images`` does.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ImageLoadError
from .budget import DEFAULT_INFLIGHT_PIXELS, DecodeLimits
from .images import DEFAULT_MAX_PIXELS, load_image, map_items, rgb_to_chw, rgb_to_hwx

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_RESIZE_MODES = ("shortest", "squash", "longest")
_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_NUMERICS = ("open_clip", "hf", "hf_pil")
_PIL_RESAMPLE_NAMES = {3: "bicubic", 2: "bilinear"}


def hf_resample(d: dict, what: str, default: int) -> str:
    """The interpolation name of a Hugging Face image processor config ``d`` (its ``resample``, PIL's code);
    ValueError naming ``what`` if it turns resizing, rescaling or normalisation off or resamples otherwise."""
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if d.get(flag, True) is False:
            raise ValueError(f"{what} with {flag}=false is not supported")
    resample = d.get("resample", default)
    if resample not in _PIL_RESAMPLE_NAMES:
        raise ValueError(f"unsupported resample {resample!r} (2=bilinear and 3=bicubic are supported)")
    return _PIL_RESAMPLE_NAMES[resample]

__all__ = ["PreprocessConfig", "Preprocess", "OPENAI_MEAN", "OPENAI_STD", "INCEPTION_MEAN", "INCEPTION_STD"]


@dataclass(frozen=True)
class PreprocessConfig:
    """How to turn an RGB image into a normalised (3, H, W) tensor.

    Attributes:
        image_size: output size, ``S`` or ``(H, W)``.
        mean, std: per-channel normalisation on the [0, 1] scale.
        resize_mode: "shortest" (resize the short side, centre crop; OpenAI / OpenCLIP / CLIP),
            "squash" (resize to exactly ``image_size``; SigLIP) or "longest" (open_clip's
            resize-longest-side then centre crop-or-pad with black).
        interpolation: "bicubic" or "bilinear".
        shortest_edge: in "shortest" mode, resize the short side to this (torchvision ``Resize(int)``,
            HF ``{"shortest_edge": S}``) and then crop ``image_size``; None: open_clip's rule.
        numerics: which reference to reproduce exactly: "open_clip", "hf" or "hf_pil" (module doc).
        rescale_factor: HF's ``rescale_factor`` (used by the "hf*" numerics only).
    """

    image_size: int | tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    shortest_edge: int | None = None
    numerics: str = "open_clip"
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"image_size must be S or (H, W) with positive sides, got {size!r}")
            object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        elif int(size) <= 0:
            raise ValueError(f"image_size must be positive, got {size!r}")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3:
                raise ValueError(f"{name} must have 3 values, got {v!r}")
            object.__setattr__(self, name, v)
        if 0.0 in self.std:
            raise ValueError(f"std must be non-zero, got {self.std!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.numerics not in _NUMERICS:
            raise ValueError(f"numerics must be one of {_NUMERICS}, got {self.numerics!r}")

    @property
    def size_hw(self) -> tuple[int, int]:
        """Output ``(H, W)``."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else s

    @classmethod
    def from_hf(cls, preprocessor_config: dict, *, backend: str = "torchvision") -> PreprocessConfig:
        """Build from a Hugging Face ``preprocessor_config.json`` (CLIP / SigLIP image processors).

        ``backend="torchvision"`` reproduces transformers >= 5's default ``CLIPImageProcessor`` /
        ``SiglipImageProcessor``; ``backend="pil"`` the ``*ImageProcessorPil`` classes (equal to the
        slow processors of transformers 4.x). Missing keys take the class defaults (SigLIP when
        ``image_processor_type`` mentions Siglip, CLIP otherwise). Alpha is not composited onto white
        as HF does: fastclip's loader drops it like open_clip (see ``fastclip.data.images``).
        """
        d = dict(preprocessor_config)
        if backend not in ("torchvision", "pil"):
            raise ValueError(f"backend must be 'torchvision' or 'pil', got {backend!r}")
        siglip = "siglip" in str(d.get("image_processor_type", d.get("feature_extractor_type", ""))).lower()
        interpolation = hf_resample(d, "preprocessor config", 3)
        mean = d.get("image_mean", INCEPTION_MEAN if siglip else OPENAI_MEAN)
        std = d.get("image_std", INCEPTION_STD if siglip else OPENAI_STD)
        size = d.get("size", {"height": 224, "width": 224} if siglip else {"shortest_edge": 224})
        if isinstance(size, int):  # legacy configs: CLIP's default_to_square=False, SigLIP's square
            size = {"height": size, "width": size} if siglip else {"shortest_edge": size}
        do_crop = d.get("do_center_crop", not siglip)
        crop = d.get("crop_size", 224) if do_crop else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        common = dict(mean=tuple(mean), std=tuple(std), interpolation=interpolation,
                      numerics="hf" if backend == "torchvision" else "hf_pil",
                      rescale_factor=float(d.get("rescale_factor", 1 / 255)))
        if "shortest_edge" in size and "longest_edge" not in size and crop is not None:
            hw = (int(crop["height"]), int(crop["width"]))
            return cls(image_size=hw[0] if hw[0] == hw[1] else hw, resize_mode="shortest",
                       shortest_edge=int(size["shortest_edge"]), **common)
        if "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
            if crop is None or (int(crop["height"]), int(crop["width"])) == hw:
                return cls(image_size=hw[0] if hw[0] == hw[1] else hw, resize_mode="squash", **common)
        raise ValueError(f"unsupported size/crop combination: size={size!r}, crop_size={crop!r}, "
                         f"do_center_crop={do_crop!r}")


def _short_side_size(h: int, w: int, s: int) -> tuple[int, int]:
    """torchvision ``_compute_resized_output_size`` for an int size (also HF's shortest_edge rule)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = s, int(s * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _normalisation_lut(cfg: PreprocessConfig) -> np.ndarray:
    """(3, 256) float32: the normalised value of each uint8 level, with the reference's own ops."""
    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 1)  # (3, 256)
    if cfg.numerics == "open_clip":  # ToTensor: x.float().div(255); Normalize: sub_(mean).div_(std)
        mean = torch.as_tensor(cfg.mean, dtype=torch.float32)[:, None]
        std = torch.as_tensor(cfg.std, dtype=torch.float32)[:, None]
        out = levels.to(torch.float32).div(255).sub_(mean).div_(std)
    elif cfg.numerics == "hf":  # fused: mean / rescale_factor, std / rescale_factor (float32 tensors)
        mean = (torch.tensor(list(cfg.mean)) * (1.0 / cfg.rescale_factor))[:, None]
        std = (torch.tensor(list(cfg.std)) * (1.0 / cfg.rescale_factor))[:, None]
        out = levels.to(torch.float32).sub(mean).div_(std)
    else:  # hf_pil: numpy rescale in float64 then float32; normalise in float32
        x = (levels.numpy().astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        mean = np.array(cfg.mean, dtype=np.float32)[:, None]
        std = np.array(cfg.std, dtype=np.float32)[:, None]
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
    return out.numpy()


class Preprocess(DecodeLimits):
    """Callable preprocessing: image item -> normalised float32 tensor of shape (3, H, W).

    ``threads`` sets the worker count of ``batch`` (default: CPU count; 1 = no thread pool).
    ``max_inflight_pixels``: the ``budget`` (a ``fastclip.data.budget.PixelBudget``) shared by every decode of
    this Preprocess -- all threads of all ``batch`` calls, e.g. ``embed_images``' prefetch of the next batch
    while one is encoded, and ``__call__`` -- bounding the decoded full-size pixels in flight (default
    ``DEFAULT_INFLIGHT_PIXELS``, 64 Mi pixels; an image larger than that runs alone; None: unbounded).
    ``max_image_pixels``: images with more pixels are refused from their header, before decoding
    (an ``ImageLoadError``; default ``fastclip.data.images.DEFAULT_MAX_PIXELS``).
    """

    def __init__(self, cfg: PreprocessConfig, threads: int | None = None,
                 max_inflight_pixels: int | None = DEFAULT_INFLIGHT_PIXELS,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS):
        self.cfg = cfg
        self.threads = threads
        self._set_decode_limits(max_inflight_pixels, max_image_pixels)
        self._lut = _normalisation_lut(cfg)
        self._resample = _INTERPOLATIONS[cfg.interpolation]

    def __repr__(self) -> str:
        return f"Preprocess({self.cfg!r}, threads={self.threads!r})"

    # -- geometry ------------------------------------------------------------------------------
    def _resize_to(self, img: Image.Image, hw: tuple[int, int], resample) -> np.ndarray:
        """RGB PIL image -> uint8 (hw[0], hw[1], 3), using the configured resampler."""
        if (img.height, img.width) == tuple(hw):
            return np.asarray(img)
        if self.cfg.numerics != "hf":
            return np.asarray(img.resize((hw[1], hw[0]), resample))
        # transformers' torchvision backend: tvF.resize on a contiguous (1, 3, H, W) uint8 tensor.
        # On CPU torchvision feeds uint8 straight to interpolate for bicubic, and for bilinear when
        # the CPU has AVX2/AVX512 (or is ARM); otherwise via float32 + clamp + round.
        mode = "bicubic" if resample == Image.Resampling.BICUBIC else "bilinear"
        avx = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        native = mode == "bicubic" or avx or platform.machine() in ("aarch64", "arm64")
        resize = functools.partial(torch.nn.functional.interpolate, size=list(hw), mode=mode, align_corners=False,
                                   antialias=True)
        if avx:
            # x86's uint8 kernel computes on 4-byte pixels and repacks a 3-channel input into them first (4 bytes
            # a pixel more); given channels-last RGBX it reads the pixels in place. Same values for R, G, B.
            t = torch.from_numpy(rgb_to_hwx(img)).permute(2, 0, 1)[None]  # (1, 4, H, W), channels-last
            return resize(t)[0, :3].permute(1, 2, 0).numpy()  # (h, w, 3)
        t = torch.from_numpy(rgb_to_chw(img))[None]  # (1, 3, H, W) contiguous uint8
        if native:
            out = resize(t)
        else:
            out = resize(t.float()).clamp_(0, 255).round_().to(torch.uint8)
        return out[0].permute(1, 2, 0).numpy()

    def _crop_or_pad(self, a: np.ndarray, th: int, tw: int) -> np.ndarray:
        """Centre crop uint8 (h, w, 3) to (th, tw, 3), zero-padding first where it is smaller."""
        h, w = a.shape[:2]
        if th > h or tw > w:
            dh, dw = max(th - h, 0), max(tw - w, 0)
            if self.cfg.numerics == "hf_pil":  # HF numpy center_crop pads ceil(d / 2) before
                top, left = (dh + 1) // 2, (dw + 1) // 2
            else:  # torchvision pads d // 2 left/top, (d + 1) // 2 right/bottom
                top, left = dh // 2, dw // 2
            out = np.zeros((h + dh, w + dw, 3), dtype=np.uint8)
            out[top:top + h, left:left + w] = a
            a, (h, w) = out, out.shape[:2]
        if (h, w) == (th, tw):
            return a
        if self.cfg.numerics == "open_clip":
            top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))  # half-to-even
        else:
            top, left = (h - th) // 2, (w - tw) // 2
        return a[top:top + th, left:left + tw]

    def _resize_plan(self, h: int, w: int) -> tuple[tuple[int, int], Any]:
        """(the (height, width) an h x w image is resized to before the crop, the resampler)."""
        cfg = self.cfg
        th, tw = cfg.size_hw
        if cfg.resize_mode == "squash":
            return (th, tw), self._resample
        if cfg.resize_mode == "shortest" and (cfg.shortest_edge is not None or th == tw):
            return _short_side_size(h, w, cfg.shortest_edge if cfg.shortest_edge is not None else th), self._resample
        # open_clip ResizeKeepRatio: "longest" or non-square "shortest"
        ratio = (max if cfg.resize_mode == "longest" else min)(h / th, w / tw)
        resample = self._resample
        if cfg.resize_mode == "shortest" and cfg.numerics == "open_clip":
            resample = Image.Resampling.BICUBIC  # open_clip does not pass interpolation here
        return (round(h / ratio), round(w / ratio)), resample

    def resize_crop(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array (H, W, 3) of the configured output size, before normalising."""
        hw, resample = self._resize_plan(img.height, img.width)
        return self._crop_or_pad(self._resize_to(img, hw, resample), *self.cfg.size_hw)

    @property
    def output_size_is_fixed_point(self) -> bool:
        """Whether ``resize_crop`` returns an image already at the output size unchanged (no resize, no crop):
        then its levels stand for the original image exactly (the service keeps them instead of the full-size
        image). False e.g. for a processor resizing the short side to more than its crop size."""
        th, tw = self.cfg.size_hw
        return self._resize_plan(th, tw)[0] == (th, tw)

    # -- public ----------------------------------------------------------------------------------
    @property
    def pixel_norm(self) -> tuple[float, tuple[float, float, float], tuple[float, float, float]]:
        """(scale, mean, std) with normalised = (scale * level - mean) / std, per channel: what
        ``normalise`` computes (up to float rounding) from uint8 levels."""
        cfg = self.cfg
        return (1 / 255 if cfg.numerics == "open_clip" else cfg.rescale_factor), cfg.mean, cfg.std

    def normalise(self, a: np.ndarray, out: np.ndarray | None = None) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 tensor (3, H, W) through the normalisation lookup table.

        ``out``: optional float32 (3, H, W) array to write into (then returned as a tensor view of it).
        """
        if out is None:
            out = np.empty((3,) + a.shape[:2], dtype=np.float32)
        for c in range(3):
            np.take(self._lut[c], a[:, :, c], out=out[c], mode="clip")  # levels are < 256: clip is a no-op
        return torch.from_numpy(out)

    def load_levels(self, image: Any, *, index: int | None = None, max_image_pixels: int | None = None) -> np.ndarray:
        """One item (any kind ``load_image`` accepts) -> uint8 (H, W, 3) resized / cropped, before normalising.
        Decode and resize hold the image's pixels in ``budget``; ``max_image_pixels`` (None: this Preprocess's
        ``max_image_pixels``) refuses larger images from their header (``ImageLoadError`` naming the size)."""
        return load_image(image, index=index, max_pixels=self._pixel_limit(max_image_pixels), budget=self.budget, transform=self.resize_crop)

    def __call__(self, image: Any) -> torch.Tensor:
        """One image (an RGB PIL image, or any item ``load_image`` accepts) -> (3, H, W) float32."""
        return self.normalise(self.load_levels(image))

    def raw(self, image: Any) -> torch.Tensor:
        """One image -> uint8 (3, H, W) resized/cropped levels, before normalising (see ``pixel_norm``)."""
        return torch.from_numpy(np.ascontiguousarray(self.load_levels(image).transpose(2, 0, 1)))

    def batch(self, items: Sequence[Any], *, on_error: str = "raise", progress: bool = False,
              index_offset: int = 0, raw: bool = False, max_image_pixels: int | None = None
              ) -> tuple[torch.Tensor, list[int], list[ImageLoadError]]:
        """Decode + preprocess many items in parallel threads.

        Returns ``(pixels, kept, errors)``: ``pixels`` is float32 (B_ok, 3, H, W) for the items that
        loaded (with ``raw=True``: their uint8 levels before normalising, see ``pixel_norm``), ``kept``
        their indices in ``items`` (increasing), ``errors`` the ``ImageLoadError`` of the others (only
        with ``on_error="skip"``; ``"raise"`` raises the lowest-index error).
        Errors name each item's position as ``index_offset + i`` (its place in the caller's list).
        Each worker writes its image straight into the batch buffer. The decoded full-size pixels in flight
        across all workers (and other calls on this Preprocess) stay within ``budget``; ``max_image_pixels``
        (None: this Preprocess's setting) refuses larger images from their header, as an ``ImageLoadError``.
        """
        th, tw = self.cfg.size_hw
        buf = np.empty((len(items), 3, th, tw), dtype=np.uint8 if raw else np.float32)  # (B, 3, H, W)

        def one(item, i):
            a = self.load_levels(item, index=index_offset + i, max_image_pixels=max_image_pixels)  # (H, W, 3) uint8
            if raw:
                np.copyto(buf[i], a.transpose(2, 0, 1))
            else:
                self.normalise(a, out=buf[i])
            return True

        results, errors = map_items(one, items, threads=self.threads, on_error=on_error, progress=progress,
                                    desc="preprocess")
        kept = [i for i, r in enumerate(results) if r is not None]
        pixels = torch.from_numpy(buf)
        if len(kept) < len(items):
            pixels = pixels[kept]  # (B_ok, 3, H, W)
        return pixels, kept, errors
