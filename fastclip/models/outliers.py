"""Models with the activation outliers of trained checkpoints, built deterministically from random weights
(for the int8 tests and benchmarks, fastclip/backends/int8.py and docs/int8.md).

Trained CLIP / ViT checkpoints carry a few channels hundreds of times larger than the rest ("massive
activations"): in the residual stream, in the LayerNorm outputs that feed the linear layers, in the
attention outputs and in the MLP's hidden units. One dynamic int8 scale per call is then set by those
channels and crushes every other one. ``add_outliers`` gives a randomly initialised fastclip model such
channels, in every block of both towers, in four ways:

1. LayerNorm gain outliers: ``ln_1`` / ``ln_2`` gain and bias times ``ln_scale`` on a few dims, the matching
   input columns of ``in_proj`` / ``c_fc`` divided by it (the fp32 function is unchanged);
2. attention-output outliers: a few rows of the v projection (and their bias) times ``v_scale``, the
   matching input columns of ``out_proj`` divided by it (unchanged);
3. MLP hidden-unit outliers: a few ``c_fc`` rows (and bias) times ``hidden_scale``, the matching ``c_proj``
   input columns divided by it (GELU(k z) / k is about ReLU(z): the function changes a little);
4. a massive residual stream: the first block's ``c_proj`` output rows of the outlier dims times
   ``residual_scale`` plus a bias of +-``residual_bias``, so those dims of the stream are hundreds of times
   the others in every later block (every LayerNorm input); the final LayerNorm's gain on them is divided by
   the same factor, as trained models' final gains are small there, so the embeddings are not dominated by
   a constant direction.
"""
from __future__ import annotations

import torch

from .clip import CLIP


def outlier_dims(width: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct channel indices in [0, width), the same for the same seed.  -> (count,) int64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(width, generator=gen)[:count].sort().values


def _signs(count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 7)
    return torch.where(torch.rand(count, generator=gen) < 0.5, -1.0, 1.0)


@torch.no_grad()
def add_outliers(model: CLIP, seed: int = 0, channels: int = 4, ln_scale: float = 50.0, v_scale: float = 50.0,
                 hidden_scale: float = 30.0, residual_scale: float = 30.0, residual_bias: float = 30.0,
                 final_gain: float = 0.01, massive_read: float = 0.03) -> CLIP:
    """Give every block of both towers of ``model`` (fp32) outlier channels, in place (see the module
    docstring); returns the model. ``channels`` dims per tower (and as many MLP hidden units and attention
    output dims per block) are chosen from ``seed``."""
    towers = [("visual", model.visual, getattr(model.visual, "ln_post", None)),
              ("text", model.text, getattr(model.text, "ln_final", None))]
    for t, (_, tower, final_ln) in enumerate(towers):
        blocks = list(tower.transformer.resblocks)
        width = blocks[0].attn.width
        dims = outlier_dims(width, channels, seed + 100 * t)  # (channels,) residual / LayerNorm dims
        signs = _signs(channels, seed + 100 * t)
        for i, block in enumerate(blocks):
            s = seed + 100 * t + i + 1
            attn, mlp = block.attn, block.mlp
            # 1. LayerNorm gain outliers, compensated in the next linear's input columns
            for ln, weight in ((block.ln_1, attn.in_proj_weight), (block.ln_2, mlp.c_fc.weight)):
                ln.weight[dims] *= ln_scale
                ln.bias[dims] = (ln.bias[dims] + 0.1 * signs) * ln_scale
                weight[:, dims] /= ln_scale
                if i > 0:  # later blocks read the massive dims weakly, as trained ones do
                    weight[:, dims] *= massive_read
            # 2. attention-output outliers: v rows up, out_proj columns down
            v_dims = outlier_dims(width, channels, s + 13)
            rows = 2 * width + v_dims
            attn.in_proj_weight[rows] *= v_scale
            attn.in_proj_bias[rows] = (attn.in_proj_bias[rows] + 0.05) * v_scale
            attn.out_proj.weight[:, v_dims] /= v_scale
            # 3. MLP hidden-unit outliers at c_proj's input
            units = outlier_dims(mlp.c_proj.weight.shape[1], channels, s + 29)
            mlp.c_fc.weight[units] *= hidden_scale
            mlp.c_fc.bias[units] = (mlp.c_fc.bias[units] + 0.05) * hidden_scale
            mlp.c_proj.weight[:, units] /= hidden_scale
            # 4. the massive residual stream, written by the first block
            if i == 0:
                mlp.c_proj.weight[dims] *= residual_scale
                mlp.c_proj.bias[dims] = signs * residual_bias
        if final_ln is not None:
            final_ln.weight[dims] *= final_gain
    return model
