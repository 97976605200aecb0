"""The key map of OpenCLIP's MobileCLIP2 checkpoints onto fastclip's EVA tower (type ``timm``,
fastclip/models/eva.py).

MobileCLIP2-L-14's trunk is timm's ``VisionTransformer`` (``vit_large_patch14_clip_224``): its names
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``norm_pre``, ``blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``) are those keymaps_eva.py already maps, the fused ``attn.qkv``
with its full bias as it is. MobileCLIP2-B (``vit_base_mci_224``) has the same blocks behind a
convolutional stem, ``visual.trunk.patch_embed.backbone.{i}.{conv, bn}.*`` (fastclip/models/mobileclip.py
keeps timm's names, the BatchNorm statistics included), so it needs its own layout test here and the same
map; its fastclip-named state dicts have no ``patch_embed.proj`` either.
"""
from __future__ import annotations

import torch

from . import keymaps_eva

STEM = "patch_embed.backbone.0.conv.weight"  # the first stem convolution, in timm's names


def is_openclip_mci_layout(sd: dict) -> bool:
    """An OpenCLIP state dict whose timm trunk has a convolutional stem (MobileCLIP2-B)."""
    return keymaps_eva.TRUNK + STEM in sd


def is_fastclip_mci_layout(sd: dict) -> bool:
    """fastclip's own names (``torch.save(model.state_dict())``) of a model with a convolutional stem."""
    return "visual." + STEM in sd and "text.token_embedding.weight" in sd


def from_openclip_mci(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP state dict of MobileCLIP2-B -> fastclip names: the stem's keys move from ``visual.trunk.``
    to ``visual.`` unchanged, the rest as keymaps_eva.from_openclip_eva (keys left over surface as
    unexpected)."""
    return keymaps_eva.from_openclip_eva(sd)
