"""fastclip.data.images: every item kind, every PIL mode, EXIF orientation, errors, threaded batches.

Images are real photographs from scikit-image's bundled data (offline) and PIL-built variants.
"""

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import skimage.data
import torch
from open_clip.transform import _convert_to_rgb  # the reference RGB conversion (image.convert("RGB"))
from PIL import Image

from fastclip.data.images import load_image, load_images
from fastclip.errors import ImageLoadError

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera"]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage.data.chelsea()  # (300, 451, 3) uint8


def arr(img: Image.Image) -> np.ndarray:
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    return np.asarray(img)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# -- item kinds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PHOTOS)
def test_item_kinds_agree(name, tmp_path):
    a = getattr(skimage.data, name)()
    rgb = np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a
    pil = Image.fromarray(a)
    path = tmp_path / "x.png"
    pil.save(path)
    png = path.read_bytes()
    items = [str(path), path, png, bytearray(png), memoryview(png), pil, a, a[..., None] if a.ndim == 2 else a,
             a.astype(np.float32) / 255, a.astype(np.float64) / 255, a.astype(np.uint16) * 257,
             torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(rgb), torch.from_numpy(rgb).float() / 255]
    for i, item in enumerate(items):
        np.testing.assert_array_equal(arr(load_image(item)), rgb, err_msg=f"item kind {i}: {type(item)}")


def test_rgba_array_drops_alpha_like_pil(photo):
    rgba = np.concatenate([photo, np.arange(photo.size // 3, dtype=np.uint8).reshape(photo.shape[:2])[..., None]], 2)
    ref = _convert_to_rgb(Image.fromarray(rgba))
    np.testing.assert_array_equal(arr(load_image(rgba)), np.asarray(ref))
    np.testing.assert_array_equal(arr(load_image(torch.from_numpy(rgba).permute(2, 0, 1))), np.asarray(ref))


@pytest.mark.parametrize("hw", [(1, 1), (3, 1000), (1000, 3), (225, 224), (224, 224), (7, 5)])
def test_odd_sizes(hw):
    a = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    img = load_image(encode(Image.fromarray(a), "PNG"))
    assert img.size == (hw[1], hw[0])
    np.testing.assert_array_equal(arr(img), a)


# -- modes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["1", "L", "P", "PA", "LA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"])
def test_modes_match_open_clip_convert(mode, photo):
    base = Image.fromarray(photo)
    img = base.quantize(256) if mode == "P" else base.convert(mode)
    if mode == "PA":
        img = base.quantize(256).convert("PA")
    np.testing.assert_array_equal(arr(load_image(img)), np.asarray(_convert_to_rgb(img)))


def test_la_premultiplied_mode(photo):
    la = Image.fromarray(photo).convert("LA")
    img = la.convert("La")
    np.testing.assert_array_equal(arr(load_image(img)), np.asarray(img.convert("LA").convert("RGB")))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "I;16L", "I;16N"])
def test_sixteen_bit_modes_scale_not_clip(mode, photo):
    grey8 = np.asarray(Image.fromarray(photo).convert("L"))
    v16 = grey8.astype(np.uint16) * 257  # exact 16-bit version of the 8-bit image
    size = (v16.shape[1], v16.shape[0])
    if mode == "I":
        img = Image.fromarray(v16).convert("I")
    else:  # Pillow's convert between 16-bit modes clips at 255, so build them from raw bytes
        img = Image.frombytes(mode, size, v16.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert img.mode == mode
    out = arr(load_image(img))
    np.testing.assert_array_equal(out, np.repeat(grey8[..., None], 3, axis=2))
    assert np.asarray(img.convert("L")).mean() > 250 > out.mean()  # Pillow's own convert clips to white


def test_sixteen_bit_rounding():
    v = np.array([[0, 128, 129, 257, 385, 386, 65406, 65407, 65535]], dtype=np.uint16)
    expect = np.array([0, 0, 1, 1, 1, 2, 254, 255, 255], dtype=np.uint8)  # round(v / 257)
    np.testing.assert_array_equal(arr(load_image(Image.fromarray(v)))[0, :, 0], expect)
    np.testing.assert_array_equal(arr(load_image(v))[0, :, 1], expect)


def test_float_mode_F():
    f = np.array([[-3.0, 0.4, 0.6, 127.5, 254.6, 300.0, np.nan]], dtype=np.float32)
    out = arr(load_image(Image.fromarray(f)))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 0, 1, 128, 255, 255, 0])


def test_sixteen_bit_png_file(tmp_path, photo):
    grey16 = np.asarray(Image.fromarray(photo).convert("L")).astype(np.uint16) * 257 + 100
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode in ("I;16", "I") and np.asarray(check).max() > 255  # really 16-bit on disk
    out = arr(load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(out[..., 0], ((grey16.astype(np.int64) + 128) // 257).astype(np.uint8))


def test_palette_png_with_transparency(photo):
    p = Image.fromarray(photo).quantize(64)
    p.info["transparency"] = bytes(range(0, 256, 4))
    data = encode(p, "PNG")
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = np.asarray(_convert_to_rgb(reopened))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency" warning from us
        out = arr(load_image(data))
    np.testing.assert_array_equal(out, ref)


def test_cmyk_jpeg(photo):
    data = encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == "CMYK"
        ref = np.asarray(reopened.convert("RGB"))
    out = arr(load_image(data))
    np.testing.assert_array_equal(out, ref)
    assert np.abs(out.astype(int) - photo).mean() < 3  # close to the original photo (JPEG loss only)


# -- EXIF orientation -------------------------------------------------------------------------------
EXPECTED = {  # what a viewer shows for each EXIF orientation, from the stored pixels
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, k=-1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation, photo, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(photo), "JPEG", quality=90, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as raw:
        stored = np.asarray(raw.convert("RGB"))
    expect = EXPECTED[orientation](stored)
    (tmp_path / "o.jpg").write_bytes(data)
    for item in (data, tmp_path / "o.jpg", Image.open(io.BytesIO(data))):
        np.testing.assert_array_equal(arr(load_image(item)), expect)
    if orientation in (5, 6, 7, 8):
        assert load_image(data).size == (photo.shape[0], photo.shape[1])  # width and height swapped


# -- errors -----------------------------------------------------------------------------------------
def png_header(w: int, h: int) -> bytes:
    """A PNG with a valid header declaring w x h pixels and no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def expect_error(item, index, *fragments, **kw):
    with pytest.raises(ImageLoadError) as info:
        load_image(item, index=index, **kw)
    msg = str(info.value)
    assert f"item {index}" in msg and info.value.index == index
    for frag in fragments:
        assert frag.lower() in msg.lower(), msg
    return info.value


def test_error_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    e = expect_error(p, 3, str(p), "not found")
    assert e.item == str(p)
    expect_error(str(tmp_path), 4, str(tmp_path), "directory")


def test_error_truncated_and_garbage(photo, tmp_path):
    jpg = encode(Image.fromarray(photo), "JPEG")
    expect_error(jpg[: len(jpg) // 2], 5, "bytes", "truncated")
    png = encode(Image.fromarray(photo), "PNG")
    expect_error(png[: len(png) // 2], 6, "bytes", "truncated")
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    expect_error(tmp_path / "cut.jpg", 7, "cut.jpg", "truncated")
    expect_error(np.random.default_rng(0).bytes(4096), 8, "bytes", "not a recognised image")
    expect_error(b"", 9, "bytes", "not a recognised image")


def test_error_decompression_bomb():
    expect_error(png_header(100_000, 100_000), 1, "bytes", "too many pixels")  # Pillow's hard limit
    expect_error(png_header(2000, 1000), 2, "too many pixels", "max_pixels=1000000", max_pixels=10**6)  # ours
    expect_error(np.zeros((2000, 1000, 3), np.uint8), 3, "ndarray", "too many pixels", max_pixels=10**6)


def test_error_zero_size():
    expect_error(Image.new("RGB", (0, 5)), 0, "PIL.Image", "zero size")
    expect_error(np.zeros((0, 5, 3), np.uint8), 1, "ndarray", "zero size")


@pytest.mark.parametrize("item, fragment", [
    (np.zeros((5, 5, 2), np.uint8), "shape"), (np.zeros((2, 3, 4, 5), np.uint8), "shape"),
    (np.zeros(5, np.uint8), "shape"), (np.zeros((5, 5, 3), np.int64), "dtype"),
    (np.zeros((5, 5, 3), np.complex64), "dtype"), (np.full((5, 5, 3), 200.0), "[0, 1]"),
    (np.full((5, 5), np.nan, np.float32), "nan"), (torch.zeros(2, 5, 5, 2), "shape"),
    (torch.zeros(5, 5, 3, dtype=torch.int64), "dtype"), (42, "unsupported item type"),
    (["a.jpg"], "unsupported item type"),
])
def test_error_unsupported_arrays_and_types(item, fragment):
    e = expect_error(item, 11, fragment)
    assert type(item).__name__ in str(e)


def test_bytes_are_never_read_as_a_path(tmp_path, photo, monkeypatch):
    Image.fromarray(photo).save(tmp_path / "img.png")
    monkeypatch.chdir(tmp_path)
    assert load_image("img.png").size == (451, 300)  # the str is a path...
    expect_error(b"img.png", 0, "not a recognised image")  # ...the same bytes are file content


# -- batches ----------------------------------------------------------------------------------------
def mixed_items(tmp_path):
    good = [getattr(skimage.data, n)() for n in PHOTOS]
    items = [good[0], tmp_path / "missing.png", encode(Image.fromarray(good[1]), "JPEG"), b"garbage",
             Image.fromarray(good[2]), good[3], np.zeros((4, 4, 2), np.uint8), good[4]]
    return items, [0, 2, 4, 5, 7], [1, 3, 6]


def test_load_images_skip_keeps_order(tmp_path):
    items, ok, bad = mixed_items(tmp_path)
    images, errors = load_images(items, threads=3, on_error="skip")
    assert [i for i, im in enumerate(images) if im is not None] == ok
    assert [e.index for e in errors] == bad
    for i in ok:
        np.testing.assert_array_equal(arr(images[i]), arr(load_image(items[i])))
    assert "missing.png" in str(errors[0]) and "item 1" in str(errors[0])


@pytest.mark.parametrize("threads", [1, 4])
def test_load_images_raise_reports_lowest_index(tmp_path, threads):
    items, _, bad = mixed_items(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_images(items, threads=threads)
    assert info.value.index == bad[0]
    with pytest.raises(ValueError):
        load_images(items, on_error="ignore")


def test_load_images_threads_identical():
    items = [getattr(skimage.data, n)() for n in PHOTOS] * 3
    items = [encode(Image.fromarray(a), "JPEG") if i % 2 else a for i, a in enumerate(items)]
    one, e1 = load_images(items, threads=1)
    many, e4 = load_images(items, threads=os.cpu_count() or 2)
    assert not e1 and not e4 and len(one) == len(many) == len(items)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(arr(a), arr(b))
    assert load_images([]) == ([], [])
