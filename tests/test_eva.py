"""EVA-01 / EVA-02 image towers (fastclip/models/eva.py) against open_clip with timm trunks, on perturbed
random weights loaded from OpenCLIP state-dict files through ``fastclip.load``.

Full-size EVA02-B-16 (both towers) at batch 1 and 3; tiny versions of EVA02-L (head width 88, SwiGLU hidden
469), EVA02-L-336, EVA02-E (post-norm, head width 112, hidden 963) and EVA01-g: open_clip builds them from the
real configs with timm's trunk shrunk through ``timm.create_model`` keywords, and fastclip reads the same
keywords from ``vision_cfg.timm_model_kwargs``. The rotary op and angles are checked against timm's own.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat

import fastclip
from fastclip import ref
from fastclip.backends.dispatch import get_ops
from fastclip.errors import CheckpointError
from fastclip.loading import keymaps_eva
from fastclip.loading.factory import _from_state_dict
from fastclip.models import eva
from fastclip.models.config import parse_config
from fastclip.tolerance import FOLDED_PIXEL_NORM_REL, MIN_COSINE
from helpers.upstream import (
    Upstream,
    assert_matches,
    clip_tokens,
    make_images,
    openclip_upstream,
    perturb_,
    register_configs,
    save_state_dict,
)

EVA_MODELS = ("EVA02-B-16", "EVA02-L-14", "EVA02-L-14-336", "EVA02-E-14", "EVA02-E-14-plus", "EVA01-g-14",
              "EVA01-g-14-plus", "PE-Core-T-16-384", "PE-Core-S-16-384", "PE-Core-B-16", "PE-Core-L-14-336",
              "PE-Core-bigG-14-448")
OPENCLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"
TRUNK_NOISE = 0.1  # extra noise on the tiny trunks' blocks (q.k large enough that positions change attention)
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
# tiny name: (real open_clip config, timm.create_model keywords shrinking its trunk)
TINY = {
    "tiny-EVA02-L": ("EVA02-L-14", dict(img_size=56, embed_dim=176, num_heads=2, depth=2)),
    "tiny-EVA02-L-336": ("EVA02-L-14-336", dict(img_size=84, embed_dim=128, num_heads=2, depth=2)),
    "tiny-EVA02-E": ("EVA02-E-14", dict(img_size=56, embed_dim=224, num_heads=2, depth=2, mlp_ratio=4.3)),
    "tiny-EVA01-g": ("EVA01-g-14", dict(img_size=56, embed_dim=176, num_heads=2, depth=3)),
    "tiny-PE-Core-B": ("PE-Core-B-16", dict(img_size=64, embed_dim=128, num_heads=2, depth=2)),
    "tiny-PE-Core-bigG": ("PE-Core-bigG-14-448", dict(img_size=56, embed_dim=128, num_heads=2, depth=2)),
}


def _tiny_config(real: str, kwargs: dict) -> dict:
    """The real open_clip config with a tiny text tower and the trunk's keywords (fastclip's key)."""
    raw = json.loads((OPENCLIP_CONFIGS / f"{real}.json").read_text())
    raw["embed_dim"], raw["text_cfg"] = 48, dict(TINY_TEXT, context_length=raw["text_cfg"]["context_length"])
    raw["vision_cfg"] = dict(raw["vision_cfg"], image_size=kwargs["img_size"], timm_model_kwargs=kwargs)
    return raw


def _tiny_openclip(raw: dict, seed: int, monkeypatch) -> Upstream:
    """open_clip.model.CustomTextCLIP of ``raw`` (open_clip's keys only), its timm trunk built with
    ``timm_model_kwargs``; perturbed."""
    kwargs = raw["vision_cfg"]["timm_model_kwargs"]
    create = timm.create_model
    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", lambda name, **kw: create(name, **kw, **kwargs))
        vision_cfg = {k: v for k, v in raw["vision_cfg"].items() if k != "timm_model_kwargs"}
        torch.manual_seed(seed)
        model = open_clip.model.CustomTextCLIP(raw["embed_dim"], vision_cfg, raw["text_cfg"])
    assert model.visual.trunk.patch_embed.img_size == (kwargs["img_size"],) * 2
    perturb_(model, seed)
    perturb_(model.visual.trunk.blocks, seed + 1, std=TRUNK_NOISE)  # attention far from uniform: rope matters
    ctx = raw["text_cfg"]["context_length"]
    return Upstream(f"open_clip tiny {raw['vision_cfg']['timm_model_name']}", model, "open_clip",
                    kwargs["img_size"], lambda b: clip_tokens(b, ctx, seed=b))


def _load(name: str, up: Upstream, path: Path, backend: str, precision: str = "fp32"):
    save_state_dict(up.model.state_dict(), path, "safetensors")
    return fastclip.load(name, pretrained=path, backend=backend, precision=precision)


# ---------------------------------------------------------------- configs
def test_list_models_names_the_eva_configs():
    names = fastclip.list_models()
    assert [m for m in EVA_MODELS if m not in names] == []
    for name in EVA_MODELS:
        cfg = fastclip.get_model_config(name)
        assert cfg.vision.type == "timm" and cfg.vision.timm_model_name in eva.TIMM_TRUNKS


def test_trunk_hyperparameters_equal_timms():
    """fastclip's table against the trunks timm builds as open_clip asks (on the meta device: no weights)."""
    for name in EVA_MODELS:
        cfg = fastclip.get_model_config(name).vision
        pool = json.loads((OPENCLIP_CONFIGS / f"{name}.json").read_text())["vision_cfg"]["timm_pool"]
        with torch.device("meta"):
            trunk = timm.create_model(cfg.timm_model_name, num_classes=8, global_pool=pool)
        block = trunk.blocks[0]
        assert (cfg.width, cfg.layers, cfg.heads) == (trunk.embed_dim, len(trunk.blocks), block.attn.num_heads)
        assert (cfg.image_size, cfg.patch_size) == (trunk.patch_embed.img_size[0], trunk.patch_embed.patch_size[0])
        assert cfg.mlp_width == block.mlp.fc2.in_features and cfg.rope == (trunk.rope is not None)
        assert cfg.post_norm == (type(block).__name__ == "EvaBlockPostNorm")
        assert cfg.attn_norm == (not isinstance(block.attn.norm, torch.nn.Identity))
        assert cfg.swiglu == hasattr(block.mlp, "fc1_g") and cfg.norm_eps == block.norm1.eps
        assert cfg.ln_pre == (not isinstance(trunk.norm_pre, torch.nn.Identity))
        assert cfg.class_token == (trunk.cls_token is not None) and cfg.num_tokens == trunk.pos_embed.shape[1]
        assert cfg.pool == trunk.global_pool and (cfg.pool == "map") == (trunk.attn_pool is not None)
        if trunk.attn_pool is not None:
            assert cfg.pool_heads == trunk.attn_pool.num_heads
            assert cfg.pool_mlp_width == trunk.attn_pool.mlp.fc1.out_features


@pytest.mark.parametrize("vision_cfg, needle", [
    ({"timm_model_name": "resnet50"}, "timm trunk 'resnet50' is not supported"),
    ({"timm_model_name": "eva02_base_patch16_clip_224", "timm_pool": "avg"}, "timm_pool 'avg'"),
    ({"timm_model_name": "eva02_base_patch16_clip_224", "timm_proj": "linear"}, "timm_proj 'linear'"),
    ({"timm_model_name": "eva02_base_patch16_clip_224", "timm_model_kwargs": {"qk_norm": True}}, "qk_norm"),
    ({"timm_model_name": "eva02_base_patch16_clip_224", "image_size": 336}, "image_size 336"),
])
def test_bad_timm_configs_are_refused_naming_the_model(vision_cfg, needle):
    raw = {"embed_dim": 8, "vision_cfg": vision_cfg, "text_cfg": TINY_TEXT}
    with pytest.raises(ValueError, match="'odd-eva'") as info:
        parse_config("odd-eva", raw)
    assert needle in str(info.value)


# ---------------------------------------------------------------- the rotary op and its angles
@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_rotary_equals_timms_rotation(backend):
    """ops.rotary on the patch tokens (class token untouched) == timm's apply_rot_embed_cat."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 1 + 20, 12, generator=gen)
    angles = torch.randn(20, 6, generator=gen) * 3
    emb = torch.cat([angles.sin(), angles.cos()], -1).repeat_interleave(2, -1)  # timm: (N, 2 Dh) [sin, cos]
    want = torch.cat([x[:, :, :1], apply_rot_embed_cat(x[:, :, 1:], emb)], dim=2)
    got = get_ops(backend).rotary(x, angles.cos(), angles.sin(), start=1)
    assert torch.equal(got[:, :, :1], x[:, :, :1])
    assert (got - want).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * want.abs().max().item()
    with pytest.raises(ValueError, match=r"rotary: x \(2, 3, 21, 12\) with start 0"):
        ref.rotary(x, angles.cos(), angles.sin())


@pytest.mark.parametrize("name", ["EVA02-B-16", "EVA02-L-14", "EVA02-L-14-336", "PE-Core-B-16", "PE-Core-bigG-14-448"])
def test_rope_angles_equal_timms(name):
    cfg = fastclip.get_model_config(name).vision
    with torch.device("meta"):
        trunk = timm.create_model(cfg.timm_model_name)
    rope = RotaryEmbeddingCat(cfg.head_width, in_pixels=False, feat_shape=[cfg.grid] * 2,
                              ref_feat_shape=trunk.rope.ref_feat_shape, grid_offset=trunk.rope.grid_offset,
                              grid_indexing=trunk.rope.grid_indexing)
    sin, cos = rope.get_embed().chunk(2, -1)  # (N, Dh) each, interleaved pairs
    ours_cos, ours_sin = eva.rope_angles(cfg)
    assert torch.equal(ours_cos.repeat_interleave(2, -1), cos) and torch.equal(ours_sin.repeat_interleave(2, -1), sin)


# ---------------------------------------------------------------- full-size EVA02-B-16
@pytest.fixture(scope="module")
def eva02_b():
    return openclip_upstream("EVA02-B-16", seed=3)


@pytest.fixture(scope="module")
def eva02_b_file(eva02_b, tmp_path_factory):
    return save_state_dict(eva02_b.model.state_dict(), tmp_path_factory.mktemp("eva02b") / "w.safetensors",
                           "safetensors")


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_eva02_b16_matches_open_clip(eva02_b, eva02_b_file, backend):
    model = fastclip.load("EVA02-B-16", pretrained=eva02_b_file, backend=backend)
    assert model.backend == backend
    for batch in (1, 3):
        assert_matches(model, eva02_b, batch, f"EVA02-B-16 {backend}", "eva")


def test_eva02_b16_int8_cosine(eva02_b, eva02_b_file):
    q = fastclip.load("EVA02-B-16", pretrained=eva02_b_file, precision="int8")
    assert q.precision == "int8" and len(q.int8_weights) > 0
    images, tokens = eva02_b.inputs(3)
    want_img, want_txt = eva02_b.outputs(3)
    with torch.no_grad():
        for got, want in ((q.encode_image(images), want_img), (q.encode_text(tokens), want_txt)):
            cosine = F.cosine_similarity(got, want, dim=-1)
            assert cosine.min().item() >= MIN_COSINE, f"per-item cosine {cosine.min():.5f}"


# ---------------------------------------------------------------- tiny EVA02-L / -L-336 / -E, EVA01-g
@pytest.fixture(scope="module")
def tiny_names(tmp_path_factory):
    register_configs(tmp_path_factory, "eva-tiny", {n: _tiny_config(real, kw) for n, (real, kw) in TINY.items()})
    return list(TINY)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_eva_matches_open_clip(tiny_names, name, tmp_path, monkeypatch):
    cfg = fastclip.get_model_config(name).vision
    up = _tiny_openclip(_tiny_config(*TINY[name]), seed=len(name), monkeypatch=monkeypatch)
    assert cfg.mlp_width == up.model.visual.trunk.blocks[0].mlp.fc2.in_features
    for backend in ("ref", "cpu"):
        model = _load(name, up, tmp_path / f"{backend}.safetensors", backend)
        for batch in (1, 3):
            assert_matches(model, up, batch, f"{name} {backend}", "eva")
    model.visual.trim_last_block = False  # the last block over every token too
    assert_matches(model, up, 3, f"{name} untrimmed", "eva")


@pytest.mark.parametrize("name", ["tiny-EVA02-L", "tiny-EVA02-E", "tiny-PE-Core-B"])
def test_tiny_eva_matches_open_clip_on_triton(tiny_names, name, tmp_path, monkeypatch):
    """The triton table (Triton's interpreter on a CPU, tests/conftest.py): head widths 88 and 112 pad to
    the kernel's block; the rotary kernel rotates q and k before the attention kernel there."""
    up = _tiny_openclip(_tiny_config(*TINY[name]), seed=len(name), monkeypatch=monkeypatch)
    model = _load(name, up, tmp_path / "w.safetensors", "triton")
    assert model.backend == "triton"
    assert_matches(model, up, 3, f"{name} triton", "eva")


def test_tiny_shapes_are_the_ones_asked_for():
    cfgs = {n: parse_config(n, _tiny_config(*TINY[n])).vision for n in TINY}
    assert cfgs["tiny-EVA02-L"].head_width == 88 and cfgs["tiny-EVA02-L"].mlp_width % 16
    assert cfgs["tiny-EVA02-E"].head_width == 112 and cfgs["tiny-EVA02-E"].post_norm
    assert cfgs["tiny-EVA02-E"].mlp_width % 16 and not cfgs["tiny-EVA01-g"].rope
    assert cfgs["tiny-PE-Core-bigG"].pool == "map" and not cfgs["tiny-PE-Core-bigG"].class_token


def test_folded_pixel_norm_equals_normalised_pixels(tiny_names):
    model = fastclip.create_model("tiny-EVA02-L", backend="ref")
    levels = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = model.cfg.preprocess.mean, model.cfg.preprocess.std
    pixels = (levels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        want = model.visual.apply_op(pixels, model.ops)
        got = model.visual.apply_op(levels, model.ops, pixel_norm=(1 / 255, mean, std))
    assert (got - want).abs().max().item() <= FOLDED_PIXEL_NORM_REL * want.abs().max().item()
    with pytest.raises(ValueError, match=r"expected pixels of shape \(B, 3, 56, 56\), got \(2, 3, 64, 64\)"):
        model.encode_image(torch.zeros(2, 3, 64, 64))


# ---------------------------------------------------------------- checkpoint errors
def test_missing_and_unexpected_eva_keys_are_named(eva02_b):
    sd = dict(eva02_b.model.state_dict())
    broken = {k: v for k, v in sd.items() if k != "visual.trunk.blocks.4.attn.v_proj.bias"}
    with pytest.raises(CheckpointError, match=r"visual\.trunk\.blocks\.4\.attn\.v_proj\.bias"):
        keymaps_eva.from_openclip_eva(broken)
    extra = dict(sd, **{"visual.trunk.blocks.0.attn.gate.weight": torch.zeros(2, 2)})
    cfg = fastclip.get_model_config("EVA02-B-16")
    with pytest.raises(CheckpointError, match=r"unexpected keys: visual\.blocks\.0\.attn\.gate\.weight"):
        _from_state_dict(cfg, copy.copy(extra), "<memory>", "cpu", "fp32", "ref")


def test_fastclip_eva_state_dict_round_trips(tiny_names, tmp_path):
    model = fastclip.create_model("tiny-EVA01-g", backend="ref")
    path = save_state_dict(model.state_dict(), tmp_path / "own.safetensors", "safetensors")
    again = fastclip.load("tiny-EVA01-g", pretrained=path, backend="ref")
    images = make_images(2, 56)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), again.encode_image(images))


def test_pretrained_tags_are_open_clips():
    def family(pairs):
        return sorted((name, tag) for name, tag in pairs if name.startswith(("EVA", "PE-Core")))

    ours = family(fastclip.list_pretrained())
    assert ours == family(open_clip.list_pretrained()) and len(ours) == 12
