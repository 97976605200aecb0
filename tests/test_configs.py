"""Model configs: the built-in registry against open_clip's, and user configs (add_model_config)."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

import fastclip
from fastclip import tolerance
from fastclip.loading import keymaps, keymaps_eva
from fastclip.models.clip import CLIP
from helpers.upstream import ROOT

BUILTINS = sorted(p.stem for p in (ROOT / "fastclip" / "models" / "configs").glob("*.json"))
# Built-ins open_clip cannot build here: Chinese-CLIP (not an open_clip model; tests/test_chinese_clip.py) and the
# Hugging Face text towers, whose open_clip build downloads the text model's config.json (tests/test_hf_text.py
# builds them from a local one).
NOT_OPEN_CLIP = ("CN-CLIP-", "xlm-roberta-", "roberta-")
# open_clip's ViT-SO400M-16-SigLIP-i18n-256 has no text projection (proj_type "none", as its timm weights);
# transformers' SiglipTextModel always has one (text_model.head), and fastclip follows the HF checkpoint.
KNOWN_PARAM_DIFFERENCES = {"ViT-SO400M-16-SigLIP-i18n-256": 1152 * 1152 + 1152}


def test_list_models_has_the_usual_names():
    names = set(fastclip.list_models())
    for name in ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14", "ViT-L-14-336-quickgelu", "ViT-H-14",
                 "ViT-g-14", "ViT-bigG-14", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-SO400M-14-SigLIP"]:
        assert name in names
    assert len(BUILTINS) >= 50, f"found only {len(BUILTINS)} built-in config files: is the folder right?"
    assert set(BUILTINS) <= names and fastclip.list_models() == sorted(fastclip.list_models())


def test_list_pretrained():
    pairs = fastclip.list_pretrained()
    assert ("ViT-B-32", "openai") in pairs and ("ViT-B-32", "laion2b_s34b_b79k") in pairs
    assert ("ViT-B-16-SigLIP", "webli") in pairs
    unknown = sorted({name for name, _ in pairs} - set(fastclip.list_models()))
    assert not unknown, f"pretrained.json names architectures without a config: {unknown}"


def _open_clip_on_meta(name: str) -> torch.nn.Module:
    cfg = dict(open_clip.get_model_config(name))
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    with torch.device("meta"):
        return (open_clip.model.CustomTextCLIP if custom else open_clip.model.CLIP)(**cfg)


def _act(module: torch.nn.Module) -> str:
    cls = type(module).__name__
    if cls == "QuickGELU":
        return "quick_gelu"
    return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"


@pytest.mark.parametrize("name", [n for n in BUILTINS if not n.startswith(NOT_OPEN_CLIP)])
def test_builtin_config_matches_open_clip(name):
    """Each built-in builds on the meta device with open_clip's parameter count; CLIP ones also with its
    exact parameter names and shapes (through the OpenCLIP key map) and its activation."""
    cfg = fastclip.get_model_config(name)
    with torch.device("meta"):
        ours = CLIP(cfg)
    theirs = _open_clip_on_meta(name)
    count = sum(p.numel() for p in ours.parameters())
    # EVA-01/02 trunks have no k bias: fastclip's packed q/k/v bias holds zeros for it (one width per block)
    k_bias_zeros = cfg.vision.layers * cfg.vision.width if name.startswith("EVA") else 0
    assert count - sum(p.numel() for p in theirs.parameters()) == KNOWN_PARAM_DIFFERENCES.get(name, k_bias_zeros)
    if cfg.family == "clip":
        timm_trunk = cfg.vision.type == "timm"
        key_map = keymaps_eva.from_openclip_eva if timm_trunk else keymaps.from_openclip
        mapped = {k: tuple(v.shape) for k, v in key_map(theirs.state_dict()).items()}
        assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        if cfg.vision.type == "vit":  # timm trunks run GELU whatever the config says (tests/test_eva.py checks
            # them); ResNets run ReLU
            assert _act(theirs.visual.transformer.resblocks[0].mlp.gelu) == cfg.vision.act
        text_blocks = (theirs.text if timm_trunk else theirs).transformer.resblocks  # CustomTextCLIP: .text
        assert _act(text_blocks[0].mlp.gelu) == cfg.text.act
        assert cfg.preprocess.resize_mode == "shortest"
        assert cfg.tokenizer == ("hf" if cfg.text.hf_tokenizer_name else "clip")  # MetaCLIP 2 worldwide: its own
    else:
        assert cfg.family == "siglip" and cfg.tokenizer == "hf" and ours.logit_bias is not None
        assert theirs.visual.trunk.patch_embed.img_size == (cfg.vision.image_size,) * 2
    assert theirs.context_length == cfg.text.context_length and theirs.vocab_size == cfg.text.vocab_size


def test_slash_names_and_suggestions():
    assert fastclip.get_model_config("ViT-B/32").name == "ViT-B-32"
    with pytest.raises(fastclip.UnknownModelError, match="did you mean.*ViT-L-14"):
        fastclip.get_model_config("ViT-L-41")


# ---------------------------------------------------------------- user configs
MY_TINY = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 64, "head_width": 32, "layers": 2, "mlp_ratio": 2.5},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
}


def _check_runs(name: str, tmp_path: Path) -> None:
    """create_model + encode like a built-in, and a save/load round trip through fastclip.load."""
    model = fastclip.create_model(name)
    assert model.cfg.name == name and f"backend={model.backend!r}" in repr(model)
    images = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    tokens = model.tokenizer(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, model.cfg.text.context_length)
    with torch.no_grad():
        img, txt = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    assert img.shape == txt.shape == (2, model.cfg.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2), rtol=0, atol=tolerance.UNIT_NORM_ATOL[torch.float32])
    torch.save(model.state_dict(), tmp_path / f"{name}.pt")
    again = fastclip.load(name, pretrained=tmp_path / f"{name}.pt")
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images, normalize=True), img, rtol=0, atol=0)
        torch.testing.assert_close(again.encode_text(tokens, normalize=True), txt, rtol=0, atol=0)


def test_add_model_config_file(tmp_path):
    path = tmp_path / "my-tiny-file.json"
    path.write_text(json.dumps(MY_TINY))
    assert fastclip.add_model_config(path) == ["my-tiny-file"]
    assert "my-tiny-file" in fastclip.list_models()
    cfg = fastclip.get_model_config("my-tiny-file")
    assert (cfg.vision.heads, cfg.vision.mlp_width, cfg.text.width) == (2, 160, 64)
    _check_runs("my-tiny-file", tmp_path)


def test_add_model_config_folder(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    quick = dict(MY_TINY, quick_gelu=True)
    (folder / "my-tiny-a.json").write_text(json.dumps(MY_TINY))
    (folder / "my-tiny-b-quickgelu.json").write_text(json.dumps(quick))
    (folder / "notes.txt").write_text("not a config")
    assert sorted(fastclip.add_model_config(folder)) == ["my-tiny-a", "my-tiny-b-quickgelu"]
    assert fastclip.get_model_config("my-tiny-b-quickgelu").vision.act == "quick_gelu"
    _check_runs("my-tiny-b-quickgelu", tmp_path)


BAD_CONFIGS = {
    "no-vision": ({k: v for k, v in MY_TINY.items() if k != "vision_cfg"}, "vision_cfg"),
    "bad-heads": (dict(MY_TINY, vision_cfg=dict(MY_TINY["vision_cfg"], head_width=48)), "head_width"),
    "scaled-attn": (dict(MY_TINY, text_cfg=dict(MY_TINY["text_cfg"], scale_attn=True)), "scale_attn"),
    "no-text-proj": (dict(MY_TINY, text_cfg=dict(MY_TINY["text_cfg"], proj_type="none")), "proj_type"),
    "timm-tower": (dict(MY_TINY, vision_cfg={"timm_model_name": "resnet50", "image_size": 224}), "timm"),
    "bad-act": (dict(MY_TINY, vision_cfg=dict(MY_TINY["vision_cfg"], act="relu")), "relu"),
    "not-json": ("{ this is not json", "my-bad-not-json.json"),
    "a-list": ([1, 2, 3], "JSON object"),
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_is_rejected_naming_the_file(kind, tmp_path):
    raw, needle = BAD_CONFIGS[kind]
    path = tmp_path / f"my-bad-{kind}.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    with pytest.raises(ValueError) as info:
        fastclip.add_model_config(path)
    assert str(path) in str(info.value) and needle in str(info.value)
    assert f"my-bad-{kind}" not in fastclip.list_models()


def test_add_model_config_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model config JSON"):
        fastclip.add_model_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        fastclip.add_model_config(tmp_path / "nope.json")
