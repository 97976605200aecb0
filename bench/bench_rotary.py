"""Rotary embeddings fused into the attention kernel against the unfused rotary op, whole EVA02-B-16 image
tower (cpu backend), same weights, same input, calls interleaved (the figure to quote on a shared machine).

    pytest bench/bench_rotary.py -s

Variants, all on the C++ kernels but for the last: ``fused`` (the default: ``attention(rotary=...)`` rotates
each query block and each head's keys as the kernel loads them), ``unfused`` (the C++ ``rotary`` op on q and
on k, one pass each into new buffers, then the attention kernel) and ``reference`` (``fastclip.ref.rotary``,
then the attention kernel: what ran before either existed). The embeddings of all three are checked equal
(fp32 max-abs <= fastclip.tolerance.SAME_MODEL_ATOL); each round times every variant once, and the medians
and the ratios to ``fused`` are printed.
"""
import dataclasses
import statistics
import time

import pytest
import torch

import fastclip
from fastclip import ref
from fastclip.backends.cpu import ops as cpu_ops
from fastclip.tolerance import SAME_MODEL_ATOL

ROUNDS = 5


def _rotating_first(rotate):
    """An attention op that rotates q and k with ``rotate`` (a rotary op), then attends without rotary."""
    def attention(q, k, v, causal=False, upcast=False, key_mask=None, rotary=None):
        if rotary is not None:
            q, k = (ref.rotary_positions(t, *rotary, op=rotate) for t in (q, k))
        return cpu_ops.attention(q, k, v, causal=causal, upcast=upcast, key_mask=key_mask)
    return attention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastclip.create_model("EVA02-B-16", backend="cpu")


@pytest.mark.parametrize("batch", [1, 8])
def test_fused_against_unfused(model, batch):
    fused = model.ops
    variants = {"fused": fused,
                "unfused": dataclasses.replace(fused, attention=_rotating_first(cpu_ops.rotary)),
                "reference": dataclasses.replace(fused, attention=_rotating_first(ref.rotary))}
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))

    def encode(ops):
        model.ops = ops
        try:
            with torch.inference_mode():
                return model.encode_image(pixels)
        finally:
            model.ops = fused

    want = encode(fused)
    for name, ops in variants.items():
        assert (encode(ops) - want).abs().max().item() <= SAME_MODEL_ATOL, name
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, ops in variants.items():
            start = time.perf_counter()
            encode(ops)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nEVA02-B-16 images, batch {batch}, {torch.get_num_threads()} threads: "
          + ", ".join(f"{n} {m * 1e3:.1f} ms ({m / med['fused']:.3f}x fused)" for n, m in med.items()))
