"""The key map of Meta's own Perception Encoder releases (``facebook/PE-Core-B16-224`` etc., each a
``PE-Core-B16-224.pt``: a state dict of facebookresearch/perception_models' ``core.vision_encoder.pe.CLIP``) onto
fastclip's EVA image tower (fastclip/models/eva.py) and CLIP text tower.

Meta's ``CLIP`` is its ``TextTransformer`` with the image tower as ``visual``, so a file holds:

* ``visual.*``, Meta's ``VisionTransformer``: ``conv1`` (no bias) -> ``patch_embed.proj``; ``class_embedding``
  (W,) -> ``cls_token`` (1, 1, W) (absent when the tower has no class token, PE-Core-G14-448);
  ``positional_embedding`` (N, W) -> ``pos_embed`` (1, N, W); ``ln_pre`` -> ``norm_pre``; ``ln_post`` -> ``norm``;
  blocks ``transformer.resblocks.{i}.{ln_1, ln_2, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj,
  mlp.c_fc, mlp.c_proj}`` -> ``blocks.{i}.{norm1, norm2, attn.qkv.weight, attn.qkv.bias, attn.proj, mlp.fc1,
  mlp.fc2}``; ``attn_pool.{probe, attn.*, layernorm, mlp.*}`` -> fastclip's AttentionPool (``layernorm`` -> ``ln``);
  ``proj`` (W, E), without a bias -> ``proj`` and a zero ``proj_bias`` (E,);
* the text tower at the top level in OpenAI names (``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.*``, ``ln_final``, ``text_projection`` (W, E)) -> under ``text.``;
  ``logit_scale`` -> ``log_logit_scale``.

Dropped, as tables fastclip recomputes: the rotary tables (``rope.*`` anywhere under ``visual.``; pe.py keeps
its ``Rope2D`` outside the module tree, a file saved from a module-holding variant carries them) and the causal
``attn_mask``. Any other key (layer scales ``ls_1.gamma`` of PE-Lang / PE-Spatial, a text ``attn_pool``, ...)
and any missing one raise a CheckpointError naming them. A Meta file carries no config: ``META_REPOS`` maps
Meta's hub repos to fastclip's architectures and ``architecture_of`` picks the architecture from the shapes.
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

VISUAL = "visual."
# Meta's hub repos (each holding <name>.pt) -> fastclip's architecture of the same model
META_REPOS = {
    "facebook/PE-Core-T16-384": "PE-Core-T-16-384",
    "facebook/PE-Core-S16-384": "PE-Core-S-16-384",
    "facebook/PE-Core-B16-224": "PE-Core-B-16",
    "facebook/PE-Core-L14-336": "PE-Core-L-14-336",
    "facebook/PE-Core-G14-448": "PE-Core-bigG-14-448",
}
_LN, _LINEAR = ("weight", "bias"), ("weight", "bias")
# Meta block leaf -> fastclip block leaf (visual blocks); text blocks keep Meta's (OpenAI) names
_BLOCK_LEAVES = {
    **{f"ln_1.{x}": f"norm1.{x}" for x in _LN}, **{f"ln_2.{x}": f"norm2.{x}" for x in _LN},
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    **{f"attn.out_proj.{x}": f"attn.proj.{x}" for x in _LINEAR},
    **{f"mlp.c_fc.{x}": f"mlp.fc1.{x}" for x in _LINEAR}, **{f"mlp.c_proj.{x}": f"mlp.fc2.{x}" for x in _LINEAR},
}
# Meta visual key -> fastclip visual key (the reshaped ones are handled apart)
_VISUAL_KEYS = {
    "conv1.weight": "patch_embed.proj.weight",
    **{f"ln_pre.{x}": f"norm_pre.{x}" for x in _LN}, **{f"ln_post.{x}": f"norm.{x}" for x in _LN},
    "attn_pool.probe": "attn_pool.probe",
    "attn_pool.attn.in_proj_weight": "attn_pool.attn.in_proj_weight",
    "attn_pool.attn.in_proj_bias": "attn_pool.attn.in_proj_bias",
    **{f"attn_pool.attn.out_proj.{x}": f"attn_pool.attn.out_proj.{x}" for x in _LINEAR},
    **{f"attn_pool.layernorm.{x}": f"attn_pool.ln.{x}" for x in _LN},
    **{f"attn_pool.mlp.{m}.{x}": f"attn_pool.mlp.{m}.{x}" for m in ("c_fc", "c_proj") for x in _LINEAR},
}
_VISUAL_RESHAPED = ("class_embedding", "positional_embedding", "proj")
_TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection")
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
_DROPPED = re.compile(r"(visual\.(.+\.)?rope\.|(.+\.)?attn_mask$)")  # recomputed: rotary tables, causal mask


def is_meta_pe_layout(sd: dict) -> bool:
    """perception_models' CLIP: ``visual.conv1`` with Meta's attention pool (``probe``, ``layernorm``) and the
    text tower at the top level."""
    return (VISUAL + "conv1.weight" in sd and VISUAL + "attn_pool.layernorm.weight" in sd
            and "token_embedding.weight" in sd)


def _blocks(sd: dict, prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if k.startswith(prefix) and (m := _BLOCK.match(k[len(prefix):]))})


def _expected(sd: dict) -> dict[str, str]:
    """Every Meta key a PE-Core file of these blocks holds -> its fastclip name (reshaped keys excluded)."""
    names = {VISUAL + k: VISUAL + v for k, v in _VISUAL_KEYS.items()}
    for i in _blocks(sd, VISUAL):
        names.update({f"{VISUAL}transformer.resblocks.{i}.{k}": f"{VISUAL}blocks.{i}.{v}" for k, v in _BLOCK_LEAVES.items()})
    for i in _blocks(sd, ""):
        names.update({f"transformer.resblocks.{i}.{k}": f"text.transformer.resblocks.{i}.{k}" for k in _BLOCK_LEAVES})
    names.update({k: "text." + k for k in _TEXT_KEYS})
    names["logit_scale"] = "log_logit_scale"
    return names


def _named(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def from_meta_pe(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Meta PE-Core state dict -> fastclip names. CheckpointError names the keys this map does not know
    and the keys a PE-Core file must hold that are missing."""
    sd = {k: v for k, v in sd.items() if not _DROPPED.match(k)}
    names = _expected(sd)
    reshaped = {VISUAL + k for k in _VISUAL_RESHAPED}
    unknown = sorted(set(sd) - set(names) - reshaped)
    missing = sorted((set(names) | {VISUAL + "positional_embedding", VISUAL + "proj"}) - set(sd))
    problems = [f"keys fastclip does not know: {_named(unknown)}"] if unknown else []
    problems += [f"missing keys: {_named(missing)}"] if missing else []
    if problems:
        raise CheckpointError("Meta Perception Encoder checkpoint: " + "; ".join(problems))
    out = {names[k]: v for k, v in sd.items() if k in names}
    if VISUAL + "class_embedding" in sd:
        out[VISUAL + "cls_token"] = sd[VISUAL + "class_embedding"].reshape(1, 1, -1)  # (W,) -> (1, 1, W)
    out[VISUAL + "pos_embed"] = sd[VISUAL + "positional_embedding"].unsqueeze(0)  # (N, W) -> (1, N, W)
    proj = sd[VISUAL + "proj"]  # (W, E): pooled @ proj, no bias
    out[VISUAL + "proj"] = proj
    out[VISUAL + "proj_bias"] = torch.zeros(proj.shape[1], dtype=proj.dtype)
    return out


# (image width, patch size, position rows) of each architecture's image tower -> its name
_SHAPES = {(192, 16, 577): "PE-Core-T-16-384", (384, 16, 577): "PE-Core-S-16-384", (768, 16, 197): "PE-Core-B-16",
           (1024, 14, 577): "PE-Core-L-14-336", (1536, 14, 1024): "PE-Core-bigG-14-448"}


def architecture_of(source: str, sd: dict) -> str:
    """The registered PE-Core architecture of a Meta file, from its image tower's shapes; CheckpointError
    (naming the shapes) for any other."""
    conv, pos = sd[VISUAL + "conv1.weight"], sd.get(VISUAL + "positional_embedding")
    key = (conv.shape[0], conv.shape[-1], None if pos is None else pos.shape[0])
    if key not in _SHAPES:
        raise CheckpointError(
            f"checkpoint {source} is a Meta Perception Encoder state dict whose image tower (width {key[0]}, patch "
            f"{key[1]}, {key[2]} positions) is none of {', '.join(sorted(set(_SHAPES.values())))}: load it with "
            f"its architecture's name, fastclip.load(<name>, pretrained={source!r})")
    return _SHAPES[key]


def meta_repo(name: str) -> str | None:
    """The Meta hub repo ``name`` ("facebook/PE-Core-B16-224" or "hf-hub:facebook/...") names, or None."""
    repo = name.removeprefix("hf-hub:")
    return repo if repo in META_REPOS else None


def weights_file(repo: str) -> str:
    """The file Meta's repo holds (perception_models' fetch_pe_checkpoint): ``<name>.pt``."""
    return repo.split("/")[-1] + ".pt"
