"""Shared fixtures for the benchmarks: one set of random ViT-B-32 weights in every implementation."""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FASTCLIP_BENCH_THREADS", os.cpu_count() or 1)))


def rate(benchmark, items: int) -> None:
    """Record items/s (from the mean round time) beside pytest-benchmark's timings."""
    benchmark.extra_info["items"] = items
    benchmark.extra_info["items_per_s"] = round(items / benchmark.stats.stats.mean, 2)


@pytest.fixture(scope="session")
def vit_b32():
    """(open_clip model, fastclip model, transformers model), eval mode; fastclip shares open_clip's weights
    and uses the backend FASTCLIP_BACKEND names (default: auto)."""
    import open_clip
    import transformers

    import fastclip
    from fastclip import keymaps
    from fastclip.factory import _attach_io, _build

    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-32-quickgelu").eval()
    cfg = fastclip.get_model_config("ViT-B-32-quickgelu")
    fc = _attach_io(_build(cfg, keymaps.from_openclip(dict(oc.state_dict())), "open_clip", "cpu", "fp32", None), None)
    hf = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # the default config is ViT-B/32
    return oc, fc, hf
