"""EVA-02 and Perception Encoder image towers: fastclip (cpu backend) against open_clip eager, same weights,
same input, calls interleaved (the figure to quote on a shared machine).

    pytest bench/bench_eva.py -s

Each case builds the open_clip model with random weights, saves its state dict, loads it with
``fastclip.load``, checks the image features (fp32 max-abs <= fastclip.tolerance.UPSTREAM_ATOL) and then times
both, round after round, printing the medians and fastclip's speed-up. Every op runs the C++ kernels (rotary
embeddings inside the attention kernel; bench/bench_rotary.py compares that with the unfused op).
"""
import statistics
import time

import open_clip
import pytest
import safetensors.torch
import torch

import fastclip
from fastclip.tolerance import UPSTREAM_ATOL

CASES = [("EVA02-B-16", 1), ("EVA02-B-16", 8), ("PE-Core-B-16", 1), ("PE-Core-B-16", 8)]
ROUNDS = 3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            built.clear()
            torch.manual_seed(0)
            theirs = open_clip.create_model(name, pretrained=None).eval()
            path = tmp_path_factory.mktemp("eva") / f"{name}.safetensors"
            safetensors.torch.save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
            built[name] = theirs, fastclip.load(name, pretrained=path, backend="cpu")
        return built[name]

    return get


@pytest.mark.parametrize("name, batch", CASES)
def test_image_tower(pairs, name, batch):
    theirs, ours = pairs(name)
    size = ours.cfg.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        err = (ours.encode_image(pixels) - theirs.encode_image(pixels)).abs().max().item()
        assert err <= UPSTREAM_ATOL, f"{name}: fastclip differs from open_clip by {err:.2e}"
        times: dict[str, list[float]] = {"fastclip": [], "open_clip": []}
        for _ in range(ROUNDS):
            for impl, fn in (("fastclip", ours.encode_image), ("open_clip", theirs.encode_image)):
                start = time.perf_counter()
                fn(pixels)
                times[impl].append(time.perf_counter() - start)
    ours_s, theirs_s = (statistics.median(times[i]) for i in ("fastclip", "open_clip"))
    print(f"\n{name} batch {batch}: fastclip {ours_s * 1e3:.0f} ms, open_clip {theirs_s * 1e3:.0f} ms, "
          f"speed-up {theirs_s / ours_s:.2f}x (max-abs {err:.1e}, {torch.get_num_threads()} threads)")
