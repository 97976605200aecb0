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
