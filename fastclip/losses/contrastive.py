"""Blockwise contrastive losses: OpenCLIP's ``ClipLoss`` and ``SigLipLoss`` without the N x N matrix.

    from fastclip.loss import ClipLoss, SigLipLoss
    loss = ClipLoss()(image_features, text_features, logit_scale)                 # InfoNCE, symmetric
    loss = SigLipLoss()(image_features, text_features, logit_scale, logit_bias)   # sigmoid loss

Same arguments, values and gradients as ``open_clip.loss.ClipLoss`` / ``SigLipLoss`` (``logit_scale`` is
already exponentiated). Tiles of the logit matrix are streamed (``fastclip.losses.blocks``): the forward
pass accumulates the row and column log-sum-exp (InfoNCE) or the softplus sum (SigLIP) from one tile
pass; the backward pass recomputes each tile once and feeds both feature gradients from it. Memory is
O(N·D) + O(block²); only the features, the log-sum-exps and the scalars are saved for backward.
Compute is float32 (fp16 / bf16 inputs are upcast; their gradients are returned in their dtype).

Backends (``backend=``): ``"torch"`` runs the tiles as blocked torch GEMMs on float32 copies (any device);
``"triton"`` runs the Triton kernels of ``fastclip.kernels.contrastive_loss`` on the features in their own
dtype (fp16/bf16 tiles on tensor cores, fp32 accumulation; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` for tests). ``"auto"`` (default) picks Triton for CUDA tensors when it is
installed, the torch path otherwise; an explicit ``"triton"`` that cannot run raises
``BackendUnavailableError``.

Multi-process (``torch.distributed`` initialised, world size > 1): each rank passes its shard. Text
blocks travel rank to rank around a ring (``batch_isend_irecv``), never all-gathered; the backward pass
sends each text block's gradient accumulator along with it, so it arrives home after one lap.

* ``ClipLoss`` = OpenCLIP's ``ClipLoss(gather_with_grad=True, local_loss=False)``: every rank returns the
  loss of the global batch; a rank's feature gradients are ``sum over ranks of grad_output`` times the
  global loss's gradient w.r.t. its shard (what OpenCLIP's all-gather backward, a reduce-scatter sum,
  gives; DDP's averaging of parameter gradients then yields the exact global gradient).
* ``SigLipLoss`` = OpenCLIP's ``SigLipLoss`` (any ``dist_impl``, they agree): each rank returns the loss
  of its images against all texts (positives only on its own diagonal) divided by its number of images;
  the text gradients of every rank's loss flow back to the texts' owner.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FastclipError
from . import blocks as loss_blocks

__all__ = ["ClipLoss", "SigLipLoss", "clip_loss", "siglip_loss", "LossInputError", "DEFAULT_BLOCK_SIZE", "BACKENDS"]

# 1024 x 1024 tiles (4 MiB, two live at once) keep the element-wise passes in the L2/L3 caches while the
# 1024 x D x 1024 GEMMs still run near MKL's sgemm rate on 2 cores (measured fastest of 1024/2048/4096).
DEFAULT_BLOCK_SIZE = 1024
_ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "torch", "triton")


class LossInputError(FastclipError, ValueError):
    """Features / scales given to a loss have the wrong shape, dtype, device or values."""


class LossDtypeError(LossInputError, TypeError):
    """A loss input has a dtype other than float32, float16 or bfloat16."""


# ---------------------------------------------------------------- input checks
def _as_scalar(value, name: str, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LossInputError(f"{name} must be a scalar tensor or a number, got {type(value).__name__}")
        value = torch.tensor(float(value), device=like.device)
    if value.numel() != 1 or value.dim() > 1:
        raise LossInputError(f"{name} must be a scalar (shape () or (1,)), got shape {tuple(value.shape)}")
    if value.dtype not in _ACCEPTED_DTYPES:
        raise LossDtypeError(f"{name} has dtype {value.dtype}; expected one of float32, float16, bfloat16")
    if value.device != like.device:
        raise LossInputError(f"{name} is on {value.device} but the features are on {like.device}")
    return value


def _check(image_features, text_features, logit_scale, logit_bias, check_finite: bool, bias_name: str):
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise LossInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise LossInputError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.dtype not in _ACCEPTED_DTYPES:
            raise LossDtypeError(f"{name} has dtype {t.dtype}; expected one of float32, float16, bfloat16 "
                                 "(the loss computes in float32)")
    if image_features.shape != text_features.shape:
        raise LossInputError(f"image_features {tuple(image_features.shape)} and text_features "
                             f"{tuple(text_features.shape)} must have the same shape (paired rows)")
    if image_features.shape[0] == 0:
        raise LossInputError("the batch is empty (N = 0): a contrastive loss needs at least one pair")
    if image_features.shape[1] == 0:
        raise LossInputError("the feature dimension is 0")
    if image_features.device != text_features.device:
        raise LossInputError(f"image_features are on {image_features.device} but text_features on "
                             f"{text_features.device}")
    scale = _as_scalar(logit_scale, "logit_scale", image_features)
    bias = None if logit_bias is None else _as_scalar(logit_bias, bias_name, image_features)
    if check_finite:
        for name, t in (("image_features", image_features), ("text_features", text_features),
                        ("logit_scale", scale), (bias_name, bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise LossInputError(f"{name} contains non-finite values (inf or nan)")
    return scale, bias


# ---------------------------------------------------------------- process group / ring
class _Ring:
    """This process's place in the group; text blocks move to the right neighbour each step."""

    def __init__(self, group=None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        else:
            self.world, self.rank = 1, 0

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def start_shift(self, tensor: torch.Tensor, tag: int = 0):
        """Send ``tensor`` to the right neighbour, receive the left one's; returns (received, requests).
        Text blocks use tag 0 and gradient accumulators tag 1, so the two streams never cross."""
        recv = torch.empty_like(tensor)
        right = self._global((self.rank + 1) % self.world)
        left = self._global((self.rank - 1) % self.world)
        ops = [dist.P2POp(dist.isend, tensor, right, group=self.group, tag=tag),
               dist.P2POp(dist.irecv, recv, left, group=self.group, tag=tag)]
        return recv, dist.batch_isend_irecv(ops)

    def shift(self, tensor: torch.Tensor, tag: int = 1) -> torch.Tensor:
        recv, reqs = self.start_shift(tensor, tag)
        for r in reqs:
            r.wait()
        return recv

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group)
        return tensor

    def lap(self, txt: torch.Tensor):
        """Yield (step, owner rank, text block) for the W blocks, prefetching the next one during the step."""
        current, owner = txt, self.rank
        for step in range(self.world):
            pending = None
            if step < self.world - 1:
                pending = self.start_shift(current)
            yield step, owner, current
            if pending is not None:
                for r in pending[1]:
                    r.wait()
                current, owner = pending[0], (owner - 1) % self.world


def _check_world(ring: _Ring, rank: int | None, world_size: int | None) -> None:
    if world_size is not None and world_size != ring.world:
        if world_size > 1 and ring.world == 1:
            raise LossInputError(f"world_size={world_size} but torch.distributed is not initialised")
        raise LossInputError(f"world_size={world_size} but the process group has {ring.world} processes")
    if rank is not None and rank != ring.rank:
        raise LossInputError(f"rank={rank} but this process is rank {ring.rank} of its group")


# ---------------------------------------------------------------- backend
def _check_backend(backend) -> str:
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise LossInputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend.lower()


def _tiles(backend: str, device: torch.device):
    """The tile backend class (fastclip.losses.blocks.TorchTiles / TritonTiles) for features on ``device``."""
    return loss_blocks.tiles_for(_check_backend(backend), device)


# ---------------------------------------------------------------- InfoNCE
class _ClipLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias, block, ring, tiles_cls):
        img, txt = tiles_cls.operand(image_features), tiles_cls.operand(text_features)
        scale = logit_scale.detach().to(torch.float32).reshape(())
        n = img.shape[0]
        big_n = n * ring.world
        tiles = tiles_cls(img, scale, None, block)
        f64 = dict(dtype=torch.float64, device=img.device)
        lse_row = torch.full((n,), -math.inf, **f64)
        lse_col = torch.full((big_n,), -math.inf, **f64)  # partial: this rank's rows only
        diag = torch.empty(n, **f64)  # this rank's diagonal logits, as the tiles hold them
        for _, owner, txt_blk in ring.lap(txt):
            tiles.clip_lse_(txt_blk, lse_row, lse_col[owner * n:(owner + 1) * n],
                            diag=diag if owner == ring.rank else None)
        if ring.world > 1:  # log-sum-exp over ranks of the column partials
            col_max = ring.all_reduce(lse_col.clone(), dist.ReduceOp.MAX)
            lse_col = ring.all_reduce((lse_col - col_max).exp_()).log_().add_(col_max)
        own_cols = lse_col[ring.rank * n:(ring.rank + 1) * n]
        # sum of (lse - diagonal logit) per row and per column; a constant bias cancels in both
        local = ring.all_reduce(torch.stack([(lse_row - diag).sum(), (own_cols - diag).sum()]))
        loss = (local[0] + local[1]) / (2 * big_n)
        ctx.save_for_backward(img, txt, scale, lse_row, lse_col)
        ctx.meta = (block, ring, tiles_cls, image_features.dtype, text_features.dtype, logit_scale.dtype,
                    logit_scale.shape)
        ctx.bias_like = None if logit_bias is None else (logit_bias.dtype, logit_bias.shape)
        return loss.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        img, txt, scale, lse_row, lse_col = ctx.saved_tensors
        block, ring, tiles_cls, img_dtype, txt_dtype, scale_dtype, scale_shape = ctx.meta
        n = img.shape[0]
        big_n = n * ring.world
        g = grad_loss.detach().to(torch.float32).reshape(())
        g_total = ring.all_reduce(g.clone().reshape(1))[0]  # OpenCLIP: reduce-scatter SUM of all ranks' grads
        s = float(scale)
        tiles = tiles_cls(img, scale, None, block)
        f32 = dict(dtype=torch.float32, device=img.device)
        d_img = torch.zeros(img.shape, **f32)   # sum_j G_ij txt_j  (G = P_row + P_col, unscaled)
        d_txt = torch.zeros(txt.shape, **f32)   # accumulator that travels with the text block
        current, owner = txt, ring.rank
        for step in range(ring.world):
            pending = ring.start_shift(current) if step < ring.world - 1 else None
            tiles.clip_grad_(current, lse_row, lse_col[owner * n:(owner + 1) * n], d_img, d_txt,
                             diag_offset=0 if owner == ring.rank else None)
            if ring.world > 1:
                d_txt = ring.shift(d_txt)   # after the last step it is back with its owner
            if pending is not None:
                for r in pending[1]:
                    r.wait()
                current, owner = pending[0], (owner - 1) % ring.world
        # dL/dlogits = (P_row + P_col - 2 I) / 2N; with S = img @ txt.T, dL/dscale = sum(dL/dlogits * S)
        d_img.mul_(1.0 / (2 * big_n))
        d_txt.mul_(1.0 / (2 * big_n))
        d_scale = ring.all_reduce((img.float() * d_img).sum(dtype=torch.float64).reshape(1))[0]
        grad_img = (d_img.mul_(g_total * s)).to(img_dtype) if ctx.needs_input_grad[0] else None
        grad_txt = (d_txt.mul_(g_total * s)).to(txt_dtype) if ctx.needs_input_grad[1] else None
        grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = (g * d_scale).to(scale_dtype).reshape(scale_shape)
        grad_bias = None
        if ctx.needs_input_grad[3]:  # a constant shift of all logits leaves the softmaxes unchanged
            dtype, shape = ctx.bias_like
            grad_bias = torch.zeros(shape, dtype=dtype, device=img.device)
        return grad_img, grad_txt, grad_scale, grad_bias, None, None, None


# ---------------------------------------------------------------- sigmoid
class _SigLipLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias, block, ring, tiles_cls):
        img, txt = tiles_cls.operand(image_features), tiles_cls.operand(text_features)
        scale = logit_scale.detach().to(torch.float32).reshape(())
        bias = logit_bias.detach().to(torch.float32).reshape(())
        n = img.shape[0]
        tiles = tiles_cls(img, scale, bias, block)
        total = torch.zeros((), dtype=torch.float64, device=img.device)
        for step, _, txt_blk in ring.lap(txt):  # positives (own diagonal) are counted as softplus(-z)
            total += tiles.siglip_softplus_sum(txt_blk, 0 if step == 0 else None)
        loss = total / n
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.meta = (block, ring, tiles_cls, image_features.dtype, text_features.dtype, logit_scale.dtype,
                    logit_scale.shape, logit_bias.dtype, logit_bias.shape)
        return loss.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):
        img, txt, scale, bias = ctx.saved_tensors
        block, ring, tiles_cls, img_dtype, txt_dtype, scale_dtype, scale_shape, bias_dtype, bias_shape = ctx.meta
        n = img.shape[0]
        g = float(grad_loss)
        s = float(scale)
        tiles = tiles_cls(img, scale, bias, block)
        f32 = dict(dtype=torch.float32, device=img.device)
        d_img = torch.zeros(img.shape, **f32)
        d_txt = torch.zeros(txt.shape, **f32)   # travels with the text block; each rank adds its own loss's share
        alpha_txt = g * s / n
        sig_sum = torch.zeros((), dtype=torch.float64, device=img.device)
        current = txt
        for step in range(ring.world):
            pending = ring.start_shift(current) if step < ring.world - 1 else None
            sig_sum += tiles.siglip_grad_(current, d_img, d_txt, alpha_txt, diag_offset=0 if step == 0 else None)
            if ring.world > 1:
                d_txt = ring.shift(d_txt)
            if pending is not None:
                for r in pending[1]:
                    r.wait()
                current = pending[0]
        d_img.mul_(1.0 / n)            # dL/dz = (sigmoid(z) - [positive]) / n
        grad_img = d_img.mul(g * s).to(img_dtype) if ctx.needs_input_grad[0] else None
        grad_txt = d_txt.to(txt_dtype) if ctx.needs_input_grad[1] else None
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_scale = (g * (img.float() * d_img).sum(dtype=torch.float64)).to(scale_dtype).reshape(scale_shape)
        if ctx.needs_input_grad[3]:
            grad_bias = (g * sig_sum / n).to(bias_dtype).reshape(bias_shape)
        return grad_img, grad_txt, grad_scale, grad_bias, None, None, None


# ---------------------------------------------------------------- functional API
def _block(block_size) -> int:
    block = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if block < 1:
        raise LossInputError(f"block_size must be >= 1, got {block_size}")
    return block


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, block_size=None, group=None,
              check_finite: bool = True, backend: str = "auto") -> torch.Tensor:
    """Symmetric InfoNCE of OpenCLIP's ClipLoss, blockwise (see the module docstring for multi-process and
    ``backend``)."""
    scale, bias = _check(image_features, text_features, logit_scale, logit_bias, check_finite, "logit_bias")
    tiles_cls = _tiles(backend, image_features.device)
    return _ClipLossFn.apply(image_features, text_features, scale, bias, _block(block_size), _Ring(group), tiles_cls)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, block_size=None, group=None,
                check_finite: bool = True, backend: str = "auto") -> torch.Tensor:
    """OpenCLIP's SigLipLoss, blockwise (see the module docstring for multi-process and ``backend``)."""
    if logit_bias is None:
        raise LossInputError("SigLipLoss needs logit_bias (a scalar); pass 0.0 for none")
    scale, bias = _check(image_features, text_features, logit_scale, logit_bias, check_finite, "logit_bias")
    tiles_cls = _tiles(backend, image_features.device)
    return _SigLipLossFn.apply(image_features, text_features, scale, bias, _block(block_size), _Ring(group), tiles_cls)


# ---------------------------------------------------------------- modules (drop-in for open_clip.loss)
class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss`` with ``gather_with_grad=True, local_loss=False`` semantics.

    ``rank`` / ``world_size`` default to the initialised process group (or 0 / 1); if given they must match
    it. ``block_size`` is the tile edge (rows of image and text features per GEMM) of the torch backend;
    ``backend`` is "auto", "torch" or "triton" (module docstring)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, cache_labels: bool = False,
                 rank: int | None = None, world_size: int | None = None, use_horovod: bool = False, *,
                 block_size: int | None = None, group=None, check_finite: bool = True, backend: str = "auto"):
        super().__init__()
        if local_loss:
            raise LossInputError("local_loss=True is not supported: fastclip's ClipLoss computes the global "
                                 "loss without gathering features (OpenCLIP local_loss=False)")
        if not gather_with_grad:
            raise LossInputError("gather_with_grad=False is not supported: gradients always flow through all "
                                 "ranks' features (OpenCLIP gather_with_grad=True)")
        if use_horovod:
            raise LossInputError("horovod is not supported; use torch.distributed")
        self.rank, self.world_size, self.group = rank, world_size, group
        self.block_size, self.check_finite = _block(block_size), check_finite
        self.backend = _check_backend(backend)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        _check_world(_Ring(self.group), self.rank, self.world_size)
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, block_size=self.block_size,
                         group=self.group, check_finite=self.check_finite, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss`` (labels +1 on the diagonal, -1 elsewhere; the sum of
    -log sigmoid(label * (scale * i.t + bias)) divided by the number of image rows). ``dist_impl`` is
    accepted for compatibility; every choice gives the same loss and gradients. ``block_size`` and
    ``backend`` as for ``ClipLoss``."""

    def __init__(self, cache_labels: bool = False, rank: int | None = None, world_size: int | None = None,
                 dist_impl: str | None = None, *, block_size: int | None = None, group=None,
                 check_finite: bool = True, backend: str = "auto"):
        super().__init__()
        if (dist_impl or "bidir") not in ("bidir", "shift", "reduce", "gather"):
            raise LossInputError(f"unknown dist_impl {dist_impl!r}")
        self.rank, self.world_size, self.group = rank, world_size, group
        self.block_size, self.check_finite = _block(block_size), check_finite
        self.backend = _check_backend(backend)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        _check_world(_Ring(self.group), self.rank, self.world_size)
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, block_size=self.block_size,
                           group=self.group, check_finite=self.check_finite, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
