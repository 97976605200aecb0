"""ResNet CLIP checkpoints in every format users hold, written from perturbed open_clip models (BatchNorm gains,
shifts and running statistics included) and loaded by fastclip.load, against open_clip on the same weights:

* open_clip state dicts (``.bin``, ``.safetensors``) by architecture name;
* OpenAI's release formats -- a TorchScript archive (read as data) and a plain state dict, fp16 weights as
  shipped -- whose architecture is inferred from the shapes (full-size RN50, and RN50x4's blocks per stage
  and image size at stem width 16);
* a ``timm/resnet50_clip.openai``-style hub repo holding timm's trunk files and open_clip's, by path and by
  the pretrained tag ``openai`` (from an offline hub cache).
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_config_for_hf
from timm.models._hub import save_for_hf as timm_save_for_hf

import fastclip
from fastclip.errors import CheckpointError
from helpers.upstream import (
    Upstream,
    assert_matches,
    clip_tokens,
    put_in_hub_cache,
    resnet_config,
    resnet_upstream,
    save_state_dict,
)

OPENAI_PREPROCESS = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
                     "interpolation": "bicubic", "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def rn50():
    return resnet_upstream("open_clip RN50", resnet_config("RN50"), seed=21)


@pytest.fixture(scope="module")
def rn50_quickgelu(rn50):
    """RN50-quickgelu on rn50's weights: a copy with QuickGELU in the text tower's MLPs (what open_clip builds
    for quick_gelu=True; the image tower has no GELU)."""
    model = copy.deepcopy(rn50.model)
    for block in model.transformer.resblocks:
        block.mlp.gelu = open_clip.model.QuickGELU()
    return Upstream("open_clip RN50-quickgelu", model.eval(), "open_clip", 224, lambda b: clip_tokens(b, seed=b))


# ---------------------------------------------------------------- open_clip state dicts
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_openclip_state_dict_by_name(fmt, rn50, tmp_path):
    path = save_state_dict(rn50.model.state_dict(), tmp_path / f"rn50.{fmt}", fmt)
    model = fastclip.load("RN50", pretrained=path)
    assert model.cfg.vision.type == "resnet" and model.dtype == torch.float32 and model.tokenizer is not None
    assert_matches(model, rn50, 3 if fmt == "safetensors" else 1, f"load RN50 open_clip .{fmt}", "resnet")


def test_state_dict_with_a_missing_batchnorm_statistic_is_refused(rn50, tmp_path):
    sd = {k: v for k, v in rn50.model.state_dict().items() if k != "visual.layer3.2.bn2.running_var"}
    path = save_state_dict(sd, tmp_path / "partial.safetensors", "safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: visual\.layer3\.2\.bn2\.running_var"):
        fastclip.load("RN50", pretrained=path)


# ---------------------------------------------------------------- OpenAI files
def _openai_files(up: Upstream, directory: Path, stem: str, script: bool) -> tuple[dict, Upstream]:
    """The model as open_clip builds OpenAI weights (fp16 convolutions and linears), saved as OpenAI ships it:
    a plain state dict with its extra entries and, with ``script``, a TorchScript archive. The reference is that
    build upcast to fp32, as open_clip's loader does."""
    built = open_clip.model.build_model_from_openai_state_dict(dict(up.model.state_dict())).eval()
    assert built.visual.conv1.weight.dtype == built.visual.attnpool.c_proj.weight.dtype == torch.float16
    size = built.visual.image_size
    paths = {"state_dict": directory / f"{stem}-state-dict.pt"}
    torch.save(dict(built.state_dict(), input_resolution=torch.tensor(size), context_length=torch.tensor(77),
                    vocab_size=torch.tensor(49408)), paths["state_dict"])
    if script:
        paths["torchscript"] = directory / f"{stem}.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; OpenAI's files are scripted
            torch.jit.script(built).save(str(paths["torchscript"]))
    return paths, Upstream(f"open_clip {stem}, OpenAI weights in fp32", built.float(), "open_clip", size,
                           lambda b: clip_tokens(b, seed=b))


@pytest.fixture(scope="module")
def openai_rn50(rn50_quickgelu, tmp_path_factory):
    return _openai_files(rn50_quickgelu, tmp_path_factory.mktemp("openai"), "RN50", script=True)


@pytest.mark.parametrize("kind, how", [("torchscript", "inferred"), ("state_dict", "inferred"), ("state_dict", "named")])
def test_openai_rn50(kind, how, openai_rn50):
    paths, ref = openai_rn50
    model = fastclip.load(paths[kind]) if how == "inferred" else fastclip.load("RN50-quickgelu", pretrained=paths[kind])
    cfg = model.cfg
    assert (cfg.vision.type, cfg.vision.layers, cfg.vision.width, cfg.vision.image_size) == ("resnet", (3, 4, 6, 3), 64, 224)
    assert (cfg.text.act, cfg.text.width, cfg.text.layers, cfg.embed_dim) == ("quick_gelu", 512, 12, 1024)
    assert model.dtype == torch.float32
    assert_matches(model, ref, 3 if kind == "torchscript" else 1, f"load OpenAI RN50 {kind} ({how})", "resnet")


def test_openai_architecture_is_inferred_from_shapes(tmp_path):
    """RN50x4's blocks per stage (4, 6, 10, 6) and image size 288, stem width 16, a one-layer text tower."""
    up = resnet_upstream("open_clip RN50x4 width 16", dict(resnet_config("RN50x4", 16), quick_gelu=True), seed=23)
    paths, ref = _openai_files(up, tmp_path, "RN50x4-w16", script=False)
    model = fastclip.load(paths["state_dict"])
    cfg = model.cfg
    assert (cfg.vision.layers, cfg.vision.width, cfg.vision.image_size, cfg.vision.heads) == ((4, 6, 10, 6), 16, 288, 8)
    assert (cfg.text.width, cfg.text.layers, cfg.embed_dim) == (64, 1, 64)
    assert_matches(model, ref, 2, "load OpenAI RN50x4 width 16 (inferred)", "resnet")


def test_openai_resnet_without_text_tower_names_the_missing_key(rn50_quickgelu, tmp_path):
    sd = {k: v for k, v in rn50_quickgelu.model.state_dict().items() if k.startswith("visual.")}
    torch.save(sd, tmp_path / "visual-only.pt")
    with pytest.raises(CheckpointError, match=r"lacks 'ln_final.weight'.*OpenAI CLIP ResNet.*fastclip.load\('RN50'"):
        fastclip.load(tmp_path / "visual-only.pt")


# ---------------------------------------------------------------- timm/resnet50_clip.openai-style repos
@pytest.fixture(scope="module")
def timm_org_repo(rn50_quickgelu, tmp_path_factory) -> Path:
    """timm's files (config.json with ``architecture``, the trunk's model.safetensors) and open_clip's
    (open_clip_config.json as open_clip's push_to_hf_hub writes it, open_clip_model.safetensors) in one folder."""
    directory = tmp_path_factory.mktemp("hub") / "resnet50_clip.openai"
    trunk = timm.create_model("resnet50_clip.openai", pretrained=False)
    timm_save_for_hf(trunk, directory, safe_serialization=True)
    assert json.loads((directory / "config.json").read_text())["architecture"] == "resnet50_clip"
    up = rn50_quickgelu
    set_model_preprocess_cfg(up.model, dict(OPENAI_PREPROCESS, size=224))  # as open_clip.create_model sets it
    save_config_for_hf(up.model, directory / "open_clip_config.json", model_config=resnet_config("RN50-quickgelu"))
    save_state_dict(up.model.state_dict(), directory / "open_clip_model.safetensors", "safetensors")
    return directory


def test_timm_org_repo_loads_its_openclip_files(timm_org_repo, rn50_quickgelu, offline_hub):
    put_in_hub_cache(offline_hub, "timm/resnet50_clip.openai", {f.name: f for f in timm_org_repo.iterdir()})
    loads = {"path": lambda: fastclip.load(timm_org_repo),
             "pretrained tag": lambda: fastclip.load("RN50", pretrained="openai", backend="cpu")}
    for how, load in loads.items():
        model = load()
        assert model.cfg.vision.type == "resnet" and model.cfg.text.act == "quick_gelu", how
        pre = model.preprocess.cfg
        assert (tuple(pre.mean), tuple(pre.std), pre.interpolation) == (OPENAI_PREPROCESS["mean"],
                                                                       OPENAI_PREPROCESS["std"], "bicubic")
        assert_matches(model, rn50_quickgelu, 1, f"timm/resnet50_clip.openai ({how})", "resnet")


def test_timm_trunk_alone_is_still_refused(tmp_path):
    trunk = timm.create_model("resnet50_clip.openai", pretrained=False, num_classes=64)
    timm_save_for_hf(trunk, tmp_path / "trunk", safe_serialization=True)
    with pytest.raises(CheckpointError, match=r"timm image-model repo \(config.json architecture 'resnet50_clip'\)"):
        fastclip.load(tmp_path / "trunk")
