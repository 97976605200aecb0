"""fastclip.loss across 2 gloo processes on CPU: each rank holds a shard of the global batch.

In the same processes, compared with OpenCLIP's distributed losses (ClipLoss(gather_with_grad=True),
SigLipLoss with each dist_impl) and with the single-process blockwise loss on the concatenated batch:
* ClipLoss: every rank returns the global loss; its shard's feature gradients are (sum over ranks of
  grad_output) x d(global loss)/d(shard), as OpenCLIP's all-gather backward (a reduce-scatter sum) gives.
* SigLipLoss: each rank's loss is its images against all texts / its image count; the text gradients of
  every rank's loss reach the texts' owner.
Ranks backpropagate different grad_outputs (rank + 1) so that the summation semantics are checked too.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastclip import tolerance

WORLD = 2
N_LOCAL, DIM, BLOCK = 150, 64, 64  # the block divides neither the shard nor the global batch


def global_batch():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(WORLD * N_LOCAL, DIM, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(WORLD * N_LOCAL, DIM, generator=g), dim=-1)
    return img, txt


def run_loss(loss_fn, kind, img, txt, weight):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = loss_fn(img, txt, scale) if kind == "clip" else loss_fn(img, txt, scale, bias)
    (loss * weight).backward()
    out = [loss.detach(), img.grad, txt.grad, scale.grad]
    return out + ([bias.grad] if kind == "siglip" else [])


def worker(rank, init_file, result_file):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from open_clip import loss as oc_loss

    from fastclip.loss import ClipLoss, SigLipLoss

    img, txt = global_batch()
    shard = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    weight = float(rank + 1)
    results = {}
    for kind in ("clip", "siglip"):
        ours_fn = ClipLoss(block_size=BLOCK) if kind == "clip" else SigLipLoss(block_size=BLOCK)
        results[kind, "fastclip"] = run_loss(ours_fn, kind, img[shard], txt[shard], weight)
        peers = ([("open_clip", oc_loss.ClipLoss(gather_with_grad=True, rank=rank, world_size=WORLD))]
                 if kind == "clip" else
                 [(f"open_clip {impl}", oc_loss.SigLipLoss(rank=rank, world_size=WORLD, dist_impl=impl))
                  for impl in ("bidir", "shift", "gather")])
        for name, fn in peers:
            results[kind, name] = run_loss(fn, kind, img[shard], txt[shard], weight)
    torch.save(results, f"{result_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp / "result")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"result.{r}") for r in range(WORLD)]


def close(a, b, what):
    torch.testing.assert_close(a, b, **tolerance.LOSS_DISTRIBUTED, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_open_clip_distributed(per_rank, kind):
    for rank, res in enumerate(per_rank):
        peers = [k for k in res if k[0] == kind and k[1] != "fastclip"]
        assert peers
        for peer in peers:
            for i, (ours, ref) in enumerate(zip(res[kind, "fastclip"], res[peer], strict=True)):
                close(ours, ref, f"rank {rank} {kind} vs {peer[1]} output {i}")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_single_process_on_concatenated_batch(per_rank, kind):
    from fastclip.loss import ClipLoss

    img, txt = global_batch()
    weights = [float(r + 1) for r in range(WORLD)]
    if kind == "clip":
        loss, d_img, d_txt, d_scale = run_loss(ClipLoss(block_size=BLOCK), kind, img, txt, 1.0)
        d_img_all = torch.cat([res[kind, "fastclip"][1] for res in per_rank])
        d_txt_all = torch.cat([res[kind, "fastclip"][2] for res in per_rank])
        for r, res in enumerate(per_rank):
            close(res[kind, "fastclip"][0], loss, "global loss")
            close(res[kind, "fastclip"][3], weights[r] * d_scale, "logit_scale grad")
        close(d_img_all, sum(weights) * d_img, "image grads")
        close(d_txt_all, sum(weights) * d_txt, "text grads")
    else:
        # rank r's loss = its image rows against all texts / N_LOCAL
        total = 0.0
        d_txt_expected = torch.zeros_like(txt)
        for r, res in enumerate(per_rank):
            shard = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
            img_r = img[shard].clone().requires_grad_()
            txt_all = txt.clone().requires_grad_()
            scale, bias = torch.tensor(14.3, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
            logits = scale * img_r @ txt_all.T + bias
            labels = -torch.ones_like(logits)
            labels[torch.arange(N_LOCAL), torch.arange(N_LOCAL) + r * N_LOCAL] = 1
            loss_r = -torch.nn.functional.logsigmoid(labels * logits).sum() / N_LOCAL
            (weights[r] * loss_r).backward()
            close(res[kind, "fastclip"][0], loss_r.detach(), f"rank {r} loss")
            close(res[kind, "fastclip"][1], img_r.grad, f"rank {r} image grads")
            close(res[kind, "fastclip"][3], scale.grad, f"rank {r} logit_scale grad")
            close(res[kind, "fastclip"][4], bias.grad, f"rank {r} logit_bias grad")
            d_txt_expected += txt_all.grad
            total += loss_r.item()
        close(torch.cat([res[kind, "fastclip"][2] for res in per_rank]), d_txt_expected, "text grads")
