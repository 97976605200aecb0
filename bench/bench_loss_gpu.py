"""Contrastive losses on a GPU: fastclip's Triton tiles vs OpenCLIP's dense ClipLoss / SigLipLoss.

    pytest bench/bench_loss_gpu.py --benchmark-group-by=group --benchmark-columns=median,rounds

Forward + backward of the loss on (N, D) image and text features, fp16 and bf16, D = 768, N = 4096,
16384 and 32768 (one GPU). OpenCLIP materialises the N x N logits (and their gradient); at the larger N
it may not fit, which is recorded as ``open_clip_error``. Numbers of record (``extra_info``, see
``gpu_bench.record``): do_bench medians per implementation and TFLOP/s on the tile FLOPs the Triton
path executes (5 passes of 2·N²·D: forward, and a recompute plus a gradient product in each of the two
backward launches). Before timing, the loss and the image gradient are checked against the fp32 dense
loss on a slice of the batch. Without a CUDA device the module skips at collection.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the Triton contrastive-loss kernels need a GPU (their numerics are "
                "tests/kernels/test_contrastive_loss.py under TRITON_INTERPRET=1)", allow_module_level=True)

from open_clip import loss as oc_loss  # noqa: E402

import gpu_bench as gb  # noqa: E402
from fastclip.loss import ClipLoss, SigLipLoss  # noqa: E402

DIM = 768


def _step(loss_fn, kind, img, txt, scale, bias):
    def fn():
        for t in (img, txt, scale, bias):
            t.grad = None
        loss = loss_fn(img, txt, scale) if kind == "clip" else loss_fn(img, txt, scale, bias)
        loss.backward()
        return loss
    return fn


def _inputs(n, dtype):
    g = torch.Generator(device="cuda").manual_seed(n)
    img = torch.nn.functional.normalize(torch.randn(n, DIM, device="cuda", generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + torch.randn(n, DIM, device="cuda", generator=g), dim=-1)
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_(), scale, bias


@pytest.mark.parametrize("dtype", gb.dtype_params())
@pytest.mark.parametrize("n", [4096, 16384, 32768])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss(benchmark, kind, n, dtype):
    benchmark.group = f"{kind} loss forward + backward: N={n} D={DIM}"
    ours_fn = ClipLoss(backend="triton") if kind == "clip" else SigLipLoss(backend="triton")
    dense_fn = oc_loss.ClipLoss() if kind == "clip" else oc_loss.SigLipLoss()
    with gb.skip_if_oom(benchmark.group):
        img, txt, scale, bias = _inputs(n, dtype)
        # output check on the first 512 pairs against the fp32 dense loss (numerics proper: tests/kernels)
        part = [t.detach()[:512].clone().requires_grad_() for t in (img, txt)]
        ours = _step(ours_fn, kind, *part, scale, bias)()
        d_ours = part[0].grad.float()
        ref = [t.detach().float().requires_grad_() for t in part]
        expected = _step(dense_fn, kind, *ref, scale, bias)()
        torch.testing.assert_close(ours, expected.float(), atol=gb.low_precision_atol(dtype), rtol=1e-2)
        torch.testing.assert_close(d_ours, ref[0].grad, atol=gb.low_precision_atol(dtype), rtol=1e-2)
        flops = 5 * 2 * n * n * DIM
        nbytes = 2 * n * DIM * img.element_size() * 2  # features read, their gradients written
        gb.record(benchmark, _step(ours_fn, kind, img, txt, scale, bias),
                  {"open_clip": _step(dense_fn, kind, img, txt, scale, bias)}, flops, nbytes, rep=200)
