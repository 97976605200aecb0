"""Tiled math of the blockwise contrastive losses, and the two tile backends ``fastclip.loss`` drives.

Every function here streams tiles of the logit matrix ``L = img_s @ txt.T`` (``img_s`` = image features
already multiplied by ``logit_scale``) of at most ``block x block`` elements through one reused buffer:
the N x N matrix never exists. Each tile costs one GEMM of ``block x D x block``; the element-wise work
on it is a handful of in-place passes. The callers (``fastclip.loss``) own the autograd, the ring
exchange between processes and the scaling of the results.

All tensors are float32 (the callers upcast) and contiguous.

``TorchTiles`` (these functions: plain PyTorch, any device) and ``TritonTiles`` (the Triton kernels of
``fastclip.kernels.contrastive_loss`` / ``contrastive_loss_bwd``: CUDA, or CPU under TRITON_INTERPRET=1)
bind the image side of a block pair once and expose the same four tile operations to ``fastclip.loss``.
"""
from __future__ import annotations

import importlib

import torch

from ..backends.dispatch import triton_interpret
from ..errors import BackendUnavailableError

# exp() of arguments below ~-87 gives float32 denormals, and x86 handles those in microcode: exp_ and the
# GEMMs fed with such tiles run 5-50x slower. Arguments are clamped at _EXP_FLOOR first, so a tile holds
# exp(-80) ~ 1.8e-35 instead of a denormal or 0: an absolute change of < 1e-34 per entry, invisible next
# to the row/column sums (>= 1: each is shifted by its own max) and in the gradients.
_EXP_FLOOR = -80.0


def tiles(n: int, block: int):
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def _view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous rows x cols view at the start of a flat buffer."""
    return buf[: rows * cols].view(rows, cols)


def _buffer(n_rows: int, n_cols: int, block: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(min(block, n_rows) * min(block, n_cols), dtype=torch.float32, device=like.device)


# ---------------------------------------------------------------- InfoNCE (CLIP)
def _diagonal(i0: int, i1: int, j0: int, j1: int, offset: int):
    """Rows r in [i0, i1) whose diagonal column r + offset is in [j0, j1): (local rows, tile rows, tile cols)."""
    lo, hi = max(i0, j0 - offset), min(i1, j1 - offset)
    if lo >= hi:
        return None
    rows = torch.arange(lo, hi)
    return rows, rows - i0, rows + offset - j0


def split64(x: torch.Tensor):
    """float64 -> (hi, lo) float32 with hi + lo == x to ~1e-14: exp(L - x) = exp((L - hi) - lo) keeps
    fp32 accuracy where L is close to x (the confident pairs), which exp(L - float32(x)) would not."""
    hi = x.to(torch.float32)
    return hi, (x - hi.double()).to(torch.float32)


def clip_lse_(img_s: torch.Tensor, txt: torch.Tensor, lse_row: torch.Tensor, lse_col: torch.Tensor,
              block: int, diag: torch.Tensor | None = None, diag_offset: int = 0) -> None:
    """Fold the row and column log-sum-exp of ``img_s @ txt.T`` into ``lse_row`` (len n_img) and
    ``lse_col`` (len n_txt), both float64, in place, from the same tile pass. If ``diag`` is given,
    ``diag[r] = logits[r, r + diag_offset]`` (float64 of the very fp32 values the tiles hold)."""
    n_i, n_t = img_s.shape[0], txt.shape[0]
    buf = _buffer(n_i, n_t, block, img_s)
    buf2 = _buffer(n_i, n_t, block, img_s)
    for i0, i1 in tiles(n_i, block):
        img_blk = img_s[i0:i1]
        for j0, j1 in tiles(n_t, block):
            logits = torch.matmul(img_blk, txt[j0:j1].t(), out=_view(buf, i1 - i0, j1 - j0))
            if diag is not None:
                hit = _diagonal(i0, i1, j0, j1, diag_offset)
                if hit is not None:
                    diag[hit[0]] = logits[hit[1], hit[2]].double()
            row_max, col_max = logits.amax(dim=1), logits.amax(dim=0)
            probs = torch.sub(logits, row_max[:, None], out=_view(buf2, i1 - i0, j1 - j0))
            row_lse = probs.clamp_min_(_EXP_FLOOR).exp_().sum(dim=1, dtype=torch.float64).log_().add_(row_max)
            probs = logits.sub_(col_max[None, :]).clamp_min_(_EXP_FLOOR).exp_()   # logits are gone
            col_lse = probs.sum(dim=0, dtype=torch.float64).log_().add_(col_max)
            torch.logaddexp(lse_row[i0:i1], row_lse, out=lse_row[i0:i1])
            torch.logaddexp(lse_col[j0:j1], col_lse, out=lse_col[j0:j1])


def clip_grad_(img_s: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, lse_row: torch.Tensor,
               lse_col: torch.Tensor, d_img: torch.Tensor, d_txt: torch.Tensor, block: int,
               alpha_img: float = 1.0, alpha_txt: float = 1.0, diag_offset: int | None = None) -> None:
    """Recompute the tiles of ``L = img_s @ txt.T`` and with ``G = exp(L - lse_row) + exp(L - lse_col)``
    (row-softmax plus column-softmax; lse float64) minus 2 on the diagonal ``(r, r + diag_offset)`` if
    ``diag_offset`` is given, accumulate ``d_img += alpha_img * G @ txt`` and ``d_txt += alpha_txt * G.T @ img``.
    The diagonal entries are set to expm1(L - lse_row) + expm1(L - lse_col), exact for confident pairs."""
    n_i, n_t = img_s.shape[0], txt.shape[0]
    buf = _buffer(n_i, n_t, block, img_s)
    buf2 = _buffer(n_i, n_t, block, img_s)
    row_hi, row_lo = split64(lse_row)
    col_hi, col_lo = split64(lse_col)
    col_scale = col_lo.neg().exp_()
    for i0, i1 in tiles(n_i, block):
        img_blk_s, img_blk = img_s[i0:i1], img[i0:i1]
        for j0, j1 in tiles(n_t, block):
            txt_blk = txt[j0:j1]
            logits = torch.matmul(img_blk_s, txt_blk.t(), out=_view(buf, i1 - i0, j1 - j0))
            hit = None if diag_offset is None else _diagonal(i0, i1, j0, j1, diag_offset)
            if hit is not None:
                rows, ti, tj = hit
                l_diag = logits[ti, tj].double()
                g_diag = torch.expm1(l_diag - lse_row[rows]) + torch.expm1(l_diag - lse_col[rows + diag_offset])
            grad = torch.sub(logits, row_hi[i0:i1, None], out=_view(buf2, i1 - i0, j1 - j0))
            grad.sub_(row_lo[i0:i1, None]).clamp_min_(_EXP_FLOOR).exp_()
            grad.addcmul_(logits.sub_(col_hi[None, j0:j1]).clamp_min_(_EXP_FLOOR).exp_(), col_scale[None, j0:j1])
            if hit is not None:
                grad[ti, tj] = g_diag.to(torch.float32)
            d_img[i0:i1].addmm_(grad, txt_blk, alpha=alpha_img)
            d_txt[j0:j1].addmm_(grad.t(), img_blk, alpha=alpha_txt)


# ---------------------------------------------------------------- sigmoid (SigLIP)
def siglip_softplus_sum(img_s: torch.Tensor, txt: torch.Tensor, bias: torch.Tensor, block: int,
                        diag_offset: int | None = None) -> torch.Tensor:
    """sum_ij softplus(z_ij), z = img_s[i] . txt[j] + bias, in float64; on the diagonal (r, r + diag_offset),
    if given, the positives' softplus(-z) = -log sigmoid(z) instead."""
    n_i, n_t = img_s.shape[0], txt.shape[0]
    buf = _buffer(n_i, n_t, block, img_s)
    buf2 = _buffer(n_i, n_t, block, img_s)
    total = torch.zeros((), dtype=torch.float64, device=img_s.device)
    for i0, i1 in tiles(n_i, block):
        img_blk = img_s[i0:i1]
        for j0, j1 in tiles(n_t, block):
            z = torch.matmul(img_blk, txt[j0:j1].t(), out=_view(buf, i1 - i0, j1 - j0)).add_(bias)
            hit = None if diag_offset is None else _diagonal(i0, i1, j0, j1, diag_offset)
            if hit is not None:
                z[hit[1], hit[2]] = z[hit[1], hit[2]].neg()
            sp = torch._C._nn.softplus(z.clamp_min_(_EXP_FLOOR), 1, 20, out=_view(buf2, i1 - i0, j1 - j0))
            total += sp.sum(dtype=torch.float64)
    return total


def siglip_grad_blocks_(img_s: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, bias: torch.Tensor,
                        d_img: torch.Tensor, d_txt: torch.Tensor, block: int, alpha_img: float = 1.0,
                        alpha_txt: float = 1.0, diag_offset: int | None = None) -> torch.Tensor:
    """With ``G = sigmoid(img_s @ txt.T + bias)`` minus 1 on the diagonal ``(r, r + diag_offset)`` (if
    given; computed there as -sigmoid(-z), exact for confident positives) tile by tile:
    ``d_img += alpha_img * G @ txt``, ``d_txt += alpha_txt * G.T @ img``; returns ``G.sum()`` (float64)."""
    n_i, n_t = img_s.shape[0], txt.shape[0]
    buf = _buffer(n_i, n_t, block, img_s)
    total = torch.zeros((), dtype=torch.float64, device=img_s.device)
    for i0, i1 in tiles(n_i, block):
        img_blk_s, img_blk = img_s[i0:i1], img[i0:i1]
        for j0, j1 in tiles(n_t, block):
            txt_blk = txt[j0:j1]
            grad = torch.matmul(img_blk_s, txt_blk.t(), out=_view(buf, i1 - i0, j1 - j0)).add_(bias)
            hit = None if diag_offset is None else _diagonal(i0, i1, j0, j1, diag_offset)
            if hit is not None:
                g_diag = torch.sigmoid(grad[hit[1], hit[2]].neg()).neg_()
            grad.clamp_min_(_EXP_FLOOR).sigmoid_()
            if hit is not None:
                grad[hit[1], hit[2]] = g_diag
            total += grad.sum(dtype=torch.float64)
            d_img[i0:i1].addmm_(grad, txt_blk, alpha=alpha_img)
            d_txt[j0:j1].addmm_(grad.t(), img_blk, alpha=alpha_txt)
    return total


# ---------------------------------------------------------------- tile backends (image side bound once)
class TorchTiles:
    """The blocked torch GEMMs above, over float32 copies of the features (any device).

    ``img``: (n, D) features as ``operand`` returns them; ``scale`` / ``bias``: fp32 scalar tensors."""

    name = "torch"

    def __init__(self, img: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, block: int):
        self.img, self.bias, self.block = img, bias, block
        self.img_s = img * scale

    @staticmethod
    def operand(t: torch.Tensor) -> torch.Tensor:
        """The features as this backend streams them (and sends around the ring): float32, contiguous."""
        return t.detach().to(torch.float32).contiguous()

    def clip_lse_(self, txt, lse_row, lse_col, diag=None) -> None:
        clip_lse_(self.img_s, txt, lse_row, lse_col, self.block, diag=diag)

    def clip_grad_(self, txt, lse_row, lse_col, d_img, d_txt, diag_offset=None) -> None:
        clip_grad_(self.img_s, self.img, txt, lse_row, lse_col, d_img, d_txt, self.block, diag_offset=diag_offset)

    def siglip_softplus_sum(self, txt, diag_offset=None) -> torch.Tensor:
        return siglip_softplus_sum(self.img_s, txt, self.bias, self.block, diag_offset)

    def siglip_grad_(self, txt, d_img, d_txt, alpha_txt, diag_offset=None) -> torch.Tensor:
        return siglip_grad_blocks_(self.img_s, self.img, txt, self.bias, d_img, d_txt, self.block,
                                   alpha_txt=alpha_txt, diag_offset=diag_offset)


class TritonTiles:
    """The Triton kernels on the features in their own dtype (fp32/fp16/bf16 tiles, fp32 accumulation);
    their own tile sizes replace ``block``."""

    name = "triton"

    def __init__(self, img: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, block: int):
        from ..kernels import contrastive_loss, contrastive_loss_bwd

        self.fwd, self.bwd = contrastive_loss, contrastive_loss_bwd
        self.img, self.scale, self.bias = img, scale, bias

    @staticmethod
    def operand(t: torch.Tensor) -> torch.Tensor:
        """The features as this backend streams them: their own dtype, contiguous."""
        return t.detach().contiguous()

    def clip_lse_(self, txt, lse_row, lse_col, diag=None) -> None:
        self.fwd.clip_lse_(self.img, txt, self.scale, lse_row, lse_col, diag=diag)

    def clip_grad_(self, txt, lse_row, lse_col, d_img, d_txt, diag_offset=None) -> None:
        self.bwd.clip_grad_(self.img, txt, self.scale, lse_row, lse_col, d_img, d_txt, diag_offset=diag_offset)

    def siglip_softplus_sum(self, txt, diag_offset=None) -> torch.Tensor:
        return self.fwd.siglip_softplus_sum(self.img, txt, self.scale, self.bias, diag_offset)

    def siglip_grad_(self, txt, d_img, d_txt, alpha_txt, diag_offset=None) -> torch.Tensor:
        return self.bwd.siglip_grad_blocks_(self.img, txt, self.scale, self.bias, d_img, d_txt,
                                            alpha_txt=alpha_txt, diag_offset=diag_offset)


# ---------------------------------------------------------------- choosing a backend
def _why_triton_unavailable(device: torch.device) -> str | None:
    """The Triton tiles run on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 (tests)."""
    interpret = device.type == "cpu" and triton_interpret()
    if device.type != "cuda" and not interpret:
        hint = " (set TRITON_INTERPRET=1 to run it on CPU tensors for testing)" if device.type == "cpu" else ""
        return f"the triton loss kernels need CUDA tensors, the features are on {device}{hint}"
    try:
        kernels = importlib.import_module("fastclip.kernels.contrastive_loss")
    except ImportError as exc:
        return f"triton kernels are unavailable ({exc})"
    if interpret and not kernels.INTERPRETED:
        return ("TRITON_INTERPRET=1 was set after the Triton kernels were imported (Triton fixes interpreted vs "
                "compiled at import); set it before importing fastclip.kernels")
    return None


def tiles_for(backend: str, device: torch.device):
    """TorchTiles or TritonTiles for ``backend`` ("auto", "torch" or "triton") and features on ``device``.
    "auto" picks Triton for CUDA tensors if it can run; an explicit "triton" that cannot raises."""
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return TorchTiles
    reason = _why_triton_unavailable(device)
    if backend == "triton":
        if reason is not None:
            raise BackendUnavailableError(f"backend 'triton' was requested but cannot run: {reason}")
        return TritonTiles
    return TorchTiles if reason is not None else TritonTiles
