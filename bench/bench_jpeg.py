"""Images from JPEG files: ``model.embed_images(paths)`` beside the encoder alone, same model, same run.

    python -m pytest bench/bench_jpeg.py --benchmark-json /tmp/jpeg.json && python bench/report.py /tmp/jpeg.json
    python -m pytest bench/bench_jpeg.py --benchmark-disable           # smoke check

240 real photographs of mixed sizes and modes (scikit-image's sample photographs, colour and grey,
randomly cropped and resized to 200-1600 px on the long side, JPEG quality 90) are written once under
FASTCLIP_BENCH_CACHE (default ~/.cache/fastclip-bench). Rows, on one ViT-B-32 fastclip model (auto
backend, random weights):

- ``encode_image``: the encoder alone on the same images already decoded and preprocessed into
  batches of 32 (``model.encode_image(pixels)``);
- ``embed_images``: files in, embeddings out (``model.embed_images(paths, batch_size=32)``: decoding,
  resizing, normalising and encoding, decode of the next batch overlapping the current encode).

The ``embed_images`` row's ``extra_info.fraction_of_encoder_rate`` is its images/s over the encoder-only
row's (target: >= 0.85).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rate
from peers import CACHE

N_IMAGES, BATCH = 240, 32
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "coins", "moon"]  # the last three are greyscale
_ENCODER_RATE: dict[str, float] = {}


def make_jpegs(n: int = N_IMAGES, seed: int = 0):
    """Paths of ``n`` JPEGs (written on first use): random crops of the sample photographs, resized so the
    long side is 200-1600 px, any aspect ratio the crop gives."""
    import skimage.data
    from PIL import Image

    folder = CACHE / f"jpegs-{n}-{seed}"
    if not folder.is_dir():
        staging = folder.with_name(folder.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        photos = [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]
        for i in range(n):
            photo = photos[i % len(photos)]
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = photo.crop((x, y, x + cw, y + ch))
            scale = int(rng.integers(200, 1601)) / max(cw, ch)
            crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
            crop.save(staging / f"{i:04d}.jpg", quality=90)
        staging.rename(folder)
    return sorted(str(p) for p in folder.glob("*.jpg"))


@pytest.fixture(scope="module")
def jpeg_model():
    """(fastclip ViT-B-32 with random weights, JPEG paths, their preprocessed batches of 32, FLOPs per image)."""
    import open_clip

    import fastclip
    from flops import image_flops

    model = fastclip.create_model("ViT-B-32-quickgelu")
    paths = make_jpegs()
    batches = [torch.stack([model.preprocess(p) for p in paths[i:i + BATCH]]) for i in range(0, len(paths), BATCH)]
    flops = image_flops(open_clip.create_model("ViT-B-32-quickgelu").eval(), 224)  # same architecture's tower
    return model, paths, batches, flops


@pytest.mark.parametrize("impl", ["encode_image", "embed_images"])  # encoder first: the other row divides by it
def test_jpeg_files(benchmark, jpeg_model, sgemm_gflops, impl):
    model, paths, batches, flops = jpeg_model
    benchmark.group = f"ViT-B-32 images from {len(paths)} JPEG files"
    if impl == "encode_image":
        def fn():
            with torch.inference_mode():
                return [model.encode_image(b) for b in batches]
    else:
        got = torch.as_tensor(model.embed_images(paths, batch_size=BATCH))
        with torch.inference_mode():
            want = torch.cat([model.encode_image(b, normalize=True) for b in batches])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # same images in, same embeddings out

        def fn():
            return model.embed_images(paths, batch_size=BATCH)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    rate(benchmark, len(paths), flops, sgemm_gflops)
    benchmark.extra_info.update(impl=impl, arch="ViT-B-32", workload="jpeg", batch=BATCH)
    if not benchmark.stats:
        return
    if impl == "encode_image":
        _ENCODER_RATE["rate"] = benchmark.extra_info["items_per_s"]
    elif "rate" in _ENCODER_RATE:
        ratio = benchmark.extra_info["items_per_s"] / _ENCODER_RATE["rate"]
        benchmark.extra_info["fraction_of_encoder_rate"] = round(ratio, 3)
