"""MobileCLIP2-L-14 and MobileCLIP2-B (fastclip/models/eva.py rows ``vit_large_patch14_clip_224`` and
``vit_base_mci_224``, the convolutional stem of fastclip/models/mobileclip.py) against open_clip with its
timm trunks, on perturbed random weights (BatchNorm running statistics included) loaded from OpenCLIP
state dicts.

Tiny versions (open_clip builds the real configs with timm's trunk shrunk through ``timm.create_model``
keywords, fastclip reads the same keywords from ``vision_cfg.timm_model_kwargs``) at batch 1 and 3 on the
ref and cpu backends; the real configs at full size: MobileCLIP2-L-14 from an OpenCLIP file, MobileCLIP2-B
through its pretrained tag from an offline hub cache (with open_clip's preprocessing).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.pretrained import get_pretrained_cfg
from PIL import Image

import fastclip
from fastclip.cli import main
from fastclip.errors import CheckpointError
from fastclip.loading.factory import _from_state_dict
from fastclip.models import eva
from fastclip.models.config import parse_config
from fastclip.tolerance import FOLDED_PIXEL_NORM_REL, MIN_COSINE, UPSTREAM_ATOL
from helpers.upstream import (
    Upstream,
    assert_matches,
    clip_tokens,
    make_images,
    perturb_,
    put_in_hub_cache,
    register_configs,
    save_state_dict,
)

MODELS = ("MobileCLIP2-L-14", "MobileCLIP2-B")
OPENCLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"
TRUNK_NOISE = 0.1  # extra noise on the tiny trunks' blocks (attention far from uniform)
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
# tiny name: (real open_clip config, timm.create_model keywords shrinking its trunk). timm's mci stem has its
# channels fixed (192, 192, 768), so tiny-MobileCLIP2-B keeps width 768 and shrinks depth and image size.
TINY = {
    "tiny-MobileCLIP2-L": ("MobileCLIP2-L-14", dict(img_size=56, embed_dim=160, num_heads=2, depth=2)),
    "tiny-MobileCLIP2-B": ("MobileCLIP2-B", dict(img_size=64, depth=2, num_heads=6)),
}


def _tiny_config(real: str, kwargs: dict) -> dict:
    """The real open_clip config with a tiny text tower (its causal mask kept) and the trunk's keywords."""
    raw = json.loads((OPENCLIP_CONFIGS / f"{real}.json").read_text())
    text = dict(TINY_TEXT, no_causal_mask=raw["text_cfg"]["no_causal_mask"])
    raw["embed_dim"], raw["text_cfg"] = 48, text
    raw["vision_cfg"] = dict(raw["vision_cfg"], image_size=kwargs["img_size"], timm_model_kwargs=kwargs)
    return raw


@torch.no_grad()
def _perturb_bn_stats_(model: torch.nn.Module, seed: int) -> None:
    """BatchNorm running statistics away from (0, 1), so the folding of mean and variance is checked."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)


def _upstream(label: str, model, size: int, seed: int) -> Upstream:
    perturb_(model, seed)
    _perturb_bn_stats_(model, seed)
    return Upstream(label, model, "open_clip", size, lambda b: clip_tokens(b, 77, seed=b))


def _tiny_openclip(name: str, block_noise: float = TRUNK_NOISE) -> Upstream:
    """open_clip.model.CustomTextCLIP of the tiny config (open_clip's keys only), perturbed (the trunk's
    blocks by ``block_noise`` more)."""
    raw = _tiny_config(*TINY[name])
    kwargs = raw["vision_cfg"]["timm_model_kwargs"]
    create = timm.create_model
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm, "create_model", lambda model_name, **kw: create(model_name, **kw, **kwargs))
        vision_cfg = {k: v for k, v in raw["vision_cfg"].items() if k != "timm_model_kwargs"}
        torch.manual_seed(len(name))
        model = open_clip.model.CustomTextCLIP(raw["embed_dim"], vision_cfg, raw["text_cfg"])
    up = _upstream(f"open_clip {name}", model, kwargs["img_size"], seed=len(name))
    perturb_(model.visual.trunk.blocks, len(name) + 1, std=block_noise)
    return up


@pytest.fixture(scope="module")
def tiny_names(tmp_path_factory):
    register_configs(tmp_path_factory, "mobileclip2-tiny", {n: _tiny_config(*TINY[n]) for n in TINY})
    return list(TINY)


@pytest.fixture(scope="module")
def tiny_up(tiny_names, tmp_path_factory):
    """name -> (the perturbed tiny open_clip model, its OpenCLIP state dict as a safetensors file)."""
    folder = tmp_path_factory.mktemp("mobileclip2-weights")
    made = {}
    for name in tiny_names:
        up = _tiny_openclip(name)
        made[name] = up, save_state_dict(up.model.state_dict(), folder / f"{name}.safetensors", "safetensors")
    return made


# ---------------------------------------------------------------- configs, tags, listing
def test_listed_with_their_tags(capsys):
    assert set(MODELS) <= set(fastclip.list_models())
    assert {("MobileCLIP2-L-14", "dfndr2b"), ("MobileCLIP2-B", "dfndr2b")} <= set(fastclip.list_pretrained())
    assert main(["models"]) == 0
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert lines["MobileCLIP2-L-14"] == ["dfndr2b"] and lines["MobileCLIP2-B"] == ["dfndr2b"]
    assert lines["MobileCLIP-B"] == ["datacompdr", "datacompdr_lt"]  # MobileCLIP v1 B: the same architecture
    v1, v2 = fastclip.get_model_config("MobileCLIP-B"), fastclip.get_model_config("MobileCLIP2-B")
    assert (v1.vision, v1.text, v1.embed_dim) == (v2.vision, v2.text, v2.embed_dim)


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_entry_is_open_clips(name):
    from fastclip.loading.hub import pretrained_entry

    theirs, ours = get_pretrained_cfg(name, "dfndr2b"), pretrained_entry(name, "dfndr2b")
    assert ours["hf_hub"] == theirs["hf_hub"].rstrip("/") and ours["format"] == "openclip"
    pre = ours["preprocess"]
    assert tuple(pre["mean"]) == tuple(theirs["mean"]) and tuple(pre["std"]) == tuple(theirs["std"])
    assert (pre["interpolation"], pre["resize_mode"]) == (theirs["interpolation"], theirs["resize_mode"])


@pytest.mark.parametrize("name", MODELS)
def test_trunk_hyperparameters_equal_timms(name):
    """fastclip's rows against the trunks timm builds as open_clip asks (meta device: no weights)."""
    cfg = fastclip.get_model_config(name).vision
    assert cfg.type == "timm" and cfg.timm_model_name in eva.TIMM_TRUNKS
    with torch.device("meta"):
        trunk = timm.create_model(cfg.timm_model_name, num_classes=8, global_pool="token")
    block = trunk.blocks[0]
    assert (cfg.width, cfg.layers, cfg.heads) == (trunk.embed_dim, len(trunk.blocks), block.attn.num_heads)
    assert cfg.mlp_width == block.mlp.fc2.in_features and block.attn.qkv.bias is not None
    assert cfg.norm_eps == block.norm1.eps == trunk.norm.eps and not cfg.swiglu and not cfg.rope
    assert cfg.ln_pre == (not isinstance(trunk.norm_pre, torch.nn.Identity))
    assert cfg.no_embed_class == trunk.no_embed_class and cfg.pos_tokens == trunk.pos_embed.shape[1]
    assert cfg.class_token == (trunk.cls_token is not None) and cfg.pool == trunk.global_pool == "token"
    assert cfg.grid**2 == trunk.patch_embed.num_patches
    if cfg.stem:
        stages = list(trunk.patch_embed.backbone)
        assert cfg.stem == tuple((s.conv.kernel_size[0], s.conv.out_channels) for s in stages)
        assert all(s.conv.stride == s.conv.kernel_size and s.conv.padding == (0, 0) for s in stages)
        assert all(type(s.bn.act).__name__ == "GELU" and s.bn.act.approximate == "none" for s in stages[:-1])
        assert isinstance(trunk.patch_embed.proj, torch.nn.Identity)
    else:
        assert cfg.patch_size == trunk.patch_embed.patch_size[0] and trunk.patch_embed.proj.bias is None


def test_bad_stem_configs_are_refused_naming_the_model():
    raw = {"embed_dim": 8, "text_cfg": TINY_TEXT,
           "vision_cfg": {"timm_model_name": "vit_base_mci_224", "timm_model_kwargs": {"embed_dim": 384}}}
    with pytest.raises(ValueError, match=r"'odd-mci'.*conv stem .* end at embed_dim 384"):
        parse_config("odd-mci", raw)


# ---------------------------------------------------------------- tiny versions, both backends
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_matches_open_clip(tiny_up, name):
    up, path = tiny_up[name]
    cfg = fastclip.get_model_config(name)
    assert cfg.text.causal == (name == "tiny-MobileCLIP2-B")  # MobileCLIP2-L-14's text tower is bidirectional
    for backend in ("ref", "cpu"):
        model = fastclip.load(name, pretrained=path, backend=backend)
        assert model.backend == backend
        for batch in (1, 3):
            assert_matches(model, up, batch, f"{name} {backend}", "mobileclip2")
    model.visual.trim_last_block = model.text.trim_last_block = False
    assert_matches(model, up, 3, f"{name} untrimmed", "mobileclip2")


def test_tiny_stem_matches_open_clip_on_triton(tiny_up):
    """The triton table (Triton's interpreter on a CPU, tests/conftest.py): the stem's GEMMs with GELU too
    (MobileCLIP2-L-14's blocks are those tests/test_eva.py runs there)."""
    up, path = tiny_up["tiny-MobileCLIP2-B"]
    model = fastclip.load("tiny-MobileCLIP2-B", pretrained=path, backend="triton")
    assert model.backend == "triton"
    assert_matches(model, up, 3, "tiny-MobileCLIP2-B triton", "mobileclip2")


@pytest.mark.parametrize("name", list(TINY))
def test_openclip_directory_loads_by_path(tiny_up, name, tmp_path):
    """open_clip_config.json + open_clip_model.safetensors: architecture and preprocessing from the file."""
    up, weights = tiny_up[name]
    theirs = get_pretrained_cfg(TINY[name][0], "dfndr2b")
    pre = {k: theirs[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": _tiny_config(*TINY[name]), "preprocess_cfg": pre}))
    (tmp_path / "open_clip_model.safetensors").symlink_to(weights)
    model = fastclip.load(tmp_path, backend="cpu")
    assert model.cfg.vision.stem == fastclip.get_model_config(name).vision.stem
    assert (model.preprocess.cfg.mean, model.preprocess.cfg.std) == (tuple(pre["mean"]), tuple(pre["std"]))
    assert model.preprocess.cfg.interpolation == pre["interpolation"]
    assert_matches(model, up, 3, f"{name} open_clip directory", "mobileclip2")


def test_stem_folded_pixel_norm_equals_normalised_pixels(tiny_names):
    model = fastclip.create_model("tiny-MobileCLIP2-B", backend="ref")
    _perturb_bn_stats_(model, 5)
    levels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for mean, std in (((0.0,) * 3, (1.0,) * 3), ((0.48, 0.46, 0.41), (0.27, 0.26, 0.28))):
        pixels = (levels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        with torch.no_grad():
            want = model.visual.apply_op(pixels, model.ops)
            got = model.visual.apply_op(levels, model.ops, pixel_norm=(1 / 255, mean, std))
        assert (got - want).abs().max().item() <= FOLDED_PIXEL_NORM_REL * want.abs().max().item()
    with pytest.raises(ValueError, match="pixel_norm expects raw uint8 pixels"):
        model.visual.apply_op(levels.float(), model.ops, pixel_norm=(1 / 255, mean, std))


def test_stem_int8_cosine(tiny_names):
    """precision="int8": the stem stays fp32 (int8_exempt), the blocks run int8 (weights of a trained
    model's scale: no extra block noise)."""
    up = _tiny_openclip("tiny-MobileCLIP2-B", block_noise=0.0)
    fp32 = _from_state_dict(fastclip.get_model_config("tiny-MobileCLIP2-B"), dict(up.model.state_dict()),
                            "<memory>", "cpu", "fp32", "cpu")
    q = _from_state_dict(fastclip.get_model_config("tiny-MobileCLIP2-B"), dict(up.model.state_dict()),
                         "<memory>", "cpu", "int8", "cpu")
    assert q.precision == "int8" and len(q.int8_weights) > 0
    images = make_images(3, 64)
    with torch.no_grad():
        assert torch.equal(q.visual.patch_tokens(images, q.ops), fp32.visual.patch_tokens(images, fp32.ops))
        cosine = F.cosine_similarity(q.encode_image(images), fp32.encode_image(images), dim=-1)
    assert cosine.min().item() >= MIN_COSINE, f"per-item cosine {cosine.min():.5f}"


# ---------------------------------------------------------------- checkpoint errors, own state dicts
def test_missing_and_unexpected_stem_keys_are_named(tiny_up):
    sd = dict(tiny_up["tiny-MobileCLIP2-B"][0].model.state_dict())
    cfg = fastclip.get_model_config("tiny-MobileCLIP2-B")
    broken = {k: v for k, v in sd.items() if k != "visual.trunk.patch_embed.backbone.1.bn.running_var"}
    with pytest.raises(CheckpointError, match=r"missing keys: visual\.patch_embed\.backbone\.1\.bn\.running_var"):
        _from_state_dict(cfg, broken, "<memory>", "cpu", "fp32", "ref")
    extra = dict(sd, **{"visual.trunk.patch_embed.backbone.3.conv.weight": torch.zeros(2, 2, 1, 1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: visual\.patch_embed\.backbone\.3\.conv\.weight"):
        _from_state_dict(cfg, copy.copy(extra), "<memory>", "cpu", "fp32", "ref")


def test_fastclip_state_dict_round_trips(tiny_names, tmp_path):
    model = fastclip.create_model("tiny-MobileCLIP2-B", backend="ref")
    path = save_state_dict(model.state_dict(), tmp_path / "own.safetensors", "safetensors")
    again = fastclip.load("tiny-MobileCLIP2-B", pretrained=path, backend="ref")
    images = make_images(2, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), again.encode_image(images))


# ---------------------------------------------------------------- the real configs, full size
def test_full_size_mobileclip2_l14_matches_open_clip():
    """The OpenCLIP state dict in memory (the files' formats are checked on the tiny versions)."""
    torch.manual_seed(0)
    up = _upstream("open_clip MobileCLIP2-L-14", open_clip.create_model("MobileCLIP2-L-14"), 224, seed=0)
    model = _from_state_dict(fastclip.get_model_config("MobileCLIP2-L-14"), dict(up.model.state_dict()),
                             "<memory>", "cpu", "fp32", "cpu")
    assert model.cfg.vision.ln_pre and not model.cfg.text.causal
    assert_matches(model, up, 1, "MobileCLIP2-L-14 cpu", "mobileclip2")


def test_full_size_mobileclip2_b_from_its_tag(offline_hub, tmp_path):
    """load("MobileCLIP2-B", pretrained="dfndr2b") from the hub cache: open_clip's outputs and preprocessing."""
    torch.manual_seed(1)
    up = _upstream("open_clip MobileCLIP2-B", open_clip.create_model("MobileCLIP2-B"), 224, seed=1)
    weights = save_state_dict(up.model.state_dict(), tmp_path / "w.safetensors", "safetensors")
    put_in_hub_cache(offline_hub, "timm/MobileCLIP2-B-OpenCLIP", {"open_clip_model.safetensors": weights})
    model = fastclip.load("MobileCLIP2-B", pretrained="dfndr2b", backend="cpu")
    for batch in (1, 3):
        assert_matches(model, up, batch, "MobileCLIP2-B tag dfndr2b cpu", "mobileclip2")
    theirs = get_pretrained_cfg("MobileCLIP2-B", "dfndr2b")
    transform = open_clip.image_transform(224, is_train=False, mean=theirs["mean"], std=theirs["std"],
                                          interpolation=theirs["interpolation"], resize_mode=theirs["resize_mode"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    assert (model.preprocess(image) - transform(image)).abs().max().item() <= UPSTREAM_ATOL
