"""Chinese-CLIP checkpoints: transformers ``ChineseCLIPModel`` directories and OFA-Sys cn_clip ``.pt`` files.

Both hold an OpenAI-style image tower and a Chinese RoBERTa-wwm text tower of BERT architecture
(fastclip/models/bert.py, text tower type ``hf``, pooled at the first token, a linear projection without bias).
fastclip's names: ``visual.*`` as OpenAI's, ``text.transformer.*`` as transformers' BertModel names,
``text.proj.weight`` (E, W), ``log_logit_scale``.

* ``ChineseCLIPModel`` (config.json ``model_type`` "chinese_clip"): ``vision_model.*`` in CLIPModel's names
  (q/k/v packed as keymaps.from_hf packs them), ``visual_projection.weight`` (E, W) -> ``visual.proj`` (W, E),
  ``text_model.*`` -> ``text.transformer.*``, ``text_projection.weight`` (E, W) -> ``text.proj.weight``.
* cn_clip (``clip_cn_vit-b-16.pt``; checkpoints.py already strips the ``state_dict`` wrapper and ``module.``):
  ``visual.*`` in OpenAI's names (kept), ``bert.*`` -> ``text.transformer.*`` (``bert.pooler.*``, unused, dropped),
  ``text_projection`` (W, E) -> ``text.proj.weight`` transposed, ``logit_scale`` -> ``log_logit_scale``.

Pure renames and transposes: keys left over surface as unexpected keys in the factory's check.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.config import OPENAI_MEAN, OPENAI_STD, ModelConfig, parse_config

MODEL_TYPE = "chinese_clip"
CONTEXT_LENGTH = 52  # cn_clip.clip.tokenize: [CLS] + 50 tokens + [SEP]
_HF_TEXT, _CN_TEXT = "text_model.", "bert."
_BUFFERS = ("position_ids", "token_type_ids")  # non-persistent buffers some files still hold


def is_chinese_clip_dir(path) -> bool:
    """Whether directory ``path`` holds a config.json of model_type ``chinese_clip``."""
    file = Path(path) / "config.json"
    try:
        return file.is_file() and json.loads(file.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def is_hf_chinese_clip_layout(sd: dict) -> bool:
    """A ChineseCLIPModel state dict: CLIPModel's vision keys with BERT text keys."""
    return _HF_TEXT + "embeddings.word_embeddings.weight" in sd


def is_cn_clip_layout(sd: dict) -> bool:
    """An OFA-Sys cn_clip state dict (``module.`` already stripped): ``visual.*``, ``bert.*``, ``text_projection``."""
    return _CN_TEXT + "embeddings.word_embeddings.weight" in sd and "text_projection" in sd


def is_chinese_clip_layout(sd: dict) -> bool:
    return is_hf_chinese_clip_layout(sd) or is_cn_clip_layout(sd)


def _text(sd: dict, prefix: str, out: dict) -> None:
    """``<prefix>X`` -> ``text.transformer.X`` (the pooler and buffers dropped); removes them from ``sd``."""
    for key in [k for k in sd if k.startswith(prefix)]:
        value = sd.pop(key)
        rest = key[len(prefix):]
        if rest.startswith("pooler.") or rest.endswith(_BUFFERS):
            continue
        out["text.transformer." + rest] = value


def from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """ChineseCLIPModel state dict -> fastclip names (``cfg``: the model's config, for the image tower's depth)."""
    from .keymaps import _hf_encoder, _move

    sd = {k: v for k, v in sd.items() if not k.endswith(_BUFFERS)}
    out: dict[str, torch.Tensor] = {}
    _text(sd, _HF_TEXT, out)
    try:
        _hf_encoder(sd, "vision_model", "visual", cfg.vision.layers, out)
    except KeyError as exc:
        raise CheckpointError(f"ChineseCLIPModel checkpoint lacks {exc.args[0]!r}") from None
    ve = "vision_model.embeddings."
    _move(sd, out, [
        (ve + "class_embedding", "visual.class_embedding"),
        (ve + "patch_embedding.weight", "visual.conv1.weight"),
        (ve + "position_embedding.weight", "visual.positional_embedding"),
        ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
        ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
        ("vision_model.post_layernorm.weight", "visual.ln_post.weight"),
        ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
        ("text_projection.weight", "text.proj.weight"),  # (E, W) as nn.Linear stores it
        ("logit_scale", "log_logit_scale"),
    ])
    if "visual_projection.weight" in sd:
        out["visual.proj"] = sd.pop("visual_projection.weight").t()  # (E, W) -> (W, E)
    out.update(sd)  # leftovers surface as unexpected keys
    return out


def from_cn_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cn_clip state dict -> fastclip names."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    _text(sd, _CN_TEXT, out)
    if "text_projection" in sd:
        out["text.proj.weight"] = sd.pop("text_projection").t()  # (W, E) -> (E, W)
    if "logit_scale" in sd:
        out["log_logit_scale"] = sd.pop("logit_scale")
    out.update(sd)  # visual.* keeps OpenAI's names
    return out


def from_chinese_clip(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Either Chinese-CLIP layout -> fastclip names."""
    return from_hf(sd, cfg) if is_hf_chinese_clip_layout(sd) else from_cn_clip(sd)


def chinese_clip_names() -> list[str]:
    """The registered architectures of Chinese-CLIP's shape: a BERT text tower with the WordPiece tokenizer."""
    from ..models.config import get_model_config, list_models

    return [n for n in list_models() if (cfg := get_model_config(n)).tokenizer == "wordpiece"
            and getattr(cfg.text, "type", None) == "hf"]


def architecture_of(source: str, sd: dict) -> str:
    """The one registered Chinese-CLIP architecture whose parameters have the names and shapes of cn_clip state
    dict ``sd``; CheckpointError naming the architectures that fit (several) or the ones there are (none)."""
    from ..models.clip import CLIP
    from ..models.config import get_model_config

    shapes = {k: tuple(v.shape) for k, v in from_cn_clip(sd).items() if not k.endswith("num_batches_tracked")}
    names = chinese_clip_names()
    fits = []
    for name in names:
        with torch.device("meta"):
            model = CLIP(get_model_config(name), backend="ref")
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        if theirs == shapes:
            fits.append(name)
    if len(fits) == 1:
        return fits[0]
    word = sd.get(_CN_TEXT + "embeddings.word_embeddings.weight")
    what = (f"text width {word.shape[1]}, {_count(sd, _CN_TEXT + 'encoder.layer.')} text layers, "
            f"{_count(sd, 'visual.transformer.resblocks.')} image blocks, image width "
            f"{tuple(sd['visual.conv1.weight'].shape)[0] if 'visual.conv1.weight' in sd else '?'}")
    if fits:
        raise CheckpointError(f"checkpoint {source} is a Chinese-CLIP (cn_clip) state dict whose shapes fit "
                              f"{', '.join(fits)}: load it with one of these names, "
                              f"fastclip.load(<name>, pretrained={source!r})")
    raise CheckpointError(f"checkpoint {source} is a Chinese-CLIP (cn_clip) state dict ({what}) whose shapes fit none "
                          f"of the Chinese-CLIP architectures {', '.join(names) or '(none registered)'}: register its "
                          f"config (fastclip.add_model_config) and load it with fastclip.load(<name>, pretrained=...)")


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """ModelConfig from a transformers ``config.json`` of model_type ``chinese_clip`` (ChineseCLIPConfig's
    defaults for omitted fields): a ViT image tower, the BERT text tower pooled at [CLS] with a linear
    projection, the WordPiece tokenizer of the directory, context length 52."""
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{name}: model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
    from .keymaps import _hf_act

    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    for key in ("image_size", "patch_size"):
        if not isinstance(v.get(key, 0), int):
            raise CheckpointError(f"{name}: vision_config.{key} must be one integer (square), got {v[key]!r}")
    vw = v.get("hidden_size", 768)
    vision = {
        "image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 32), "width": vw,
        "layers": v.get("num_hidden_layers", 12), "head_width": vw // v.get("num_attention_heads", 12),
        "mlp_ratio": v.get("intermediate_size", 3072) / vw, "act": _hf_act(v.get("hidden_act", "quick_gelu"), name),
        "norm_kwargs": {"eps": v.get("layer_norm_eps", 1e-5)},
    }
    if t.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{name}: text_config.hidden_act {t['hidden_act']!r} is not supported (expected 'gelu')")
    text = {
        "type": "hf", "hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear",
        "context_length": min(CONTEXT_LENGTH, t.get("max_position_embeddings", 512)),
        "hf_model_config": {
            "model_type": "bert", "vocab_size": t.get("vocab_size", 30522), "hidden_size": t.get("hidden_size", 768),
            "num_hidden_layers": t.get("num_hidden_layers", 12), "num_attention_heads": t.get("num_attention_heads", 12),
            "intermediate_size": t.get("intermediate_size", 3072),
            "max_position_embeddings": t.get("max_position_embeddings", 512),
            "type_vocab_size": t.get("type_vocab_size", 2), "pad_token_id": t.get("pad_token_id", 0),
            "layer_norm_eps": t.get("layer_norm_eps", 1e-12), "hidden_act": "gelu",
        },
    }
    raw = {"embed_dim": hf.get("projection_dim", 512), "family": "clip", "tokenizer": "wordpiece",
           "preprocess": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "resize_mode": "squash",
                          "interpolation": "bicubic"},
           "vision_cfg": vision, "text_cfg": text}
    return parse_config(name, raw)
