"""End-to-end encoder throughput: fastclip beside open_clip and transformers, same run, same shapes.

    pytest bench/bench_e2e.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

Each row's ``extra_info.items_per_s`` is images/s or texts/s; compare rows of one group only.
"""
import pytest
import torch

from conftest import rate

IMPLS = ["fastclip", "open_clip", "transformers"]


def _image_fn(models, impl, pixels):
    oc, fc, hf = models
    if impl == "fastclip":
        return lambda: fc.encode_image(pixels)
    if impl == "open_clip":
        return lambda: oc.encode_image(pixels)
    return lambda: hf.get_image_features(pixel_values=pixels)


def _text_fn(models, impl, tokens):
    oc, fc, hf = models
    if impl == "fastclip":
        return lambda: fc.encode_text(tokens)
    if impl == "open_clip":
        return lambda: oc.encode_text(tokens)
    return lambda: hf.get_text_features(input_ids=tokens)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 32])
def test_images(benchmark, vit_b32, impl, batch):
    benchmark.group = f"ViT-B-32 images, batch {batch}"
    pixels = torch.randn(batch, 3, 224, 224)
    fn = _image_fn(vit_b32, impl, pixels)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=20 if batch == 1 else 5, warmup_rounds=1)
    rate(benchmark, batch)


CAPTIONS = [
    "a photo of a cat sitting on a windowsill",
    "two dogs playing with a red ball in the park",
    "an aerial view of a city at night with lights",
    "a bowl of ramen with an egg and green onions",
] * 16  # 64 captions of typical length


@pytest.mark.parametrize("impl", IMPLS)
def test_captions(benchmark, vit_b32, impl):
    benchmark.group = "ViT-B-32 text, 64 captions"
    tokens = vit_b32[1].tokenizer(CAPTIONS)
    fn = _text_fn(vit_b32, impl, tokens)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    rate(benchmark, len(CAPTIONS))
