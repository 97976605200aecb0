"""Blockwise ClipLoss / SigLipLoss (fastclip.loss) against OpenCLIP's dense losses and a float64 dense
reference: the loss and every gradient (both feature matrices, logit_scale, logit_bias).

Errors are measured relative to the largest magnitude of the float64 value (max-abs error / max-abs
value), and fastclip's error must stay within LOSS_FP32_FACTOR (2) x OpenCLIP's own fp32 error plus
LOSS_FP32_FLOOR (fastclip/tolerance.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip import loss as oc_loss

from fastclip import tolerance
from fastclip.loss import ClipLoss, LossInputError, SigLipLoss, clip_loss, siglip_loss
from helpers.loss_reference import rel_err, run

ROOT = Path(__file__).resolve().parents[1]


def features(n, d, normalized, seed):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    txt = txt + 0.5 * img  # paired rows are more alike than the rest, as after some training
    if normalized:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img, txt


# (N, D, block, normalised, logit_scale): every N in {1, 7, 1000, 4096} and D in {64, 512, 768}; blocks
# that do not divide N; unnormalised features; OpenCLIP's initial (1/0.07) and maximal (100) scales.
CASES = [
    (1, 64, None, True, 14.3),
    (7, 512, 3, False, 0.05),
    (7, 64, 4096, True, 100.0),
    (1000, 64, 333, True, 100.0),
    (1000, 768, 256, False, 0.03),
    (4096, 768, 1500, True, 14.3),
]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("n,d,block,normalized,scale", CASES)
def test_matches_open_clip_and_float64(kind, n, d, block, normalized, scale):
    img, txt = features(n, d, normalized, seed=n + d)
    bias = -10.0 if normalized else -2.0
    ours = run(kind, "fastclip", img, txt, scale, bias, block=block)
    oc = run(kind, "open_clip", img, txt, scale, bias)
    ref = run(kind, "float64", img, txt, scale, bias, dtype=torch.float64)
    for key in ref:
        err, oc_err = rel_err(ours[key], ref[key]), rel_err(oc[key], ref[key])
        if kind == "clip" and n == 1:  # one pair: the loss is the constant 0 (up to fp32 rounding)
            assert ours[key].abs().max() < tolerance.ZERO_LOSS_ATOL, (key, ours[key])
            continue
        limit = tolerance.loss_fp32_bound(oc_err)
        assert err <= limit, f"{kind} {key}: rel err {err:.2e} vs float64 > {limit:.2e} (open_clip {oc_err:.2e})"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_extreme_logits_stay_exact(kind):
    """Rows and columns whose logits span far more than fp32 exp's range (unnormalised, large scale).
    Logits reach ~4e3 here, so fp32 rounds each exponent by up to ~2.4e-4: open_clip's error is ~1e-5."""
    img, txt = features(300, 64, normalized=False, seed=3)
    img[:50] *= 20.0  # some rows dominate every column
    ours = run(kind, "fastclip", img, txt, 3.0, -5.0, block=128)
    ref = run(kind, "float64", img, txt, 3.0, -5.0, dtype=torch.float64)
    for key in ref:
        assert rel_err(ours[key], ref[key]) < tolerance.EXTREME_LOGITS_REL, key


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(kind, dtype):
    img, txt = features(200, 64, normalized=True, seed=5)
    img, txt = img.to(dtype).float(), txt.to(dtype).float()  # the values the low dtype can hold
    low = run(kind, "fastclip", img, txt, 14.3, -10.0, dtype=dtype, block=64)
    ref = run(kind, "float64", img, txt, 14.3, -10.0, dtype=torch.float64)
    for key in ref:  # only the rounding of the returned gradient
        assert rel_err(low[key], ref[key]) < tolerance.rounding_rel(dtype), key


def test_gradient_dtypes_and_shapes():
    img = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    scale = torch.ones(1, requires_grad=True)  # shape (1,) is accepted too
    bias = torch.zeros((), dtype=torch.float16, requires_grad=True)
    loss = SigLipLoss(block_size=4)(img, txt, scale, bias)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert img.grad.dtype == torch.bfloat16 and txt.grad.dtype == torch.bfloat16
    assert scale.grad.shape == (1,) and bias.grad.dtype == torch.float16


def test_clip_bias_and_output_dict_and_plain_float_scale():
    img, txt = features(50, 32, normalized=True, seed=7)
    bias = torch.tensor(3.0, requires_grad=True)
    out = ClipLoss(block_size=16)(img, txt, 10.0, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    ref = oc_loss.ClipLoss()(img, txt, torch.tensor(10.0))
    assert rel_err(out["contrastive_loss"].detach().double(), ref.double()) <= tolerance.LOSS_BACKEND_REL[torch.float32]
    out["contrastive_loss"].backward()
    assert bias.grad == 0  # softmax is shift-invariant
    ours, oc_siglip = siglip_loss(img, txt, 10.0, -5.0), oc_loss.SigLipLoss()(img, txt, 10.0, -5.0)
    assert rel_err(ours.double(), oc_siglip.double()) <= tolerance.LOSS_BACKEND_REL[torch.float32]


def test_no_grad_and_partial_requires_grad():
    img, txt = features(20, 8, normalized=True, seed=8)
    img.requires_grad_()
    loss = clip_loss(img, txt, torch.tensor(5.0))  # only the image features need a gradient
    loss.backward()
    assert img.grad is not None and txt.grad is None
    with torch.no_grad():
        assert not clip_loss(img, txt, 5.0).requires_grad


@pytest.mark.parametrize("args,match", [
    ((torch.randn(4, 8), torch.randn(5, 8), 1.0), "same shape"),
    ((torch.randn(4, 8), torch.randn(4, 9), 1.0), "same shape"),
    ((torch.randn(0, 8), torch.randn(0, 8), 1.0), "N = 0"),
    ((torch.randn(4), torch.randn(4), 1.0), "2-D"),
    ((torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), 1.0), "dtype"),
    ((torch.randint(0, 3, (4, 8)), torch.randint(0, 3, (4, 8)), 1.0), "dtype"),
    ((torch.full((4, 8), float("nan")), torch.randn(4, 8), 1.0), "non-finite"),
    ((torch.randn(4, 8), torch.full((4, 8), float("inf")), 1.0), "non-finite"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.tensor(float("inf"))), "non-finite"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.ones(2)), "scalar"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.ones(1, 1)), "scalar"),
    ((torch.randn(4, 8), torch.randn(4, 8, device="meta"), 1.0), "meta"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.ones((), device="meta")), "meta"),
    (([[1.0]], torch.randn(1, 1), 1.0), "torch.Tensor"),
])
@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_input_errors(args, match, loss_cls):
    with pytest.raises(LossInputError, match=match):
        loss_cls()(*args, 0.0) if loss_cls is SigLipLoss else loss_cls()(*args)


def test_more_input_errors():
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(LossInputError, match="logit_bias"):
        SigLipLoss()(img, txt, 1.0, None)
    with pytest.raises(LossInputError, match="logit_bias"):
        SigLipLoss()(img, txt, 1.0, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="dtype"):
        ClipLoss()(img, txt, torch.tensor(1, dtype=torch.int64))
    with pytest.raises(LossInputError, match="world_size"):
        ClipLoss(world_size=2)(img, txt, 1.0)
    with pytest.raises(LossInputError, match="local_loss"):
        ClipLoss(local_loss=True)
    with pytest.raises(LossInputError, match="gather_with_grad"):
        ClipLoss(gather_with_grad=False)
    with pytest.raises(LossInputError, match="block_size"):
        ClipLoss(block_size=0)


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from fastclip.loss import ClipLoss, SigLipLoss
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    n, d, kind = {n}, {d}, {kind!r}
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    scale, bias = torch.tensor(14.3, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    # warm up the allocator and MKL on a small problem, then take the baseline
    ClipLoss()(img[:64], txt[:64], scale).backward(); img.grad = txt.grad = scale.grad = None
    base = hwm()
    loss = ClipLoss()(img, txt, scale) if kind == "clip" else SigLipLoss()(img, txt, scale, bias)
    loss.backward()
    print(hwm() - base)
""")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_peak_memory_is_not_quadratic(kind):
    """N = 12288, D = 256: one N x N fp32 matrix is 576 MiB; the blockwise loss adds a few N x D
    matrices (12 MiB each) and two tile buffers."""
    n, d = 12288, 256
    script = PEAK_SCRIPT.format(root=str(ROOT), n=n, d=d, kind=kind)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.split()[-1])
    assert extra < 150 * 2**20, f"peak extra memory {extra / 2**20:.0f} MiB (N x N would be {n * n * 4 / 2**20:.0f})"


def test_example_training_loss_falls():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_tiny_clip
    finally:
        sys.path.remove(str(ROOT / "bench"))
    losses = train_tiny_clip.train(steps=12, batch=128, log_every=0, block_size=50)
    assert losses[-1] < 0.7 * losses[0], losses
