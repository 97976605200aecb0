"""The hub out of reach and HF_HUB_OFFLINE unset: every hub entry point fails at once (no retry loop) with a
message that says how to get the files onto the machine, and files already in the cache still load."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

import fastclip
from fastclip import FastclipError
from fastclip.loading import hub
from helpers.upstream import assert_matches, put_in_hub_cache, save_state_dict

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there, so a connect is refused at once
FAST = 5.0  # seconds; huggingface_hub's retry loop takes ~23 s per file


def _closed_port_is_closed() -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", 9)) != 0


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch) -> Path:
    """The hub endpoint at a closed local port, an empty cache in a tmp dir, HF_HUB_OFFLINE unset.

    huggingface_hub reads these variables once, at import, so its constants are patched too."""
    import huggingface_hub.constants as hf_constants

    assert _closed_port_is_closed(), "something listens on 127.0.0.1:9; these tests need it closed"
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "ENDPOINT", CLOSED)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", CLOSED + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _timed_error(call) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(FastclipError) as info:
        call()
    return str(info.value), time.monotonic() - start


@pytest.mark.parametrize("entry", ["pretrained tag", "hub id", "hf-hub: repo", "tokenizer"])
def test_unreachable_hub_and_empty_cache_fail_at_once(entry, unreachable_hub):
    repo, call = {
        "pretrained tag": ("timm/vit_base_patch16_clip_224.openai",
                           lambda: fastclip.load("ViT-B-16", pretrained="openai")),
        "hub id": ("nobody/no-such-model", lambda: fastclip.load("nobody/no-such-model")),
        "hf-hub: repo": ("nobody/no-such-repo", lambda: fastclip.load("hf-hub:nobody/no-such-repo")),
        "tokenizer": ("nobody/no-such-tokenizer", lambda: fastclip.get_tokenizer("nobody/no-such-tokenizer")),
    }[entry]
    message, elapsed = _timed_error(call)
    assert elapsed < FAST, f"took {elapsed:.1f} s to fail: {message}"
    needles = [repo, CLOSED, "HF_HUB_OFFLINE", str(unreachable_hub), f"hf download {repo}", "HF_HUB_CACHE"]
    if entry != "pretrained tag":  # a repo folder loads from its path; a tag's weights keep its settings via the cache
        needles += [f"hf download {repo} --local-dir", "fastclip.load"]
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"


def test_unreachable_hub_is_probed_once_not_retried(unreachable_hub, monkeypatch):
    """One TCP connect per entry point, and huggingface_hub never goes to the network."""
    connects = []
    real = socket.create_connection

    def counting(address, *args, **kwargs):
        connects.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counting)
    with pytest.raises(FastclipError):
        fastclip.load("ViT-B-16", pretrained="openai")  # two candidate weights files
    assert connects == [("127.0.0.1", 9)]


def test_cached_files_load_with_the_hub_unreachable(unreachable_hub, oc_b32_quickgelu, hf_siglip, hf_siglip_dir,
                                                     tmp_path):
    entry = hub.pretrained_entry("ViT-B-32", "openai")
    weights = save_state_dict(oc_b32_quickgelu.model.state_dict(), tmp_path / "openai.safetensors", "safetensors")
    put_in_hub_cache(unreachable_hub, entry["hf_hub"], {"open_clip_model.safetensors": weights})
    repo_id = "google/siglip-base-patch16-224"
    put_in_hub_cache(unreachable_hub, repo_id, {f.name: f for f in hf_siglip_dir.iterdir() if f.is_file()})

    start = time.monotonic()
    assert hub.download_openclip_weights(entry["hf_hub"]).name == "open_clip_model.safetensors"
    assert (hub.download_repo(repo_id) / "config.json").is_file()
    elapsed = time.monotonic() - start
    assert elapsed < FAST, f"cache hits took {elapsed:.1f} s with the hub unreachable"

    model = fastclip.load("ViT-B-32", pretrained="openai")
    assert_matches(model, oc_b32_quickgelu, 3, "hub tag ViT-B-32/openai (hub unreachable, cached)", "load")
    siglip = fastclip.load(repo_id)
    assert_matches(siglip, hf_siglip, 3, f"hub id {repo_id} (hub unreachable, cached)", "load")
    texts = ["sen ka tor", "qui dra belxa"]
    assert (fastclip.get_tokenizer(repo_id)(texts) == siglip.tokenizer(texts)).all()
