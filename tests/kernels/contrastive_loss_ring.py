"""Worker of test_contrastive_loss.py's ring test: 2 gloo processes, each with a shard of one batch, run
ClipLoss / SigLipLoss with the Triton and the torch tile backends (fp32 and fp16 features) and save
every rank's loss and gradients. Kept apart from the test module so the spawned processes import only
torch and fastclip (TRITON_INTERPRET=1 is set for them by the test)."""
import torch
import torch.distributed as dist

WORLD, N_LOCAL, DIM = 2, 40, 32


def _run(kind, backend, img, txt, dtype, weight):
    from fastclip.loss import ClipLoss, SigLipLoss

    img, txt = img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()
    scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    loss = (ClipLoss(backend=backend)(img, txt, scale) if kind == "clip"
            else SigLipLoss(backend=backend)(img, txt, scale, bias))
    (loss * weight).backward()  # ranks weight their losses differently: the gradient sums are checked too
    return [loss.detach(), img.grad, txt.grad, scale.grad] + ([bias.grad] if kind == "siglip" else [])


def worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    g = torch.Generator().manual_seed(9)
    img = torch.randn(WORLD * N_LOCAL, DIM, generator=g) / 3  # unnormalised, logits of a few units
    txt = torch.randn(WORLD * N_LOCAL, DIM, generator=g) / 3 + 0.5 * img
    shard = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    out = {}
    for kind in ("clip", "siglip"):
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
            for backend in ("triton", "torch"):
                out[kind, name, backend] = _run(kind, backend, img[shard], txt[shard], dtype, float(rank + 1))
    torch.save(out, f"{result_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
