"""The key map of BAAI EVA-CLIP checkpoints (the ``EVA-CLIP`` / ``EVA-CLIP-18B`` releases of baaivision/EVA,
e.g. ``EVA02_CLIP_B_psz16_s8B.pt``) onto fastclip's EVA tower (fastclip/models/eva.py).

A BAAI file is a whole-CLIP state dict. Its image tower is ``visual.*`` in the names of BAAI's
``EVAVisionTransformer``:

* ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.norm1`` / ``norm2``, ``norm``: fastclip's names;
* attention: separate ``q_proj`` / ``k_proj`` / ``v_proj`` weights (EVA-02 B / L, ``subln``) or a fused ``qkv``
  weight (EVA-01, EVA-02-E), both with ``q_bias`` / ``v_bias`` (k has none) -> packed ``attn.qkv``;
  ``inner_attn_ln`` (the sub-LayerNorm) -> ``attn.norm``; ``proj`` as is;
* MLP: SwiGLU ``w1`` (gate) / ``w2`` (value) -> ``mlp.fc1`` rows [gate; value], ``w3`` -> ``mlp.fc2``; or GELU
  ``fc1`` / ``fc2``; ``ffn_ln`` (the sub-LayerNorm) -> ``mlp.norm``;
* ``head`` (E, W) with bias -> ``proj`` (W, E) and ``proj_bias``;
* the rotary tables ``rope.freqs_cos`` / ``rope.freqs_sin`` (and their copies under each ``blocks.{i}.attn.rope``)
  are buffers fastclip computes itself (eva.rope_angles): dropped.

The text tower is in OpenAI / OpenCLIP names, at the top level (``transformer.*``, ``token_embedding``,
``positional_embedding``, ``ln_final``, ``text_projection``, BAAI's ``CLIP``) or under ``text.`` (its
``CustomCLIP``); ``logit_scale`` (or ``text.logit_scale``). Keys this map does not know (layer scales
``gamma_1`` / ``gamma_2``, relative position biases, ...) keep their name under ``visual.`` and surface as
unexpected keys when the model is built. A BAAI file carries no config: load it with the architecture's name,
``fastclip.load("EVA02-B-16", pretrained=path)``.
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from . import keymaps

VISUAL = "visual."
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_ROPE_BUFFER = re.compile(r"(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
# renames inside a block (BAAI -> fastclip); q/k/v and w1/w2 are packed separately
_BLOCK_RENAMES = (("attn.inner_attn_ln.", "attn.norm."), ("mlp.ffn_ln.", "mlp.norm."), ("mlp.w3.", "mlp.fc2."))


def is_baai_eva_layout(sd: dict) -> bool:
    """BAAI's EVAVisionTransformer under ``visual.``: timm-like names with the head still called ``head``."""
    return VISUAL + "patch_embed.proj.weight" in sd and VISUAL + "head.weight" in sd


def _pop(visual: dict, key: str) -> torch.Tensor:
    if key not in visual:
        raise CheckpointError(f"BAAI EVA-CLIP checkpoint lacks {VISUAL + key!r}")
    return visual.pop(key)


def _attention(visual: dict, a: str, out: dict) -> None:
    """Block attention prefix ``a`` ("blocks.{i}.attn.") -> packed ``qkv.weight`` (3W, W), ``qkv.bias`` (3W,)."""
    if a + "qkv.weight" in visual:  # fused (EVA-01, EVA-02-E)
        weight = visual.pop(a + "qkv.weight")
    else:  # separate projections without bias (EVA-02 B / L: subln)
        weight = torch.cat([_pop(visual, a + f"{p}_proj.weight") for p in "qkv"])  # (3W, W)
    q_bias, v_bias = _pop(visual, a + "q_bias"), _pop(visual, a + "v_bias")
    out[a + "qkv.weight"] = weight
    out[a + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])  # k has no bias


def _mlp(visual: dict, m: str, out: dict) -> None:
    """Block MLP prefix ``m`` ("blocks.{i}.mlp."): SwiGLU's w1 (gate) / w2 (value) -> ``fc1`` rows [gate; value]."""
    if m + "w1.weight" in visual:
        for leaf in ("weight", "bias"):
            out[m + "fc1." + leaf] = torch.cat([_pop(visual, m + "w1." + leaf), _pop(visual, m + "w2." + leaf)])


def _rename(key: str) -> str:
    """A BAAI block key -> fastclip's (the sub-LayerNorms, SwiGLU's output projection); others unchanged."""
    if _BLOCK.match(key):
        for theirs, ours in _BLOCK_RENAMES:
            key = key.replace(theirs, ours, 1)
    return key


def _text(rest: dict) -> dict:
    """BAAI's text tower (top level or under ``text.``) -> OpenAI / OpenCLIP names at the top level."""
    out = {}
    for key, value in rest.items():
        if key.startswith("text."):  # CustomCLIP: the text tower (and maybe logit_scale) under text.
            key = key[len("text."):]
        out[key] = value
    return out


def from_baai_eva(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BAAI EVA-CLIP state dict -> fastclip names (keys left over surface as unexpected, named)."""
    visual = {k[len(VISUAL):]: v for k, v in sd.items() if k.startswith(VISUAL) and not _ROPE_BUFFER.match(k[len(VISUAL):])}
    rest = {k: v for k, v in sd.items() if not k.startswith(VISUAL)}
    out: dict[str, torch.Tensor] = {}
    for i in sorted({int(m.group(1)) for k in visual if (m := _BLOCK.match(k))}):
        _attention(visual, f"blocks.{i}.attn.", out)
        _mlp(visual, f"blocks.{i}.mlp.", out)
    out["proj"] = _pop(visual, "head.weight").t()  # (E, W) -> (W, E)
    out["proj_bias"] = _pop(visual, "head.bias")
    out.update({_rename(k): v for k, v in visual.items()})  # fastclip's names already, or unknown
    mapped = {VISUAL + k: v for k, v in out.items()}
    mapped.update(keymaps.from_openclip(_text(rest)))
    return mapped


def needs_name(source: str, sd: dict) -> str:
    """The error for a BAAI file loaded without an architecture name, naming the registered EVA architectures
    whose parameters have the file's names and shapes."""
    from ..models.clip import CLIP
    from ..models.config import get_model_config, list_models

    try:
        shapes = {k: tuple(v.shape) for k, v in from_baai_eva(dict(sd)).items()}
    except CheckpointError:
        shapes = None
    fits = []
    for name in list_models() if shapes else []:
        cfg = get_model_config(name)
        if getattr(cfg.vision, "type", None) == "timm":
            with torch.device("meta"):
                model = CLIP(cfg)
            if shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}:
                fits.append(name)
    hint = f"its shapes fit {', '.join(fits)}" if fits else "no registered architecture fits its shapes"
    return (f"checkpoint {source} is a BAAI EVA-CLIP state dict, which carries no config: load it with the "
            f"architecture's name, fastclip.load(<name>, pretrained={source!r}) ({hint})")
