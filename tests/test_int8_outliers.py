"""int8 on models with the outlier channels of trained checkpoints (fastclip/models/outliers.py).

The model has ViT-B-32's widths with 4 blocks per tower (as tests/test_int8.py) and outlier channels in
every block. Plain int8 (no smoothing: one activation scale per GEMM call with fbgemm, one per row with
fastclip's kernel -- both GEMMs run here, the ``int8_gemm`` fixture) falls below the bar on it; the default int8 (smoothing from the built-in synthetic set) and the calibrated plan
(fastclip/quantize.py) meet it: per-item cosine >= MIN_COSINE to fp32 and self-retrieval 1.0, both towers.
"""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import fastclip
from fastclip import quantize, tolerance
from fastclip.backends import int8 as quant
from fastclip.models.outliers import add_outliers
from helpers.upstream import EOT, SOT, make_images

MODEL = "int8-outliers-ViT-B-32-4-blocks"
N = 64
MIN_COSINE = tolerance.MIN_COSINE


@pytest.fixture(scope="module")
def fp32_and_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8_outliers")
    raw = {"embed_dim": 512,
           "vision_cfg": {"image_size": 224, "layers": 4, "width": 768, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 4}}
    (folder / f"{MODEL}.json").write_text(json.dumps(raw))
    fastclip.add_model_config(folder / f"{MODEL}.json")
    fp32 = add_outliers(fastclip.create_model(MODEL, seed=0))
    path = folder / "weights.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, str(path))
    return fp32, path


@pytest.fixture(scope="module")
def inputs():
    """64 near images (one base + noise) and 64 CLIP token rows of 4 to 40 tokens."""
    images = make_images(1, 224, seed=1) + 0.5 * make_images(N, 224, seed=2)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.zeros(N, 77, dtype=torch.long)
    for row, length in enumerate(torch.randint(4, 41, (N,), generator=gen).tolist()):
        tokens[row, :length] = torch.randint(1, SOT, (length,), generator=gen)
        tokens[row, 0], tokens[row, length - 1] = SOT, EOT
    return images, tokens


def _encode(model, inputs):
    with torch.inference_mode():
        return model.encode_image(inputs[0], normalize=True), model.encode_text(inputs[1], normalize=True)


@pytest.fixture(scope="module")
def reference(fp32_and_path, inputs):
    return _encode(fp32_and_path[0], inputs)


def _scores(got, want):
    """[(min per-item cosine, self-retrieval)] for image and text."""
    own = torch.arange(N)
    return [(F.cosine_similarity(q, f, dim=-1).min().item(), ((q @ f.T).argmax(1) == own).float().mean().item())
            for q, f in zip(got, want, strict=True)]


def test_the_model_has_massive_channels(fp32_and_path, inputs):
    """Each tower's later-block LayerNorm outputs (the inputs of in_proj and c_fc) have channels
    > INT8_OUTLIER_RATIO x the median channel."""
    absmax = quantize.collect_absmax(fp32_and_path[0], lambda: [("image", inputs[0][:2]), ("text", inputs[1][:2])])
    for tower in ("visual", "text"):
        for layer in ("attn.in_proj_weight", "mlp.c_fc.weight"):
            m = absmax[f"{tower}.transformer.resblocks.2.{layer}"]
            assert (m.max() / m.median()).item() > tolerance.INT8_OUTLIER_RATIO, (tower, layer)


def test_unsmoothed_int8_fails_on_outliers(fp32_and_path, inputs, reference, int8_gemm):
    fp32, _ = fp32_and_path
    naive = add_outliers(fastclip.create_model(MODEL, seed=0))
    naive.int8_weights = quant.quantize_model(naive)  # no plan: unsmoothed
    naive.set_backend(naive.backend)
    (image_cos, image_self), (text_cos, _) = _scores(_encode(naive, inputs), reference)
    assert text_cos < MIN_COSINE and image_cos < MIN_COSINE
    assert image_self < 1.0


def test_default_int8_meets_the_bar(fp32_and_path, inputs, reference, int8_gemm):
    """fastclip.load(..., precision="int8") on the plain fp32 checkpoint: smoothing from synthetic inputs."""
    int8 = fastclip.load(MODEL, pretrained=fp32_and_path[1], precision="int8")
    assert int8.int8_weights.plan.smooth and int8.int8_weights.has_norms
    for tower, (cos, own) in zip(("image", "text"), _scores(_encode(int8, inputs), reference), strict=True):
        assert cos >= MIN_COSINE, f"{tower}: per-item cosine {cos:.5f}"
        assert own == 1.0, f"{tower}: self-retrieval {own:.3f}"
    assert int8.state_dict().keys() == fp32_and_path[0].state_dict().keys()
    for k, v in int8.state_dict().items():  # the fp32 masters (LayerNorms included) are untouched
        assert torch.equal(v, fp32_and_path[0].state_dict()[k]), k


def test_calibrated_int8_meets_the_bar(fp32_and_path, inputs, reference, int8_gemm):
    model = add_outliers(fastclip.create_model(MODEL, seed=0))
    images, tokens = make_images(4, 224, seed=11), inputs[1][::8]
    model, calibration = quantize.quantize_calibrated(model, lambda: [("image", images), ("text", tokens)])
    naive = [r.naive_error for r in calibration.layers]
    bar = quantize.max_layer_error()  # 0.04 with 8-bit activations (255 levels), 255 / 127 times that with 7-bit
    assert bar == pytest.approx(quantize.MAX_LAYER_ERROR * (1 if quant.activation_levels() == 255 else 255 / 127))
    assert max(naive) > bar  # outliers show in the per-layer errors
    assert all(r.error <= bar or r.fp32 for r in calibration.layers)
    for tower, (cos, own) in zip(("image", "text"), _scores(_encode(model, inputs), reference), strict=True):
        assert cos >= MIN_COSINE, f"{tower}: per-item cosine {cos:.5f}"
        assert own == 1.0, f"{tower}: self-retrieval {own:.3f}"
    assert calibration.cosine["image"][1] >= MIN_COSINE and calibration.cosine["text"][1] >= MIN_COSINE
    report = quantize.format_report(calibration)
    assert "text.transformer.resblocks.3.mlp.c_proj.weight" in report and "cosine" in report
