"""The tower registry: which module builds an image or text tower, chosen by the tower's config.

A family of models is a tower module that registers itself here (its config dataclass, a parser from
OpenCLIP's JSON shape, and the tower class), plus its key map in fastclip/loading/keymaps.py. ``CLIP``
builds its two towers through ``build_tower`` and never names a tower class.

A tower's type comes from its config dict: an explicit ``"type"`` key, else what OpenCLIP's shape implies
(``vision_cfg.layers`` as a list: an OpenAI ResNet; ``timm_model_name``: a timm trunk; ``hf_model_name``:
a Hugging Face text model), else ``vit`` (vision) / ``clip`` (text).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .. import ref

KINDS = ("vision", "text")
DEFAULT_TYPE = {"vision": "vit", "text": "clip"}
# Tower types OpenCLIP configs name that no module registers yet, with what they are (for the error).
KNOWN_UNREGISTERED = {("vision", "timm"): "timm image towers"}


class ImageTower(Protocol):
    """What ``CLIP`` and the batch API need of an image tower."""

    cfg: Any  # its config dataclass (``image_size`` is what preprocessing resizes to)
    trim_last_block: bool  # exact last-block trimming on (the default) or off (tests, benchmarks)

    def apply_op(self, pixels: torch.Tensor, ops, normalize: bool = False, pixel_norm=None) -> torch.Tensor:
        """pixels: (B, 3, S, S) normalised floats, or raw uint8 levels with ``pixel_norm`` -> (B, E)."""


class TextTower(Protocol):
    """What ``CLIP`` and the batch API need of a text tower."""

    cfg: Any  # its config dataclass (``context_length`` is what tokenizers pad to)
    trim_last_block: bool

    def apply_op(self, tokens: torch.Tensor, ops, normalize: bool = False) -> torch.Tensor:
        """tokens: (B, L) int64 -> (B, E)."""

    def run_lengths(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B,) the number of leading tokens each row needs (a causal tower stops after the pooled token),
        or None if every row runs at full length; the batch API groups texts of similar length by it."""


@dataclass(frozen=True)
class TowerType:
    kind: str  # "vision" or "text"
    name: str  # the config's type, e.g. "vit"
    parse: Callable[[str, dict, bool], Any]  # (model name, tower config dict, quick_gelu) -> config dataclass
    build: Callable[[Any, int], nn.Module]  # (config dataclass, embed_dim) -> the tower


_TOWERS: dict[tuple[str, str], TowerType] = {}


def register_tower(kind: str, name: str, parse: Callable, build: Callable) -> TowerType:
    """Register a tower type (a family's module calls this once, at import)."""
    if kind not in KINDS:
        raise ValueError(f"tower kind must be one of {KINDS}, got {kind!r}")
    tower = TowerType(kind, name, parse, build)
    _TOWERS[kind, name] = tower
    return tower


def registered(kind: str) -> list[str]:
    return sorted(name for k, name in _TOWERS if k == kind)


def tower_type_of(kind: str, raw: dict) -> str:
    """The tower type a config dict names or implies (see the module docstring)."""
    if raw.get("type"):
        return str(raw["type"])
    if kind == "vision" and isinstance(raw.get("layers"), (list, tuple)):
        return "resnet"
    if kind == "vision" and raw.get("timm_model_name"):
        return "timm"
    if kind == "text" and raw.get("hf_model_name"):
        return "hf"
    return DEFAULT_TYPE[kind]


def _tower(kind: str, name: str, model: str) -> TowerType:
    if (kind, name) not in _TOWERS:
        what = KNOWN_UNREGISTERED.get((kind, name), "an unknown tower type")
        raise ValueError(f"model config {model!r}: {kind} tower type {name!r} ({what}) is not supported by fastclip "
                         f"(supported: {', '.join(registered(kind))})")
    return _TOWERS[kind, name]


def parse_tower(kind: str, model: str, raw: dict, quick_gelu: bool):
    """The config dataclass of a tower config dict (``vision_cfg`` / ``text_cfg``)."""
    return _tower(kind, tower_type_of(kind, raw), model).parse(model, raw, quick_gelu)


def build_tower(kind: str, cfg, embed_dim: int) -> nn.Module:
    """The tower for a parsed tower config (its ``type`` field picks the module)."""
    return _tower(kind, cfg.type, "<parsed>").build(cfg, embed_dim)


# ---------------------------------------------------------------- helpers for the towers' config parsers
# open_clip block options that change the computation: silently ignoring them would build a different model
UNSUPPORTED_OPTIONS = {
    "attentional_pool": "attentional pooling (CoCa)",
    "embed_cls": "a text class token (CoCa)",
    "ls_init_value": "layer scale",
    "pos_embed_type": "non-learned position embeddings",
    "use_pad_mask": "padding masks",
    "qk_norm": "query/key normalisation",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "per-head attention scaling",
    "scale_attn_inner": "attention inner LayerNorm",
    "scale_attn": "attention output LayerNorm",
    "scale_fc": "MLP inner LayerNorm",
    "block_type": "non-default transformer blocks",
    "proj_type": "a text projection other than linear",
}
_DEFAULTS_OK = {"block_type": ("default",), "proj_type": ("linear",), "pos_embed_type": ("learnable",)}


def check_options(model: str, tower: str, raw: dict) -> None:
    """Refuse open_clip options that a tower would otherwise silently ignore."""
    for key, what in UNSUPPORTED_OPTIONS.items():
        if raw.get(key) not in (None, False, "") + _DEFAULTS_OK.get(key, ()):
            raise ValueError(f"model config {model!r}: {tower}.{key} ({what}) is not supported by fastclip")


def tower_act(raw: dict, quick_gelu: bool) -> str:
    """A tower's activation: an explicit ``act``, else QuickGELU when the config says so, else GELU
    (tanh-approximated if ``act_kwargs`` asks)."""
    if "act" in raw:
        return raw["act"]
    if quick_gelu:
        return "quick_gelu"
    return "gelu_tanh" if raw.get("act_kwargs", {}).get("approximate") == "tanh" else "gelu"


def act_problem(act: str) -> str | None:
    """Why ``act`` cannot be an MLP activation, or None."""
    usable = [a for a in ref.ACTIVATIONS if a != "none"]
    return None if act in usable else f"activation {act!r} is not one of {', '.join(usable)}"
