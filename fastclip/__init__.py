"""fastclip: a fused-kernel runtime for CLIP, OpenCLIP and SigLIP embedding models.

    model = fastclip.load("ViT-B-32", pretrained="laion2b_s34b_b79k")
    vectors = model.embed_images(["cat.jpg", "dog.png"])      # (2, 512) float32, L2-normalised
"""
from . import loss
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    FastclipError,
    ImageLoadError,
    ItemError,
    UnknownModelError,
)
from .loading.factory import create_model, get_tokenizer, load
from .loading.hub import list_pretrained
from .models.clip import CLIP
from .models.config import add_model_config, get_model_config, list_models
from .version import __version__

__all__ = [
    "CLIP", "loss", "load", "create_model", "get_tokenizer", "list_models", "list_pretrained", "add_model_config",
    "get_model_config", "FastclipError", "CheckpointError", "UnknownModelError", "BackendUnavailableError",
    "ItemError", "ImageLoadError", "__version__",
]
