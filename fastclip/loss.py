"""``fastclip.loss``: the documented import path of the contrastive losses (they live in fastclip/losses/).

    from fastclip.loss import ClipLoss, SigLipLoss
"""
from .losses import BACKENDS, DEFAULT_BLOCK_SIZE, ClipLoss, LossInputError, SigLipLoss, clip_loss, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss", "clip_loss", "siglip_loss", "LossInputError", "DEFAULT_BLOCK_SIZE", "BACKENDS"]
