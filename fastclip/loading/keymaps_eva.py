"""The key map of OpenCLIP checkpoints with a timm EVA image tower (``visual.trunk.*``, timm's ``Eva``
names) onto fastclip's EVA tower (fastclip/models/eva.py).

The image tower's keys move from ``visual.trunk.`` to ``visual.``; the re-arrangements are the packing of
q/k/v into ``attn.qkv`` (timm's fused ``qkv.weight`` + ``q_bias`` / ``v_bias``, or the separate ``q_proj`` /
``k_proj`` / ``v_proj`` of EVA-02; k has no bias, its rows of the packed bias are zeros), of SwiGLU's
``fc1_g`` / ``fc1_x`` into ``mlp.fc1`` (rows [gate; value]), of an attention-pooling head's ``q`` / ``kv``
(Perception Encoder) into fastclip's AttentionPool, and the head Linear (E, W) into ``proj`` (W, E) and
``proj_bias``. Every other key (the text tower, ``logit_scale``) goes through keymaps.from_openclip.
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from . import keymaps

TRUNK = "visual.trunk."
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def is_openclip_eva_layout(sd: dict) -> bool:
    return TRUNK + "patch_embed.proj.weight" in sd


def is_fastclip_eva_layout(sd: dict) -> bool:
    """fastclip's own names (``torch.save(model.state_dict())`` of a fastclip EVA model)."""
    return "visual.patch_embed.proj.weight" in sd and "text.token_embedding.weight" in sd


def _pop(trunk: dict, key: str) -> torch.Tensor:
    if key not in trunk:
        raise CheckpointError(f"OpenCLIP EVA checkpoint lacks {TRUNK + key!r}")
    return trunk.pop(key)


def _attention(trunk: dict, a: str, out: dict) -> None:
    """Block attention prefix ``a`` ("blocks.{i}.attn.") -> packed ``qkv.weight`` (3W, W) and ``qkv.bias`` (3W,)."""
    if a + "qkv.bias" in trunk:  # fused, with a bias for k too (Perception Encoder): fastclip's layout
        return
    if a + "qkv.weight" in trunk:  # timm's fused layout (EVA-01, EVA-02-E)
        weight = trunk.pop(a + "qkv.weight")
        q_bias, v_bias = _pop(trunk, a + "q_bias"), _pop(trunk, a + "v_bias")
    else:  # separate projections (EVA-02 B / L)
        weight = torch.cat([_pop(trunk, a + f"{p}_proj.weight") for p in "qkv"])
        q_bias, v_bias = _pop(trunk, a + "q_proj.bias"), _pop(trunk, a + "v_proj.bias")
    out[a + "qkv.weight"] = weight
    out[a + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def _mlp(trunk: dict, m: str, out: dict) -> None:
    """Block MLP prefix ``m`` ("blocks.{i}.mlp."): SwiGLU's fc1_g / fc1_x -> ``fc1`` rows [gate; value]."""
    if m + "fc1_g.weight" in trunk:
        for leaf in ("weight", "bias"):
            out[m + "fc1." + leaf] = torch.cat([_pop(trunk, m + "fc1_g." + leaf), _pop(trunk, m + "fc1_x." + leaf)])


def _attention_pool(trunk: dict, out: dict) -> None:
    """timm's AttentionPoolLatent (``attn_pool.*``) -> fastclip's AttentionPool (transformer.py)."""
    p = "attn_pool."
    out[p + "probe"] = _pop(trunk, p + "latent")
    for leaf in ("weight", "bias"):
        out[f"{p}attn.in_proj_{leaf}"] = torch.cat([_pop(trunk, f"{p}q.{leaf}"), _pop(trunk, f"{p}kv.{leaf}")])
        for theirs, ours in (("proj", "attn.out_proj"), ("norm", "ln"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{p}{ours}.{leaf}"] = _pop(trunk, f"{p}{theirs}.{leaf}")


def from_openclip_eva(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP state dict with a timm EVA trunk -> fastclip names (keys left over surface as unexpected)."""
    trunk = {k[len(TRUNK):]: v for k, v in sd.items() if k.startswith(TRUNK)}
    rest = {k: v for k, v in sd.items() if not k.startswith(TRUNK)}
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({int(m.group(1)) for k in trunk if (m := _BLOCK.match(k))})
    for i in blocks:
        _attention(trunk, f"blocks.{i}.attn.", out)
        _mlp(trunk, f"blocks.{i}.mlp.", out)
    if "attn_pool.latent" in trunk:
        _attention_pool(trunk, out)
    out["proj"] = _pop(trunk, "head.weight").t()
    out["proj_bias"] = _pop(trunk, "head.bias")
    out.update(trunk)  # the keys whose names are timm's (patch_embed, cls_token, pos_embed, norms, ...)
    mapped = {"visual." + k: v for k, v in out.items()}
    mapped.update(keymaps.from_openclip(rest))
    return mapped


def is_timm_trunk_config(hf_cfg: dict) -> bool:
    """A timm model repo's config.json (``architecture``, no transformers ``model_type``), e.g.
    timm/eva02_base_patch16_clip_224.merged2b: an image trunk alone, without a text tower."""
    return "architecture" in hf_cfg and "model_type" not in hf_cfg


def timm_trunk_repo_error(directory, hf_cfg: dict) -> str:
    """Why a timm image-trunk repo does not load, naming the OpenCLIP repos (both towers) of that trunk."""
    from ..models.config import get_model_config
    from . import hub

    arch = hf_cfg.get("architecture")
    tag = str((hf_cfg.get("pretrained_cfg") or {}).get("tag") or "")
    found = [(name, t) for name, t in hub.list_pretrained()
             if getattr(get_model_config(name).vision, "timm_model_name", None) == arch]
    found.sort(key=lambda nt: not (tag and nt[1].startswith(tag)))  # the same training run first
    instead = "; ".join(f"fastclip.load({n!r}, pretrained={t!r}) (hf-hub:{hub.pretrained_entry(n, t)['hf_hub']})"
                        for n, t in found)
    hint = (f"load the OpenCLIP repo of this trunk instead: {instead}" if found else
            "load an OpenCLIP repo with this trunk (open_clip_config.json + open_clip_model.safetensors) instead")
    return (f"{directory} is a timm image-model repo (config.json architecture {arch!r}): it holds an image "
            f"trunk without a text tower, and fastclip models need both; {hint}")
