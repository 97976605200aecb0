"""Every checkpoint format through the public API ``fastclip.load``, each compared with the upstream
model's outputs (max-abs <= UPSTREAM_ATOL, fastclip/tolerance.py), the offline hub cache, and the errors
of broken or unsafe files.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch

import fastclip
from fastclip import CheckpointError, FastclipError, UnknownModelError, tolerance
from fastclip.loading import hub
from helpers.upstream import (
    ROOT,
    TINY_CONFIGS,
    Marker,
    Upstream,
    assert_matches,
    clip_tokens,
    put_in_hub_cache,
    save_state_dict,
)

TINY = "tiny-avgpool-quickgelu"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # full-size checkpoints: don't keep GBs in pytest's tmp dirs


# ---------------------------------------------------------------- (a) OpenCLIP state dicts
@pytest.fixture(scope="module")
def b32_safetensors(oc_b32, files) -> Path:
    return save_state_dict(oc_b32.model.state_dict(), files / "ViT-B-32.safetensors", "safetensors")


@pytest.mark.parametrize("fmt", ["bin", "pt", "safetensors", "wrapper"])
def test_openclip_checkpoint(fmt, oc_b32, b32_safetensors, files):
    path = b32_safetensors if fmt == "safetensors" else save_state_dict(
        oc_b32.model.state_dict(), files / f"ViT-B-32-{fmt}.{'pt' if fmt == 'wrapper' else fmt}", fmt)
    model = fastclip.load("ViT-B-32", pretrained=path)
    assert model.cfg.vision.act == model.cfg.text.act == "gelu"
    assert model.dtype == torch.float32 and model.tokenizer is not None and model.preprocess is not None
    assert_matches(model, oc_b32, 3, f"load ViT-B-32 OpenCLIP .{fmt}", "load")
    if fmt != "safetensors":
        path.unlink()  # 600 MB each


# ---------------------------------------------------------------- (b) OpenAI checkpoints
@pytest.fixture(scope="module")
def openai_ckpts(oc_b32_quickgelu, files):
    """OpenAI's two shapes of ViT-B-32: a plain state dict and a TorchScript archive, fp16 weights as shipped.
    The reference is the open_clip model built the way open_clip loads OpenAI weights (upcast to fp32)."""
    sd = {k: v.clone() for k, v in oc_b32_quickgelu.model.state_dict().items()}
    built = open_clip.model.build_model_from_openai_state_dict(dict(sd)).eval()
    assert built.visual.conv1.weight.dtype == built.text_projection.dtype == torch.float16
    plain = dict(built.state_dict(), input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    torch.save(plain, files / "openai-state-dict.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; OpenAI's files are scripted
        torch.jit.script(built).save(str(files / "ViT-B-32.pt"))
    ref = Upstream("open_clip, OpenAI weights in fp32", built.float(), "open_clip", 224,
                   lambda b: clip_tokens(b, seed=b))
    return {"state_dict": files / "openai-state-dict.pt", "torchscript": files / "ViT-B-32.pt"}, ref


@pytest.mark.parametrize("how", ["inferred", "named"])
@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_openai_checkpoint(kind, how, openai_ckpts):
    paths, ref = openai_ckpts
    path = paths[kind]
    model = fastclip.load(path) if how == "inferred" else fastclip.load("ViT-B-32-quickgelu", pretrained=path)
    cfg = model.cfg
    assert cfg.vision.act == cfg.text.act == "quick_gelu"
    shape = (cfg.vision.width, cfg.vision.patch_size, cfg.vision.layers, cfg.text.width, cfg.embed_dim)
    assert shape == (768, 32, 12, 512, 512)
    assert model.dtype == torch.float32
    assert_matches(model, ref, 3, f"load OpenAI {kind} ({how})", "load")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_trusted_gives_the_same_weights(openai_ckpts):
    paths, _ = openai_ckpts
    as_data = fastclip.load(paths["torchscript"]).state_dict()
    trusted = fastclip.load(paths["torchscript"], trust=True).state_dict()
    assert as_data.keys() == trusted.keys()
    assert all(torch.equal(as_data[k], trusted[k]) for k in as_data)


# ---------------------------------------------------------------- (c) Hugging Face directories
def test_hf_clip_directory(hf_clip, hf_clip_dir):
    model = fastclip.load(hf_clip_dir)
    assert model.cfg.vision.act == "quick_gelu" and model.cfg.text.act == "gelu"
    assert model.preprocess is not None and model.tokenizer is not None
    assert_matches(model, hf_clip, 3, "load HF CLIPModel dir", "load")


def test_hf_siglip_directory(hf_siglip, hf_siglip_dir):
    import transformers

    model = fastclip.load(hf_siglip_dir)
    assert model.cfg.family == "siglip" and model.logit_bias is not None
    assert_matches(model, hf_siglip, 3, "load HF SiglipModel dir", "load")
    texts = ["sen ka tor", "qui dra belxa tor so", "unknown words here"]
    ref = transformers.AutoTokenizer.from_pretrained(hf_siglip_dir)(
        texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    assert torch.equal(model.tokenizer(texts), ref)


# ---------------------------------------------------------------- (d) hub ids and pretrained tags, offline
def test_pretrained_tag_from_offline_cache(offline_hub, oc_b32_quickgelu, files):
    entry = hub.pretrained_entry("ViT-B-32", "openai")
    assert entry["hf_hub"] == "timm/vit_base_patch32_clip_224.openai" and entry["quick_gelu"]
    weights = save_state_dict(oc_b32_quickgelu.model.state_dict(), files / "openai-fp32.safetensors", "safetensors")
    put_in_hub_cache(offline_hub, entry["hf_hub"], {"open_clip_model.safetensors": weights})
    model = fastclip.load("ViT-B-32", pretrained="openai")
    assert model.cfg.vision.act == model.cfg.text.act == "quick_gelu"
    assert_matches(model, oc_b32_quickgelu, 3, "hub tag ViT-B-32/openai (offline)", "load")


def _put_hf_dir(cache: Path, repo_id: str, directory: Path) -> None:
    put_in_hub_cache(cache, repo_id, {f.name: f for f in directory.iterdir() if f.is_file()})


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_hub_id_from_offline_cache(which, offline_hub, request):
    up, directory = request.getfixturevalue(f"hf_{which}"), request.getfixturevalue(f"hf_{which}_dir")
    repo_id = {"clip": "openai/clip-vit-base-patch32", "siglip": "google/siglip-base-patch16-224"}[which]
    _put_hf_dir(offline_hub, repo_id, directory)
    model = fastclip.load(repo_id)
    assert model.cfg.name == repo_id
    assert_matches(model, up, 3, f"hub id {repo_id} (offline, small)", "load")


def test_openclip_hub_repo_from_offline_cache(offline_hub, oc_tiny, files):
    up = oc_tiny[TINY]
    weights = save_state_dict(up.model.state_dict(), files / "tiny.safetensors", "safetensors")
    meta = {"model_cfg": TINY_CONFIGS[TINY], "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    put_in_hub_cache(offline_hub, "someone/tiny-openclip", {
        "open_clip_config.json": json.dumps(meta).encode(), "open_clip_model.safetensors": weights})
    model = fastclip.load("hf-hub:someone/tiny-openclip")
    assert model.cfg.name == "someone/tiny-openclip" and model.cfg.preprocess.mean == (0.5, 0.5, 0.5)
    assert_matches(model, up, 3, f"hf-hub: OpenCLIP repo ({TINY})", "load")


def test_offline_cache_miss_names_the_repo(offline_hub):
    with pytest.raises(FastclipError, match=r"timm/vit_base_patch16_clip_224\.openai") as info:
        fastclip.load("ViT-B-16", pretrained="openai")
    assert "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(FastclipError, match="nobody/no-such-model"):
        fastclip.load("nobody/no-such-model")
    with pytest.raises(FastclipError, match="nobody/no-such-repo"):
        fastclip.load("hf-hub:nobody/no-such-repo")


def test_hub_environment_variables_in_a_fresh_process(tmp_path, hf_clip, hf_clip_dir):
    """HF_HUB_OFFLINE / HF_HUB_CACHE set before the process starts are honoured (no patching)."""
    cache = tmp_path / "cache"
    _put_hf_dir(cache, "openai/clip-vit-base-patch32", hf_clip_dir)
    images, _ = hf_clip.inputs(3)
    torch.save(images, tmp_path / "images.pt")
    code = ("import sys, torch, fastclip; m = fastclip.load('openai/clip-vit-base-patch32'); "
            "torch.save(m.encode_image(torch.load(sys.argv[1])), sys.argv[2])")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=120)
    assert (torch.load(tmp_path / "out.pt") - hf_clip.outputs(3)[0]).abs().max() <= tolerance.UPSTREAM_ATOL


# ---------------------------------------------------------------- errors: names, tags, keys
def test_unknown_architecture_suggests_names():
    for call in (lambda: fastclip.load("ViT-B-33", pretrained="openai"), lambda: fastclip.create_model("ViT-B-33"),
                 lambda: fastclip.get_model_config("vit-b-32")):
        with pytest.raises(UnknownModelError, match="did you mean.*ViT-B-32"):
            call()


def test_unknown_pretrained_tag_lists_the_known_tags():
    with pytest.raises(UnknownModelError, match="laion5b_typo") as info:
        fastclip.load("ViT-B-32", pretrained="laion5b_typo")
    assert "openai" in str(info.value) and "laion2b_s34b_b79k" in str(info.value)
    with pytest.raises(ValueError, match="needs pretrained="):
        fastclip.load("ViT-B-32")


def _tiny_sd(oc_tiny) -> dict:
    return {k: v.clone() for k, v in oc_tiny[TINY].model.state_dict().items()}


@pytest.mark.parametrize("problem, key", [
    ("missing", "visual.ln_post.weight"),
    ("unexpected", "visual.extra_head.weight"),
    ("mis-shaped", "text_projection"),
])
def test_key_errors_name_the_keys_and_the_file(problem, key, oc_tiny, tmp_path):
    sd = _tiny_sd(oc_tiny)
    if problem == "missing":
        del sd[key]
    elif problem == "unexpected":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = sd[key][:, :10]
    path = save_state_dict(sd, tmp_path / "tiny.safetensors", "safetensors")
    with pytest.raises(CheckpointError, match=f"{problem} keys") as info:
        fastclip.load(TINY, pretrained=path)
    assert key in str(info.value) and str(path) in str(info.value)


def test_wrong_architecture(b32_safetensors, oc_tiny, tmp_path):
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: .*visual\.conv1\.weight") as info:
        fastclip.load("ViT-B-16", pretrained=b32_safetensors)
    assert str(b32_safetensors) in str(info.value) and "'ViT-B-16'" in str(info.value)
    tiny = save_state_dict(_tiny_sd(oc_tiny), tmp_path / "tiny.bin", "bin")
    with pytest.raises(CheckpointError, match="missing keys"):  # a GELU B-32 is no tiny QuickGELU model
        fastclip.load("ViT-B-32", pretrained=tiny)
    other = save_state_dict({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "other.pt", "pt")
    for call in (lambda: fastclip.load(other), lambda: fastclip.load(TINY, pretrained=other)):
        with pytest.raises(CheckpointError, match="other.pt"):
            call()


# ---------------------------------------------------------------- errors: corrupt and empty files
@pytest.fixture(scope="module")
def tiny_files(oc_tiny, files) -> dict[str, bytes]:
    sd = _tiny_sd(oc_tiny)
    st = save_state_dict(sd, files / "t.safetensors", "safetensors").read_bytes()
    pt = save_state_dict(sd, files / "t.pt", "pt").read_bytes()
    torch.save(sd, files / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (files / "legacy.pt").read_bytes()
    script = files / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(oc_tiny[TINY].model).save(str(script))
    return {"safetensors": st, "pt": pt, "legacy": legacy, "script": script.read_bytes()}


CORRUPT = {
    "truncated.safetensors": lambda f: f["safetensors"][: len(f["safetensors"]) // 2],
    "header-only.safetensors": lambda f: f["safetensors"][:6],
    "random.bin": lambda f: os.urandom(1 << 14),
    "text.bin": lambda f: b"this is not a checkpoint\n" * 40,
    "truncated-zip.pt": lambda f: f["pt"][: len(f["pt"]) // 2],
    "truncated-legacy.pt": lambda f: f["legacy"][: len(f["legacy"]) // 2],
    "truncated-torchscript.pt": lambda f: f["script"][: len(f["script"]) * 2 // 3],
    "empty.bin": lambda f: b"",
    "empty.safetensors": lambda f: b"",
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_files(name, tiny_files, tmp_path):
    path = tmp_path / name
    path.write_bytes(CORRUPT[name](tiny_files))
    for call in (lambda: fastclip.load(TINY, pretrained=path), lambda: fastclip.load(path)):
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert str(path) in message
        assert "trust=True" not in message  # a damaged file is not an untrusted one
        assert ("empty" in message) if name.startswith("empty") else ("corrupt" in message or "readable" in message)


# ---------------------------------------------------------------- security: nothing from a file runs
@pytest.mark.parametrize("name", ["evil.bin", "evil.pt", "evil-legacy.pt"])
def test_malicious_pickle_is_refused(name, tmp_path):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"visual.conv1.weight": torch.zeros(2)}, "hook": Marker(marker)}
    torch.save(payload, tmp_path / name, _use_new_zipfile_serialization=not name.endswith("legacy.pt"))
    for call in (lambda: fastclip.load(tmp_path / name), lambda: fastclip.load(TINY, pretrained=tmp_path / name)):
        with pytest.raises(CheckpointError, match="trust=True"):
            call()
    assert not marker.exists()
    torch.load(tmp_path / name, weights_only=False)  # control: the payload is live
    assert marker.exists()


def test_fake_torchscript_archive_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/version", "3\n")
        archive.writestr("model/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("model/code/__torch__/model.py", "class Model: pass\n")
        archive.writestr("model/data.pkl", pickle.dumps({"weights": Marker(marker)}, protocol=2))
    for call in (lambda: fastclip.load(path), lambda: fastclip.load(TINY, pretrained=path)):
        with pytest.raises(CheckpointError, match="trust=True") as info:
            call()
        assert str(path) in str(info.value)
    assert not marker.exists()
    pickle.loads(zipfile.ZipFile(path).read("model/data.pkl"))  # control: the payload is live
    assert marker.exists()
