"""Meta's own Perception Encoder releases (``facebook/PE-Core-*``: one ``<name>.pt``, a state dict of
perception_models' ``core.vision_encoder.pe.CLIP``), against open_clip on perturbed random weights:

* Meta-layout files written from open_clip PE-Core models by renaming their keys (the inverse of timm's
  converter); the written image keys are checked to be Meta's by timm's own converter
  (``timm.models.eva._convert_pe``, which reads perception_models files) before fastclip reads the file;
* tiny S / L / bigG-shaped variants (bigG without a class token) by name + path, raw and wrapped, ref and cpu;
* a real-size release repo, ``hf-hub:facebook/PE-Core-T16-384`` (a fake offline hub cache), the bare hub id and
  the file's path alone;
* the full-size PE-Core-B-16: its Meta state dict (both towers) and its open_clip state dict (the text tower);
* the Meta hub names against perception_models' config.py, and the errors for unknown / missing keys.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from timm.models.eva import _convert_pe

import fastclip
from fastclip import FastclipError
from fastclip.errors import CheckpointError
from fastclip.loading import keymaps_pe_meta
from fastclip.loading.factory import _from_state_dict
from fastclip.tolerance import UPSTREAM_ATOL
from helpers.timm_tiny import tiny_timm_config, tiny_timm_openclip
from helpers.upstream import (
    Upstream,
    assert_matches,
    openclip_upstream,
    put_in_hub_cache,
    register_configs,
    save_state_dict,
)

# tiny name: (real open_clip config, timm.create_model keywords shrinking its trunk). The images keep the release's
# size: at a grid other than the rotary reference grid (timm ref_feat_shape) timm rescales the rotary positions and
# perception_models does not, so only there is open_clip on these weights what Meta's own model computes.
TINY = {
    "pemeta-S": ("PE-Core-S-16-384", dict(img_size=384, embed_dim=128, num_heads=2, depth=2)),
    "pemeta-L": ("PE-Core-L-14-336", dict(img_size=336, embed_dim=128, num_heads=2, depth=2)),
    "pemeta-bigG": ("PE-Core-bigG-14-448", dict(img_size=448, embed_dim=128, num_heads=2, depth=2)),  # no class token
}
PE_PREPROCESS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", "squash")  # core/vision_encoder/transforms.py


def _tiny_config(name: str) -> dict:
    return tiny_timm_config(*TINY[name])


@pytest.fixture(scope="module")
def tiny_names(tmp_path_factory):
    register_configs(tmp_path_factory, "pe-formats", {n: _tiny_config(n) for n in TINY})
    return list(TINY)


def _meta_ready(model: torch.nn.Module) -> torch.nn.Module:
    """Meta's image projection is ``pooled @ proj`` without a bias: the trunk head's (perturbed) bias -> 0."""
    with torch.no_grad():
        model.visual.trunk.head.bias.zero_()
    return model


@functools.cache
def _tiny_openclip(name: str) -> Upstream:
    """The tiny config's open_clip model, perturbed (one per name: the tests only read it)."""
    return tiny_timm_openclip(name, _tiny_config(name), len(name) + 40, _meta_ready)


@pytest.fixture(scope="module")
def pe_core_b() -> Upstream:
    """open_clip.create_model("PE-Core-B-16"), both towers at full size (the text tower: 24 layers of width
    1024), perturbed."""
    up = openclip_upstream("PE-Core-B-16", 23)
    assert (up.image_size, up.model.context_length) == (224, 32)
    _meta_ready(up.model)
    return up


# ---------------------------------------------------------------- Meta's layout, written from open_clip
_BLOCK_RENAMES = (("blocks.", "transformer.resblocks."), (".norm1.", ".ln_1."), (".norm2.", ".ln_2."),
                  ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
                  ("attn.proj.", "attn.out_proj."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
_POOL_RENAMES = (("attn_pool.latent", "attn_pool.probe"), ("attn_pool.proj.", "attn_pool.attn.out_proj."),
                 ("attn_pool.norm.", "attn_pool.layernorm."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
_TOP_RENAMES = {"patch_embed.proj.weight": "conv1.weight", "norm_pre.weight": "ln_pre.weight",
                "norm_pre.bias": "ln_pre.bias", "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias"}


def _meta_visual(trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm PE trunk's state dict -> perception_models' VisionTransformer names (under ``visual.``)."""
    out = {}
    for key, value in trunk.items():
        if key == "cls_token":
            key, value = "class_embedding", value.reshape(-1)  # (1, 1, W) -> (W,)
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]  # (1, N, W) -> (N, W)
        elif key == "head.weight":
            key, value = "proj", value.t()  # (E, W) -> (W, E)
        elif key == "head.bias":
            assert not value.any(), "Meta's image projection has no bias"
            continue
        elif key.startswith("attn_pool.q.") or key.startswith("attn_pool.kv."):
            leaf = key.split(".")[-1]
            if key.startswith("attn_pool.q."):  # nn.MultiheadAttention: rows [q; k; v]
                out["visual.attn_pool.attn.in_proj_" + leaf] = torch.cat([value, trunk["attn_pool.kv." + leaf]])
            continue
        elif key in _TOP_RENAMES:
            key = _TOP_RENAMES[key]
        else:
            for theirs, ours in _POOL_RENAMES if key.startswith("attn_pool.") else _BLOCK_RENAMES:
                key = key.replace(theirs, ours, 1)
        out["visual." + key] = value.detach()
    return out


def to_meta(up: Upstream) -> dict[str, torch.Tensor]:
    """An open_clip PE-Core model's state dict in perception_models' ``CLIP`` names: ``visual.*`` as its
    VisionTransformer, the text tower (a TextTransformer: CLIP's own attributes) at the top level."""
    sd = up.model.state_dict()
    out = _meta_visual({k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")})
    out.update({k.removeprefix("text."): v.detach() for k, v in sd.items() if not k.startswith("visual.")})
    return out


@pytest.mark.parametrize("name", ["pemeta-S", "pemeta-L", "pemeta-bigG", "PE-Core-B-16"])
def test_written_meta_file_is_what_timms_converter_reads(name, request):
    """timm's _convert_pe (which reads perception_models files) turns the file's visual.* part into the
    trunk's own state dict: the writer renames into Meta's names and nothing else."""
    up = request.getfixturevalue("pe_core_b") if name == "PE-Core-B-16" else _tiny_openclip(name)
    meta = to_meta(up)
    assert keymaps_pe_meta.is_meta_pe_layout(meta) and not any(k.startswith(("visual.trunk.", "text.")) for k in meta)
    converted = _convert_pe(meta, up.model.visual.trunk)
    want = up.model.visual.trunk.state_dict()
    assert sorted(converted) == sorted(want)
    assert [k for k in want if not torch.equal(converted[k], want[k])] == []
    assert ("visual.class_embedding" in meta) == (name != "pemeta-bigG")
    for key in ("visual.transformer.resblocks.1.attn.in_proj_bias", "visual.transformer.resblocks.0.ln_2.weight",
                "visual.attn_pool.probe", "visual.attn_pool.layernorm.bias", "visual.attn_pool.mlp.c_fc.weight",
                "visual.ln_pre.weight", "visual.ln_post.bias", "visual.proj", "token_embedding.weight",
                "transformer.resblocks.1.mlp.c_proj.weight", "ln_final.weight", "text_projection", "logit_scale"):
        assert key in meta, key


# ---------------------------------------------------------------- tiny variants, by name + path
@pytest.mark.parametrize("name, fmt", [("pemeta-S", "pt"), ("pemeta-L", "wrapper"), ("pemeta-bigG", "pt")])
def test_meta_file_matches_open_clip(tiny_names, name, fmt, tmp_path):
    """Image and text embeddings of the Meta file equal open_clip's on the same weights (fmt "wrapper": a
    training checkpoint, {"state_dict": {"module." + key: ...}})."""
    up = _tiny_openclip(name)
    path = save_state_dict(to_meta(up), tmp_path / f"{name}.pt", fmt)
    for backend in ("ref", "cpu"):
        model = fastclip.load(name, pretrained=path, backend=backend)
        assert model.cfg.vision.class_token == (name != "pemeta-bigG")
        for batch in (1, 3):
            assert_matches(model, up, batch, f"{name} Meta .pt ({fmt}) {backend}", "pe")


def test_meta_file_wrapped_under_weights_loads(tiny_names, tmp_path):
    """perception_models' loader also reads files saved as {"weights": state_dict}; fastclip unwraps them too."""
    up = _tiny_openclip("pemeta-S")
    path = tmp_path / "wrapped.pt"
    torch.save({"weights": to_meta(up)}, path)
    assert_matches(fastclip.load("pemeta-S", pretrained=path, backend="ref"), up, 1, "pemeta-S {weights: ...}", "pe")


def test_meta_recomputed_tables_are_dropped_and_other_keys_named(tiny_names):
    up = _tiny_openclip("pemeta-S")
    cfg = fastclip.get_model_config("pemeta-S")
    sd = to_meta(up)
    tables = {"visual.rope.rope.freqs": torch.ones(16), "visual.transformer.resblocks.0.attn.rope.rope.freqs":
              torch.ones(16), "attn_mask": torch.full((32, 32), float("-inf")).triu(1)}
    model = _from_state_dict(cfg, dict(sd, **tables), "<memory>", "cpu", "fp32", "ref")
    assert_matches(model, up, 3, "pemeta-S Meta with rope tables and attn_mask", "pe")
    extra = dict(sd, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(128), "attn_pool.probe": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"keys fastclip does not know: attn_pool\.probe, "
                                              r"visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        _from_state_dict(cfg, extra, "<memory>", "cpu", "fp32", "ref")
    short = {k: v for k, v in sd.items() if k not in ("visual.transformer.resblocks.1.attn.in_proj_bias", "ln_final.bias")}
    with pytest.raises(CheckpointError, match=r"missing keys: ln_final\.bias, "
                                              r"visual\.transformer\.resblocks\.1\.attn\.in_proj_bias"):
        _from_state_dict(cfg, short, "<memory>", "cpu", "fp32", "ref")


def test_meta_file_of_no_meta_architecture_by_path_alone_says_load_it_by_name(tiny_names, tmp_path):
    path = save_state_dict(to_meta(_tiny_openclip("pemeta-L")), tmp_path / "PE-tiny.pt", "pt")
    with pytest.raises(CheckpointError, match=r"Meta Perception Encoder state dict whose image tower \(width 128, "
                                              r"patch 14, 577 positions\)") as info:
        fastclip.load(path)
    assert "PE-Core-B-16" in str(info.value) and f"fastclip.load(<name>, pretrained={str(path)!r})" in str(info.value)


# ---------------------------------------------------------------- Meta's hub repos
# perception_models core/vision_encoder/config.py: PE_VISION_CONFIG (image_size, patch_size, width, layers, heads,
# mlp_ratio, output_dim, use_cls_token) and PE_TEXT_CONFIG (context_length, width, heads, layers) of each release
META_CONFIGS = {
    "facebook/PE-Core-G14-448": ((448, 14, 1536, 50, 16, 8960 / 1536, 1280, False), (72, 1280, 20, 24)),
    "facebook/PE-Core-L14-336": ((336, 14, 1024, 24, 16, 4.0, 1024, True), (32, 1024, 16, 24)),
    "facebook/PE-Core-B16-224": ((224, 16, 768, 12, 12, 4.0, 1024, True), (32, 1024, 16, 24)),
    "facebook/PE-Core-S16-384": ((384, 16, 384, 12, 6, 4.0, 512, True), (32, 512, 8, 12)),
    "facebook/PE-Core-T16-384": ((384, 16, 192, 12, 3, 4.0, 512, True), (32, 512, 8, 12)),
}


def test_meta_hub_names_map_to_the_architectures_of_metas_configs():
    assert sorted(keymaps_pe_meta.META_REPOS) == sorted(META_CONFIGS)
    for repo, (vision, text) in META_CONFIGS.items():
        cfg = fastclip.get_model_config(keymaps_pe_meta.META_REPOS[repo])
        v, t = cfg.vision, cfg.text
        size, patch, width, layers, heads, mlp_ratio, output_dim, cls = vision
        assert (v.image_size, v.patch_size, v.width, v.layers, v.heads) == (size, patch, width, layers, heads), repo
        assert (v.mlp_width, cfg.embed_dim, v.class_token) == (int(width * mlp_ratio), output_dim, cls), repo
        assert (v.pool, v.pool_heads, v.ln_pre, v.rope) == ("map", 8, True, True), repo  # attn_pooler_heads=8
        assert (t.context_length, t.width, t.heads, t.layers, t.vocab_size) == (*text, 49408), repo
        assert (t.causal, t.pool_type, t.act, t.proj_bias) == (True, "argmax", "gelu", False), repo
        assert keymaps_pe_meta.meta_repo("hf-hub:" + repo) == keymaps_pe_meta.meta_repo(repo) == repo
        assert keymaps_pe_meta.weights_file(repo) == repo.split("/")[1] + ".pt"  # fetch_pe_checkpoint's file
    assert keymaps_pe_meta.meta_repo("hf-hub:timm/PE-Core-B-16") is None


def test_meta_hub_repo_not_cached_says_how_to_get_the_file(offline_hub):
    with pytest.raises(FastclipError) as info:
        fastclip.load("hf-hub:facebook/PE-Core-S16-384")
    message = str(info.value)
    for needle in ("facebook/PE-Core-S16-384", "hf download facebook/PE-Core-S16-384 PE-Core-S16-384.pt",
                   "HF_HUB_OFFLINE", str(offline_hub)):
        assert needle in message, f"{needle!r} not in: {message}"


# ---------------------------------------------------------------- a real-size Meta repo through the hub
@pytest.fixture(scope="module")
def pe_core_t() -> Upstream:
    """open_clip.create_model("PE-Core-T-16-384") (the smallest release, at its real size), perturbed."""
    up = openclip_upstream("PE-Core-T-16-384", 29)
    assert (up.image_size, up.model.context_length) == (384, 32)
    _meta_ready(up.model)
    return up


def test_meta_hub_repo_loads_as_its_architecture(pe_core_t, offline_hub, tmp_path):
    """``hf-hub:facebook/PE-Core-T16-384`` (a repo holding PE-Core-T16-384.pt, as Meta publishes it) loads as
    PE-Core-T-16-384 with Meta's preprocessing and matches open_clip; the bare hub id and the file's path alone
    load the same weights."""
    path = save_state_dict(to_meta(pe_core_t), tmp_path / "PE-Core-T16-384.pt", "pt")
    put_in_hub_cache(offline_hub, "facebook/PE-Core-T16-384",
                     {"PE-Core-T16-384.pt": path, "README.md": b"# Perception Encoder\n"})
    model = fastclip.load("hf-hub:facebook/PE-Core-T16-384", backend="cpu")
    assert model.cfg.name == "PE-Core-T-16-384" and model.backend == "cpu"
    pre = model.preprocess.cfg
    assert (tuple(pre.mean), tuple(pre.std), pre.interpolation, pre.resize_mode) == PE_PREPROCESS
    assert model.tokenizer.context_length == 32
    for batch in (1, 3):
        assert_matches(model, pe_core_t, batch, "PE-Core-T-16-384 hf-hub:facebook/PE-Core-T16-384 cpu", "pe")
    want = model.state_dict()
    for other in (fastclip.load("facebook/PE-Core-T16-384"), fastclip.load(path)):
        assert other.cfg.name == "PE-Core-T-16-384"
        assert (other.preprocess.cfg.interpolation, other.preprocess.cfg.resize_mode) == ("bilinear", "squash")
        got = other.state_dict()
        assert sorted(got) == sorted(want) and [k for k in want if not torch.equal(got[k], want[k])] == []


# ---------------------------------------------------------------- full-size PE-Core-B-16, both towers
# In memory (a 1.8 GB file would add its write to the run); files and the hub are covered above.
def test_pe_core_b16_meta_state_dict_matches_open_clip(pe_core_b):
    """Meta's layout of the full-size PE-Core-B-16 (image tower 12 x 768, text tower 24 x 1024), both towers."""
    sd = to_meta(pe_core_b)
    assert keymaps_pe_meta.architecture_of("<memory>", sd) == "PE-Core-B-16"
    model = _from_state_dict(fastclip.get_model_config("PE-Core-B-16"), sd, "<memory>", "cpu", "fp32", "cpu")
    for batch in (1, 3):
        assert_matches(model, pe_core_b, batch, "PE-Core-B-16 Meta state dict cpu", "pe")


def test_pe_core_b16_open_clip_state_dict_text_tower_matches(pe_core_b):
    """The open_clip state dict of the full-size PE-Core-B-16: its text tower (24 layers, width 1024, context 32)
    against open_clip, raw and L2-normalised (its image tower: test_eva_formats.py)."""
    cfg = fastclip.get_model_config("PE-Core-B-16")
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.text.context_length) == (1024, 24, 16, 32)
    model = _from_state_dict(cfg, dict(pe_core_b.model.state_dict()), "<memory>", "cpu", "fp32", "ref")
    for batch in (1, 3):
        _, tokens = pe_core_b.inputs(batch)
        _, want = pe_core_b.outputs(batch)
        with torch.no_grad():
            got, got_n = model.encode_text(tokens), model.encode_text(tokens, normalize=True)
        errors = ((got - want).abs().max().item(), (got_n - F.normalize(want, dim=-1)).abs().max().item())
        assert max(errors) <= UPSTREAM_ATOL, f"PE-Core-B-16 text B={batch}: max-abs (raw, normalised) {errors}"
