"""Blockwise contrastive losses (``ClipLoss``, ``SigLipLoss``) that never build the N x N logit matrix.

``contrastive.py`` holds the losses (autograd functions, the ring across ranks), ``blocks.py`` the
tile passes they run (blocked torch GEMMs, or the Triton kernels of ``fastclip.kernels``).
"""
from .contrastive import BACKENDS, DEFAULT_BLOCK_SIZE, ClipLoss, LossInputError, SigLipLoss, clip_loss, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss", "clip_loss", "siglip_loss", "LossInputError", "DEFAULT_BLOCK_SIZE", "BACKENDS"]
