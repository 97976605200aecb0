"""Batch-embedding API: embed_images / embed_texts / classify, on a tiny registered CLIP config."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastclip
from fastclip import tolerance
from fastclip.backends import bf16
from fastclip.errors import ImageLoadError, ItemError

NAME = "tiny-clip"  # fastclip/models/tiny.py


@pytest.fixture(scope="module")
def model(tiny_config_dir):
    return fastclip.create_model(NAME, seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three photos of different sizes, saved as files; returns (paths, PIL images)."""
    from skimage import data

    d = tmp_path_factory.mktemp("img")
    arrays = [data.astronaut(), data.coffee(), data.chelsea()]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(d / f"img{i}.png"))
        Image.fromarray(a).save(paths[-1])
    return paths, [Image.open(p).convert("RGB") for p in paths]


def _direct(model, pil_images):
    """Independent path: preprocess each image alone, encode, normalise with numpy."""
    pixels = torch.stack([model.preprocess(im) for im in pil_images])
    with torch.no_grad():
        emb = model.encode_image(pixels).numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_embed_images_every_input_kind(model, images):
    paths, pils = images
    expected = _direct(model, pils)
    as_bytes = [open(p, "rb").read() for p in paths]
    as_arrays = [np.asarray(im) for im in pils]
    for items in (paths, pils, as_bytes, as_arrays):
        out = model.embed_images(items, batch_size=2)
        assert out.dtype == np.float32 and out.shape == (3, model.cfg.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=tolerance.UNIT_NORM_ATOL[torch.float32])
        np.testing.assert_allclose(out, expected, atol=tolerance.SAME_MODEL_ATOL)


def test_batch_size_does_not_change_results(model, images):
    paths, _ = images
    items = paths * 3  # 9 items, batch sizes that do and don't divide it
    full = model.embed_images(items, batch_size=9)
    for bs in (1, 2, 4):
        np.testing.assert_allclose(model.embed_images(items, batch_size=bs, progress=bs == 4), full,
                                   atol=tolerance.SAME_MODEL_ATOL)


def test_one_batch_is_prepared_in_the_callers_thread(model, images, monkeypatch):
    """Decoding overlaps encoding only when there is a next batch: one batch starts no thread."""
    import fastclip.embed as embed

    pools = []
    real = embed.ThreadPoolExecutor

    def counted(*args, **kwargs):
        pools.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "ThreadPoolExecutor", counted)
    paths, _ = images
    one = model.embed_images(paths, batch_size=len(paths))
    assert not pools
    several = model.embed_images(paths, batch_size=1)
    assert pools == [1]
    np.testing.assert_allclose(one, several, atol=tolerance.SAME_MODEL_ATOL)
    with pytest.raises(ItemError):  # a bad item still raises from the caller's thread
        model.embed_images([paths[0], b"not an image"], batch_size=8)


def test_bad_image_names_item_and_skip_keeps_the_rest(model, images, tmp_path):
    paths, pils = images
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    missing = str(tmp_path / "missing.png")
    items = [paths[0], missing, paths[1], str(corrupt), paths[2]]
    with pytest.raises(ImageLoadError, match="missing.png") as info:
        model.embed_images(items, batch_size=2)
    assert info.value.index == 1
    result = model.embed_images(items, batch_size=2, on_error="skip")
    assert result.indices.tolist() == [0, 2, 4]
    assert sorted(e.index for e in result.errors) == [1, 3]
    assert any("corrupt.jpg" in str(e) for e in result.errors)
    np.testing.assert_allclose(result.embeddings, _direct(model, pils), atol=tolerance.SAME_MODEL_ATOL)


def test_embed_texts(model):
    texts = ["a photo of a cat", "a diagram", "Ünïcödé ✨ text", "x " * 200]
    out = model.embed_texts(texts, batch_size=3)
    tokens = model.tokenizer(texts)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(out, direct, atol=tolerance.SAME_MODEL_ATOL)
    with pytest.raises(ItemError, match="item 1"):
        model.embed_texts(["ok", "   ", "fine"])
    result = model.embed_texts(["ok", "", "fine", 3], on_error="skip")
    assert result.indices.tolist() == [0, 2] and len(result.errors) == 2
    np.testing.assert_allclose(result.embeddings, model.embed_texts(["ok", "fine"]), atol=tolerance.REPEAT_ATOL)
    with pytest.raises(TypeError):
        model.embed_texts("a bare string")


def test_classify_prompt_ensemble(model, images):
    _, pils = images
    labels, templates = ["cat", "coffee", "astronaut"], ["a photo of a {}.", "a drawing of a {}."]
    probs = model.classify(pils, labels, templates=templates)
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=tolerance.UNIT_NORM_ATOL[torch.float32])
    # independent computation of the same ensemble
    with torch.no_grad():
        cls = []
        for label in labels:
            e = torch.nn.functional.normalize(model.encode_text(model.tokenizer([t.format(label) for t in templates])), dim=-1)
            cls.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        img = torch.from_numpy(_direct(model, pils))
        expected = torch.softmax(model.logit_scale * img @ torch.stack(cls).T, dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=tolerance.SAME_MODEL_ATOL)
    with pytest.raises(ValueError, match="placeholder"):
        model.classify(pils, labels, templates=["no placeholder"])


def test_encode_shape_errors(model):
    with pytest.raises(ValueError, match="pixels of shape"):
        model.encode_image(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text(torch.zeros(2, 77))
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(torch.zeros(2, 78, dtype=torch.long))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_close_to_fp32(model, images, precision):
    if precision == "bf16" and bf16.why_not_bf16("cpu"):
        pytest.skip(f"{bf16.why_not_bf16('cpu')} (tests/test_cpu_bf16.py checks the refusal)")
    _, pils = images
    low = fastclip.create_model(NAME, seed=0, precision=precision)
    ref = model.embed_images(pils)
    out = low.embed_images(pils)
    cos = (out * ref).sum(axis=1)
    assert cos.min() > tolerance.MIN_COSINE, cos


def test_logit_scale_and_repr(model):
    assert torch.isclose(model.logit_scale, torch.tensor(1 / 0.07), rtol=tolerance.FP32_SCALAR_RTOL, atol=0)
    assert model.logit_bias is None
    assert model.backend in ("ref", "cpu") and f"backend='{model.backend}'" in repr(model)
