"""Tiny model configs (OpenCLIP's JSON shape) that exercise every path of the towers in seconds: the one set
``fastclip verify`` runs and the test suite uses (tests/helpers re-exports it).

They are not registered as architectures (``fastclip.list_models()`` does not show them): ``register()``
adds them, ``parse_config(name, TINY_CONFIGS[name])`` parses one without registering it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

EOT = 49407  # CLIP's end-of-text id (the highest id of its vocabulary)
_CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}

TINY_CONFIGS: dict[str, dict] = {
    # OpenAI CLIP's shape: class token, ln_pre, causal text pooled at argmax (end of text), QuickGELU.
    "tiny-clip": {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 64, "head_width": 32, "layers": 2},
        "text_cfg": dict(_CLIP_TEXT),
    },
    # SigLIP's shape: no class token, attention-pool ("map") head, no vision projection, patch bias, tanh-GELU,
    # eps 1e-6, head dim 72; bidirectional text pooled at the last position with a projection bias. Its
    # text is tokenised by the bundled CLIP BPE (context 16), so it needs no tokenizer files.
    "tiny-siglip": {
        "embed_dim": 48, "init_logit_bias": -10, "family": "siglip", "tokenizer": "clip",
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 144, "layers": 2, "head_width": 72,
                       "act": "gelu_tanh", "norm_kwargs": {"eps": 1e-6}, "class_token": False, "no_ln_pre": True,
                       "patch_bias": True, "pool_type": "map", "proj": False},
        "text_cfg": {**_CLIP_TEXT, "context_length": 16, "act": "gelu_tanh", "norm_kwargs": {"eps": 1e-6},
                     "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
    },
    # ViT-bigG's proportions: head dim 104, mlp_ratio 4.9231 (1024 = int(208 * 4.9231)), GELU; text heads of
    # width 80, pooled at the last position without a causal mask, projection bias.
    "tiny-bigG-like": {
        "embed_dim": 96,
        "vision_cfg": {"image_size": 80, "patch_size": 16, "width": 208, "head_width": 104, "layers": 2,
                       "mlp_ratio": 4.9231},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 160, "heads": 2, "layers": 2,
                     "mlp_ratio": 3.0, "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
    },
    # QuickGELU, mean-pooled patches with the LayerNorm after pooling, no ln_pre; causal text pooled at the
    # first end-of-text (open_clip's "eos" pooling with its "eos_id" key).
    "tiny-avgpool-quickgelu": {
        "embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "head_width": 32, "layers": 2,
                       "pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True},
        "text_cfg": {**_CLIP_TEXT, "pool_type": "eos", "eos_id": EOT},
    },
    # One block each; causal text pooled at the first token.
    "tiny-first-token": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "head_width": 32, "layers": 1},
        "text_cfg": {**_CLIP_TEXT, "layers": 1, "pool_type": "first"},
    },
}
# The ones open_clip builds too (the others use keys only fastclip reads).
OPENCLIP_TINY = ("tiny-clip", "tiny-bigG-like", "tiny-avgpool-quickgelu", "tiny-first-token")


def write_configs(folder: str | os.PathLike, names=None) -> Path:
    """Write the configs (all, or ``names``) as ``<name>.json`` files into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names or TINY_CONFIGS:
        (folder / f"{name}.json").write_text(json.dumps(TINY_CONFIGS[name]))
    return folder


def register() -> list[str]:
    """Register every tiny config as an architecture (``fastclip.create_model("tiny-clip")``)."""
    from .config import add_model_config

    with tempfile.TemporaryDirectory() as tmp:
        return add_model_config(write_configs(tmp))
