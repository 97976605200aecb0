"""Model configs as data: OpenCLIP's JSON shape, parsed into typed dataclasses.

A config JSON has ``embed_dim``, ``vision_cfg``, ``text_cfg`` and optionally ``quick_gelu`` and
``init_logit_bias``, as in OpenCLIP. fastclip adds a few keys OpenCLIP expresses through timm/HF towers
(SigLIP): ``vision_cfg.class_token``, ``vision_cfg.patch_bias``, ``vision_cfg.pool_type = "map"``,
``vision_cfg.proj``, ``act`` in either tower, a tower ``type`` (fastclip/models/registry.py), and a
top-level ``preprocess`` and ``tokenizer``. Each tower's config dataclass lives beside its tower
(``VisionConfig`` in vit.py, ``TextConfig`` in text.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UnknownModelError
from . import bert as _bert_tower  # noqa: F401
from . import eva as _eva_tower  # noqa: F401
from . import naflex as _naflex_tower  # noqa: F401
from . import resnet as _resnet_tower  # noqa: F401
from . import text as _text_tower  # noqa: F401  (the built-in tower types register themselves at import)
from . import vit as _vit_tower  # noqa: F401
from .registry import parse_tower
from .text import TextConfig
from .vit import VisionConfig

__all__ = ["ModelConfig", "PreprocessSpec", "VisionConfig", "TextConfig", "parse_config", "get_model_config",
           "list_models", "add_model_config", "OPENAI_MEAN", "OPENAI_STD", "INCEPTION_MEAN", "INCEPTION_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PreprocessSpec:
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    embed_dim: int
    vision: Any  # the image tower's config (VisionConfig for type "vit")
    text: Any  # the text tower's config (TextConfig for type "clip")
    family: str = "clip"  # "clip" (InfoNCE, softmax) or "siglip" (sigmoid, logit_bias)
    init_logit_bias: float | None = None
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    tokenizer: str = "clip"  # "clip" (bundled BPE) or "hf" (the checkpoint's tokenizer files, or hf_tokenizer_name's)
    # or "wordpiece" (Chinese-CLIP's BERT WordPiece: a transformers directory's vocab.txt, else cn_clip's bundled one)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_name(self, name: str) -> ModelConfig:
        return replace(self, name=name)


def parse_config(name: str, raw: dict) -> ModelConfig:
    """Parse an OpenCLIP-shaped config dict into a ModelConfig (errors name the model and key). Each
    tower's dict is parsed by the module registered for its type (fastclip/models/registry.py)."""
    try:
        vcfg, tcfg, embed_dim = dict(raw["vision_cfg"]), dict(raw["text_cfg"]), int(raw["embed_dim"])
    except KeyError as exc:
        raise ValueError(f"model config {name!r} lacks the required key {exc.args[0]!r}") from None
    quick = bool(raw.get("quick_gelu", False))
    vision = parse_tower("vision", name, vcfg, quick)
    text = parse_tower("text", name, tcfg, quick)
    family = raw.get("family", "siglip" if raw.get("init_logit_bias") is not None else "clip")
    pre = raw.get("preprocess", {})
    default_pre = PreprocessSpec() if family == "clip" else PreprocessSpec(INCEPTION_MEAN, INCEPTION_STD, "squash")
    preprocess = PreprocessSpec(
        mean=tuple(pre.get("mean", default_pre.mean)),
        std=tuple(pre.get("std", default_pre.std)),
        resize_mode=pre.get("resize_mode", default_pre.resize_mode),
        interpolation=pre.get("interpolation", default_pre.interpolation),
    )
    # "hf" also when the text tower names a Hugging Face tokenizer repo (MetaCLIP 2: text_cfg.hf_tokenizer_name)
    tokenizer = raw.get("tokenizer", "clip" if family == "clip" and not getattr(text, "hf_tokenizer_name", None) else "hf")
    bias = raw.get("init_logit_bias")
    return ModelConfig(name, embed_dim, vision, text, family, None if bias is None else float(bias), preprocess, tokenizer)


# ---------------------------------------------------------------- registry of named configs
_BUILTIN_DIR = Path(__file__).with_name("configs")
_REGISTRY: dict[str, dict] = {}


def _register_file(path: Path) -> str:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"model config {path} is not a JSON object (found {type(raw).__name__})")
    name = path.stem
    try:
        parse_config(name, raw)  # validate now, so a bad file fails at registration, naming the file
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"invalid model config file {path}: {exc}") from None
    _REGISTRY[name] = raw
    return name


def _ensure_builtins() -> None:
    if not _REGISTRY:
        for path in sorted(_BUILTIN_DIR.glob("*.json")):
            _register_file(path)
        _REGISTRY.update(_naflex_tower.NAMED_CONFIGS)  # SigLIP 2 NaFlex: no open_clip config to mirror as a file


def add_model_config(path: str | os.PathLike) -> list[str]:
    """Register a config JSON (named after the model) or every JSON in a folder; returns the names."""
    _ensure_builtins()
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no model config JSON files in {path}")
        return [_register_file(f) for f in files]
    if path.suffix != ".json" or not path.is_file():
        raise FileNotFoundError(f"model config {path} is not a JSON file")
    return [_register_file(path)]


def list_models() -> list[str]:
    """Names of all registered model configs, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_model_config(name: str) -> ModelConfig:
    """The ModelConfig of a registered architecture name (OpenCLIP's names, e.g. 'ViT-B-32-quickgelu')."""
    _ensure_builtins()
    key = name.replace("/", "-")
    if key not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (fastclip.list_models() lists {len(_REGISTRY)} names)")
    return parse_config(key, _REGISTRY[key])
