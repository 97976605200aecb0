"""The fastclip model: an image and a text tower (built by type, fastclip/models/registry.py) over one op
table, with OpenCLIP's encode API."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..backends import int8 as quant
from ..backends.dispatch import get_ops, resolve_backend
from ..embed import EmbeddingMixin
from .config import ModelConfig
from .registry import ImageTower, TextTower, build_tower


class CLIP(EmbeddingMixin, nn.Module):
    """A CLIP / OpenCLIP / SigLIP dual encoder.

    ``encode_image`` (B, 3, S, S) -> (B, E) and ``encode_text`` (B, L) -> (B, E) mean what OpenCLIP's
    do. ``logit_scale`` is already exponentiated; ``logit_bias`` is None for CLIP. ``tokenizer`` and
    ``preprocess`` are set by ``fastclip.load`` / ``fastclip.create_model``.
    """

    def __init__(self, cfg: ModelConfig, backend: str = "ref"):
        super().__init__()
        self.cfg = cfg
        self.visual: ImageTower = build_tower("vision", cfg.vision, cfg.embed_dim)
        self.text: TextTower = build_tower("text", cfg.text, cfg.embed_dim)
        self.log_logit_scale = nn.Parameter(torch.empty(()))
        self.logit_bias = nn.Parameter(torch.empty(1)) if cfg.family == "siglip" else None
        self.int8_weights = None  # a fastclip.backends.int8.Int8Weights once the model runs in int8
        self.set_backend(backend)
        self.tokenizer = None
        self.tokenizer_missing: str | None = None  # why there is no tokenizer, and how to add one (if known)
        self.preprocess = None

    # ------------------------------------------------------------------ backend
    def set_backend(self, backend: str | None = "auto") -> CLIP:
        """Resolve ``backend`` for the model's current device and use it from now on (an int8 model keeps
        its int8 linear layers; int8 runs on the CPU with ``cpu`` or ``ref`` only, else ValueError)."""
        device = self.device if self._has_storage() else "cpu"
        if self.int8_weights is not None:
            quant.check_int8(device, backend)
        name = resolve_backend(backend, device)
        ops = get_ops(name)
        if self.int8_weights is not None:
            quant.check_int8(device, name)
            ops = quant.int8_ops(ops, self.int8_weights)
        self.backend, self.ops = name, ops
        return self

    def _has_storage(self) -> bool:
        return not self.log_logit_scale.is_meta

    @property
    def device(self) -> torch.device:
        return self.log_logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.log_logit_scale.dtype  # cast with every other parameter by .to(dtype)

    @property
    def precision(self) -> str:
        """"int8" (int8 linear layers, fp32 elsewhere), or the parameters' dtype: "fp32", "fp16", "bf16"."""
        if self.int8_weights is not None:
            return "int8"
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))

    def extra_repr(self) -> str:
        return (f"name={self.cfg.name!r}, family={self.cfg.family!r}, backend={self.backend!r}, "
                f"precision={self.precision!r}")

    # ------------------------------------------------------------------ OpenCLIP API
    @property
    def logit_scale(self) -> torch.Tensor:
        """exp of the learned log temperature (what OpenCLIP's training code multiplies logits by)."""
        return self.log_logit_scale.exp()

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """pixels: (B, 3, S, S) float, preprocessed -> (B, E) in the model's dtype."""
        return self.visual.apply_op(pixels.to(self.device), self.ops, normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens: (B, L) int64 from ``model.tokenizer`` -> (B, E) in the model's dtype."""
        return self.text.apply_op(tokens.to(self.device), self.ops, normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """As OpenCLIP: (image_features, text_features, logit_scale[, logit_bias]), features normalised."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale, self.logit_bias
        return image_features, text_features, self.logit_scale

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_random(self, seed: int | None = None) -> CLIP:
        """Random weights in OpenCLIP's initialisation scheme (for tests and benchmarks)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)  # gains 1, biases 0 (BatchNorm statistics: 0 / 1)
        norm_gains = {id(m.weight) for m in self.modules() if isinstance(m, norms) and m.weight is not None}
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.reset_running_stats()
        for name, p in self.named_parameters():
            if id(p) in norm_gains:
                p.fill_(1.0)
            elif p.ndim == 1 and name.endswith("bias"):
                p.zero_()
            elif p.ndim >= 1:
                std = p.shape[-1] ** -0.5 if name.endswith(("proj", "text_projection")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        self.log_logit_scale.fill_(math.log(10.0 if self.cfg.family == "siglip" else 1 / 0.07))
        if self.logit_bias is not None:
            self.logit_bias.fill_(self.cfg.init_logit_bias if self.cfg.init_logit_bias is not None else -10.0)
        return self
