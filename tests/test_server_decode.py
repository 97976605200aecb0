"""The service's request decoding: under the model's pixel budget, and reduced at once to the output-size levels
where those stand for the image exactly (fastclip/server/inputs.py), so waiting requests hold small arrays."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.data.preprocess import Preprocess, PreprocessConfig
from fastclip.server import ServerConfig
from fastclip.server.inputs import ItemProblem, decode_image

MEAN, STD = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
# (config kwargs, whether resizing an image already at the output size is the identity)
CONFIGS = {
    "open_clip shortest": (dict(image_size=64), True),
    "open_clip squash": (dict(image_size=64, resize_mode="squash"), True),
    "open_clip longest": (dict(image_size=64, resize_mode="longest"), True),
    "open_clip shortest non-square": (dict(image_size=(48, 64)), True),
    "hf shortest_edge = crop": (dict(image_size=64, shortest_edge=64, numerics="hf"), True),
    "hf_pil shortest_edge = crop": (dict(image_size=64, shortest_edge=64, numerics="hf_pil"), True),
    "hf shortest_edge > crop": (dict(image_size=64, shortest_edge=72, numerics="hf"), False),
}


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kept_levels_embed_like_the_full_image(name):
    kwargs, fixed = CONFIGS[name]
    pre = Preprocess(PreprocessConfig(mean=MEAN, std=STD, **kwargs), threads=1)
    assert pre.output_size_is_fixed_point is fixed
    blobs = [_png(301, 217, 0), _png(90, 160, 1), _png(64, 64, 2)]
    kept = [decode_image(b, i, ServerConfig(), pre) for i, b in enumerate(blobs)]
    th, tw = pre.cfg.size_hw
    for item, blob in zip(kept, blobs, strict=True):
        if fixed:  # the output-size uint8 levels, not the full image
            assert isinstance(item, np.ndarray) and item.shape == (th, tw, 3) and item.dtype == np.uint8
            np.testing.assert_array_equal(item, pre.load_levels(blob))
        else:
            assert isinstance(item, Image.Image) and item.size == Image.open(io.BytesIO(blob)).size
    ours, _, _ = pre.batch(kept)  # what embed_images computes from what the service keeps
    full, _, _ = pre.batch(blobs)  # ... and from the request's bytes
    assert torch.equal(ours, full)


def test_decode_holds_the_models_budget():
    pre = Preprocess(PreprocessConfig(64, MEAN, STD), threads=1, max_inflight_pixels=10_000_000)
    pre.budget.reset_peak()
    decode_image(_png(640, 480, 3), 0, ServerConfig(), pre)
    assert pre.budget.peak == 640 * 480 and pre.budget.held == 0


def test_limits_still_apply_to_the_original_image():
    pre = Preprocess(PreprocessConfig(64, MEAN, STD), threads=1)
    with pytest.raises(ItemProblem, match="both sides must be at least 8") as small:
        decode_image(_png(400, 4, 4), 3, ServerConfig(), pre)
    assert small.value.index == 3 and small.value.status == 400 and pre.budget.held == 0
    with pytest.raises(ItemProblem, match="too many pixels") as big:
        decode_image(_png(300, 300, 5), 1, ServerConfig(max_image_pixels=50_000), pre)
    assert big.value.status == 413
    with pytest.raises(ItemProblem, match="cannot decode|not a recognised|cannot identify") as bad:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 2, ServerConfig(), pre)
    assert bad.value.status == 400 and pre.budget.held == 0


def test_without_a_preprocess_the_full_image_comes_back():
    img = decode_image(_png(120, 90, 6), 0, ServerConfig())
    assert isinstance(img, Image.Image) and img.size == (120, 90) and img.mode == "RGB"
