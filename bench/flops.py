"""FLOPs per image and per caption, counted by ``torch.utils.flop_counter.FlopCounterMode``.

Images: open_clip eager ``encode_image`` at batch 1 (every implementation does this work). Captions:
the work each caption needs at its own token length, counted on the transformers text tower (open_clip
always runs 77 positions; the lengths come from transformers' tokenizer, which equals open_clip's on
these captions) — so a row's GFLOP/s is useful work per second, and running padding costs rate.
The counter runs with autograd enabled and scaled-dot-product attention on its math backend, so
attention appears as the matmuls the counter sees (it has no formula for the fused CPU attention
kernels, nor for the inference fast path of ``nn.MultiheadAttention``).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn, *args, **kwargs) -> int:
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def image_flops(open_clip_model, image_size: int) -> int:
    """FLOPs of one image through open_clip's image tower."""
    return count_flops(open_clip_model.encode_image, torch.zeros(1, 3, image_size, image_size))


def caption_flops(hf_model, hf_tokenizer, captions: list[str]) -> int:
    """Total FLOPs of ``captions``, each run alone at its own token length."""
    lengths = Counter(len(ids) for ids in hf_tokenizer(captions)["input_ids"])
    total = 0
    for length, count in lengths.items():
        ids = torch.full((1, length), 320)
        ids[0, 0], ids[0, -1] = 49406, 49407
        total += count * count_flops(hf_model.get_text_features, input_ids=ids)
    return total


# ---------------------------------------------------------------- EVA02 / PE-Core / SigLIP 2 NaFlex
def naflex_image_flops(vision_model, processor, images) -> float:
    """Mean FLOPs of one image of ``images`` through transformers' SigLIP 2 vision model (``Siglip2VisionModel``
    or ``Siglip2Model.vision_model``), each image counted alone on its own h * w patches (the processor's
    padding to ``max_num_patches`` cut off), so a row's GFLOP/s is useful work per second, as for the
    captions. Images of one size are counted once."""
    counted: dict[tuple[int, int], int] = {}
    for image in images:
        if image.size not in counted:
            inputs = processor(images=[image], return_tensors="pt")
            n = int(inputs["pixel_attention_mask"].sum())  # the real patches come first
            counted[image.size] = count_flops(vision_model, pixel_values=inputs["pixel_values"][:, :n],
                                              pixel_attention_mask=inputs["pixel_attention_mask"][:, :n],
                                              spatial_shapes=inputs["spatial_shapes"])
    return sum(counted[image.size] for image in images) / len(images)


def _blocks_flops(tokens: int, width: int, layers: int, mlp_in: int, mlp_hidden: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of ``layers`` transformer blocks on ``tokens`` tokens: q/k/v, q.k and
    attention.v, the output projection, and an MLP of ``mlp_in`` rows into the hidden layer (2 M for a gated
    one: gate and value) and M -> width out."""
    attention = 3 * tokens * width * width + 2 * tokens * tokens * width + tokens * width * width
    mlp = tokens * width * mlp_in + tokens * mlp_hidden * width
    return 2 * layers * (attention + mlp)


def _pool_flops(tokens: int, width: int, mlp_hidden: int) -> int:
    """The attention-pooling head: one learned query (q projected once) over ``tokens`` keys / values, the output
    projection and its MLP on the pooled row."""
    return 2 * (width * width + 2 * tokens * width * width + 2 * tokens * width + width * width
                + 2 * width * mlp_hidden)


def eva_image_flops(cfg) -> int:
    """Matmul FLOPs of one image through an EVA-02 / PE-Core image tower from its fastclip config
    (``fastclip.get_model_config(name)``): the patch embedding, the blocks (SwiGLU MLP: fc1 holds the gate and
    value rows, 2 x 2048 for EVA02-B; PE-Core: GELU, 3072), then the head Linear on the class token ("token")
    or on the attention-pooled row ("map"). The elementwise work (rotary embeddings, norms) is not counted,
    as ``FlopCounterMode`` does not count it."""
    v = cfg.vision
    patches, tokens = v.grid ** 2, v.num_tokens
    mlp_in = 2 * v.mlp_width if v.swiglu else v.mlp_width
    flops = 2 * patches * 3 * v.patch_size ** 2 * v.width
    flops += _blocks_flops(tokens, v.width, v.layers, mlp_in, v.mlp_width)
    if v.pool == "map":
        flops += _pool_flops(tokens, v.width, v.pool_mlp_width)
    return flops + 2 * v.width * cfg.embed_dim


def naflex_flops(cfg, patches: int) -> int:
    """Matmul FLOPs of one SigLIP 2 NaFlex image of ``patches`` patches (h * w) from its fastclip config: the
    patch embedding, the (G x G) position grid resized to the image (transformers runs it as one
    (patches, G^2) @ (G^2, W) matmul), the blocks (GELU MLP) and the attention-pooling head (no projection)."""
    v = cfg.vision
    flops = 2 * patches * v.patch_dim * v.width + 2 * patches * v.position_grid ** 2 * v.width
    flops += _blocks_flops(patches, v.width, v.layers, v.mlp_width, v.mlp_width)
    return flops + _pool_flops(patches, v.width, v.mlp_width)


def resnet_image_flops(cfg) -> int:
    """FLOPs (2 per multiply-add) of one image through an OpenAI ResNet image tower (RN50, ...) from its fastclip
    config: every convolution (the 3x3 stem, each Bottleneck's 1x1 / 3x3 / 1x1 and downsample 1x1) at its own
    output size, then the attention pool's useful work -- k and v projections of the (S/32)² + 1 tokens, the one
    mean-token query (its projection, q.k and attention.v) and ``c_proj`` on the pooled row. (open_clip's pool runs
    every token as a query and keeps the first; that extra work is not counted.) Average pools, BatchNorm and
    ReLU are elementwise and, as ``FlopCounterMode`` does, not counted."""
    v = cfg.vision
    w, s = v.width, v.image_size // 2  # the stem's first convolution has stride 2
    macs = s * s * 9 * (3 * (w // 2) + (w // 2) * (w // 2) + (w // 2) * w)
    s //= 2  # the stem's 2x2 average pool
    inplanes = w
    for i, blocks in enumerate(v.layers):
        planes = w * 2 ** i
        for b in range(blocks):
            stride = 2 if i > 0 and b == 0 else 1
            macs += s * s * (inplanes * planes + 9 * planes * planes)  # conv1 and conv2 at the input size
            out = s // stride
            macs += out * out * planes * 4 * planes  # conv3 after the average pool
            if b == 0:  # the downsample branch's 1x1 convolution (every stage's first block)
                macs += out * out * inplanes * 4 * planes
            inplanes, s = 4 * planes, out
    C, tokens = v.feature_width, v.grid ** 2 + 1
    macs += 2 * tokens * C * C + C * C + 2 * tokens * C + C * cfg.embed_dim  # k, v; q; q.k and p.v; c_proj
    return 2 * macs


# ---------------------------------------------------------------- Chinese-CLIP text (BERT)
def bert_caption_flops(hf_model, hf_tokenizer, captions: list[str], context_length: int = 52) -> int:
    """Total FLOPs of ``captions`` through a transformers ChineseCLIPModel's ``get_text_features``, each caption
    run alone at its own token length ([CLS] ... [SEP], at most ``context_length``), as ``caption_flops``."""
    encoded = hf_tokenizer(captions, truncation=True, max_length=context_length)["input_ids"]
    lengths = Counter(len(ids) for ids in encoded)
    total = 0
    for length, count in lengths.items():
        ids = torch.full((1, length), 2769)  # any word piece
        ids[0, 0], ids[0, -1] = hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id
        total += count * count_flops(hf_model.get_text_features, input_ids=ids, attention_mask=torch.ones_like(ids))
    return total
