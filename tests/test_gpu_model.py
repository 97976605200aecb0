"""The roofline model (bench/gpu_model.py) against independent counts.

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` counts every matmul / conv the reference backend
  runs in ``encode_image`` / ``encode_text`` of a tiny model; the model's GEMM + attention FLOPs for the
  same config must equal it exactly (the ref attention computes full L x L scores even when causal, so
  the triton path's useful causal FLOPs are the dense count minus the masked half).
- Attention tiles: the model's tile table mirrors ``kernels/attention.py::configs_for``; the executed
  scores of two hand-counted cases match the ones quoted in docs/gpu.md.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastclip.models.clip import CLIP
from fastclip.models.config import parse_config
from fastclip.models.tiny import TINY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


gm = sys.modules.get("fastclip_bench_gpu_model") or _load("fastclip_bench_gpu_model", ROOT / "bench" / "gpu_model.py")

TINY = parse_config("tiny-clip", TINY_CONFIGS["tiny-clip"])  # fastclip/models/tiny.py
BATCH = 3


@pytest.fixture(scope="module")
def tiny_model():
    return CLIP(TINY, backend="ref").init_random(0).eval()


def _counted(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _tensor_work(ops) -> float:
    """GEMM FLOPs (tensor-core work, excluding the head's LayerNorm) + useful attention FLOPs."""
    gemms = sum(op.tensor_flops for op in ops if op.kind == "gemm")
    return gemms + sum(op.flops for op in ops if op.kind == "attention")


def test_image_flops_match_flop_counter(tiny_model):
    S = TINY.vision.image_size
    pixels = torch.randn(BATCH, 3, S, S)
    counted = _counted(lambda: tiny_model.encode_image(pixels))
    assert counted > 0
    assert _tensor_work(gm.vision_ops(TINY.vision, TINY.embed_dim, BATCH, "ref")) == counted
    # the fused path does the same tensor work: non-causal attention wastes nothing in the useful count
    assert _tensor_work(gm.vision_ops(TINY.vision, TINY.embed_dim, BATCH, "triton")) == counted


def test_text_flops_match_flop_counter(tiny_model):
    L, vocab = TINY.text.context_length, TINY.text.vocab_size
    tokens = torch.randint(1, vocab - 1, (BATCH, L))
    tokens[:, -1] = vocab - 1  # the highest id = end of text (argmax pooling): no causal truncation, all L run
    counted = _counted(lambda: tiny_model.encode_text(tokens))
    assert _tensor_work(gm.text_ops(TINY.text, TINY.embed_dim, BATCH, "ref")) == counted
    t = TINY.text
    # the causal mask hides the same scores in every block but the last, trimmed to one query that sees all keys
    masked = 4 * BATCH * t.heads * (t.width // t.heads) * (L * L - L * (L + 1) // 2) * (t.layers - 1)
    assert _tensor_work(gm.text_ops(TINY.text, TINY.embed_dim, BATCH, "triton")) == counted - masked


def test_attention_tiles_mirror_the_kernel_configs():
    try:
        attention = importlib.import_module("fastclip.kernels.attention")
    except ModuleNotFoundError:  # a checkout that is not pip-installed
        attention = _load("fastclip_test_attention_kernel", ROOT / "kernels" / "attention.py")
    for block_d, tiles in gm.ATTN_TILES.items():
        configs = attention.configs_for(False, block_d)
        assert tuple((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs) == tiles, block_d
    for lq in (50, 77, 197):
        for dh in (64, 80):
            configs = attention.configs_for(False, max(16, 1 << (dh - 1).bit_length()), lq)
            assert gm.attention_tiles(dh, lq) == tuple((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs)


def test_executed_scores_hand_counts():
    # causal L=77, 64x64 tiles: query tile 0 sees key tile 0; query tile 1 sees key tiles 0 and 1
    assert gm.executed_scores(77, 77, True, 64, 64) == 3 * 64 * 64
    assert gm.attention_tile(77, 77, 64, True) == (64, 64)
    # ViT-B/16, L=197: 4 x 4 tiles of 64 -> 256 x 256 scores (docs/gpu.md: executed / useful 1.69)
    op = gm.attention(1, 1, 197, 64)
    assert op.tensor_flops / op.flops == pytest.approx(256 * 256 / 197**2)
    # Dh=80 is padded to BLOCK_D=128 in the MMAs
    assert gm.attention(1, 1, 64, 80).tensor_flops == 4 * 128 * 64 * 64
