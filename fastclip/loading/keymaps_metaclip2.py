"""transformers ``MetaClip2Model`` directories (MetaCLIP 2 worldwide, e.g. facebook/metaclip-2-worldwide-*): the
ModelConfig of their ``config.json`` (model_type ``metaclip_2``).

A MetaClip2Model holds CLIPModel's parameter names (``vision_model.*``, ``text_model.*``,
``visual_projection``, ``text_projection``, ``logit_scale``), so its weights go through the CLIP key map
(``keymaps.from_hf``) unchanged; what differs is the text tower's pooling and tokenizer:

* the text is pooled at the FIRST position holding ``text_config.eos_token_id`` (``MetaClip2TextModel``;
  no argmax fallback as CLIP has for eos id 2): text_cfg ``pool_type: "eos"``;
* the tokenizer is the directory's own (XLM-V's ``XLMRobertaTokenizer``: ``<s> ... </s>`` padded with
  ``<pad>``), taken as transformers' ``AutoTokenizer`` takes it, without open_clip's text cleaning
  (text_cfg ``tokenizer_kwargs.clean: "none"``).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..models.config import ModelConfig, parse_config

MODEL_TYPE = "metaclip_2"


def is_metaclip2_dir(path) -> bool:
    """Whether directory ``path`` holds a config.json of model_type ``metaclip_2``."""
    file = Path(path) / "config.json"
    try:
        return file.is_file() and json.loads(file.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def _hf_act(name: str, where: str) -> str:
    from .keymaps import _hf_act as act  # the activation names CLIP / SigLIP directories map too

    return act(name, where)


def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` of model_type ``metaclip_2`` (transformers'
    MetaClip2Config defaults for omitted fields). ``name``: the hub id or directory, recorded as the
    tokenizer's source."""
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{name}: model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    vw, tw = v.get("hidden_size", 768), t.get("hidden_size", 512)
    v_heads = v.get("num_attention_heads", 12)
    eos = t.get("eos_token_id", 49407)
    if not isinstance(eos, int):
        raise CheckpointError(f"{name}: text_config.eos_token_id must be one token id, got {eos!r}")
    for key, where in (("image_size", v), ("patch_size", v)):
        if not isinstance(where.get(key, 0), int):
            raise CheckpointError(f"{name}: vision_config.{key} must be one integer (square), got {where[key]!r}")
    vision = {
        "image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 32), "width": vw,
        "layers": v.get("num_hidden_layers", 12), "head_width": vw // v_heads,
        "mlp_ratio": v.get("intermediate_size", 3072) / vw,
        "act": _hf_act(v.get("hidden_act", "quick_gelu"), name),
        "norm_kwargs": {"eps": v.get("layer_norm_eps", 1e-5)},
    }
    text = {
        "context_length": t.get("max_position_embeddings", 77), "vocab_size": t.get("vocab_size", 49408),
        "width": tw, "heads": t.get("num_attention_heads", 8), "layers": t.get("num_hidden_layers", 12),
        "mlp_ratio": t.get("intermediate_size", 2048) / tw,
        "act": _hf_act(t.get("hidden_act", "quick_gelu"), name),
        "norm_kwargs": {"eps": t.get("layer_norm_eps", 1e-5)},
        "pool_type": "eos", "eos_id": eos,
        "hf_tokenizer_name": name, "tokenizer_kwargs": {"clean": "none"},
    }
    raw = {"embed_dim": hf.get("projection_dim", 512), "family": "clip", "tokenizer": "hf",
           "vision_cfg": vision, "text_cfg": text}
    return parse_config(name, raw)
