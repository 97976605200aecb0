"""transformers ``Siglip2Model`` (SigLIP 2 NaFlex) checkpoints: config inference and the vision key map.

A Siglip2Model state dict has SiglipModel's names except for the patch embedding, an ``nn.Linear``
(W, P*P*3) over flattened patches: ``keymaps.from_hf`` maps everything else (encoders, the pooling head,
the text tower) and calls ``naflex_vision_keys`` for the NaFlex tower's own names
(fastclip/models/naflex.py). The text tower is SigLIP's.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..errors import CheckpointError
from ..models.config import ModelConfig
from ..models.naflex import parse_naflex_config

# keymaps.from_hf's name for the patch embedding (a ViT's conv1) -> the NaFlex tower's
_RENAMES = {"visual.conv1.weight": "visual.patch_embed.weight", "visual.conv1.bias": "visual.patch_embed.bias"}


def naflex_vision_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The output of ``keymaps.from_hf`` for a Siglip2Model -> the NaFlex tower's names (a renaming)."""
    missing = [k for k in _RENAMES if k not in sd]
    if missing:
        raise CheckpointError(f"Siglip2 checkpoint lacks the patch embedding "
                              f"{', '.join('vision_model.embeddings.patch_embedding.' + k.rsplit('.', 1)[1] for k in missing)}")
    weight = sd["visual.conv1.weight"]
    if weight.ndim != 2:
        raise CheckpointError(f"Siglip2 vision_model.embeddings.patch_embedding.weight must be a linear (W, P*P*3) "
                              f"matrix, got shape {tuple(weight.shape)}")
    return {_RENAMES.get(k, k): v for k, v in sd.items()}


def config_from_hf_naflex(hf: dict, name: str) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` of model_type ``siglip2``: SigLIP's text tower and
    pooling (``keymaps.config_from_hf``) with the NaFlex image tower."""
    from .keymaps import _hf_act, config_from_hf

    if hf.get("model_type") != "siglip2":
        raise CheckpointError(f"{name}: model_type {hf.get('model_type')!r} is not 'siglip2'")
    v = dict(hf.get("vision_config", {}))
    num_patches, patch = int(v.get("num_patches", 256)), int(v.get("patch_size", 16))
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointError(f"{name}: vision num_patches {num_patches} is not a square position grid")
    width, heads = int(v.get("hidden_size", 768)), int(v.get("num_attention_heads", 12))
    siglip = config_from_hf({**hf, "model_type": "siglip", "vision_config": {**v, "image_size": grid * patch}}, name)
    vision = parse_naflex_config(name, {
        "patch_size": patch, "position_grid": grid, "max_num_patches": num_patches, "width": width,
        "layers": int(v.get("num_hidden_layers", 12)), "head_width": width // heads,
        "mlp_ratio": int(v.get("intermediate_size", 3072)) / width,
        "act": _hf_act(v.get("hidden_act", "gelu_pytorch_tanh"), name),
        "norm_kwargs": {"eps": float(v.get("layer_norm_eps", 1e-6))},
    }, False)
    if siglip.embed_dim != width:
        raise CheckpointError(f"{name}: text projection_size {siglip.embed_dim} differs from the vision width {width} "
                              f"(Siglip2Model has no vision projection)")
    return replace(siglip, vision=vision)
