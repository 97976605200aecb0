"""Decoding image items into RGB PIL images.

``load_image`` accepts every kind of image item fastclip takes (a path, encoded bytes, a PIL image, a
numpy array or a torch tensor) and returns an 8-bit RGB ``PIL.Image.Image`` of shape (H, W, 3) once
converted with ``np.asarray``. ``load_images`` does the same for a list of items in a thread pool.

Conversion rules (every PIL mode ends as 8-bit RGB):

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``) for files, bytes and PIL images, so a
  phone photo comes out upright. A malformed EXIF block is ignored rather than failing the image.
* Alpha is *dropped*, exactly as open_clip's ``_convert_to_rgb`` / ``MaybeConvertMode`` do
  (``image.convert("RGB")``): RGBA, LA, PA and palette images with transparency keep their colour
  values where alpha is 0. This is a deliberate choice so that embeddings equal the open_clip
  reference; note that transformers (>= 5) instead composites alpha onto white, so results for
  transparent images differ from transformers' processors (not from open_clip's).
* 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` and ``I``, which Pillow uses for 16-bit
  PNGs) is scaled to 8 bits as ``round(v / 257)`` (i.e. 65535 -> 255); ``I`` values are clipped to
  [0, 65535] first. Pillow's own ``convert`` would clip at 255 instead, turning most of the image white.
* ``F`` (32-bit float) follows Pillow's convention that the range is 0..255: rounded to nearest,
  clipped, NaN -> 0.
* 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La: Pillow's ``convert`` (via LA for La).

Arrays: numpy (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with dtype uint8, uint16 (scaled by 1/257),
bool, or float in [0, 1] (scaled by 255 and rounded; values outside [-1e-3, 1 + 1e-3] or non-finite
are an error, since they usually mean a 0..255 float image). Torch tensors: (3, H, W), (1, H, W),
(4, H, W), (H, W, 3), (H, W, 1), (H, W, 4) or (H, W) - leading size 1, 3 or 4 means channels-first -
of dtype uint8 / float / bool; they are moved to the CPU and treated as the numpy array.

Memory: the pixel limit (``max_pixels``) is checked from the header before decoding; with a
``fastclip.data.budget.PixelBudget`` the image's pixels are held in the budget through decode, conversion
and the caller's ``transform`` (the resize), so the threads sharing a budget bound the decoded pixels in
flight. Conversions of 16-bit, float and array images work in strips of rows (no whole-image int64 /
float temporaries).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError
from .budget import PixelBudget

DEFAULT_MAX_PIXELS = 178_956_970  # = 2 * PIL.Image.MAX_IMAGE_PIXELS, where Pillow itself refuses

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# Pillow allocates an image in blocks (16 MiB by default). glibc serves allocations below its mmap threshold
# (which rises to at most 32 MiB) from per-thread heaps that keep the memory once freed, so each decode thread
# could go on holding a whole decoded image after it is released. Blocks of 64 MiB are mmapped and returned
# to the system when freed, so the budget bounds the resident memory too. Not done if PILLOW_BLOCK_SIZE is set.
_PIL_BLOCK_SIZE = 64 * 2**20
if "PILLOW_BLOCK_SIZE" not in os.environ and Image.core.get_block_size() < _PIL_BLOCK_SIZE:
    Image.core.set_block_size(_PIL_BLOCK_SIZE)
_STRIP_PIXELS = 1 << 20  # conversions of a large image run in strips of rows of about this many pixels

__all__ = ["load_image", "load_images", "describe_item", "rgb_to_chw", "rgb_to_hwx", "DEFAULT_MAX_PIXELS"]


def describe_item(item: Any) -> str:
    """A short description of an item for error messages: the path itself, or its type and size."""
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        return path if isinstance(path, str) else repr(path)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{type(item).__name__} of {memoryview(item).nbytes} bytes>"
    if isinstance(item, Image.Image):
        return f"<PIL.Image mode={item.mode} size={item.size[0]}x{item.size[1]}>"
    if isinstance(item, np.ndarray):
        return f"<numpy.ndarray shape={tuple(item.shape)} dtype={item.dtype}>"
    shape, dtype = getattr(item, "shape", None), getattr(item, "dtype", None)
    if shape is not None and dtype is not None:
        return f"<{type(item).__module__}.{type(item).__name__} shape={tuple(shape)} dtype={dtype}>"
    return f"<{type(item).__module__}.{type(item).__name__}>"


def _row_ranges(h: int, w: int) -> list[tuple[int, int]]:
    """(r0, r1) strips of rows covering an (h, w) image, each of about ``_STRIP_PIXELS`` pixels."""
    step = max(1, _STRIP_PIXELS // max(w, 1))
    return [(r, min(r + step, h)) for r in range(0, h, step)]


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    """uint16-range integers (H, W[, C]) -> uint8 as round(v / 257) (exact: 257 is odd so there are no ties);
    other integer types are clipped to [0, 65535] first. uint32 arithmetic (exact: 65535 + 128 fits) in strips
    of rows, so the temporaries are one strip, not the whole image."""
    out = np.empty(a.shape, dtype=np.uint8)
    for r0, r1 in _row_ranges(a.shape[0], a.shape[1]):
        s = a[r0:r1]
        if not (s.dtype.kind == "u" and s.dtype.itemsize <= 2):
            s = np.clip(s, 0, 65535)
        s = s.astype(np.uint32)  # (rows, W[, C]), a copy
        s += 128
        s //= 257
        out[r0:r1] = s
    return out


def _f_to_u8(a: np.ndarray) -> np.ndarray:
    """Pillow "F" values (0..255 scale) -> uint8: rounded to nearest, clipped, NaN -> 0 (elementwise)."""
    a = np.nan_to_num(a.astype(np.float32), copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8)


def _band_to_l(img: Image.Image, fn) -> Image.Image:
    """Single-band PIL image (I;16*, I, F) -> 8-bit "L" image; ``fn`` maps each strip of rows (a numpy array)
    to uint8. Strips are cropped one at a time, so no whole-image temporary is made besides the result."""
    w, h = img.size
    out = np.empty((h, w), dtype=np.uint8)  # (H, W)
    for r0, r1 in _row_ranges(h, w):
        out[r0:r1] = fn(np.asarray(img.crop((0, r0, w, r1))))
    return Image.fromarray(out)


def rgb_to_chw(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 array (3, H, W), filled in strips of rows (``np.array(img)`` makes two
    whole-image temporaries on the way: Pillow's ``tobytes`` chunks and their join)."""
    w, h = img.size
    out = np.empty((3, h, w), dtype=np.uint8)  # (3, H, W)
    for r0, r1 in _row_ranges(h, w):
        out[:, r0:r1] = np.asarray(img.crop((0, r0, w, r1))).transpose(2, 0, 1)  # (3, rows, W)
    return out


def rgb_to_hwx(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 array (H, W, 4): R, G, B and a padding byte per pixel (Pillow's own RGBX
    layout), filled in strips of rows. Channels-last 4-byte pixels are what torch's uint8 resize kernel
    works on, so it needs no repacked copy of such an input."""
    w, h = img.size
    out = np.empty((h, w, 4), dtype=np.uint8)  # (H, W, 4)
    for r0, r1 in _row_ranges(h, w):
        strip = img.crop((0, r0, w, r1)).tobytes("raw", "RGBX")
        out[r0:r1] = np.frombuffer(strip, dtype=np.uint8).reshape(r1 - r0, w, 4)
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        return _band_to_l(img, _u16_to_u8).convert("RGB")
    if mode == "F":
        return _band_to_l(img, _f_to_u8).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        # Same colours as convert("RGB") (checked in tests) without Pillow's "should be converted to
        # RGBA" warning for byte-string transparency.
        return img.convert("RGBA").convert("RGB")
    if mode == "La":
        img = img.convert("LA")
    return img.convert("RGB")


def _check_size(size: tuple[int, int], max_pixels: int, index, desc) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageLoadError(f"image has zero size ({w}x{h})", index=index, item=desc)
    if w * h > max_pixels:
        raise ImageLoadError(
            f"image has too many pixels ({w}x{h} = {w * h} > max_pixels={max_pixels}); "
            "refusing to decode a possible decompression bomb", index=index, item=desc)


def _unit_float_to_u8(a: np.ndarray, index, desc) -> np.ndarray:
    """Float (H, W, C) in [0, 1] -> uint8 as rint(clip(v, 0, 1) * 255), in float32 at least; checked, then
    converted in strips of rows (no whole-image float temporaries)."""
    rows = _row_ranges(a.shape[0], a.shape[1])
    strip = (lambda s: s.astype(np.float32)) if a.itemsize < 4 else (lambda s: s)
    lo, hi = np.inf, -np.inf
    for r0, r1 in rows:
        f = strip(a[r0:r1])
        if not np.isfinite(f).all():
            raise ImageLoadError("float array contains NaN or infinity", index=index, item=desc)
        lo, hi = min(lo, float(f.min())), max(hi, float(f.max()))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ImageLoadError(
            f"float array values must be in [0, 1], got [{lo:g}, {hi:g}] (divide 0..255 data by 255)",
            index=index, item=desc)
    out = np.empty(a.shape, dtype=np.uint8)
    for r0, r1 in rows:
        out[r0:r1] = np.rint(np.clip(strip(a[r0:r1]), 0, 1) * 255).astype(np.uint8)
    return out


def _array_to_rgb(a: np.ndarray, index, desc, max_pixels: int) -> Image.Image:
    """(H, W[, C]) numpy array -> RGB PIL image, following the module docstring."""
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        pass
    elif a.ndim == 2:
        a = a[:, :, None]
    else:
        raise ImageLoadError(
            f"unsupported array shape {tuple(a.shape)}: expected (H, W), (H, W, 1), (H, W, 3) or "
            "(H, W, 4) (torch tensors may also be channels-first)", index=index, item=desc)
    _check_size((a.shape[1], a.shape[0]), max_pixels, index, desc)
    if a.dtype == np.uint8:
        a8 = a
    elif a.dtype == np.bool_:
        a8 = a.view(np.uint8) * np.uint8(255)
    elif a.dtype == np.uint16:
        a8 = _u16_to_u8(a)
    elif a.dtype.kind == "f":
        a8 = _unit_float_to_u8(a, index, desc)
    else:
        raise ImageLoadError(f"unsupported array dtype {a.dtype}: expected uint8, uint16, bool or float "
                             "in [0, 1]", index=index, item=desc)
    c = a8.shape[2]
    if c == 1:  # grey -> RGB by Pillow (no (H, W, 3) temporary)
        return Image.fromarray(np.ascontiguousarray(a8[:, :, 0])).convert("RGB")
    if c == 4:  # drop alpha, as PIL's RGBA -> RGB convert does (an RGBA image shares the array's memory)
        return Image.fromarray(np.ascontiguousarray(a8), "RGBA").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(a8))


def _tensor_to_array(t, index, desc) -> np.ndarray:
    """torch tensor (C, H, W) / (H, W, C) / (H, W) -> numpy (H, W[, C]) on the CPU."""
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif not (t.ndim == 2 or (t.ndim == 3 and t.shape[2] in (1, 3, 4))):
        raise ImageLoadError(f"unsupported tensor shape {tuple(t.shape)}: expected (3, H, W) or (H, W, 3)",
                             index=index, item=desc)
    try:
        return t.contiguous().numpy()
    except TypeError as e:  # dtypes numpy lacks
        raise ImageLoadError(f"unsupported tensor dtype {t.dtype}: {e}", index=index, item=desc) from None


def _open_encoded(fp, index, desc, max_pixels: int) -> Image.Image:
    """Open an encoded image from a binary file object, lazily: only the header is read (size checked)."""
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageLoadError("not a recognised image file (unknown format or corrupt header)",
                             index=index, item=desc) from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image has too many pixels (decompression bomb): {e}",
                             index=index, item=desc) from None
    except Exception as e:  # Pillow raises many types for bad headers
        raise ImageLoadError(f"cannot open image: {type(e).__name__}: {e}", index=index, item=desc) from None
    _check_size(img.size, max_pixels, index, desc)
    return img


def _open(item: Any, index, desc, max_pixels: int, stack: ExitStack):
    """An item, opened but not decoded: a PIL image (lazily opened for paths and bytes; the file stays open
    in ``stack``) with its size checked, or the numpy array / torch tensor itself."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _open_encoded(io.BytesIO(item), index, desc, max_pixels)
    if isinstance(item, (str, os.PathLike)):
        try:
            f = stack.enter_context(open(item, "rb"))
        except FileNotFoundError:
            raise ImageLoadError("file not found", index=index, item=desc) from None
        except IsADirectoryError:
            raise ImageLoadError("path is a directory, not an image file", index=index, item=desc) from None
        except PermissionError:
            raise ImageLoadError("permission denied", index=index, item=desc) from None
        except OSError as e:
            raise ImageLoadError(f"cannot read file: {e}", index=index, item=desc) from None
        return _open_encoded(f, index, desc, max_pixels)
    if isinstance(item, Image.Image):
        _check_size(item.size, max_pixels, index, desc)
        return item
    if isinstance(item, np.ndarray):
        if item.ndim in (2, 3):  # refused before waiting for the budget (shapes are checked when converting)
            _check_size((item.shape[1], item.shape[0]), max_pixels, index, desc)
        return item
    if type(item).__module__.startswith("torch") and hasattr(item, "detach"):
        return item
    raise ImageLoadError(f"unsupported item type {type(item).__name__}: expected a path, bytes, "
                         "PIL image, numpy array or torch tensor", index=index, item=desc)


def _pixel_count(src) -> int:
    """Pixels of an item from ``_open``, without decoding: a PIL image's header size, an array's (H, W) (a
    torch tensor's leading size 1, 3 or 4 is its channels, as ``_tensor_to_array`` reads it)."""
    if isinstance(src, Image.Image):
        return src.size[0] * src.size[1]
    shape = tuple(src.shape)
    if len(shape) == 3 and not isinstance(src, np.ndarray) and shape[0] in (1, 3, 4):
        return shape[1] * shape[2]
    return shape[0] * shape[1] if len(shape) >= 2 else 0


def _finish(src, index, desc, max_pixels: int) -> Image.Image:
    """An item from ``_open`` -> RGB PIL image: decode (errors for corrupt / truncated data), EXIF orientation,
    mode conversion."""
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, index, desc, max_pixels)
    if not isinstance(src, Image.Image):  # a torch tensor
        return _array_to_rgb(_tensor_to_array(src, index, desc), index, desc, max_pixels)
    img = src
    try:
        img.load()  # decode now (a PIL image given as the item may still be lazy) so bad data is caught here
    except Exception as e:
        raise ImageLoadError(f"corrupt or truncated image data: {type(e).__name__}: {e}",
                             index=index, item=desc) from None
    try:
        if img.getexif().get(0x0112, 1) not in (1, None):
            img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # malformed EXIF: keep the stored orientation rather than losing the image
    try:
        return _to_rgb(img)
    except Exception as e:
        raise ImageLoadError(f"cannot convert mode {img.mode} to RGB: {e}", index=index, item=desc) from None


def load_image(item: Any, *, index: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               budget: PixelBudget | None = None, transform: Callable[[Image.Image], Any] | None = None) -> Any:
    """Load one image item and return it as an RGB PIL image (size W x H, mode "RGB").

    Args:
        item: a path (``str`` / ``os.PathLike``), encoded file content (``bytes`` / ``bytearray`` /
            ``memoryview``; never interpreted as a path), a ``PIL.Image.Image``, a numpy array or a
            torch tensor (see the module docstring for accepted shapes and dtypes).
        index: position of the item in the caller's batch, reported in errors.
        max_pixels: refuse images with more pixels than this (checked from the header, before
            decoding). Pillow's own limit (2 * ``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top.
        budget: a ``fastclip.data.budget.PixelBudget`` shared with other decode threads: the image's
            pixel count (read from the header) is held from before decoding until the RGB image -- or,
            with ``transform``, its result -- is returned, so the decoded pixels in flight stay bounded.
        transform: applied to the RGB image while ``budget`` is still held (e.g. the resize); its result
            is returned instead of the image, and the full-size image is released before the budget is.

    Returns an RGB image (``transform(image)`` if given); an RGB, upright PIL image given as ``item`` is
    returned as is (not copied).

    Raises:
        ImageLoadError: naming the item (the path, or its type) and ``index``, with the reason.
    """
    desc = describe_item(item)
    with ExitStack() as stack:  # closes the file (if any) on the way out, after the budget is released
        src = _open(item, index, desc, max_pixels, stack)
        if budget is not None:
            stack.enter_context(budget.hold(_pixel_count(src)))
        img = _finish(src, index, desc, max_pixels)
        del src  # only the RGB image stays referenced (a converted source is freed now)
        if transform is None:
            return img
        out = transform(img)
        del img  # freed before the budget is released
        return out


def _resolve_threads(threads: int | None, n: int) -> int:
    if threads is None:
        threads = os.cpu_count() or 1
    return max(1, min(int(threads), n))


def map_items(fn, items: Sequence[Any], *, threads: int | None = None, on_error: str = "raise",
              progress: bool = False, desc: str = "images"):
    """Apply ``fn(item, index)`` to each item in a thread pool, keeping order.

    Returns ``(results, errors)``: ``results[i]`` is ``fn``'s value or None where it raised an
    ``ImageLoadError``; ``errors`` lists those errors by increasing index. With ``on_error="raise"``
    the error of the lowest failing index is raised instead (later work is cancelled).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    items = list(items)
    n = len(items)
    results: list[Any] = [None] * n
    errors: list[ImageLoadError] = []

    def work(i):
        try:
            return fn(items[i], i), None
        except ImageLoadError as e:
            # The error names the item and the reason; its traceback (and the exception it replaced) would
            # keep the worker's frames -- and a failed image's decoded pixels -- alive as long as the error.
            e.__traceback__ = e.__context__ = None
            return None, e

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=desc, unit="img")
    workers = _resolve_threads(threads, n)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        outs = pool.map(work, range(n)) if pool else (work(i) for i in range(n))
        for i, (value, err) in enumerate(outs):  # in index order, so the first error seen is the lowest
            if err is not None:
                if on_error == "raise":
                    raise err
                errors.append(err)
            results[i] = value
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return results, errors


def load_images(items: Iterable[Any], *, threads: int | None = None, on_error: str = "raise",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Image.Image | None], list[ImageLoadError]]:
    """Decode many items in a thread pool (``threads`` workers, default: CPU count; 1 = no pool).

    Returns ``(images, errors)`` with ``images[i]`` the RGB image of ``items[i]`` (same order).
    ``on_error="raise"`` raises the ``ImageLoadError`` of the lowest failing index;
    ``on_error="skip"`` puts None in failed slots and returns their errors (by increasing index).
    """
    return map_items(lambda it, i: load_image(it, index=i, max_pixels=max_pixels), list(items),
                     threads=threads, on_error=on_error)
