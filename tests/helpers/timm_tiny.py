"""Tiny open_clip CLIPs with timm trunks (EVA-02 / EVA-01 / PE-Core shapes) for the checkpoint-format tests:
the real open_clip config of a release with a tiny text tower and a trunk shrunk by timm.create_model keywords."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch

from helpers.upstream import Upstream, clip_tokens, perturb_

OPENCLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"
TINY_TEXT = {"vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def tiny_timm_config(real: str, kwargs: dict) -> dict:
    """open_clip's config ``real`` with a tiny text tower and the trunk's keywords (fastclip's key
    ``timm_model_kwargs``)."""
    raw = json.loads((OPENCLIP_CONFIGS / f"{real}.json").read_text())
    raw["embed_dim"], raw["text_cfg"] = 48, dict(TINY_TEXT, context_length=raw["text_cfg"]["context_length"])
    raw["vision_cfg"] = dict(raw["vision_cfg"], image_size=kwargs["img_size"], timm_model_kwargs=kwargs)
    return raw


def tiny_timm_openclip(name: str, raw: dict, seed: int, prepare=None) -> Upstream:
    """open_clip.model.CustomTextCLIP of ``raw`` (tiny_timm_config), its timm trunk built with the shrinking
    keywords, perturbed (the blocks strongly: attention far from uniform, so positions matter); ``prepare``
    (model -> model) runs last."""
    kwargs = raw["vision_cfg"]["timm_model_kwargs"]
    create = timm.create_model
    vision_cfg = {k: v for k, v in raw["vision_cfg"].items() if k != "timm_model_kwargs"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm, "create_model", lambda arch, **kw: create(arch, **kw, **kwargs))
        torch.manual_seed(seed)
        model = open_clip.model.CustomTextCLIP(raw["embed_dim"], vision_cfg, raw["text_cfg"])
    perturb_(model, seed)
    perturb_(model.visual.trunk.blocks, seed + 1, std=0.1)
    if prepare is not None:
        model = prepare(model)
    ctx = raw["text_cfg"]["context_length"]
    return Upstream(f"open_clip {name}", model, "open_clip", kwargs["img_size"], lambda b: clip_tokens(b, ctx, seed=b))
