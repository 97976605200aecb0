"""Pretrained tags and Hugging Face hub access (honours HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE).

``pretrained.json`` maps OpenCLIP's architecture names and tags (``openai``, ``laion2b_s34b_b79k``,
``datacomp_xl_s13b_b90k``, ``webli``, ...) to the hub repositories that publish those weights:
OpenCLIP-format repos (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``) or
transformers-format repos (``config.json`` + ``model.safetensors``).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import FastclipError, UnknownModelError
from ..version import __version__

OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model*.bin"]


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(Path(__file__).with_name("pretrained.json").read_text())


def list_pretrained() -> list[tuple[str, str]]:
    """(architecture, tag) pairs with published weights."""
    return [(name, tag) for name, tags in _table().items() for tag in tags]


def pretrained_tags(name: str) -> list[str]:
    return list(_table().get(name, {}))


def pretrained_entry(name: str, tag: str) -> dict:
    """The hub location and preprocessing of ``name`` + ``tag``; UnknownModelError lists the valid tags."""
    tags = _table().get(name, {})
    if tag not in tags:
        known = ", ".join(tags) if tags else "none (pass a checkpoint path instead)"
        raise UnknownModelError(f"unknown pretrained tag {tag!r} for {name}; known tags: {known}")
    return tags[tag]


def _hub_error(repo_id: str, exc: Exception) -> FastclipError:
    return FastclipError(
        f"could not get {repo_id!r} from the Hugging Face hub or its local cache ({type(exc).__name__}: {exc}). "
        f"Offline (HF_HUB_OFFLINE=1) only cached files can be used."
    )


def download_openclip_weights(repo_id: str) -> Path:
    """Path of an OpenCLIP-format weights file of ``repo_id`` (safetensors preferred), via the hub cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    last = None
    for filename in OPENCLIP_WEIGHTS:
        try:
            return Path(hf_hub_download(repo_id, filename, library_name="fastclip", library_version=__version__))
        except EntryNotFoundError as exc:
            last = exc
        except Exception as exc:  # network, offline cache miss, auth: one clear message
            last = exc
            if "EntryNotFound" not in type(exc).__name__ and "LocalEntryNotFound" not in type(exc).__name__:
                break
    raise _hub_error(repo_id, last)


def download_repo(repo_id: str, patterns: list[str] | None = None) -> Path:
    """Local directory with the model files of ``repo_id`` (config, weights, tokenizer), via the hub cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns or HF_PATTERNS, library_name="fastclip",
                                      library_version=__version__))
    except Exception as exc:
        raise _hub_error(repo_id, exc) from None
