"""What every peer set shares: the cache root, the tolerances, the optional packages of each peer, the output
checks, the weight perturbation and the transformers-directory base of the NaFlex and Chinese-CLIP peer sets."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# The default cache root. The package's ``peers.CACHE`` (this value, re-exported) is the one every peer set reads,
# through ``cache_root()`` at construction time: pointing ``peers.CACHE`` elsewhere (the tests do) redirects every
# cache path. (Assigning ``peers.common.CACHE`` changes nothing.)
CACHE = Path(os.environ.get("FASTCLIP_BENCH_CACHE", Path.home() / ".cache" / "fastclip-bench"))
ATOL = RTOL = 1e-4  # fp32 peers vs open_clip eager
MIN_COSINE = 0.99  # int8 and bf16 peers vs fp32 (fastclip.tolerance.MIN_COSINE)
# Packages each optional peer needs (a row whose packages are missing is skipped, see ``unavailable``).
NEEDS = {"ort-fp32": ("onnx", "onnxscript", "onnxruntime"), "ort-int8": ("onnx", "onnxscript", "onnxruntime"),
         "ov-fp32": ("onnx", "onnxscript", "openvino"), "ov-bf16": ("onnx", "onnxscript", "openvino"),
         "ov-int8": ("onnx", "onnxscript", "openvino", "nncf")}

Encoder = Callable  # pixels (B, 3, S, S) -> (B, E), or captions list[str] -> (B, E)


def cache_root() -> Path:
    """The cache root now: the package's ``CACHE`` attribute (``peers.CACHE``), read at call time."""
    return sys.modules[__package__].CACHE


def unavailable(impl: str) -> str | None:
    """Why ``impl`` cannot run here (an optional package it needs is not installed), or None."""
    missing = [name for name in NEEDS.get(impl, ()) if importlib.util.find_spec(name) is None]
    return f"{impl} needs {', '.join(missing)} (pip install 'fastclip[bench]')" if missing else None


def precision(impl: str) -> str:
    """The precision ``impl`` computes in: "int8", "bf16" or "fp32" (tables group peers by it)."""
    return "int8" if "int8" in impl else "bf16" if "bf16" in impl else "fp32"


def per_item_cosine(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(got.float(), want.float(), dim=-1)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """An fp32 peer must equal open_clip eager; raise naming the peer if not."""
    try:
        torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL)
    except AssertionError as exc:
        raise AssertionError(f"{name} disagrees with open_clip eager: {exc}") from None


def _weights_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha1()
    for key in sorted(sd):
        digest.update(key.encode())
        digest.update(sd[key].detach().reshape(-1)[:4096].contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def _features(out):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _seconds(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


BROKEN_COSINE = 0.9  # an int8 peer under this per-item cosine to fp32 computes something else: it raises
WEIGHT_NOISE = 0.02  # N(0, std) added to every upstream parameter, so no bias or LayerNorm weight keeps its init


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, std: float = WEIGHT_NOISE) -> torch.nn.Module:
    """Add N(0, std) to every parameter (seeded); returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    return module.eval()


class _HfDirectoryPeers:
    """A peer set whose fastclip model loads from a transformers directory it writes once into its cache:
    ``_save(staging)`` writes the model and its processor (``self.cache_dir``, ``self._built`` set by __init__)."""

    def _save(self, staging: Path) -> None:
        raise NotImplementedError

    def directory(self) -> Path:
        """The model and its processor as a transformers directory (written once into the cache)."""
        path = self.cache_dir / "hf"
        if not (path / "config.json").is_file():
            staging = self.cache_dir / "hf.partial"
            shutil.rmtree(staging, ignore_errors=True)
            self._save(staging)
            shutil.rmtree(path, ignore_errors=True)
            staging.rename(path)
        return path

    def fastclip(self, precision: str = "fp32"):
        import fastclip

        key = ("fastclip", precision)
        if key not in self._built:
            self._built[key] = fastclip.load(self.directory(), precision=precision)
        return self._built[key]
