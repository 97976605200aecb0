"""Pretrained tags and Hugging Face hub access (honours HF_HOME / HF_HUB_CACHE, HF_ENDPOINT and HF_HUB_OFFLINE).

``pretrained.json`` maps OpenCLIP's architecture names and tags (``openai``, ``laion2b_s34b_b79k``,
``datacomp_xl_s13b_b90k``, ``webli``, ...) to the hub repositories that publish those weights:
OpenCLIP-format repos (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``) or
transformers-format repos (``config.json`` + ``model.safetensors``). The SigLIP 2 NaFlex names
(``ViT-B-16-SigLIP2-naflex``, ``ViT-SO400M-16-SigLIP2-naflex``: open_clip has no NaFlex configs; theirs are in
fastclip/models/naflex.py) map ``webli`` to Google's transformers repos ``google/siglip2-*-patch16-naflex``.

Before any download the hub endpoint (``huggingface_hub.constants.ENDPOINT``, i.e. HF_ENDPOINT, or the
proxy configured for it) gets one TCP connect of PROBE_TIMEOUT_S. With HF_HUB_OFFLINE set or the endpoint
out of reach only the local cache is read, and a cache miss fails at once with a message that says how to
bring the files over (instead of huggingface_hub's retries with backoff, ~23 s per file).
"""
from __future__ import annotations

import functools
import json
import os
import socket
import threading
import urllib.parse
import urllib.request
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


PROBE_TIMEOUT_S = 2.0  # one TCP connect to the hub endpoint (or its proxy) before any download


def _env_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or flag


def _resolve(host: str, port: int, timeout: float) -> str:
    """An address of ``host``; getaddrinfo has no timeout of its own, so it runs in a thread bounded by
    ``timeout`` (a machine without network may wait on its DNS servers much longer)."""
    found: list = []

    def lookup():
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
        except OSError as exc:
            found.append(exc)

    worker = threading.Thread(target=lookup, daemon=True, name="fastclip-hub-resolve")
    worker.start()
    worker.join(timeout)
    if not found:
        raise OSError(f"{host} did not resolve within {timeout:g} s")
    if isinstance(found[0], OSError):
        raise found[0]
    return found[0]


def _unreachable(endpoint: str) -> str | None:
    """None if a TCP connection to ``endpoint`` (or to the proxy configured for it) opens within
    PROBE_TIMEOUT_S, else why not."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"the endpoint {endpoint!r} has no host name"
    proxies = urllib.request.getproxies()  # HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, as httpx reads them
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = purl.hostname or host, purl.port or (443 if purl.scheme == "https" else 80)
    try:
        socket.create_connection((_resolve(host, port, PROBE_TIMEOUT_S), port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:  # refused, timed out, name not resolved, network unreachable
        return f"{host}:{port} did not accept a connection ({exc})"
    return None


def _local_only() -> str | None:
    """Why the hub must not be asked (HF_HUB_OFFLINE set, or its endpoint out of reach), or None."""
    from huggingface_hub import constants

    if _env_offline():
        return "HF_HUB_OFFLINE is set"
    why = _unreachable(constants.ENDPOINT)
    return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached: {why}" if why else None


def _not_cached_error(repo_id: str, reason: str, fetch: str, use_local: str = "") -> FastclipError:
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    return FastclipError(
        f"could not get {repo_id!r}: {reason}, and the local hub cache ({cache}) does not hold it. "
        f"On a machine with network access run `{fetch}` and copy that machine's hub cache (its HF_HUB_CACHE, "
        f"by default ~/.cache/huggingface/hub) to {cache} here, or run `{fetch} --cache-dir DIR`, copy DIR "
        f"here and set HF_HUB_CACHE=DIR{use_local}. Once the files are cached, HF_HUB_OFFLINE=1 skips the "
        f"network check."
    )


def download_openclip_weights(repo_id: str) -> Path:
    """Path of an OpenCLIP-format weights file of ``repo_id`` (safetensors preferred), via the hub cache.

    Only the local cache is read when HF_HUB_OFFLINE is set or the hub endpoint cannot be reached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    local_only = _local_only()
    last = None
    for filename in OPENCLIP_WEIGHTS:
        try:
            return Path(hf_hub_download(repo_id, filename, library_name="fastclip", library_version=__version__,
                                        local_files_only=local_only is not None))
        except EntryNotFoundError as exc:
            last = exc
        except Exception as exc:  # network, offline cache miss, auth: one clear message
            last = exc
            if "EntryNotFound" not in type(exc).__name__ and "LocalEntryNotFound" not in type(exc).__name__:
                break
    if local_only is not None:
        raise _not_cached_error(repo_id, local_only, f'hf download {repo_id} --include "open_clip_*"')
    raise _hub_error(repo_id, last)


def download_repo(repo_id: str, patterns: list[str] | None = None) -> Path:
    """Local directory with the model files of ``repo_id`` (config, weights, tokenizer), via the hub cache.

    Only the local cache is read when HF_HUB_OFFLINE is set or the hub endpoint cannot be reached."""
    from huggingface_hub import snapshot_download

    local_only = _local_only()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns or HF_PATTERNS, library_name="fastclip",
                                      library_version=__version__, local_files_only=local_only is not None))
    except Exception as exc:
        if local_only is not None:
            raise _not_cached_error(repo_id, local_only, f"hf download {repo_id}",
                                    f"; or run `hf download {repo_id} --local-dir DIR`, copy DIR here and pass "
                                    f"its path to fastclip.load (or fastclip.get_tokenizer)") from None
        raise _hub_error(repo_id, exc) from None


def download_file(repo_id: str, filename: str) -> Path:
    """Path of one file of ``repo_id`` (e.g. Meta's ``facebook/PE-Core-B16-224``: ``PE-Core-B16-224.pt``), via
    the hub cache. Only the local cache is read when HF_HUB_OFFLINE is set or the hub endpoint cannot be reached."""
    from huggingface_hub import hf_hub_download

    local_only = _local_only()
    try:
        return Path(hf_hub_download(repo_id, filename, library_name="fastclip", library_version=__version__,
                                    local_files_only=local_only is not None))
    except Exception as exc:
        if local_only is not None:
            raise _not_cached_error(repo_id, local_only, f"hf download {repo_id} {filename}",
                                    "; or pass the file's path to fastclip.load") from None
        raise _hub_error(repo_id, exc) from None
