"""OpenAI ResNet CLIP towers (fastclip/models/resnet.py) against open_clip's ModifiedResNet on the same perturbed
random weights (BatchNorm gains, shifts and running statistics included), and the ``conv2d_act`` op against
``F.conv2d`` in float64:

* full-size RN50 at 224, batch 1 and 3, ``ref`` and ``cpu`` backends (image and text towers);
* RN101, RN50x4, RN50x16, RN50x64 with their real blocks per stage and image sizes, stem width 16;
* pixel normalisation folded into the stem, BatchNorm folds remade after in-place changes, int8, bad configs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip import ref
from fastclip.backends.cpu import conv2d_act as cpu_conv
from fastclip.backends.dispatch import get_ops
from fastclip.models.config import parse_config
from fastclip.models.resnet import ModifiedResNet
from fastclip.tolerance import FOLDED_PIXEL_NORM_REL, MIN_COSINE, UPSTREAM_ATOL, check_fp32
from helpers.upstream import assert_matches, fastclip_from_openclip, make_images, resnet_config, resnet_upstream

BACKENDS = ["ref", "cpu"]
REDUCED = ["RN101", "RN50x4", "RN50x16", "RN50x64"]
_UPSTREAMS: dict = {}


def _upstream(name: str, width: int | None = None):
    key = (name, width)
    if key not in _UPSTREAMS:
        _UPSTREAMS[key] = resnet_upstream(f"open_clip {name}" + (f" width {width}" if width else ""),
                                          resnet_config(name, width), seed=len(_UPSTREAMS) + 3)
    return _UPSTREAMS[key]


def _fastclip(name: str, width: int | None, backend: str):
    cfg = parse_config(f"{name}-w{width}" if width else name, resnet_config(name, width))
    return fastclip_from_openclip(cfg, _upstream(name, width).model.state_dict(), backend)


# ---------------------------------------------------------------- parity with open_clip
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_size_rn50_matches_open_clip(backend):
    """The real RN50 (102M parameters) at 224: image embeddings and its 12-layer text tower, batch 1 and 3."""
    model = _fastclip("RN50", None, backend)
    assert isinstance(model.visual, ModifiedResNet) and model.backend == backend
    assert model.cfg.vision.layers == (3, 4, 6, 3) and model.cfg.vision.heads == 32
    for batch in (1, 3):
        assert_matches(model, _upstream("RN50"), batch, f"RN50 ({backend})", "resnet")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", REDUCED)
def test_every_resnet_architecture_matches_open_clip(name, backend):
    """Real blocks per stage and image size (288 / 384 / 448), stem width 16 (feature width 512, 8 heads)."""
    model = _fastclip(name, 16, backend)
    real = resnet_config(name)["vision_cfg"]
    assert (list(model.cfg.vision.layers), model.cfg.vision.image_size) == (real["layers"], real["image_size"])
    assert_matches(model, _upstream(name, 16), 2, f"{name} width 16 ({backend})", "resnet")


# ---------------------------------------------------------------- the conv2d_act op
# RN50's convolutions (batch 1, smaller maps): the stem's strided 3x3, a 3x3, 1x1s with and without a residual
SHAPES = [  # (C, H, C', kernel, stride, padding, act, residual)
    (3, 64, 32, 3, 2, 1, "relu", False),
    (64, 28, 64, 3, 1, 1, "relu", False),
    (64, 28, 256, 1, 1, 0, "relu", True),
    (256, 14, 512, 1, 1, 0, "none", False),
    (512, 7, 2048, 1, 1, 0, "relu", True),
]
VARIANTS = {"fused": dict(FUSED=True, PACK_WEIGHTS=False), "packed": dict(FUSED=True, PACK_WEIGHTS=True),
            "plain": dict(FUSED=False, PACK_WEIGHTS=False)}


@pytest.mark.parametrize("variant", ["ref", *VARIANTS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[2]}-k{s[3]}s{s[4]}-{s[6]}{'-res' if s[7] else ''}")
def test_conv2d_act_vs_float64_conv2d(shape, variant, monkeypatch):
    C, H, Co, k, stride, padding, act, with_residual = shape
    gen = torch.Generator().manual_seed(C + Co)
    x = torch.randn(2, C, H, H, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(Co, C, k, k, generator=gen) / (C * k * k) ** 0.5
    b = torch.randn(Co, generator=gen)
    Ho = (H + 2 * padding - k) // stride + 1
    res = torch.randn(2, Co, Ho, Ho, generator=gen).contiguous(memory_format=torch.channels_last) if with_residual else None
    ref64 = F.conv2d(x.double(), w.double(), b.double(), stride, padding)
    ref64 = ref64 + res.double() if with_residual else ref64
    ref64 = ref64.relu() if act == "relu" else ref64
    ref32 = ref.conv2d_act(x, w, b, stride, padding, act, res)
    if variant == "ref":
        out = ref32
    else:
        for attr, value in VARIANTS[variant].items():
            monkeypatch.setattr(cpu_conv, attr, value)
        with torch.no_grad():
            out = get_ops("cpu").conv2d_act(x, w, b, stride, padding, act, res)
            again = get_ops("cpu").conv2d_act(x, w, b, stride, padding, act, res)  # a packed weight found again
        torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    check_fp32(out, ref64, ref32, f"conv2d_act {shape} {variant}")


def test_conv2d_act_refuses_bad_input():
    x, w = torch.randn(1, 8, 6, 6), torch.randn(4, 8, 1, 1)
    for ops in (get_ops("ref"), get_ops("cpu")):
        with pytest.raises(ValueError, match="activation 'gelu' is not one of"):
            ops.conv2d_act(x, w, None, 1, 0, "gelu")
        with pytest.raises(ValueError, match=r"residual \(1, 4, 5, 5\) does not match the output \(1, 4, 6, 6\)"):
            ops.conv2d_act(x, w, None, 1, 0, "relu", torch.randn(1, 4, 5, 5))
        with pytest.raises(ValueError, match="same C"):
            ops.conv2d_act(x, torch.randn(4, 3, 1, 1), None, 1, 0, "none")


# ---------------------------------------------------------------- folding, pixel_norm, int8, configs
@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_norm_folded_into_the_stem(backend):
    """uint8 levels with pixel_norm (what embed_images passes) == the normalised float pixels: the stem's
    zero padding is of the normalised image, so the mean is subtracted from the levels, 1/std folded."""
    model = _fastclip("RN50x4", 16, backend)
    levels = torch.randint(0, 256, (2, 3, 288, 288), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    scale, mean, std = 1 / 255, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pixels = (levels.float() * scale - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.visual.apply_op(pixels, model.ops, normalize=True)
        got = model.visual.apply_op(levels, model.ops, normalize=True, pixel_norm=(scale, mean, std))
    assert (got - want).abs().max().item() <= FOLDED_PIXEL_NORM_REL * want.abs().max().item()
    with pytest.raises(ValueError, match="pixel_norm expects raw uint8 pixels"):
        model.visual.apply_op(pixels, model.ops, pixel_norm=(scale, mean, std))


def test_embed_images_runs_the_folded_stem():
    """embed_images (uint8 levels, pixel_norm folded) == encode_image of the preprocessed float pixels."""
    from PIL import Image

    from fastclip.loading.factory import _attach_io

    model = _attach_io(_fastclip("RN50x4", 16, "cpu"), None)
    gen = torch.Generator().manual_seed(9)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
              for h, w in ((300, 320), (288, 500))]
    got = torch.from_numpy(model.embed_images(images, batch_size=2))
    with torch.no_grad():
        want = model.encode_image(torch.stack([model.preprocess(im) for im in images]), normalize=True)
    assert (got - want).abs().max().item() <= FOLDED_PIXEL_NORM_REL * want.abs().max().item()


def test_batchnorm_folds_follow_in_place_changes():
    """Changing running statistics or a convolution in place (both libraries) remakes the folded weights."""
    up = _upstream("RN101", 16)
    model = _fastclip("RN101", 16, "cpu")
    images = make_images(2, 224, seed=11)
    with torch.no_grad():
        before = model.encode_image(images)
        for m in (model.visual, up.model.visual):
            m.layer3[5].bn2.running_var.mul_(1.5)
            getattr(m.layer2[0].downsample, "1").running_mean.add_(0.2)  # its BatchNorm (open_clip: Sequential)
            m.conv2.weight.mul_(0.9)
        after, want = model.encode_image(images), up.model.encode_image(images)
    assert (after - before).abs().max().item() > 1e-3
    assert (after - want).abs().max().item() <= UPSTREAM_ATOL


def test_int8_keeps_convolutions_fp32_and_the_embeddings_close():
    """precision="int8": the attention pool's four linears run int8, every convolution stays fp32."""
    from fastclip.backends.int8 import int8_layer_names

    fp32 = fastclip.create_model("RN50")
    int8 = fastclip.create_model("RN50", precision="int8")
    names = int8_layer_names(int8)
    assert sorted(n for n in names if n.startswith("visual.")) == [
        f"visual.attnpool.{p}_proj.weight" for p in "ckqv"]
    images = make_images(3, 224, seed=2)
    with torch.no_grad():
        a, b = fp32.encode_image(images), int8.encode_image(images)
    cos = F.cosine_similarity(a, b, dim=-1)
    assert torch.isfinite(b).all() and a.abs().max() > 0
    assert cos.min().item() >= MIN_COSINE, f"int8 vs fp32 image embeddings: cosine {cos.tolist()}"


@pytest.mark.parametrize("change, message", [
    (dict(layers=[3, 4, 6]), "four positive block counts"),
    (dict(image_size=200), "image_size 200 is not a multiple of 32"),
    (dict(width=63), "vision width 63 must be even"),
    (dict(head_width=48), "not a multiple of head_width 48"),
])
def test_bad_resnet_configs_are_refused(change, message):
    raw = resnet_config("RN50")
    raw["vision_cfg"] = dict(raw["vision_cfg"], **change)
    with pytest.raises(ValueError, match=f"model config 'bad-rn'.*{message}"):
        parse_config("bad-rn", raw)


def test_wrong_image_size_is_refused():
    model = _fastclip("RN50x16", 16, "ref")
    with pytest.raises(ValueError, match=r"expected pixels of shape \(B, 3, 384, 384\), got \(1, 3, 224, 224\)"):
        model.encode_image(torch.zeros(1, 3, 224, 224))
