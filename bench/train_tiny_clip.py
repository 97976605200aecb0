"""Train a tiny CLIP on synthetic image/caption pairs with fastclip.loss.ClipLoss as a drop-in for
open_clip.loss.ClipLoss (same call: features, features, exponentiated logit_scale).

    python bench/train_tiny_clip.py [--steps 50] [--batch 256]

Each synthetic "concept" has a random image prototype (3x16x16) and a random 8-token caption; a pair is
a noisy view of one concept's image and its caption with some tokens replaced. The loss falls as the two
towers learn to align the concepts. Runs in a few seconds on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastclip.loss import ClipLoss  # noqa: E402

VOCAB, CTX, CONCEPTS, EMBED = 1000, 8, 512, 64


class TinyClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 256), nn.GELU(), nn.Linear(256, EMBED))
        self.token_embedding = nn.EmbeddingBag(VOCAB, 128, mode="mean")
        self.text = nn.Sequential(nn.GELU(), nn.Linear(128, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    def forward(self, images, tokens):
        img = F.normalize(self.visual(images), dim=-1)
        txt = F.normalize(self.text(self.token_embedding(tokens)), dim=-1)
        return img, txt, self.logit_scale.exp()


class SyntheticPairs:
    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(CONCEPTS, 3, 16, 16, generator=self.g)
        self.captions = torch.randint(0, VOCAB, (CONCEPTS, CTX), generator=self.g)

    def batch(self, size: int):
        ids = torch.randperm(CONCEPTS, generator=self.g)[:size]  # distinct concepts: one positive per row
        images = self.prototypes[ids] + 0.5 * torch.randn(size, 3, 16, 16, generator=self.g)
        tokens = self.captions[ids].clone()
        noise = torch.rand(size, CTX, generator=self.g) < 0.2
        tokens[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=self.g)
        return images, tokens


def train(steps: int = 50, batch: int = 256, lr: float = 3e-3, seed: int = 0, log_every: int = 5,
          block_size: int | None = None) -> list[float]:
    torch.manual_seed(seed)
    model, data = TinyClip(), SyntheticPairs(seed)
    loss_fn = ClipLoss(block_size=block_size)  # open_clip.loss.ClipLoss() takes the same arguments
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        images, tokens = data.batch(batch)
        loss = loss_fn(*model(images, tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # as OpenCLIP: logit_scale <= 100
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  logit_scale {model.logit_scale.exp().item():.2f}")
    return losses


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()
    train(a.steps, a.batch, a.lr)
