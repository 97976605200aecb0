"""Batch embedding API mixed into the model: images/texts in, L2-normalised float32 numpy out."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .data.naflex import pad_sequences
from .data.text_batches import plan_batches
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


def _decoder(method, items: list, on_error: str, raw: bool, max_image_pixels: int | None = None):
    """span -> ``method`` (a preprocess's ``batch`` / ``sequences``) of ``items[start:stop]``, with the kept
    indices made absolute: (prepared, kept indices in ``items``, errors). ``max_image_pixels``: passed on
    (None: the preprocess's own limit)."""
    def prepare(span):
        start, stop = span
        prepared, idx, errs = method(items[start:stop], on_error=on_error, index_offset=start, raw=raw,
                                     max_image_pixels=max_image_pixels)
        return prepared, [start + i for i in idx], errs
    return prepare


def _prefetched(spans: list, prepare):
    """(span, prepare(span)) for each span in turn; the next span is prepared in a thread (image decoding)
    while the caller works on this one. A single span has nothing to overlap and is prepared in the caller's
    thread: no thread is started, and the resize's torch ops run on the caller's OpenMP team instead of
    starting a second one beside the encoder's."""
    if len(spans) == 1:
        yield spans[0], prepare(spans[0])
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, spans[0]) if spans else None
        for i, span in enumerate(spans):
            result = pending.result()
            pending = pool.submit(prepare, spans[i + 1]) if i + 1 < len(spans) else None
            yield span, result


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="item")


class EmbeddingMixin:
    """Adds embed_images / embed_texts / classify to a model with encode_image/encode_text, its towers
    ``visual`` / ``text`` and op table ``ops``, a ``preprocess`` (fastclip.data.preprocess.Preprocess) and a
    ``tokenizer``.

    Two exact speed-ups, on by default (set the attribute to False on a model to compare):
    ``fold_pixel_norm``: images are preprocessed to uint8 levels and the pixel mean/std are folded into
    the patch embedding (fastclip.models.vit.fold_pixel_norm) instead of a float normalise pass;
    ``group_texts_by_length``: texts are sorted by token length before batching (a causal text tower
    runs each batch only up to its longest end-of-text), then put back in input order.
    """

    fold_pixel_norm = True
    group_texts_by_length = True
    text_window_batches = 16  # texts are sorted within windows of this many batches (bounds memory)
    image_window_batches = 8  # NaFlex images are sorted by patch count within windows of this many batches

    def _finish(self, parts, indices, errors, n: int, on_error: str):
        dim = self.cfg.embed_dim
        emb = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        if on_error == "raise":
            return emb
        return EmbedResult(emb, np.asarray(indices, dtype=np.int64), errors)

    def embed_images(self, items: Sequence, batch_size: int = 32, progress: bool = False, on_error: str = "raise",
                     max_image_pixels: int | None = None):
        """Embed images given as paths, PIL images, encoded bytes or arrays.

        Returns (N, E) float32 L2-normalised rows in input order. A bad item raises an ItemError naming
        it; with ``on_error="skip"`` bad items are skipped and an EmbedResult (embeddings, indices,
        errors) is returned instead. Decoding/resizing of the next batch overlaps the current encode.

        Memory: all decode threads (this batch's and the next's) share the preprocess's ``budget``
        (``Preprocess(..., max_inflight_pixels=...)``, default 64 Mi decoded pixels in flight; a larger image
        runs alone). ``max_image_pixels``: images with more pixels are refused from their header, before
        decoding, as an ``ImageLoadError`` naming the size (None: the preprocess's ``max_image_pixels``,
        by default ``fastclip.data.images.DEFAULT_MAX_PIXELS``).
        """
        _check_on_error(on_error)
        if self.preprocess is None:
            raise RuntimeError("this model has no preprocess; create it with fastclip.load / create_model")
        items = list(items)
        if hasattr(self.preprocess, "sequences"):  # NaFlex: patch sequences of each image's own length
            return self._embed_sequences(items, batch_size, progress, on_error, max_image_pixels)
        spans = _chunks(len(items), batch_size)
        parts, kept, errors = [], [], []
        fold = self.fold_pixel_norm
        with _progress(len(items), progress, "images") as bar:
            decoded = _prefetched(spans, _decoder(self.preprocess.batch, items, on_error, fold, max_image_pixels))
            for span, (pixels, idx, errs) in decoded:
                errors.extend(errs)
                if idx:
                    with torch.inference_mode():
                        emb = self._encode_prepared(pixels, fold)
                    parts.append(emb.float().cpu().numpy())
                    kept.extend(idx)
                bar.update(span[1] - span[0])
        return self._finish(parts, kept, errors, len(items), on_error)

    def _embed_sequences(self, items: list, batch_size: int, progress: bool, on_error: str,
                         max_image_pixels: int | None = None):
        """embed_images for a NaFlex model (fastclip/data/naflex.py): within each window of
        ``batch_size * image_window_batches`` items, images are sorted by patch count and cut into batches
        of similar lengths (``plan_batches``), each padded only to its longest image; rows go back in input
        order. The next window is decoded while the current one is encoded."""
        _chunks(0, batch_size)  # validates batch_size
        windows = _chunks(len(items), batch_size * self.image_window_batches)
        parts, kept, errors = [], [], []
        fold = self.fold_pixel_norm
        with _progress(len(items), progress, "images") as bar:
            decoder = _decoder(self.preprocess.sequences, items, on_error, fold, max_image_pixels)
            for _, (seqs, idx, errs) in _prefetched(windows, decoder):
                errors.extend(errs)
                bar.update(len(errs))
                lengths = [hw[0] * hw[1] for _, hw in seqs]  # patches per image
                order = sorted(range(len(seqs)), key=lengths.__getitem__)  # stable: ties keep input order
                out = np.empty((len(seqs), self.cfg.embed_dim), dtype=np.float32)  # (n, E), input order
                for b0, b1 in plan_batches([lengths[i] for i in order], batch_size):
                    rows = order[b0:b1]
                    batch = pad_sequences([seqs[i] for i in rows])  # (b, longest, P*P*3)
                    with torch.inference_mode():
                        out[rows] = self._encode_prepared(batch, fold).float().cpu().numpy()
                    bar.update(len(rows))
                parts.append(out)
                kept.extend(idx)
        return self._finish(parts, kept, errors, len(items), on_error)

    def _encode_prepared(self, pixels: torch.Tensor, folded: bool) -> torch.Tensor:
        """(B, 3, S, S) from ``preprocess.batch``, or a NaflexBatch of patch sequences (uint8 levels if
        ``folded``, else normalised) -> (B, E), L2-normalised."""
        if not folded:
            return self.encode_image(pixels.to(self.dtype), normalize=True)
        return self.visual.apply_op(pixels.to(self.device), self.ops, normalize=True,
                                    pixel_norm=self.preprocess.pixel_norm)

    def _length_order(self, tokens: torch.Tensor):
        """(order, sorted lengths): a permutation of the rows of ``tokens`` (N, L) that sorts them by the
        tokens the text tower needs of each (``run_lengths``), and those lengths in that order; None when
        the tower always runs at full length (not causal, or pooled at the last position)."""
        lengths = self.text.run_lengths(tokens) if self.group_texts_by_length else None  # (N,) or None
        if lengths is None:
            return None
        order = torch.argsort(lengths, stable=True)
        return order, lengths[order].tolist()

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
        """Embed texts: (N, E) float32 L2-normalised in input order (see embed_images for on_error).

        For a causal text tower, texts are batched by token length (see ``group_texts_by_length``)."""
        _check_on_error(on_error)
        if isinstance(texts, str):
            raise TypeError("embed_texts expects a sequence of strings; wrap a single text in a list")
        self._require_tokenizer("embed texts")
        _chunks(0, batch_size)  # validates batch_size
        good, idx, errors = self._check_texts(list(texts), on_error)
        parts = []
        window = batch_size * self.text_window_batches  # texts sorted by length within each window
        with _progress(len(good), progress, "texts") as bar:
            for w_start, w_stop in _chunks(len(good), window):
                tokens = self.tokenizer(good[w_start:w_stop])  # (n, L)
                sorting = self._length_order(tokens)  # ((n,), n lengths ascending) or None
                out = np.empty((w_stop - w_start, self.cfg.embed_dim), dtype=np.float32)  # (n, E)
                order = None
                if sorting is None:
                    spans = _chunks(w_stop - w_start, batch_size)
                else:  # sorted: cut into batches of similar length (fastclip/data/text_batches.py)
                    order, lengths = sorting
                    tokens = tokens[order]
                    spans = plan_batches(lengths, batch_size)
                for start, stop in spans:
                    with torch.inference_mode():
                        emb = self.encode_text(tokens[start:stop], normalize=True).float().cpu().numpy()
                    out[order[start:stop].numpy() if order is not None else slice(start, stop)] = emb
                    bar.update(stop - start)
                parts.append(out)
        return self._finish(parts, idx, errors, len(texts), on_error)

    def _require_tokenizer(self, what: str) -> None:
        """MissingTokenizerError (which files are missing, how to add them) if there is no tokenizer."""
        if self.tokenizer is None:
            from .data.tokenizers import MissingTokenizerError, no_tokenizer_message

            raise MissingTokenizerError(no_tokenizer_message(self, what))

    def classifier_weights(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """Zero-shot class embeddings with prompt ensembling: (C, E), each the renormalised mean of its
        label's template embeddings."""
        self._require_tokenizer("embed the labels (classify)")
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
