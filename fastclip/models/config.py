"""Model configs as data: OpenCLIP's JSON shape, parsed into typed dataclasses.

A config JSON has ``embed_dim``, ``vision_cfg``, ``text_cfg`` and optionally ``quick_gelu`` and
``init_logit_bias``, as in OpenCLIP. fastclip adds a few keys OpenCLIP expresses through timm/HF towers
(SigLIP): ``vision_cfg.class_token``, ``vision_cfg.patch_bias``, ``vision_cfg.pool_type = "map"``,
``vision_cfg.proj``, ``act`` in either tower, and a top-level ``preprocess`` and ``tokenizer``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import UnknownModelError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_UNSUPPORTED = {
    "timm_model_name": "timm image towers",
    "hf_model_name": "Hugging Face text towers",
    "attentional_pool": "attentional pooling (CoCa)",
    "embed_cls": "a text class token (CoCa)",
    "ls_init_value": "layer scale",
    "pos_embed_type": "non-learned position embeddings",
    "use_pad_mask": "padding masks",
    # open_clip block options that change the computation: silently ignoring them would build a different model
    "qk_norm": "query/key normalisation",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "per-head attention scaling",
    "scale_attn_inner": "attention inner LayerNorm",
    "scale_attn": "attention output LayerNorm",
    "scale_fc": "MLP inner LayerNorm",
    "block_type": "non-default transformer blocks",
    "proj_type": "a text projection other than linear",
}
_DEFAULTS_OK = {"block_type": ("default",), "proj_type": ("linear",)}


@dataclass(frozen=True)
class VisionConfig:
    """ViT image tower.  Tokens: (B, 1 + (image_size/patch_size)^2, width) with a class token."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    class_token: bool = True
    ln_pre: bool = True
    patch_bias: bool = False
    pool_type: str = "tok"  # "tok" (class token), "avg" (mean of patch tokens), "map" (attention pooling head)
    final_ln_after_pool: bool = False
    proj: bool = True  # project the pooled token to embed_dim

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio + 1e-4)  # ratios stored as rounded decimals (4304/1152)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + int(self.class_token)


@dataclass(frozen=True)
class TextConfig:
    """Text transformer.  Tokens: (B, context_length) int64 -> (B, context_length, width)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    pool_type: str = "argmax"  # "argmax" (highest id = end of text), "eos", "last", "first"
    eos_token_id: int | None = None
    proj_bias: bool = False

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio + 1e-4)  # ratios stored as rounded decimals (4304/1152)


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
    vision: VisionConfig
    text: TextConfig
    family: str = "clip"  # "clip" (InfoNCE, softmax) or "siglip" (sigmoid, logit_bias)
    init_logit_bias: float | None = None
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    tokenizer: str = "clip"  # "clip" (bundled BPE) or "hf" (the checkpoint's own tokenizer files)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_name(self, name: str) -> "ModelConfig":
        return replace(self, name=name)


def _tower_act(cfg: dict, quick_gelu: bool) -> str:
    if "act" in cfg:
        return cfg["act"]
    if quick_gelu:
        return "quick_gelu"
    return "gelu_tanh" if cfg.get("act_kwargs", {}).get("approximate") == "tanh" else "gelu"


def _check_supported(name: str, tower: str, cfg: dict) -> None:
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key) not in (None, False, "", "learnable") + _DEFAULTS_OK.get(key, ()):
            raise ValueError(f"model config {name!r}: {tower}.{key} ({what}) is not supported by fastclip")
    if not isinstance(cfg.get("layers", 12), int):
        raise ValueError(f"model config {name!r}: ResNet image towers (layers as a list) are not supported yet")


def parse_config(name: str, raw: dict) -> ModelConfig:
    """Parse an OpenCLIP-shaped config dict into a ModelConfig (errors name the model and key)."""
    try:
        vcfg, tcfg, embed_dim = dict(raw["vision_cfg"]), dict(raw["text_cfg"]), int(raw["embed_dim"])
    except KeyError as exc:
        raise ValueError(f"model config {name!r} lacks the required key {exc.args[0]!r}") from None
    _check_supported(name, "vision_cfg", vcfg)
    _check_supported(name, "text_cfg", tcfg)
    quick = bool(raw.get("quick_gelu", False))
    pool = vcfg.get("pool_type", "tok")
    vision = VisionConfig(
        image_size=int(vcfg.get("image_size", 224)),
        patch_size=int(vcfg.get("patch_size", 16)),
        width=int(vcfg.get("width", 768)),
        layers=int(vcfg.get("layers", 12)),
        head_width=int(vcfg.get("head_width", 64)),
        mlp_ratio=float(vcfg.get("mlp_ratio", 4.0)),
        act=_tower_act(vcfg, quick),
        norm_eps=float(vcfg.get("norm_kwargs", {}).get("eps", 1e-5)),
        class_token=bool(vcfg.get("class_token", True)),
        ln_pre=not vcfg.get("no_ln_pre", False),
        patch_bias=bool(vcfg.get("patch_bias", False)),
        pool_type=pool,
        final_ln_after_pool=bool(vcfg.get("final_ln_after_pool", False)),
        proj=bool(vcfg.get("proj", True)),
    )
    text = TextConfig(
        context_length=int(tcfg.get("context_length", 77)),
        vocab_size=int(tcfg.get("vocab_size", 49408)),
        width=int(tcfg.get("width", 512)),
        heads=int(tcfg.get("heads", 8)),
        layers=int(tcfg.get("layers", 12)),
        mlp_ratio=float(tcfg.get("mlp_ratio", 4.0)),
        act=_tower_act(tcfg, quick),
        norm_eps=float(tcfg.get("norm_kwargs", {}).get("eps", 1e-5)),
        causal=not tcfg.get("no_causal_mask", False),
        pool_type=tcfg.get("pool_type", "argmax"),
        eos_token_id=tcfg.get("eos_token_id", tcfg.get("eos_id")),  # "eos_id" is open_clip's spelling
        proj_bias=bool(tcfg.get("proj_bias", False)),
    )
    _validate(name, vision, text)
    family = raw.get("family", "siglip" if raw.get("init_logit_bias") is not None else "clip")
    pre = raw.get("preprocess", {})
    default_pre = PreprocessSpec() if family == "clip" else PreprocessSpec(INCEPTION_MEAN, INCEPTION_STD, "squash")
    preprocess = PreprocessSpec(
        mean=tuple(pre.get("mean", default_pre.mean)),
        std=tuple(pre.get("std", default_pre.std)),
        resize_mode=pre.get("resize_mode", default_pre.resize_mode),
        interpolation=pre.get("interpolation", default_pre.interpolation),
    )
    tokenizer = raw.get("tokenizer", "clip" if family == "clip" else "hf")
    bias = raw.get("init_logit_bias")
    return ModelConfig(name, embed_dim, vision, text, family, None if bias is None else float(bias), preprocess, tokenizer)


def _validate(name: str, v: VisionConfig, t: TextConfig) -> None:
    problems = []
    if v.image_size < v.patch_size:
        problems.append(f"image_size {v.image_size} is smaller than patch_size {v.patch_size}")
    if v.width % v.head_width:
        problems.append(f"vision width {v.width} is not a multiple of head_width {v.head_width}")
    if t.width % t.heads:
        problems.append(f"text width {t.width} is not a multiple of heads {t.heads}")
    if v.pool_type not in ("tok", "avg", "map"):
        problems.append(f"vision pool_type {v.pool_type!r} is not one of tok, avg, map")
    if v.pool_type == "tok" and not v.class_token:
        problems.append("vision pool_type 'tok' needs a class token")
    if t.pool_type not in ("argmax", "eos", "last", "first"):
        problems.append(f"text pool_type {t.pool_type!r} is not one of argmax, eos, last, first")
    if t.pool_type == "eos" and t.eos_token_id is None:
        problems.append("text pool_type 'eos' needs text_cfg.eos_token_id")
    for act in (v.act, t.act):
        if act not in ("gelu", "gelu_tanh", "quick_gelu"):
            problems.append(f"activation {act!r} is not one of gelu, gelu_tanh, quick_gelu")
    if problems:
        raise ValueError(f"model config {name!r}: " + "; ".join(problems))


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
