"""EVA / Perception Encoder checkpoints in their other formats, against open_clip on perturbed random weights:

* BAAI EVA-CLIP release files (``visual.*`` in BAAI's names, the text tower at the top level or under
  ``text.``), written from open_clip models by renaming their keys; the written image keys are checked to be
  BAAI's by timm's own converter (``timm.models.eva.checkpoint_filter_fn``) before fastclip reads the file;
* OpenCLIP hub directories of the timm org (``open_clip_config.json`` as open_clip's ``save_config_for_hf``
  writes it, with ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), by path and by hf-hub id;
* timm image-trunk repos (``config.json`` with ``architecture``, the trunk alone), refused naming the OpenCLIP
  repo to load instead;
* the full-size PE-Core-B-16 image tower, batch 1 and 3, ref and cpu backends;
* ``cfg.tokenizer`` of configs whose text tower names a Hugging Face tokenizer (MetaCLIP 2 worldwide).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_config_for_hf
from timm.models._hub import save_for_hf as timm_save_for_hf
from timm.models.eva import checkpoint_filter_fn

import fastclip
from fastclip.errors import CheckpointError
from fastclip.loading import keymaps_eva_baai
from fastclip.loading.factory import _from_state_dict
from fastclip.models.config import parse_config
from fastclip.tolerance import MIN_COSINE
from helpers.timm_tiny import OPENCLIP_CONFIGS, TINY_TEXT, tiny_timm_config, tiny_timm_openclip
from helpers.upstream import (
    Upstream,
    assert_matches,
    clip_tokens,
    perturb_,
    put_in_hub_cache,
    register_configs,
    save_state_dict,
)

# tiny name: (real open_clip config, timm.create_model keywords shrinking its trunk)
TINY = {
    "fmt-EVA02-B": ("EVA02-B-16", dict(img_size=64, embed_dim=128, num_heads=2, depth=2)),  # q/k/v, SwiGLU, rope
    "fmt-EVA01-g": ("EVA01-g-14", dict(img_size=56, embed_dim=128, num_heads=2, depth=2)),  # fused qkv, GELU
    "fmt-EVA02-E": ("EVA02-E-14", dict(img_size=56, embed_dim=128, num_heads=2, depth=2, mlp_ratio=4.3)),  # post-norm
    "fmt-PE-Core-B": ("PE-Core-B-16", dict(img_size=64, embed_dim=128, num_heads=2, depth=2)),
}
OPENAI_PREPROCESS = {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "interpolation": "bicubic",
                     "resize_mode": "shortest"}
PE_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "resize_mode": "squash"}


def _tiny_config(name: str) -> dict:
    return tiny_timm_config(*TINY[name])


@pytest.fixture(scope="module")
def tiny_names(tmp_path_factory):
    register_configs(tmp_path_factory, "eva-formats", {n: _tiny_config(n) for n in TINY})
    return list(TINY)


@functools.cache
def _tiny_openclip(name: str) -> Upstream:
    """The tiny config's open_clip model, perturbed (one per name: the tests only read it)."""
    return tiny_timm_openclip(name, _tiny_config(name), len(name))


# ---------------------------------------------------------------- BAAI EVA-CLIP files
def _baai_rope(head_width: int, grid: int, pt_seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """BAAI's VisionRotaryEmbeddingFast buffers (freqs_cos, freqs_sin), each (grid^2, head_width)."""
    dim = head_width // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * pt_seq_len
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, -1)  # (g, dim)
    f = torch.cat([f[:, None].expand(grid, grid, dim), f[None, :].expand(grid, grid, dim)], -1)  # (g, g, 2 dim)
    return f.cos().reshape(grid * grid, -1), f.sin().reshape(grid * grid, -1)


def to_baai(up: Upstream, text_prefix: str = "") -> dict[str, torch.Tensor]:
    """An open_clip EVA model's state dict in BAAI EVA-CLIP's names: ``visual.*`` as BAAI's
    EVAVisionTransformer (with its rotary buffers), the text tower under ``text_prefix`` ("" as BAAI's CLIP)."""
    sd, trunk = up.model.state_dict(), up.model.visual.trunk
    swiglu = "visual.trunk.blocks.0.mlp.fc1_g.weight" in sd
    out = {}
    for key, value in sd.items():
        if key.startswith("visual.trunk."):
            key = "visual." + key[len("visual.trunk."):]
            key = re.sub(r"attn\.([qv])_proj\.bias$", r"attn.\1_bias", key)
            key = key.replace("attn.norm.", "attn.inner_attn_ln.").replace("mlp.norm.", "mlp.ffn_ln.")
            key = key.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
            if swiglu:
                key = key.replace("mlp.fc2.", "mlp.w3.")
        elif key.startswith("text."):
            key = text_prefix + key[len("text."):]
        out[key] = value.detach().clone()
    if trunk.rope is not None:  # one shared module, registered in every block's attention too
        cos, sin = _baai_rope(trunk.embed_dim // trunk.blocks[0].attn.num_heads, trunk.patch_embed.grid_size[0])
        for prefix in ["visual."] + [f"visual.blocks.{i}.attn." for i in range(len(trunk.blocks))]:
            out[prefix + "rope.freqs_cos"], out[prefix + "rope.freqs_sin"] = cos, sin
    return out


@pytest.mark.parametrize("name", ["fmt-EVA02-B", "fmt-EVA01-g", "fmt-EVA02-E"])
def test_written_baai_file_is_what_timms_converter_reads(name):
    """timm's checkpoint_filter_fn (which reads BAAI EVA-CLIP files) turns the file's visual.* part into the
    trunk's own state dict: the writer renames into BAAI's names and nothing else."""
    up = _tiny_openclip(name)
    baai = to_baai(up)
    assert not any(k.startswith("visual.trunk.") for k in baai) and keymaps_eva_baai.is_baai_eva_layout(baai)
    visual = {k: v for k, v in baai.items() if k.startswith("visual.")}
    converted = checkpoint_filter_fn(visual, up.model.visual.trunk)
    want = up.model.visual.trunk.state_dict()
    assert sorted(converted) == sorted(want)
    assert [k for k in want if not torch.equal(converted[k], want[k])] == []
    if name == "fmt-EVA02-B":  # the names that differ from timm's are there
        for key in ("blocks.0.attn.q_proj.weight", "blocks.0.attn.q_bias", "blocks.0.attn.inner_attn_ln.weight",
                    "blocks.0.mlp.w1.weight", "blocks.0.mlp.w3.weight", "blocks.0.mlp.ffn_ln.weight",
                    "rope.freqs_cos", "blocks.1.attn.rope.freqs_sin", "head.weight"):
            assert "visual." + key in baai


@pytest.mark.parametrize("name, text_prefix", [("fmt-EVA02-B", ""), ("fmt-EVA01-g", ""), ("fmt-EVA02-E", "text.")])
def test_baai_file_matches_open_clip(tiny_names, name, text_prefix, tmp_path):
    up = _tiny_openclip(name)
    path = save_state_dict(to_baai(up, text_prefix), tmp_path / "EVA_CLIP_tiny.pt", "pt")
    for backend in ("ref", "cpu"):
        model = fastclip.load(name, pretrained=path, backend=backend)
        for batch in (1, 3):
            assert_matches(model, up, batch, f"{name} BAAI (text at {text_prefix or 'top level'}) {backend}", "eva")


def test_baai_text_logit_scale_under_text(tiny_names):
    """BAAI's loader also accepts ``text.logit_scale`` (CustomCLIP files): it is the model's logit scale."""
    up = _tiny_openclip("fmt-EVA02-B")
    sd = to_baai(up, "text.")
    sd["text.logit_scale"] = sd.pop("logit_scale")
    model = _from_state_dict(fastclip.get_model_config("fmt-EVA02-B"), sd, "<memory>", "cpu", "fp32", "ref")
    assert torch.allclose(model.logit_scale, up.model.logit_scale.exp())
    assert_matches(model, up, 3, "fmt-EVA02-B BAAI text.logit_scale", "eva")


def test_baai_missing_and_unknown_keys_are_named(tiny_names):
    up = _tiny_openclip("fmt-EVA02-B")
    cfg = fastclip.get_model_config("fmt-EVA02-B")
    sd = to_baai(up)
    with pytest.raises(CheckpointError, match=r"lacks 'visual\.blocks\.1\.attn\.v_bias'"):
        keymaps_eva_baai.from_baai_eva({k: v for k, v in sd.items() if k != "visual.blocks.1.attn.v_bias"})
    extra = dict(sd, **{"visual.blocks.0.gamma_1": torch.ones(128), "visual.rel_pos_bias.table": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: visual\.blocks\.0\.gamma_1, visual\.rel_pos_bias\.table"):
        _from_state_dict(cfg, extra, "<memory>", "cpu", "fp32", "ref")
    short = {k: v for k, v in sd.items() if k != "visual.blocks.1.mlp.ffn_ln.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: visual\.blocks\.1\.mlp\.norm\.bias"):
        _from_state_dict(cfg, short, "<memory>", "cpu", "fp32", "ref")


def test_baai_file_without_a_name_says_which_names_fit(tiny_names, tmp_path):
    path = save_state_dict(to_baai(_tiny_openclip("fmt-EVA02-B")), tmp_path / "EVA02_tiny.pt", "pt")
    with pytest.raises(CheckpointError, match=r"BAAI EVA-CLIP state dict, which carries no config") as info:
        fastclip.load(path)
    fits = re.search(r"its shapes fit ([^)]*)\)", str(info.value))  # other tests may register same-shaped configs
    assert fits and "fmt-EVA02-B" in fits.group(1).split(", ") and "fastclip.load(<name>, pretrained=" in str(info.value)


# ---------------------------------------------------------------- OpenCLIP hub directories (timm org)
def _openclip_dir(up: Upstream, raw: dict, directory: Path, weights: str) -> Path:
    """open_clip_config.json as open_clip's push_to_hf_hub writes it ({"model_cfg", "preprocess_cfg"}) + weights."""
    directory.mkdir(parents=True)
    save_config_for_hf(up.model, directory / "open_clip_config.json", model_config=raw)
    sd = {k: v.detach().contiguous() for k, v in up.model.state_dict().items()}
    save_state_dict(sd, directory / weights, "safetensors" if weights.endswith(".safetensors") else "bin")
    return directory


@pytest.mark.parametrize("name, weights", [("fmt-EVA02-B", "open_clip_model.safetensors"),
                                           ("fmt-PE-Core-B", "open_clip_model.safetensors"),
                                           ("fmt-PE-Core-B", "open_clip_pytorch_model.bin")])
def test_openclip_hub_directory_loads_by_path(name, weights, tmp_path):
    """No registered config needed: the directory's model_cfg (vision_cfg.timm_model_name) is the config."""
    up = _tiny_openclip(name)
    set_model_preprocess_cfg(up.model, dict(PE_PREPROCESS if name.startswith("fmt-PE") else OPENAI_PREPROCESS,
                                            size=up.image_size))  # as open_clip.create_model sets it
    directory = _openclip_dir(up, _tiny_config(name), tmp_path / "repo", weights)
    meta = json.loads((directory / "open_clip_config.json").read_text())
    assert sorted(meta) == ["model_cfg", "preprocess_cfg"] and "timm_model_name" in meta["model_cfg"]["vision_cfg"]
    model = fastclip.load(directory)
    assert model.cfg.vision.type == "timm" and model.cfg.vision.timm_model_name == meta["model_cfg"]["vision_cfg"]["timm_model_name"]
    pre = model.preprocess.cfg
    assert (tuple(pre.mean), tuple(pre.std)) == (tuple(up.model.visual.image_mean), tuple(up.model.visual.image_std))
    if name.startswith("fmt-PE"):
        assert (pre.interpolation, pre.resize_mode) == ("bilinear", "squash")
    for batch in (1, 3):
        assert_matches(model, up, batch, f"{name} OpenCLIP dir ({weights})", "eva")


def test_openclip_hub_repo_loads_by_hf_hub_id(offline_hub, tmp_path):
    up = _tiny_openclip("fmt-PE-Core-B")
    set_model_preprocess_cfg(up.model, dict(PE_PREPROCESS, size=up.image_size))
    directory = _openclip_dir(up, _tiny_config("fmt-PE-Core-B"), tmp_path / "repo", "open_clip_model.safetensors")
    put_in_hub_cache(offline_hub, "timm/PE-Core-tiny", {f.name: f for f in directory.iterdir()})
    model = fastclip.load("hf-hub:timm/PE-Core-tiny", backend="cpu")
    assert model.cfg.name == "timm/PE-Core-tiny"
    assert_matches(model, up, 3, "fmt-PE-Core-B hf-hub: repo", "eva")


# ---------------------------------------------------------------- timm image-trunk repos
@pytest.mark.parametrize("timm_name, instead", [
    ("eva02_base_patch16_clip_224.merged2b", ["fastclip.load('EVA02-B-16', pretrained='merged2b_s8b_b131k')",
                                              "hf-hub:timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k"]),
    ("vit_pe_core_base_patch16_224.fb", ["fastclip.load('PE-Core-B-16', pretrained='meta')", "hf-hub:timm/PE-Core-B-16"]),
])
def test_timm_trunk_repo_is_refused_naming_the_openclip_repo(timm_name, instead, tmp_path, offline_hub):
    """config.json (architecture, pretrained_cfg) + model.safetensors as timm's save_for_hf writes them: an image
    trunk without a text tower. Loading it by path or hub id says which OpenCLIP repo holds the whole model."""
    arch = timm_name.split(".")[0]
    trunk = timm.create_model(timm_name, pretrained=False, img_size=64, embed_dim=64, num_heads=2, depth=1)
    directory = tmp_path / timm_name
    timm_save_for_hf(trunk, directory, safe_serialization=True)
    assert json.loads((directory / "config.json").read_text())["architecture"] == arch
    put_in_hub_cache(offline_hub, f"timm/{timm_name}", {f.name: f for f in directory.iterdir()})
    for load in (lambda: fastclip.load(directory), lambda: fastclip.load(f"timm/{timm_name}")):
        with pytest.raises(CheckpointError, match=rf"timm image-model repo \(config.json architecture '{arch}'\)") as info:
            load()
        assert "without a text tower" in str(info.value)
        assert [s for s in instead if s not in str(info.value)] == []


# ---------------------------------------------------------------- full-size PE-Core-B-16
# The real image tower with a tiny text tower: PE-Core-B-16's text tower (24 layers, width 1024: 354M of the 447M
# parameters) is OpenCLIP's plain causal CLIP text transformer, and building, perturbing and running it in both
# libraries took the test from ~15 s to ~42 s on an idle 2-core machine (110-130 s on a busy one).
@pytest.fixture(scope="module")
def pe_core_b(tmp_path_factory):
    raw = json.loads((OPENCLIP_CONFIGS / "PE-Core-B-16.json").read_text())
    raw["text_cfg"] = dict(TINY_TEXT, context_length=raw["text_cfg"]["context_length"])
    register_configs(tmp_path_factory, "pe-core-b", {"fs-PE-Core-B-16": raw})
    torch.manual_seed(11)
    model = open_clip.model.CustomTextCLIP(raw["embed_dim"], raw["vision_cfg"], raw["text_cfg"])
    perturb_(model, 11)
    return Upstream("open_clip PE-Core-B-16 image tower", model, "open_clip", 224, lambda b: clip_tokens(b, 32, seed=b))


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_pe_core_b16_image_tower_matches_open_clip(pe_core_b, backend):
    """The full-size ViT-B/16 trunk with rotary and absolute positions, a LayerNorm before the blocks and attention
    pooling, as PE-Core-B-16 configures it (fastclip's registered config has the same image tower)."""
    cfg = fastclip.get_model_config("fs-PE-Core-B-16")
    assert cfg.vision == fastclip.get_model_config("PE-Core-B-16").vision and cfg.embed_dim == 1024
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.pool) == (768, 12, "map")
    model = _from_state_dict(cfg, dict(pe_core_b.model.state_dict()), "<memory>", "cpu", "fp32", backend)
    assert model.backend == backend
    for batch in (1, 3):
        assert_matches(model, pe_core_b, batch, f"PE-Core-B-16 image tower {backend}", "eva")


def test_pe_core_b16_int8_cosine(pe_core_b):
    """precision="int8" on the full-size PE-Core-B-16 image tower: per-item cosine to open_clip's fp32 >= MIN_COSINE."""
    cfg = fastclip.get_model_config("fs-PE-Core-B-16")
    q = _from_state_dict(cfg, dict(pe_core_b.model.state_dict()), "<memory>", "cpu", "int8", "cpu")
    assert q.precision == "int8" and len(q.int8_weights) > 0
    images, _ = pe_core_b.inputs(3)
    want, _ = pe_core_b.outputs(3)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(q.encode_image(images), want, dim=-1)
    assert cosine.min().item() >= MIN_COSINE, f"per-item cosine {cosine.min():.5f}"


# ---------------------------------------------------------------- cfg.tokenizer says which tokenizer runs
def test_configs_naming_an_hf_tokenizer_say_hf():
    """MetaCLIP 2 worldwide: a CLIP-family config whose text_cfg names hf_tokenizer_name loads that Hugging Face
    tokenizer (open_clip's HFTokenizer), so its ``tokenizer`` is "hf"; CLIP configs without one keep "clip"."""
    worldwide = [n for n in fastclip.list_models() if "worldwide" in n]
    assert len(worldwide) >= 7
    for name in worldwide:
        cfg = fastclip.get_model_config(name)
        assert cfg.family == "clip" and cfg.text.hf_tokenizer_name and cfg.tokenizer == "hf", name
    assert fastclip.get_model_config("ViT-B-32").tokenizer == "clip"
    assert fastclip.get_model_config("EVA02-B-16").tokenizer == "clip"
    raw = json.loads((Path(fastclip.__file__).parent / "models" / "configs" / "ViT-L-14-worldwide.json").read_text())
    assert parse_config("explicit", dict(raw, tokenizer="clip")).tokenizer == "clip"  # an explicit key still rules
