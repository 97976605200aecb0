"""fastclip.data.preprocess against open_clip (torchvision on PIL) and transformers' image processors.

Measured on this machine (torch 2.14.1, torchvision 0.29.1, Pillow 13, transformers 5.24), max-abs
difference of the normalised (3, 224, 224) tensors:

* ours (numerics="open_clip") vs ``open_clip.image_transform``: 0.0 (bit-exact) for every image and
  config below, so the tests use ``torch.equal``.
* ours (``PreprocessConfig.from_hf``) vs ``CLIPImageProcessor`` / ``SiglipImageProcessor`` (torchvision
  backend, the default in transformers 5) and vs ``*ImageProcessorPil``: 0.0 (bit-exact): ``torch.equal``.
* HF vs open_clip (the two references disagree with each other):
  - normalisation alone (224x224 input, no resize/crop): torchvision backend 2.4e-7 (CLIP) / 5.9e-8
    (SigLIP), from its fused ``(x - 255 mean) / (255 std)``; PIL backend 0.0.
  - resize: torch's antialiased uint8 bicubic vs Pillow's differ by <= 1 uint8 level on the
    photographs for CLIP (0.0150 after /255/std), <= 2 levels for SigLIP (0.0157; ``page``), and up to
    13-20 levels on synthetic noise.
  - crop: HF uses ``floor((H - h) / 2)``, torchvision ``round`` half-to-even; they differ when
    ``(H - h) % 4 == 3`` (e.g. ``rocket`` 640x427 -> 335x224, offset 55 vs 56): then max-abs ~2.1
    (142 levels), for both HF backends.
"""

import numpy as np
import open_clip
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, SiglipImageProcessor, SiglipImageProcessorPil

from fastclip import tolerance
from fastclip.data.images import load_image
from fastclip.data.preprocess import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    Preprocess,
    PreprocessConfig,
)
from fastclip.errors import ImageLoadError

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "page", "colorwheel"]
SIZES = [(1, 1), (3, 1000), (1000, 3), (225, 224), (224, 225), (224, 224), (100, 50), (50, 223), (227, 300),
         (600, 229)]

# preprocessor_config.json of openai/clip-vit-base-patch32 and google/siglip-base-patch16-224
HF_CLIP = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_MEAN),
           "image_std": list(OPENAI_STD), "resample": 3, "size": 224}
HF_SIGLIP = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
             "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
             "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}


@pytest.fixture(scope="module")
def images() -> dict:
    """name -> RGB PIL image: photographs, crops of a photo and noise at awkward sizes."""
    out = {n: load_image(getattr(skimage.data, n)()) for n in PHOTOS}
    retina, rng = skimage.data.retina(), np.random.default_rng(0)
    for h, w in SIZES:
        out[f"photo{h}x{w}"] = load_image(retina[200:200 + h, 100:100 + w])
        out[f"noise{h}x{w}"] = load_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return out


OPEN_CLIP_CASES = [
    (224, OPENAI_MEAN, OPENAI_STD, "shortest", "bicubic"),
    (224, OPENAI_MEAN, OPENAI_STD, "shortest", "bilinear"),
    (336, OPENAI_MEAN, OPENAI_STD, "shortest", "bicubic"),
    (256, INCEPTION_MEAN, INCEPTION_STD, "squash", "bicubic"),
    (384, INCEPTION_MEAN, INCEPTION_STD, "squash", "bilinear"),
    ((224, 320), OPENAI_MEAN, OPENAI_STD, "shortest", "bilinear"),  # open_clip: bicubic regardless
    ((200, 240), OPENAI_MEAN, OPENAI_STD, "squash", "bicubic"),
    (224, OPENAI_MEAN, OPENAI_STD, "longest", "bicubic"),
    ((200, 240), INCEPTION_MEAN, INCEPTION_STD, "longest", "bilinear"),
]


@pytest.mark.parametrize("case", OPEN_CLIP_CASES, ids=lambda c: f"{c[0]}-{c[3]}-{c[4]}")
def test_equals_open_clip(case, images):
    size, mean, std, mode, interp = case
    ref = open_clip.image_transform(size, is_train=False, mean=mean, std=std, resize_mode=mode, interpolation=interp)
    ours = Preprocess(PreprocessConfig(size, mean, std, resize_mode=mode, interpolation=interp))
    h, w = ours.cfg.size_hw
    for name, img in images.items():
        a, b = ours(img), ref(img)
        assert a.shape == (3, h, w) and a.dtype == torch.float32
        assert torch.equal(a, b), f"{name} {img.size}: max-abs {(a - b).abs().max().item():.3g}"


def test_modes_then_preprocess_equal_open_clip_on_rgb(images):
    """Every mode goes through load_image first; the result equals open_clip on that RGB image."""
    ref = open_clip.image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    ours = Preprocess(PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD))
    base = images["chelsea"]
    g16 = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    for img in [base.convert(m) for m in ("1", "L", "LA", "RGBA", "CMYK", "YCbCr")] + [base.quantize(256), g16]:
        assert torch.equal(ours(img), ref(load_image(img))), img.mode
    # open_clip itself resizes *before* converting modes; for L and opaque RGBA that changes nothing
    for img in (base.convert("L"), base.convert("RGBA")):
        assert torch.equal(ours(img), ref(img)), img.mode


def hf_pixels(proc, img) -> torch.Tensor:
    return proc(img, return_tensors="pt")["pixel_values"][0]


def hf_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("feature_extractor_type", "image_processor_type")}


@pytest.mark.parametrize("cfg, tv_cls, pil_cls", [(HF_CLIP, CLIPImageProcessor, CLIPImageProcessorPil),
                                                  (HF_SIGLIP, SiglipImageProcessor, SiglipImageProcessorPil)],
                         ids=["clip", "siglip"])
def test_from_hf_equals_transformers(cfg, tv_cls, pil_cls, images):
    for backend, proc in (("torchvision", tv_cls(**hf_kwargs(cfg))), ("pil", pil_cls(**hf_kwargs(cfg)))):
        ours = Preprocess(PreprocessConfig.from_hf(cfg, backend=backend))
        for name, img in images.items():
            a, b = ours(img), hf_pixels(proc, img)
            # measured: bit-exact (we mirror HF's resize kernel, crop rounding and normalisation order)
            assert torch.equal(a, b), f"{backend} {name} {img.size}: max-abs {(a - b).abs().max().item():.3g}"


def test_transformers_vs_open_clip_measured_gap(images):
    """Documents (and pins) how far HF's default processors are from open_clip and from us."""
    oc = Preprocess(PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD))
    oc_sig = Preprocess(PreprocessConfig(224, INCEPTION_MEAN, INCEPTION_STD, resize_mode="squash"))
    clip, sig = CLIPImageProcessor(**hf_kwargs(HF_CLIP)), SiglipImageProcessor(**hf_kwargs(HF_SIGLIP))
    clip_level, sig_level = 1 / 255 / min(OPENAI_STD), 1 / 255 / 0.5
    for name in PHOTOS:
        img = images[name]
        d_clip = (hf_pixels(clip, img) - oc(img)).abs().max().item()
        d_sig = (hf_pixels(sig, img) - oc_sig(img)).abs().max().item()
        assert d_sig <= 2 * sig_level + tolerance.PIXEL_ATOL, (name, d_sig)  # resize kernels: <= 2 uint8 levels
        if name == "rocket":  # 335 - 224 = 111: HF crops at 55, torchvision at round(55.5) = 56
            assert d_clip > 1.0
        else:
            assert d_clip <= clip_level + tolerance.PIXEL_ATOL, (name, d_clip)  # <= 1 uint8 level
    # normalisation only: no resize or crop involved
    x = load_image(np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    assert 0 < (hf_pixels(clip, x) - oc(x)).abs().max().item() <= tolerance.HF_NORMALISE_GAP


def test_from_hf_parsing():
    c = PreprocessConfig.from_hf(HF_CLIP)
    assert (c.image_size, c.resize_mode, c.shortest_edge, c.interpolation, c.numerics) == \
        (224, "shortest", 224, "bicubic", "hf")
    c = PreprocessConfig.from_hf({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                                  "resample": 2}, backend="pil")
    assert (c.image_size, c.shortest_edge, c.interpolation, c.numerics, c.mean) == \
        (224, 256, "bilinear", "hf_pil", OPENAI_MEAN)
    s = PreprocessConfig.from_hf({"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}})
    assert (s.image_size, s.resize_mode, s.mean, s.std) == (384, "squash", INCEPTION_MEAN, INCEPTION_STD)
    for bad in ({"resample": 1}, {"do_normalize": False}, {"size": {"shortest_edge": 224, "longest_edge": 300}},
                {"size": {"height": 224, "width": 224}, "crop_size": 200}):
        with pytest.raises(ValueError):
            PreprocessConfig.from_hf(bad)
    with pytest.raises(ValueError):
        PreprocessConfig.from_hf(HF_CLIP, backend="cv2")


def test_shortest_edge_then_crop_equals_torchvision(images):
    from torchvision import transforms as T
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    ours = Preprocess(PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD, shortest_edge=256))
    for name, img in images.items():
        assert torch.equal(ours(img), ref(img)), name
    small = Preprocess(PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD, shortest_edge=200))  # crop > image: pad
    ref_small = T.Compose([T.Resize(200, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    for name in ("astronaut", "page", "photo3x1000"):
        assert torch.equal(small(images[name]), ref_small(images[name])), name


def test_config_validation():
    for kw in (dict(resize_mode="fit"), dict(interpolation="lanczos"), dict(numerics="cv2"),
               dict(mean=(0.5, 0.5)), dict(std=(0.5, 0.0, 0.5)), dict(image_size=(224, 224, 3)), dict(image_size=0)):
        args = dict(image_size=224, mean=OPENAI_MEAN, std=OPENAI_STD) | kw
        with pytest.raises(ValueError):
            PreprocessConfig(**args)


# -- batches ----------------------------------------------------------------------------------------
def test_call_accepts_any_item(images, tmp_path):
    p = Preprocess(PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD))
    rgb = np.array(images["coffee"])
    Image.fromarray(rgb).save(tmp_path / "c.png")
    expect = p(images["coffee"])
    for item in (rgb, tmp_path / "c.png", (tmp_path / "c.png").read_bytes(), torch.from_numpy(rgb).permute(2, 0, 1)):
        assert torch.equal(p(item), expect)


@pytest.mark.parametrize("cfg", [PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD), PreprocessConfig.from_hf(HF_SIGLIP)],
                         ids=["open_clip", "hf"])
def test_batch_threads_identical_and_skip(cfg, images, tmp_path):
    items = list(images.values())
    items[3], items[10] = tmp_path / "missing.jpg", b"\xff\xd8\xff\xe0 broken jpeg"
    one = Preprocess(cfg, threads=1).batch(items, on_error="skip")
    many = Preprocess(cfg, threads=4).batch(items, on_error="skip", progress=True)
    kept = [i for i in range(len(items)) if i not in (3, 10)]
    for pixels, idx, errors in (one, many):
        assert idx == kept and [e.index for e in errors] == [3, 10]
        assert pixels.shape == (len(kept), 3, 224, 224) and pixels.dtype == torch.float32
    assert torch.equal(one[0], many[0])
    single = Preprocess(cfg)
    for row, i in enumerate(kept[:6]):
        assert torch.equal(one[0][row], single(items[i]))
    with pytest.raises(ImageLoadError) as info:
        Preprocess(cfg, threads=2).batch(items)
    assert info.value.index == 3 and "missing.jpg" in str(info.value)


def test_batch_empty_and_all_bad():
    p = Preprocess(PreprocessConfig((200, 240), INCEPTION_MEAN, INCEPTION_STD, resize_mode="squash"))
    pixels, kept, errors = p.batch([])
    assert pixels.shape == (0, 3, 200, 240) and kept == [] and errors == []
    pixels, kept, errors = p.batch([b"x", 5], on_error="skip")
    assert pixels.shape == (0, 3, 200, 240) and kept == [] and [e.index for e in errors] == [0, 1]


# -- raw levels (folded normalisation) ----------------------------------------------------------------
@pytest.mark.parametrize("cfg", [PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD), PreprocessConfig.from_hf(HF_CLIP),
                                 PreprocessConfig.from_hf(HF_SIGLIP, backend="pil")], ids=["open_clip", "hf", "hf_pil"])
def test_raw_levels_and_pixel_norm(cfg, images):
    """raw() + normalise() == __call__ exactly; batch(raw=True) stacks raw(); pixel_norm's formula
    reproduces the normalisation table to float32 rounding."""
    p = Preprocess(cfg, threads=2)
    items = [images[n] for n in ("astronaut", "rocket", "noise3x1000", "photo50x223")]
    raw, kept, errors = p.batch(items, raw=True)
    assert raw.dtype == torch.uint8 and raw.shape == (4, 3, 224, 224) and kept == [0, 1, 2, 3] and not errors
    floats, _, _ = p.batch(items)
    for row, img in enumerate(items):
        assert torch.equal(raw[row], p.raw(img))
        assert torch.equal(p.normalise(raw[row].permute(1, 2, 0).numpy()), p(img))
        assert torch.equal(floats[row], p(img))
    scale, mean, std = p.pixel_norm
    levels = torch.arange(256, dtype=torch.float64)
    formula = torch.stack([(scale * levels - m) / s for m, s in zip(mean, std, strict=True)])  # (3, 256)
    torch.testing.assert_close(torch.from_numpy(p._lut).double(), formula, rtol=0, atol=tolerance.PIXEL_ATOL)
