"""SigLIP 2 NaFlex against transformers (``Siglip2Model`` + ``Siglip2ImageProcessor``) on random weights.

* preprocessing (fastclip/data/naflex.py) vs the processor on the same PIL images: target sizes, patches,
  masks and spatial shapes;
* ``resample_positions`` vs ``Siglip2VisionEmbeddings.resize_positional_embeddings`` and vs torch's
  antialiased bilinear ``F.interpolate``;
* a tiny perturbed Siglip2Model saved with ``save_pretrained`` (+ its processor) and loaded by ``fastclip.load``:
  image embeddings of images of mixed sizes and aspect ratios, each alone and in one padded batch, and text
  embeddings, equal transformers' ``get_image_features`` / ``get_text_features`` to UPSTREAM_ATOL (fp32) on
  the ref and cpu backends, and on triton (compiled on a GPU, else the Triton interpreter on CPU tensors);
* ``embed_images`` (uint8 patches, pixel normalisation folded into the patch embedding) and clear errors.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers.models.siglip2 import image_processing_siglip2 as hf_proc
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

import fastclip
from fastclip import ref
from fastclip.backends import bf16
from fastclip.data.naflex import NaflexBatch, NaflexConfig, NaflexPreprocess, target_size
from fastclip.errors import CheckpointError
from fastclip.tolerance import MIN_COSINE, PIXEL_ATOL, UPSTREAM_ATOL, max_abs
from helpers.device import DEVICE
from helpers.upstream import _TABLE, make_tokens, save_siglip2_naflex

PATCH, GRID, BUDGET = 8, 8, 48  # 8-pixel patches, an 8 x 8 learned grid, 48 patches per image
VOCAB, CTX = 300, 16
SIZES = [(64, 48), (33, 100), (224, 224), (17, 9), (8, 300)]  # (width, height) of the PIL images


def make_images(sizes=SIZES, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def hf_inputs(processor, images) -> dict:
    return processor(images=images, return_tensors="pt")


def as_batch(inputs) -> NaflexBatch:
    return NaflexBatch(inputs["pixel_values"], inputs["pixel_attention_mask"].bool(), inputs["spatial_shapes"])


@pytest.fixture(scope="module")
def hf_naflex(tmp_path_factory):
    """(transformers Siglip2Model perturbed, its Siglip2ImageProcessor, the saved directory)."""
    directory = tmp_path_factory.mktemp("hf_siglip2")
    model, processor = save_siglip2_naflex(directory, vision_width=96, text_width=64, patch=PATCH, grid=GRID,
                                           budget=BUDGET, vocab=VOCAB, context=CTX, seed=7, projection_size=96)
    return model, processor, directory


@torch.no_grad()
def hf_image_features(model, inputs) -> torch.Tensor:
    out = model.get_image_features(**inputs)
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()


# ---------------------------------------------------------------- preprocessing
def test_target_size_matches_transformers():
    for h in (1, 7, 8, 33, 48, 100, 224, 480, 3000):
        for w in (1, 9, 64, 100, 224, 641):
            for patch, budget in ((8, 48), (16, 256), (14, 729)):
                assert target_size(h, w, patch, budget) == hf_proc.get_image_size_for_max_num_patches(
                    h, w, patch, budget), (h, w, patch, budget)


def test_preprocess_matches_processor():
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=BUDGET)
    images = make_images()
    want = hf_inputs(processor, images)
    got, kept, errors = NaflexPreprocess(NaflexConfig.from_hf(processor.to_dict())).batch(images)
    assert kept == list(range(len(images))) and errors == []
    assert torch.equal(got.spatial_shapes, want["spatial_shapes"].long())
    assert torch.equal(got.mask, want["pixel_attention_mask"].bool())
    assert got.pixel_values.shape == want["pixel_values"].shape
    assert max_abs(got.pixel_values, want["pixel_values"]) == 0.0
    alone, hw = NaflexPreprocess(NaflexConfig(PATCH, BUDGET))(images[1])  # one image, unpadded
    n = hw[0] * hw[1]
    assert tuple(hw) == tuple(want["spatial_shapes"][1].tolist()) and torch.equal(alone, want["pixel_values"][1, :n])


def test_raw_patches_normalise_to_the_processor_values():
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=BUDGET)
    images = make_images()[:3]
    pre = NaflexPreprocess(NaflexConfig(PATCH, BUDGET))
    raw, _, _ = pre.batch(images, raw=True)
    assert raw.pixel_values.dtype == torch.uint8
    scale, mean, std = pre.pixel_norm
    channels = torch.arange(raw.pixel_values.shape[-1]) % 3  # patches are flattened (row, column, channel)
    levels = raw.pixel_values.float()
    normalised = (scale * levels - torch.tensor(mean)[channels]) / torch.tensor(std)[channels]
    want = hf_inputs(processor, images)["pixel_values"]
    real = raw.mask
    assert max_abs(normalised[real], want[real]) <= PIXEL_ATOL


# ---------------------------------------------------------------- resample_positions
@pytest.mark.parametrize("grid_side", [8, 16])
def test_resample_positions_matches_transformers(grid_side):
    gen = torch.Generator().manual_seed(grid_side)
    grid = torch.randn(grid_side, grid_side, 24, generator=gen)
    shapes = torch.tensor([[grid_side, grid_side], [3, 11], [20, 2], [1, 1], [5, 40]])  # down, up, mixed
    max_length = 260
    want = Siglip2VisionEmbeddings.resize_positional_embeddings(grid, shapes, max_length)
    got = ref.resample_positions(grid, shapes, max_length)
    assert got.shape == want.shape == (5, max_length, 24)
    err = max_abs(got, want)
    _TABLE.append(("naflex", f"resample_positions grid {grid_side} vs transformers", 5, err, err, 0.0, 0.0))
    assert err <= UPSTREAM_ATOL
    for b, (h, w) in enumerate(shapes.tolist()):  # and torch's antialiased bilinear resize, image by image
        image = F.interpolate(grid.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False,
                              antialias=True)[0]  # (W, h, w)
        assert max_abs(got[b, : h * w], image.reshape(24, h * w).t()) <= UPSTREAM_ATOL


def test_resample_positions_is_in_every_op_table():
    from fastclip.backends.dispatch import get_ops

    for backend in ("ref", "cpu"):
        assert get_ops(backend).resample_positions is ref.resample_positions
    with pytest.raises(ValueError, match="max_length"):
        ref.resample_positions(torch.zeros(4, 4, 2), torch.tensor([[5, 5]]), 24)


# ---------------------------------------------------------------- the model
def _record(case: str, batch: int, img: float, txt: float = 0.0) -> None:
    _TABLE.append(("naflex", case, batch, img, img, txt, txt))


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_image_embeddings_match_transformers(hf_naflex, backend):
    model_hf, processor, directory = hf_naflex
    model = fastclip.load(directory, backend=backend)
    assert model.cfg.vision.type == "naflex" and model.backend == backend
    images = make_images()
    inputs = hf_inputs(processor, images)
    want = hf_image_features(model_hf, inputs)  # (B, 96)
    with torch.no_grad():
        mixed = model.encode_image(as_batch(inputs))  # the processor's own padded batch
        ours, _, _ = model.preprocess.batch(images)  # fastclip's preprocessing
        mixed_ours = model.encode_image(ours)
    errs = [max_abs(mixed, want), max_abs(mixed_ours, want)]
    for i, image in enumerate(images):  # each image alone: its own (unpadded) sequence
        alone = hf_image_features(model_hf, hf_inputs(processor, [image]))
        with torch.no_grad():
            mine = model.encode_image(model.preprocess.batch([image])[0])
        errs += [max_abs(mine, alone), max_abs(mine, mixed[i:i + 1]), max_abs(alone, want[i:i + 1])]
    _record(f"Siglip2Model NaFlex images, mixed + alone ({backend})", len(images), max(errs))
    assert max(errs) <= UPSTREAM_ATOL, errs


def test_text_embeddings_match_transformers(hf_naflex):
    model_hf, _, directory = hf_naflex
    model = fastclip.load(directory, backend="cpu")
    tokens = make_tokens(5, CTX, eot=1, lo=3, hi=VOCAB, pad=1, seed=3)
    with torch.no_grad():
        out = model_hf.get_text_features(input_ids=tokens)
        want = (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
        got = model.encode_text(tokens)
    err = max_abs(got, want)
    _record("Siglip2Model text", 5, 0.0, err)
    assert err <= UPSTREAM_ATOL


def test_triton_backend_matches_transformers(hf_naflex):
    model_hf, processor, directory = hf_naflex
    model = fastclip.load(directory, backend="ref").to(DEVICE).set_backend("triton")
    images = make_images()[:3]
    inputs = hf_inputs(processor, images)
    want = hf_image_features(model_hf, inputs)
    with torch.no_grad():
        got = model.encode_image(as_batch(inputs)).float().cpu()
    err = max_abs(got, want)
    _record("Siglip2Model NaFlex images (triton)", 3, err)
    assert err <= UPSTREAM_ATOL


def test_embed_images_folds_the_pixel_norm(hf_naflex):
    model_hf, processor, directory = hf_naflex
    model = fastclip.load(directory, backend="cpu")
    images = make_images()
    want = F.normalize(hf_image_features(model_hf, hf_inputs(processor, images)), dim=-1).numpy()
    got = model.embed_images(images, batch_size=2)  # batches of two, each padded to the budget
    model.fold_pixel_norm = False
    unfolded = model.embed_images(images, batch_size=3)
    errs = (float(np.abs(got - want).max()), float(np.abs(unfolded - want).max()))
    _record("Siglip2Model NaFlex embed_images (L2)", len(images), max(errs))
    assert max(errs) <= UPSTREAM_ATOL, errs


def test_classify_matches_transformers(hf_naflex):
    """Zero-shot sigmoid probabilities from transformers' features, the directory's tokenizer and logit scale/bias."""
    model_hf, processor, directory = hf_naflex
    model = fastclip.load(directory, backend="cpu")
    labels = ["sen ka", "qui dra bel", "tor so xa mu"]
    images = make_images()
    tokenizer = transformers.SiglipTokenizer.from_pretrained(directory)  # the files write_siglip_tokenizer wrote
    texts = [f"a photo of a {label}." for label in labels]
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=CTX, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model_hf.get_text_features(input_ids=ids)
        txt = F.normalize((out if isinstance(out, torch.Tensor) else out.pooler_output).float(), dim=-1)
        img = F.normalize(hf_image_features(model_hf, hf_inputs(processor, images)), dim=-1)
        want = torch.sigmoid(model_hf.logit_scale.exp() * img @ txt.T + model_hf.logit_bias).numpy()  # (N, C)
    got = model.classify(images, labels, batch_size=2)
    err = float(np.abs(got - want).max())
    _record("Siglip2Model NaFlex classify (probabilities)", len(images), err)
    assert got.shape == (len(images), len(labels)) and err <= UPSTREAM_ATOL


def test_pixel_tensors_are_unpadded_sequences(hf_naflex):
    """(B, 3, H, W) pixels at a patch-multiple size: transformers' patches of them, every patch real."""
    model_hf, _, directory = hf_naflex
    model = fastclip.load(directory, backend="cpu")
    pixels = torch.randn(3, 3, 40, 64, generator=torch.Generator().manual_seed(2))
    inputs = {"pixel_values": torch.stack([hf_proc.convert_image_to_patches(p, PATCH) for p in pixels]),
              "pixel_attention_mask": torch.ones(3, 5 * 8, dtype=torch.int32),
              "spatial_shapes": torch.tensor([[5, 8]] * 3)}
    want = hf_image_features(model_hf, inputs)
    with torch.no_grad():
        err = max_abs(model.encode_image(pixels), want)
    _record("Siglip2Model NaFlex (B, 3, H, W) pixels", 3, err)
    assert err <= UPSTREAM_ATOL


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_low_precision_embeddings_keep_their_direction(hf_naflex, precision):
    """int8 (calibrated on square pixel tensors) and bf16: per-image cosine to transformers' fp32 >= MIN_COSINE."""
    if precision == "bf16" and bf16.why_not_bf16("cpu"):
        pytest.skip(f"{bf16.why_not_bf16('cpu')} (tests/test_cpu_bf16.py checks the refusal)")
    model_hf, processor, directory = hf_naflex
    model = fastclip.load(directory, precision=precision)
    images = make_images()
    want = F.normalize(hf_image_features(model_hf, hf_inputs(processor, images)), dim=-1).numpy()
    got = model.embed_images(images)
    cosine = (got * want).sum(-1)
    assert cosine.min() >= MIN_COSINE, cosine


# ---------------------------------------------------------------- errors
def test_bad_inputs_are_refused(hf_naflex):
    _, processor, directory = hf_naflex
    model = fastclip.load(directory, backend="ref")
    batch = as_batch(hf_inputs(processor, make_images()[:2]))
    with pytest.raises(TypeError, match="NaflexBatch"):
        model.visual.apply_op({"pixel_values": batch.pixel_values}, model.ops)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model.encode_image(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="pixel_values"):
        model.encode_image(NaflexBatch(batch.pixel_values[..., :-1], batch.mask, batch.spatial_shapes))
    shifted = batch.mask.clone()
    shifted[0, 0] = False
    with pytest.raises(ValueError, match="first h \\* w patches"):
        model.encode_image(NaflexBatch(batch.pixel_values, shifted, batch.spatial_shapes))


def test_bad_checkpoints_are_refused(hf_naflex, tmp_path):
    from fastclip.loading import keymaps

    model_hf, _, directory = hf_naflex
    hf_cfg = json.loads((directory / "config.json").read_text())
    odd = json.loads(json.dumps(hf_cfg))
    odd["vision_config"]["num_patches"] = 60
    with pytest.raises(CheckpointError, match="num_patches 60"):
        keymaps.config_from_hf(odd, "odd")
    cfg = keymaps.config_from_hf(hf_cfg, "tiny")
    sd = {k: v for k, v in model_hf.state_dict().items() if "patch_embedding.bias" not in k}
    with pytest.raises(CheckpointError, match="patch_embedding.bias"):
        keymaps.from_hf(sd, cfg)
