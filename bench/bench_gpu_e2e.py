"""Whole encoders on a GPU: fastclip backend="triton" vs backend="ref" vs open_clip eager, fp16, batch 256.

    pytest bench/bench_gpu_e2e.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

One set of random weights per architecture: open_clip builds the model (``precision="fp16"``, so its
LayerNorms are LayerNormFp32, as users get it) and fastclip loads that state dict on the same GPU
(the tensors are shared, not copied); fastclip's two backends are the same model with ``set_backend``.
Inputs are fp16 pixels (B, 3, 224, 224) already on the GPU, and token ids of the full 77-token context
(end-of-text in the last position, so fastclip's exact causal truncation removes nothing) or of short
captions (end-of-text at position 15: fastclip runs 16 tokens, open_clip always runs 77).

Each round is one ``encode_image`` / ``encode_text`` call followed by ``torch.cuda.synchronize()``;
``extra_info.items_per_s`` (bench/conftest.py::rate) is images/s or texts/s from the mean round time;
compare rows of one group only. ``extra_info.model_<GPU>_{roofline,expected}_items_per_s`` are the
modelled rates of the same path (bench/gpu_model.py; docs/gpu.md), for the two fastclip backends.
Before timing, fastclip's embeddings are checked against open_clip's (cosine >= 0.99 per row).
Without a CUDA device the module skips at collection.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU end-to-end suite needs one (the CPU suite is bench/bench_e2e.py; "
                "modelled GPU numbers: docs/gpu.md)", allow_module_level=True)

import open_clip  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastclip  # noqa: E402
import gpu_bench as gb  # noqa: E402
import gpu_model as gm  # noqa: E402
from conftest import rate  # noqa: E402
from fastclip.loading import keymaps  # noqa: E402
from fastclip.loading.factory import _build  # noqa: E402

BATCH = 256
IMPLS = ("fastclip-triton", "fastclip-ref", "open_clip")
SOT, EOT = 49406, 49407
# (architecture, tower, text length); ordered so each architecture is built once (one on the GPU at a time)
CASES = [("ViT-B-32", "image", None), ("ViT-B-32", "text", 77), ("ViT-B-32", "text", 16),
         ("ViT-B-16", "image", None), ("ViT-L-14", "image", None), ("ViT-L-14", "text", 77),
         ("ViT-L-14", "text", 16)]
PARAMS = [pytest.param(name, tower, length, impl, id=f"{name}-{tower}{length or ''}-{impl}")
          for name, tower, length in CASES for impl in IMPLS]


@pytest.fixture(scope="module")
def models():
    """get(name) -> (open_clip model, fastclip model) with shared fp16 weights; keeps one architecture."""
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            torch.manual_seed(0)
            oc = open_clip.create_model(name, precision="fp16", device="cuda").eval()
            cfg = fastclip.get_model_config(name)
            fc = _build(cfg, keymaps.from_openclip(dict(oc.state_dict())), "open_clip", "cuda", "fp16", "triton")
            cache[name] = (oc, fc)
        return cache[name]

    return get


def _inputs(cfg, tower, length):
    gen = torch.Generator(device="cuda").manual_seed(0)
    if tower == "image":
        size = cfg.vision.image_size
        return torch.randn(BATCH, 3, size, size, device="cuda", dtype=torch.float16, generator=gen)
    ctx = cfg.text.context_length
    tokens = torch.zeros(BATCH, ctx, dtype=torch.long, device="cuda")
    tokens[:, 1:length - 1] = torch.randint(1, SOT, (BATCH, length - 2), device="cuda", generator=gen)
    tokens[:, 0], tokens[:, length - 1] = SOT, EOT
    return tokens


@pytest.mark.parametrize("name, tower, length, impl", PARAMS)
def test_encoder(benchmark, models, name, tower, length, impl):
    what = f"{name} {tower}" + (f", {length} tokens" if length else "")
    benchmark.group = f"GPU {what}, batch {BATCH}, fp16"
    with gb.skip_if_oom(what), torch.inference_mode():
        oc, fc = models(name)
        x = _inputs(fc.cfg, tower, length)
        oc_fn = oc.encode_image if tower == "image" else oc.encode_text
        if impl == "open_clip":
            fn = oc_fn
        else:
            fc.set_backend(impl.removeprefix("fastclip-"))
            fn = fc.encode_image if tower == "image" else fc.encode_text
            cos = F.cosine_similarity(fn(x).float(), oc_fn(x).float(), dim=-1)
            assert cos.min().item() >= 0.99, f"{impl} vs open_clip: min cosine {cos.min().item():.4f}"

        def synced():
            fn(x)
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=10, warmup_rounds=3)
    rate(benchmark, BATCH)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    if impl != "open_clip":
        path = impl.removeprefix("fastclip-")
        cfg = fc.cfg
        if tower == "image":
            ops = gm.vision_ops(cfg.vision, cfg.embed_dim, BATCH, path)
        else:
            ops = gm.text_ops(cfg.text, cfg.embed_dim, BATCH, path, length=length)
        for gpu in gm.GPUS:
            short = gpu.name.split()[0]
            for eff in (gm.ROOFLINE, gm.EXPECTED):
                benchmark.extra_info[f"model_{short}_{eff.name}_items_per_s"] = round(BATCH / gm.time_of(ops, gpu, eff))
