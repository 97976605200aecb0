"""fastclip on Ray Data: callable classes for ``Dataset.map_batches`` that embed a column of images or texts.

    import ray
    from fastclip.ray import ImageEmbedder

    ds = ray.data.read_webdataset(urls, decoder=None)          # raw bytes: fastclip decodes them itself
    ds = ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
                                                              "column": "jpg", "key_column": "__key__"},
                        concurrency=4, batch_size=256, batch_format="pyarrow")
    ds.write_parquet(out)

Each actor loads the model once (``fastclip.load`` in ``__init__``), sets torch's threads (and the image
decoder's) to the CPUs Ray assigned to it, and runs on CUDA with the default (triton) backend when Ray
assigned it a GPU (``num_gpus=1``) or ``device="cuda"`` is given. A batch comes back as a ``pyarrow.Table``
with every input row, in order, and two columns added:

* ``embedding``: fixed-size list of float32 (E,), L2-normalised; null where the row failed;
* ``error``: null, or why the row failed (missing file, corrupt image, empty text, null value, ...).

A bad row never fails the batch (``embed_images`` / ``embed_texts`` with ``on_error="skip"``).
The documented batch format is ``batch_format="pyarrow"``; dicts of numpy arrays (Ray's "numpy" /
"default" format) and pandas DataFrames are accepted too (converted to Arrow the way Ray converts them).
Needs ``pip install 'fastclip[ray]'``; ``import fastclip`` never imports Ray. Recipe: docs/ray.md.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

RAY_HINT = "pip install 'fastclip[ray]'"


def _require_ray():
    """(ray, pyarrow), or an ImportError saying how to install them."""
    try:
        import pyarrow
        import ray
        import ray.data  # noqa: F401  (Ray Data, not only Ray core)
    except ImportError as exc:
        raise ImportError(f"fastclip.ray needs Ray Data and pyarrow ({exc}): {RAY_HINT}") from exc
    return ray, pyarrow


def assigned_resources() -> dict[str, float]:
    """The resources Ray assigned to this worker ({"CPU": 2.0, "GPU": 1.0}); {} outside a Ray worker
    (no Ray, Ray not started, or the driver)."""
    try:
        import ray
    except ImportError:
        return {}
    if not ray.is_initialized():
        return {}
    try:
        return dict(ray.get_runtime_context().get_assigned_resources())
    except (AssertionError, RuntimeError):  # the driver: "only available when the process is a worker"
        return {}


def _to_arrow(batch):
    """A batch as Ray hands it (pyarrow.Table, dict of numpy arrays, pandas.DataFrame) -> pyarrow.Table."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    from ray.data.block import BlockAccessor

    if not isinstance(batch, Mapping) and type(batch).__name__ != "DataFrame":
        raise TypeError(f"expected a batch as a pyarrow.Table, a dict of numpy arrays or a pandas.DataFrame, "
                        f"got {type(batch).__name__}")
    return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).to_arrow()


def _values(table, name: str) -> list:
    """The Python values of column ``name``: bytes, str, dicts for structs, numpy arrays for Ray's tensor
    columns, None for nulls."""
    import pyarrow as pa

    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = pa.chunked_array([c.dictionary_decode() for c in col.chunks], col.type.value_type)
    if isinstance(col.type, pa.ExtensionType):  # Ray's tensor columns: one ndarray per row
        out: list = []
        for chunk in col.chunks:
            out.extend(chunk.to_numpy())
        return out
    return col.to_pylist()


def _is_text_type(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_binary_type(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _embedding_array(emb: np.ndarray, ok: np.ndarray):
    """(N, E) float32 rows and (N,) bool -> a fixed_size_list<float32>[E] array, null where not ``ok``."""
    import pyarrow as pa

    n, e = emb.shape
    values = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))  # (N*E,)
    validity = pa.py_buffer(np.packbits(ok.astype(bool), bitorder="little"))
    return pa.Array.from_buffers(pa.list_(pa.float32(), e), n, [validity], children=[values])


class _Embedder:
    """The shared part of ImageEmbedder / TextEmbedder: model loading, resources, columns, output."""

    def __init__(self, model, pretrained=None, column: str = "", precision: str = "fp32", backend: str | None = None,
                 device=None, batch_size: int = 32, key_column: str | None = None, *,
                 embedding_column: str = "embedding", error_column: str = "error"):
        _require_ray()
        import torch

        import fastclip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if embedding_column == error_column:
            raise ValueError(f"embedding_column and error_column are both {embedding_column!r}")
        resources = assigned_resources()
        cpus = resources.get("CPU")
        self.threads = max(1, int(cpus)) if cpus else None  # None: not in a Ray worker, leave torch's as is
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if device is None:
            device = "cuda" if resources.get("GPU", 0) > 0 else "cpu"
        self.column, self.key_column, self.batch_size = column, key_column, batch_size
        self.embedding_column, self.error_column = embedding_column, error_column
        self.model = fastclip.load(model, pretrained=pretrained, device=device, precision=precision, backend=backend)
        preprocess = getattr(self.model, "preprocess", None)
        if self.threads is not None and preprocess is not None and hasattr(preprocess, "threads"):
            preprocess.threads = self.threads  # the image decoder's thread pool: the same CPUs
        self.dim = self.model.cfg.embed_dim

    def settings(self) -> dict[str, Any]:
        """What this embedder runs with: device, backend, precision, torch's threads, the decoder's threads."""
        import torch

        preprocess = getattr(self.model, "preprocess", None)
        return {"model": self.model.cfg.name, "device": str(self.model.device), "backend": self.model.backend,
                "precision": self.model.precision, "threads": torch.get_num_threads(),
                "decode_threads": getattr(preprocess, "threads", None), "pid": os.getpid()}

    def _check_columns(self, table) -> None:
        names = table.column_names
        for what, name in (("column", self.column), ("key_column", self.key_column)):
            if name is not None and name not in names:
                raise ValueError(f"{type(self).__name__}: {what} {name!r} is not in the batch (columns: "
                                 f"{', '.join(names)})")
        for what, name in (("embedding_column", self.embedding_column), ("error_column", self.error_column)):
            if name in names:
                raise ValueError(f"{type(self).__name__}: the batch already has a column {name!r}; pass "
                                 f"{what}= another name")

    def _items(self, table) -> tuple[list, dict[int, str]]:
        """(the column's items, {row: reason} for rows that cannot be embedded at all)."""
        raise NotImplementedError

    def _embed(self, items: list):
        raise NotImplementedError

    def _reason(self, err) -> str:
        """The error text of an item fastclip refused (an ItemError): the item (without its index) and why."""
        from .errors import ItemError

        return str(ItemError(err.reason, item=err.item))

    def __call__(self, batch):
        """Embed ``column`` of a batch: pyarrow.Table (or dict of numpy arrays / pandas.DataFrame) of N rows ->
        pyarrow.Table of the same N rows in the same order, plus ``embedding`` (fixed_size_list<float32>[E],
        null for failed rows) and ``error`` (string, null for rows that worked)."""
        import pyarrow as pa

        table = _to_arrow(batch)
        self._check_columns(table)
        n = table.num_rows
        items, reasons = self._items(table)
        good = [i for i in range(n) if i not in reasons]  # rows handed to fastclip, in order
        emb = np.zeros((n, self.dim), dtype=np.float32)  # (N, E)
        ok = np.zeros(n, dtype=bool)
        if good:
            result = self._embed([items[i] for i in good])
            rows = np.asarray(good, dtype=np.int64)[result.indices]  # positions in the batch of the kept items
            emb[rows] = result.embeddings
            ok[rows] = True
            for err in result.errors:
                reasons[good[err.index]] = self._reason(err)
        if self.key_column is not None:
            keys = table.column(self.key_column).to_pylist()
            reasons = {i: f"{self.key_column}={keys[i]!r}: {r}" for i, r in reasons.items()}
        errors = pa.array([reasons.get(i) for i in range(n)], type=pa.string())
        table = table.append_column(self.embedding_column, _embedding_array(emb, ok))
        return table.append_column(self.error_column, errors)


class ImageEmbedder(_Embedder):
    """``Dataset.map_batches(ImageEmbedder, fn_constructor_kwargs={"model": ..., ...}, concurrency=...,
    batch_format="pyarrow")``: embeds the images of ``column``.

    ``column`` may hold encoded image bytes (binary: JPEG, PNG, WebP, ... as ``read_webdataset(decoder=None)``,
    ``read_binary_files`` or a Parquet file store them), file paths (string; absolute, readable where the
    actor runs), Hugging Face ``Image`` structs {bytes, path} (bytes used when present) or arrays (Ray's
    tensor columns: (H, W, 3) uint8 or float in [0, 1], see fastclip.data.images). Decoding is fastclip's
    own (EXIF orientation, any mode to RGB, the decompression-bomb limit) in the actor's threads, the next
    sub-batch decoded while the current one is encoded.

    ``model`` / ``pretrained`` / ``precision`` / ``backend`` / ``device``: as ``fastclip.load`` (``device``
    None: "cuda" when Ray assigned the actor a GPU, else "cpu"); ``batch_size``: the encoder's batch within
    one Ray batch; ``key_column``: a column (e.g. "__key__") whose value each error message names;
    ``embedding_column`` / ``error_column`` (keywords): the names of the two added columns (default
    "embedding" / "error"; a batch that already has one is refused).
    """

    def __init__(self, model, pretrained=None, column: str = "image", precision: str = "fp32",
                 backend: str | None = None, device=None, batch_size: int = 32, key_column: str | None = None,
                 **names):
        super().__init__(model, pretrained, column, precision, backend, device, batch_size, key_column, **names)

    def _items(self, table):
        import pyarrow as pa

        t = table.schema.field(self.column).type
        if pa.types.is_struct(t):
            fields = {t.field(i).name for i in range(t.num_fields)}
            if not fields & {"bytes", "path"}:
                raise TypeError(f"ImageEmbedder: column {self.column!r} is a struct without 'bytes' or 'path' "
                                f"fields ({t})")
        elif not (_is_binary_type(t) or _is_text_type(t) or pa.types.is_null(t) or isinstance(t, pa.ExtensionType)
                  or pa.types.is_dictionary(t)):
            raise TypeError(f"ImageEmbedder: column {self.column!r} has type {t}; expected image bytes (binary), "
                            f"paths (string), {{bytes, path}} structs or arrays")
        items, reasons = [], {}
        for i, v in enumerate(_values(table, self.column)):
            if isinstance(v, dict):  # Hugging Face Image feature: bytes when present, else the path
                v = v.get("bytes") if v.get("bytes") is not None else v.get("path")
            if v is None:
                reasons[i] = "null value (no image)"
            items.append(v)
        return items, reasons

    def _embed(self, items):
        return self.model.embed_images(items, batch_size=self.batch_size, on_error="skip")

    def _reason(self, err) -> str:  # an image's description is a path or "<bytes of N bytes>": no quotes
        return f"{err.item}: {err.reason}" if err.item is not None else err.reason


class TextEmbedder(_Embedder):
    """``Dataset.map_batches(TextEmbedder, fn_constructor_kwargs={"model": ..., "column": "caption"}, ...)``:
    embeds the texts of ``column`` (string, or UTF-8 bytes as ``read_webdataset(decoder=None)`` gives a
    ``txt`` member). Empty texts, nulls and bytes that are not UTF-8 come back with an error. Arguments as
    ImageEmbedder; ``batch_size`` defaults to 256 (texts are cheap to batch)."""

    def __init__(self, model, pretrained=None, column: str = "text", precision: str = "fp32",
                 backend: str | None = None, device=None, batch_size: int = 256, key_column: str | None = None,
                 **names):
        super().__init__(model, pretrained, column, precision, backend, device, batch_size, key_column, **names)

    def _items(self, table):
        import pyarrow as pa

        t = table.schema.field(self.column).type
        if not (_is_text_type(t) or _is_binary_type(t) or pa.types.is_null(t) or pa.types.is_dictionary(t)):
            raise TypeError(f"TextEmbedder: column {self.column!r} has type {t}; expected strings or UTF-8 bytes")
        items, reasons = [], {}
        for i, v in enumerate(_values(table, self.column)):
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError as exc:
                    reasons[i] = f"not UTF-8 text: {exc}"
            elif v is None:
                reasons[i] = "null value (no text)"
            items.append(v)
        return items, reasons

    def _embed(self, items):
        return self.model.embed_texts(items, batch_size=self.batch_size, on_error="skip")
