"""Issue 4's exact speed-ups on ViT-B-32, each with and without, in the same run.

    pytest bench/bench_speedups.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

Groups (the second row of each reports ``extra_info.speedup`` = the first row's fastest round / its own;
the fastest round, not the mean, because the development machine's 2 cores are shared and other load
inflates means far more than minima):

* last-block trimming, image tower (batch 32) and text tower (64 captions of 5-40 words);
* pixel mean/std folded into the patch embedding vs a float normalise pass (uint8 levels in, batch 32);
* texts grouped by length vs input order (``embed_texts``, 256 captions of 5-40 words, batch 32);
* the image pipeline: ``embed_images`` on 224 JPEG files vs the encoder alone on the same images already
  decoded and resized (``extra_info.rate_vs_encoder`` = the encoder's fastest round / embed_images').

``extra_info.items_per_s`` is images/s or texts/s. Rows of one group run back to back.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rate

_FASTEST: dict[tuple[str, str], float] = {}
WORDS = ("a photo of the small red cat dog sitting on an old wooden chair near window in morning light "
         "with two people walking along beach at sunset while children play football park city street").split()


def _record(benchmark, group: str, variant: str, items: int, baseline: str | None = None) -> None:
    rate(benchmark, items)
    if not benchmark.stats:  # --benchmark-disable: each function ran once, as a smoke check
        return
    fastest = benchmark.stats.stats.min
    _FASTEST[(group, variant)] = fastest
    if baseline is not None and (group, baseline) in _FASTEST:
        benchmark.extra_info["speedup"] = round(_FASTEST[(group, baseline)] / fastest, 3)


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 41)))) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    """ViT-B-32 (QuickGELU) with random weights on the auto backend; every shortcut on after each test."""
    import fastclip

    fc = fastclip.create_model("ViT-B-32-quickgelu", seed=0)
    yield fc
    fc.visual.trim_last_block = fc.text.trim_last_block = True
    fc.fold_pixel_norm = fc.group_texts_by_length = True


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """224 JPEG photos (crops of scikit-image's photographs, 320-640 px a side) on disk."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("jpegs")
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(224):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(320, 641)), int(rng.integers(320, 641)))
        path = folder / f"{i:03d}.jpg"
        img.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(str(path))
    return paths


TRIM_CASES = {  # tower: (group, inputs(model), encode(model, inputs), items, rounds)
    "image": ("ViT-B-32 image tower, batch 32: last-block trimming",
              lambda m: torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
              lambda m, x: m.encode_image(x), 32, 5),
    "text": ("ViT-B-32 text tower, 64 captions of 5-40 words: last-block trimming",
             lambda m: m.tokenizer(_captions(64)), lambda m, x: m.encode_text(x), 64, 8),
}


@pytest.mark.parametrize("trim", [False, True], ids=["untrimmed", "trimmed"])
@pytest.mark.parametrize("tower", list(TRIM_CASES))
def test_trim(benchmark, model, tower, trim):
    group, inputs, encode, items, rounds = TRIM_CASES[tower]
    benchmark.group = group
    x = inputs(model)
    tower_module = model.visual if tower == "image" else model.text
    tower_module.trim_last_block = trim
    try:
        with torch.inference_mode():
            benchmark.pedantic(lambda: encode(model, x), rounds=rounds, warmup_rounds=1)
    finally:
        tower_module.trim_last_block = True
    _record(benchmark, group, str(trim), items, baseline="False")


@pytest.mark.parametrize("fold", [False, True], ids=["normalised", "folded"])
def test_image_fold(benchmark, model, fold):
    """uint8 levels (as the preprocessing leaves them) -> embeddings: normalise pass + encoder, or folded."""
    benchmark.group = "ViT-B-32 images from uint8 levels, batch 32: folded pixel mean/std"
    levels = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    hwc = [np.ascontiguousarray(x.permute(1, 2, 0).numpy()) for x in levels]  # (224, 224, 3) each
    pre = model.preprocess

    def normalised():
        buf = np.empty((32, 3, 224, 224), dtype=np.float32)  # as Preprocess.batch does it
        for i, a in enumerate(hwc):
            pre.normalise(a, out=buf[i])
        return model.encode_image(torch.from_numpy(buf), normalize=True)

    def folded():
        return model.visual.apply_op(levels, model.ops, normalize=True, pixel_norm=pre.pixel_norm)

    with torch.inference_mode():
        benchmark.pedantic(folded if fold else normalised, rounds=5, warmup_rounds=1)
    _record(benchmark, benchmark.group, str(fold), 32, baseline="False")


@pytest.mark.parametrize("group", [False, True], ids=["input-order", "grouped"])
def test_text_grouping(benchmark, model, group):
    benchmark.group = "ViT-B-32 embed_texts, 256 captions of 5-40 words, batch 32: grouped by length"
    captions = _captions(256, seed=1)
    model.group_texts_by_length = group
    benchmark.pedantic(lambda: model.embed_texts(captions, batch_size=32), rounds=3, warmup_rounds=1)
    model.group_texts_by_length = True
    _record(benchmark, benchmark.group, str(group), len(captions), baseline="False")


@pytest.mark.parametrize("what", ["encoder", "embed_images"])
def test_image_pipeline(benchmark, model, jpegs, what):
    """The encoder alone on preprocessed uint8 batches vs embed_images (decode + resize overlapped) on files."""
    benchmark.group = "ViT-B-32 224 JPEGs, batch 32: embed_images vs the encoder alone"
    if what == "encoder":
        levels, _, _ = model.preprocess.batch(jpegs, raw=True)  # (224, 3, 224, 224) uint8

        def run():
            with torch.inference_mode():
                for start in range(0, len(jpegs), 32):
                    model.visual.apply_op(levels[start:start + 32], model.ops, normalize=True,
                                          pixel_norm=model.preprocess.pixel_norm)
    else:
        def run():
            model.embed_images(jpegs, batch_size=32)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, benchmark.group, what, len(jpegs))
    if what == "embed_images" and (benchmark.group, "encoder") in _FASTEST:
        benchmark.extra_info["rate_vs_encoder"] = round(_FASTEST[(benchmark.group, "encoder")] / _FASTEST[
            (benchmark.group, what)], 3)
