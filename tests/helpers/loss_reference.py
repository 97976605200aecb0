"""Shared by the loss tests: the dense float64 reference, one runner for every implementation (loss and
all gradients), and the relative error they are compared by."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import loss as oc_loss

from fastclip.loss import ClipLoss, SigLipLoss


def dense_reference(kind, img, txt, scale, bias):
    """Dense losses written out from their definitions (independent of open_clip); run in float64."""
    logits = scale * img @ txt.T + (bias if kind == "siglip" else 0.0)
    n = img.shape[0]
    if kind == "clip":
        labels = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    signs = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / n


def run(kind, impl, img0, txt0, scale0, bias0, dtype=torch.float32, block=None, device=None):
    """Loss and gradients (as float64, on the CPU) of one implementation on inputs cast to ``dtype`` (and moved
    to ``device``, if given).

    impl: "fastclip" (torch tiles), "triton" (Triton tiles), "open_clip" (dense) or "float64" (dense_reference).
    """
    img = img0.to(device=device, dtype=dtype).clone().requires_grad_()
    txt = txt0.to(device=device, dtype=dtype).clone().requires_grad_()
    scale = torch.tensor(scale0, dtype=dtype, device=img.device, requires_grad=True)
    bias = torch.tensor(bias0, dtype=dtype, device=img.device, requires_grad=True)
    if impl in ("fastclip", "triton"):
        backend = "torch" if impl == "fastclip" else "triton"
        loss = (ClipLoss(block_size=block, backend=backend)(img, txt, scale) if kind == "clip"
                else SigLipLoss(block_size=block, backend=backend)(img, txt, scale, bias))
    elif impl == "open_clip":
        loss = oc_loss.ClipLoss()(img, txt, scale) if kind == "clip" else oc_loss.SigLipLoss()(img, txt, scale, bias)
    else:
        loss = dense_reference(kind, img, txt, scale, bias)
    loss.backward()
    out = {"loss": loss, "d_image": img.grad, "d_text": txt.grad, "d_logit_scale": scale.grad}
    if kind == "siglip":
        out["d_logit_bias"] = bias.grad
    return {k: v.detach().double().cpu() for k, v in out.items()}


def rel_err(a, ref):
    """max-abs error / max-abs of the reference value."""
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
