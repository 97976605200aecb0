"""Batch embedding API mixed into the model: images/texts in, L2-normalised float32 numpy out."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import ItemError

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class EmbedResult:
    """Result of ``embed_images`` / ``embed_texts`` with ``on_error="skip"``.

    embeddings: (K, E) float32, L2-normalised, for the K items that worked, in input order;
    indices: (K,) positions of those items in the input; errors: one ItemError per skipped item.
    """

    embeddings: np.ndarray
    indices: np.ndarray
    errors: list = field(default_factory=list)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _chunks(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="item")


class EmbeddingMixin:
    """Adds embed_images / embed_texts / classify to a model with encode_image/encode_text,
    a ``preprocess`` (fastclip.preprocess.Preprocess) and a ``tokenizer``."""

    def _finish(self, parts, indices, errors, n: int, on_error: str):
        dim = self.cfg.embed_dim
        emb = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        if on_error == "raise":
            return emb
        return EmbedResult(emb, np.asarray(indices, dtype=np.int64), errors)

    def embed_images(self, items: Sequence, batch_size: int = 32, progress: bool = False, on_error: str = "raise"):
        """Embed images given as paths, PIL images, encoded bytes or arrays.

        Returns (N, E) float32 L2-normalised rows in input order. A bad item raises an ItemError naming
        it; with ``on_error="skip"`` bad items are skipped and an EmbedResult (embeddings, indices,
        errors) is returned instead. Decoding/resizing of the next batch overlaps the current encode.
        """
        _check_on_error(on_error)
        if self.preprocess is None:
            raise RuntimeError("this model has no preprocess; create it with fastclip.load / create_model")
        items = list(items)
        spans = _chunks(len(items), batch_size)
        parts, kept, errors = [], [], []

        def prepare(span):
            start, stop = span
            pixels, idx, errs = self.preprocess.batch(items[start:stop], on_error=on_error, index_offset=start)
            return pixels, [start + i for i in idx], errs

        with ThreadPoolExecutor(max_workers=1) as prefetch, _progress(len(items), progress, "images") as bar:
            pending = prefetch.submit(prepare, spans[0]) if spans else None
            for i, span in enumerate(spans):
                pixels, idx, errs = pending.result()
                pending = prefetch.submit(prepare, spans[i + 1]) if i + 1 < len(spans) else None
                errors.extend(errs)
                if idx:
                    with torch.inference_mode():
                        emb = self.encode_image(pixels.to(self.dtype), normalize=True)
                    parts.append(emb.float().cpu().numpy())
                    kept.extend(idx)
                bar.update(span[1] - span[0])
        return self._finish(parts, kept, errors, len(items), on_error)

    def _check_texts(self, texts: Sequence, on_error: str):
        good, idx, errors = [], [], []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                err = ItemError(f"expected a str, got {type(text).__name__}", index=i)
            elif not text.strip():
                err = ItemError("empty text", index=i, item=text)
            else:
                good.append(text)
                idx.append(i)
                continue
            if on_error == "raise":
                raise err
            errors.append(err)
        return good, idx, errors

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False, on_error: str = "raise"):
        """Embed texts: (N, E) float32 L2-normalised in input order (see embed_images for on_error)."""
        _check_on_error(on_error)
        if isinstance(texts, str):
            raise TypeError("embed_texts expects a sequence of strings; wrap a single text in a list")
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; create it with fastclip.load / create_model")
        good, idx, errors = self._check_texts(list(texts), on_error)
        parts = []
        with _progress(len(good), progress, "texts") as bar:
            for start, stop in _chunks(len(good), batch_size):
                tokens = self.tokenizer(good[start:stop])
                with torch.inference_mode():
                    parts.append(self.encode_text(tokens, normalize=True).float().cpu().numpy())
                bar.update(stop - start)
        return self._finish(parts, idx, errors, len(texts), on_error)

    def classifier_weights(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """Zero-shot class embeddings with prompt ensembling: (C, E), each the renormalised mean of its
        label's template embeddings."""
        templates = tuple(templates) if templates else DEFAULT_TEMPLATES
        if not labels:
            raise ValueError("classify needs at least one label")
        for t in templates:
            if "{}" not in t and "{c}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' placeholder for the label")
        prompts = [t.replace("{c}", "{}").format(label) for label in labels for t in templates]
        emb = self.embed_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)  # (C, E)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

    def classify(self, images: Sequence, labels: Sequence[str], templates: Sequence[str] | None = None,
                 batch_size: int = 32) -> np.ndarray:
        """Zero-shot probabilities (N, C): softmax over labels for CLIP, per-label sigmoid for SigLIP."""
        weights = torch.from_numpy(self.classifier_weights(labels, templates))  # (C, E)
        image_emb = torch.from_numpy(self.embed_images(images, batch_size=batch_size))  # (N, E)
        with torch.inference_mode():
            logits = self.logit_scale.detach().float().cpu() * image_emb @ weights.T  # (N, C)
            if self.logit_bias is not None:
                return torch.sigmoid(logits + self.logit_bias.detach().float().cpu()).numpy()
            return torch.softmax(logits, dim=-1).numpy()
