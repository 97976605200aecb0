"""Explicit key maps from every checkpoint layout to fastclip's parameter names, and config inference.

fastclip's names are OpenAI/OpenCLIP's, with the text tower under ``text.``:
``visual.*`` as in OpenAI, ``text.{token_embedding, positional_embedding, transformer, ln_final,
text_projection}``, ``log_logit_scale`` (OpenAI's ``logit_scale``) and ``logit_bias``.
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from ..models.config import INCEPTION_MEAN, INCEPTION_STD, ModelConfig, parse_config

_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# Entries of OpenAI / OpenCLIP files that are not weights.
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask",
                "text.transformer.embeddings.position_ids")  # a buffer older transformers saved (HF text towers)


def from_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI / OpenCLIP CLIP state dict -> fastclip names (a renaming, no copies)."""
    out = {}
    for key, value in sd.items():
        if key in _NON_WEIGHTS or key.endswith(".attn_mask"):
            continue
        if key == "logit_scale":
            key = "log_logit_scale"
        elif key == "text_projection.weight":  # OpenCLIP text towers with proj_bias: nn.Linear (E, W)
            key, value = "text.text_projection", value.t()
        elif key == "text_projection.bias":
            key = "text.text_projection_bias"
        elif key.startswith(_TEXT_KEYS):
            key = "text." + key
        out[key] = value
    return out


def is_openclip_layout(sd: dict) -> bool:
    return "visual.conv1.weight" in sd and "token_embedding.weight" in sd


def is_openclip_hf_text_layout(sd: dict) -> bool:
    """open_clip's CustomTextCLIP with a Hugging Face text tower (HFTextEncoder: fastclip's text type "hf",
    fastclip/models/bert.py, holds its names); ``from_openclip`` maps it."""
    return "text.transformer.embeddings.word_embeddings.weight" in sd


def is_hf_layout(sd: dict) -> bool:
    return any(k.startswith("vision_model.") for k in sd)


def _count_layers(sd: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _openai_text_cfg(sd: dict[str, torch.Tensor]) -> tuple[int, dict]:
    """(embed_dim, text_cfg) of an OpenAI-layout CLIP's text tower, from shapes; KeyError for a missing key."""
    text_width, embed_dim = sd["ln_final.weight"].shape[0], sd["text_projection"].shape[1]
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    context_length, vocab_size = sd["positional_embedding"].shape[0], sd["token_embedding.weight"].shape[0]
    return int(embed_dim), {
        "context_length": int(context_length), "vocab_size": int(vocab_size), "width": int(text_width),
        "heads": int(text_width // 64), "layers": _count_layers(sd, r"transformer\.resblocks\.(\d+)\."),
        "mlp_ratio": t_mlp / text_width,
    }


def _infer_openai_resnet_config(sd: dict[str, torch.Tensor], name: str) -> ModelConfig:
    """An OpenAI ResNet CLIP (RN50, ...) from shapes, as open_clip's build_model_from_openai_state_dict infers
    it: blocks per stage from the ``visual.layer{b}.{i}.`` keys, width from ``visual.layer1.0.conv1.weight``,
    image size 32 x the attention pool's grid (its positional embedding has grid² + 1 rows)."""
    try:
        layers = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        positions = sd["visual.attnpool.positional_embedding"].shape[0]
        embed_dim, text_cfg = _openai_text_cfg(sd)
    except KeyError as exc:
        raise CheckpointError(
            f"cannot infer the architecture: the checkpoint lacks {exc.args[0]!r}; it does not look like an OpenAI "
            f"CLIP ResNet checkpoint (pass the architecture name, e.g. fastclip.load('RN50', pretrained=path))"
        ) from None
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions or 0 in layers:
        raise CheckpointError(f"cannot infer the architecture: visual.attnpool.positional_embedding has {positions} "
                              f"rows (not a square grid + 1) or a stage has no blocks (blocks per stage: {layers})")
    raw = {"embed_dim": embed_dim, "quick_gelu": True,
           "vision_cfg": {"image_size": int(grid * 32), "layers": layers, "width": int(width)}, "text_cfg": text_cfg}
    return parse_config(name, raw)


def infer_openai_config(sd: dict[str, torch.Tensor], name: str = "openai") -> ModelConfig:
    """Architecture of an OpenAI-layout CLIP state dict, from tensor shapes (OpenAI implies QuickGELU)."""
    if "visual.layer1.0.conv1.weight" in sd:  # a ResNet image tower
        return _infer_openai_resnet_config(sd, name)
    try:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim, text_cfg = _openai_text_cfg(sd)
    except KeyError as exc:
        raise CheckpointError(
            f"cannot infer the architecture: the checkpoint lacks {exc.args[0]!r}; it does not look like an "
            f"OpenAI CLIP ViT checkpoint (pass the architecture name, e.g. fastclip.load('ViT-B-32', pretrained=path))"
        ) from None
    raw = {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": int(patch * grid), "patch_size": int(patch), "width": int(width),
            "layers": _count_layers(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
            "mlp_ratio": v_mlp / width,
        },
        "text_cfg": text_cfg,
    }
    return parse_config(name, raw)


# ---------------------------------------------------------------- Hugging Face CLIPModel / SiglipModel
def _hf_encoder(sd: dict, src: str, dst: str, layers: int, out: dict) -> None:
    for i in range(layers):
        s, d = f"{src}.encoder.layers.{i}.", f"{dst}.transformer.resblocks.{i}."
        attn = s + "self_attn."
        out[d + "attn.in_proj_weight"] = torch.cat([sd.pop(attn + f"{p}_proj.weight") for p in "qkv"])
        out[d + "attn.in_proj_bias"] = torch.cat([sd.pop(attn + f"{p}_proj.bias") for p in "qkv"])
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for leaf in ("weight", "bias"):
                out[f"{d}{ours}.{leaf}"] = sd.pop(f"{s}{theirs}.{leaf}")


def _move(sd: dict, out: dict, pairs) -> None:
    for theirs, ours in pairs:
        if theirs in sd:
            out[ours] = sd.pop(theirs)


def from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPModel / SiglipModel state dict -> fastclip names.

    Pure re-arrangements only: q/k/v projections are concatenated into OpenAI's packed layout and
    the projection matrices transposed (``Linear.weight`` (E, W) -> ``proj`` (W, E)). Keys left over
    are reported by the caller as unexpected.
    """
    from .keymaps_chinese_clip import is_hf_chinese_clip_layout

    if is_hf_chinese_clip_layout(sd):  # ChineseCLIPModel: a BERT text tower (keymaps_chinese_clip.py)
        from .keymaps_chinese_clip import from_hf as chinese_clip_from_hf

        return chinese_clip_from_hf(sd, cfg)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    try:
        _hf_encoder(sd, "vision_model", "visual", cfg.vision.layers, out)
        _hf_encoder(sd, "text_model", "text", cfg.text.layers, out)
    except KeyError as exc:
        raise CheckpointError(f"Hugging Face checkpoint lacks {exc.args[0]!r}") from None
    ve, te = "vision_model.embeddings.", "text_model.embeddings."
    _move(sd, out, [
        (ve + "class_embedding", "visual.class_embedding"),
        (ve + "patch_embedding.weight", "visual.conv1.weight"),
        (ve + "patch_embedding.bias", "visual.conv1.bias"),
        ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
        ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
        ("vision_model.post_layernorm.weight", "visual.ln_post.weight"),
        ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
        (te + "token_embedding.weight", "text.token_embedding.weight"),
        ("text_model.final_layer_norm.weight", "text.ln_final.weight"),
        ("text_model.final_layer_norm.bias", "text.ln_final.bias"),
        ("text_model.head.bias", "text.text_projection_bias"),
        ("logit_scale", "log_logit_scale"),
        ("logit_bias", "logit_bias"),
    ])
    for theirs, ours in ((ve + "position_embedding.weight", "visual.positional_embedding"),
                         (te + "position_embedding.weight", "text.positional_embedding")):
        if theirs in sd:
            out[ours] = sd.pop(theirs)
    for theirs, ours in (("visual_projection.weight", "visual.proj"), ("text_projection.weight", "text.text_projection"),
                         ("text_model.head.weight", "text.text_projection")):
        if theirs in sd:
            out[ours] = sd.pop(theirs).t()
    head = "vision_model.head."
    if head + "probe" in sd:
        _move(sd, out, [(head + "probe", "visual.attn_pool.probe"),
                        (head + "attention.in_proj_weight", "visual.attn_pool.attn.in_proj_weight"),
                        (head + "attention.in_proj_bias", "visual.attn_pool.attn.in_proj_bias")])
        for ours, theirs in (("attn.out_proj", "attention.out_proj"), ("ln", "layernorm"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for leaf in ("weight", "bias"):
                _move(sd, out, [(f"{head}{theirs}.{leaf}", f"visual.attn_pool.{ours}.{leaf}")])
    out.update(sd)  # leftovers surface as unexpected keys
    if getattr(cfg.vision, "type", None) == "naflex":  # Siglip2Model: a linear patch embedding
        from .keymaps_naflex import naflex_vision_keys

        return naflex_vision_keys(out)
    return out


_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _hf_act(name: str, where: str) -> str:
    if name not in _HF_ACTS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported (expected one of {sorted(_HF_ACTS)})")
    return _HF_ACTS[name]


def is_metaclip2_dir(path) -> bool:
    """Whether ``path`` holds a transformers MetaClip2Model (config.json model_type ``metaclip_2``)."""
    from .keymaps_metaclip2 import is_metaclip2_dir as check

    return check(path)


def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` of model_type ``clip``, ``siglip``, ``siglip2`` (NaFlex,
    fastclip/loading/keymaps_naflex.py) or ``metaclip_2`` (fastclip/loading/keymaps_metaclip2.py)."""
    if hf.get("model_type") == "siglip2":  # SigLIP 2 NaFlex (keymaps_naflex.py)
        from .keymaps_naflex import config_from_hf_naflex

        return config_from_hf_naflex(hf, name)
    model_type = hf.get("model_type")
    if model_type == "metaclip_2":  # CLIP's parameter names, first-eos pooling, XLM-V tokenizer
        from .keymaps_metaclip2 import config_from_hf as metaclip2_config

        return metaclip2_config(hf, name)
    if model_type == "chinese_clip":  # ChineseCLIPModel: a BERT text tower, WordPiece tokenizer (keymaps_chinese_clip.py)
        from .keymaps_chinese_clip import config_from_hf as chinese_clip_config

        return chinese_clip_config(hf, name)
    if model_type not in ("clip", "siglip"):
        raise CheckpointError(f"{name}: model_type {model_type!r} is not supported "
                              "(expected 'clip', 'siglip', 'siglip2' or 'metaclip_2')")
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    siglip = model_type == "siglip"
    # transformers' defaults for fields a config.json may omit
    vw, tw = v.get("hidden_size", 768), t.get("hidden_size", 768 if siglip else 512)
    v_heads = v.get("num_attention_heads", 12)
    vision = {
        "image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 16 if siglip else 32),
        "width": vw, "layers": v.get("num_hidden_layers", 12), "head_width": vw // v_heads,
        "mlp_ratio": v.get("intermediate_size", 3072) / vw,
        "act": _hf_act(v.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"), name),
        "norm_kwargs": {"eps": v.get("layer_norm_eps", 1e-6 if siglip else 1e-5)},
    }
    text = {
        "context_length": t.get("max_position_embeddings", 64 if siglip else 77),
        "vocab_size": t.get("vocab_size", 32000 if siglip else 49408), "width": tw,
        "heads": t.get("num_attention_heads", 12 if siglip else 8), "layers": t.get("num_hidden_layers", 12),
        "mlp_ratio": t.get("intermediate_size", 3072 if siglip else 2048) / tw,
        "act": _hf_act(t.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"), name),
        "norm_kwargs": {"eps": t.get("layer_norm_eps", 1e-6 if siglip else 1e-5)},
    }
    if siglip:
        if not v.get("vision_use_head", True):
            raise CheckpointError(f"{name}: SigLIP vision towers without the pooling head are not supported")
        vision.update(class_token=False, no_ln_pre=True, patch_bias=True, pool_type="map", proj=False)
        text.update(no_causal_mask=True, pool_type="last", proj_bias=True)
        raw = {"embed_dim": t.get("projection_size", tw), "init_logit_bias": -10.0, "family": "siglip",
               "tokenizer": "hf", "preprocess": {"mean": list(INCEPTION_MEAN), "std": list(INCEPTION_STD),
                                                  "resize_mode": "squash"}}
    else:
        eos = t.get("eos_token_id", 49407)
        text.update(pool_type="argmax" if eos == 2 else "eos", eos_token_id=eos)
        raw = {"embed_dim": hf.get("projection_dim", 512), "family": "clip", "tokenizer": "clip"}
    raw.update(vision_cfg=vision, text_cfg=text)
    return parse_config(name, raw)
