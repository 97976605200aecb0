"""Turning image references from requests into decoded RGB PIL images, with limits.

A reference is a ``data:image/...;base64,`` URI, bare base64, or an ``http(s)`` URL whose host is on
the operator's allow-list. Nothing here ever opens a local path: references become *bytes* first, and
only bytes reach ``fastclip.data.images.load_image``. Every failure is an ``ItemProblem`` naming the item
as ``input[i]`` with the reason; the route answers it with a 4xx.

Memory: with the model's square-output ``Preprocess`` (``fastclip.data.preprocess``), an image is decoded
under that preprocess's pixel budget (shared with ``embed_images``' own decode threads) and resized / cropped
at once, so a request waiting for its micro-batch holds the output-size uint8 levels (224 x 224 x 3 bytes for
a ViT-B) rather than the full-size image. ``embed_images`` maps those levels to the same embedding as the
original image (resizing an image already at the output size is the identity; ``Preprocess.
output_size_is_fixed_point``). Other preprocessing (NaFlex's per-image sizes) keeps the full-size image, still
decoded under the budget.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from ..data.images import load_image
from ..data.preprocess import Preprocess
from ..errors import ImageLoadError
from .config import ServerConfig


class ItemProblem(Exception):
    """A bad item: ``index`` in the request's ``input``, ``reason``, HTTP ``status`` (400 or 413)."""

    def __init__(self, index: int, reason: str, status: int = 400, code: str = "invalid_item"):
        self.index, self.reason, self.status, self.code = index, reason, status, code
        super().__init__(f"input[{index}]: {reason}")


def _b64(text: str, index: int, max_bytes: int) -> bytes:
    text = "".join(text.split())  # base64 may be wrapped over lines
    if not text:
        raise ItemProblem(index, "empty image data")
    if len(text) // 4 * 3 > max_bytes + 3:  # refuse before decoding
        raise ItemProblem(index, f"image is larger than the limit of {max_bytes} bytes", 413, "image_too_large")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ItemProblem(index, f"invalid base64 ({e})") from None
    if len(data) > max_bytes:
        raise ItemProblem(index, f"image is larger than the limit of {max_bytes} bytes", 413, "image_too_large")
    return data


def _data_uri(uri: str, index: int, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ItemProblem(index, "malformed data URI: no ',' before the data")
    params = header[len("data:"):].split(";")
    if not params[0].lower().startswith("image/"):
        raise ItemProblem(index, f"data URI media type must be image/*, got {params[0] or 'none'!r}")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ItemProblem(index, "data URI must be base64-encoded (data:image/...;base64,...)")
    return _b64(payload, index, max_bytes)


def host_allowed(url: str, allow_hosts: tuple[str, ...]) -> bool:
    """Whether ``url``'s host (or host:port) is on the allow-list (``*.example.com`` = sub-domains)."""
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return False
    if not host:
        return False
    for entry in allow_hosts:
        name, _, want_port = entry.partition(":") if not entry.startswith("[") else (entry, "", "")
        if want_port and str(port or (443 if parts.scheme == "https" else 80)) != want_port:
            continue
        if name == host or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False


async def _fetch(url: str, index: int, cfg: ServerConfig, client) -> bytes:
    """GET an allowed http(s) URL (no redirects), streaming at most ``max_image_bytes``."""
    import httpx

    if not cfg.allow_url_hosts:
        raise ItemProblem(index, "URL inputs are disabled on this server; send a data URI or base64")
    if not host_allowed(url, cfg.allow_url_hosts):
        raise ItemProblem(index, "URL host is not on this server's allow-list")
    limit = cfg.max_image_bytes
    try:
        async with client.stream("GET", url, follow_redirects=False, timeout=cfg.url_timeout_s) as resp:
            if resp.status_code != 200:
                raise ItemProblem(index, f"fetching the URL returned HTTP {resp.status_code}", 422, "fetch_failed")
            size = resp.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > limit:
                raise ItemProblem(index, f"image is larger than the limit of {limit} bytes", 413, "image_too_large")
            chunks, total = [], 0
            async for chunk in resp.aiter_bytes():
                total += len(chunk)
                if total > limit:
                    raise ItemProblem(index, f"image is larger than the limit of {limit} bytes", 413,
                                      "image_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise ItemProblem(index, f"cannot fetch the URL: {type(e).__name__}", 422, "fetch_failed") from None


async def image_bytes(ref: str, index: int, cfg: ServerConfig, client) -> bytes:
    """An image reference from a request -> its encoded bytes (never reads a local file)."""
    if ref.startswith("data:"):
        return _data_uri(ref, index, cfg.max_image_bytes)
    scheme = ref.split(":", 1)[0].lower() if ":" in ref[:8] else ""
    if scheme in ("http", "https"):
        return await _fetch(ref, index, cfg, client)
    if scheme:
        raise ItemProblem(index, f"unsupported URL scheme {scheme!r}: send a data URI, base64 or an http(s) URL")
    return _b64(ref, index, cfg.max_image_bytes)


def _early_resize(preprocess) -> Callable[[Image.Image], np.ndarray] | None:
    """``preprocess.resize_crop`` where its uint8 output stands for the image exactly (see the module doc)."""
    if isinstance(preprocess, Preprocess) and preprocess.output_size_is_fixed_point:
        return preprocess.resize_crop
    return None


def decode_image(data: bytes, index: int, cfg: ServerConfig, preprocess=None) -> Image.Image | np.ndarray:
    """Encoded bytes -> RGB PIL image, refusing bombs (pixel limit read from the header) and tiny images.

    ``preprocess``: the model's; its pixel budget bounds the decode, and a square-output ``Preprocess`` makes
    the result its uint8 (H, W, 3) resized / cropped levels instead of the full-size image (module doc)."""
    resize = _early_resize(preprocess)
    budget = getattr(preprocess, "budget", None)

    def checked(img: Image.Image):  # runs on the full-size RGB image, inside the budget
        w, h = img.size
        if min(w, h) < cfg.min_image_side:
            raise ItemProblem(index, f"image is {w}x{h}; both sides must be at least {cfg.min_image_side} pixels",
                              400, "image_too_small")
        return img if resize is None else resize(img)

    try:
        return load_image(data, index=index, max_pixels=cfg.max_image_pixels, budget=budget, transform=checked)
    except ItemProblem:
        raise
    except ImageLoadError as e:
        status = 413 if "too many pixels" in e.reason else 400
        raise ItemProblem(index, e.reason, status, "image_too_large" if status == 413 else "invalid_image") from None
    except Exception as e:  # anything else Pillow may raise on hostile data is still the item's fault
        raise ItemProblem(index, f"cannot decode image: {type(e).__name__}", 400, "invalid_image") from None


async def load_request_images(refs: list[tuple[int, str]], cfg: ServerConfig, client,
                              preprocess=None) -> list[Image.Image | np.ndarray]:
    """[(index in input, reference)] -> decoded images (see ``decode_image``) in the same order. Decoding runs
    in threads, off the event loop; the first bad item (lowest index) raises its ItemProblem."""
    blobs = await asyncio.gather(*(image_bytes(ref, i, cfg, client) for i, ref in refs), return_exceptions=True)
    for blob in blobs:
        if isinstance(blob, BaseException):
            raise blob

    def decode_all():
        return [decode_image(blob, i, cfg, preprocess) for (i, _), blob in zip(refs, blobs, strict=True)]

    return await asyncio.to_thread(decode_all)
