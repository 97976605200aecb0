"""The streaming, resumable embedding job: input parts in, one finished output shard per part out.

``embed_corpus`` reads each input part (fastclip/jobs/sources.py: a WebDataset tar, a row range of a Parquet
file, a slice of a folder or of a text file) as a stream of samples, embeds them in chunks with the model's
``embed_images`` / ``embed_texts`` (bad samples recorded, never fatal), and writes the part's shard
(fastclip/jobs/writer.py) before starting the next. Memory is bounded by one chunk of encoded samples, the
decoder's pixel budget and one shard of vectors, whatever the corpus size. The next chunk is read (tar /
Parquet I/O) in a thread while the current one is embedded.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .sources import Part, Sample, open_inputs
from .writer import ShardRows, ShardWriter, check_manifest, check_output

MODALITIES = ("images", "texts")


@dataclass
class JobSummary:
    """What a job did: samples read, embedded and failed (finished shards skipped by a resume included),
    shards written now and skipped as already finished, and the wall time of this run."""

    samples: int = 0
    embedded: int = 0
    failed: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = (self.embedded / self.seconds) if self.seconds > 0 else 0.0
        return (f"{self.embedded} embedded, {self.failed} failed of {self.samples} samples; "
                f"{self.shards_written} shards written, {self.shards_skipped} already finished; "
                f"{self.seconds:.1f} s ({rate:.1f} items/s)")


def _read_ahead(chunks: Iterator[list[Sample]], depth: int = 1) -> Iterator[list[Sample]]:
    """The chunks of ``chunks``, with up to ``depth`` read ahead in a thread; an error raised while reading
    is raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="fastclip-read-ahead")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _chunked(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    while chunk := list(itertools.islice(samples, size)):
        yield chunk


def _part_chunks(part: Part, size: int) -> Iterator[list[Sample]]:
    """``part``'s samples in lists of ``size``, the next one read ahead in a thread."""
    return _read_ahead(_chunked(part.samples(), size))


class _ShardBuilder:
    """Collects one shard's rows from embedded chunks (see embed_chunk)."""

    def __init__(self, kinds: tuple[str, ...], modality: str, with_captions: bool):
        self.kinds, self.modality, self.with_captions = kinds, modality, with_captions
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
        self.keys: list[str] = []
        self.captions: list[str | None] = []
        self.errors: list[tuple[str, str]] = []

    def add(self, samples: list[Sample], vectors: dict[str, np.ndarray], ok: list[int]) -> None:
        for kind in self.kinds:
            self.parts[kind].append(vectors[kind])
        self.keys.extend(samples[i].key for i in ok)
        self.captions.extend(samples[i].text for i in ok)

    def rows(self, dim: int) -> ShardRows:
        emb = {k: np.concatenate(v) if v else np.zeros((0, dim), np.float32) for k, v in self.parts.items()}
        metadata: dict[str, list] = {"key": self.keys}
        if self.modality == "images":
            metadata["image_path"] = self.keys
        if self.modality == "texts" or self.with_captions or any(c is not None for c in self.captions):
            metadata["caption"] = self.captions
        return ShardRows(emb, metadata, self.errors)


def _embed_chunk(model, samples: list[Sample], builder: _ShardBuilder, batch_size: int) -> int:
    """Embed one chunk into ``builder``; returns how many samples failed. A sample fails when reading it
    failed, its image or text cannot be used, or (with captions) its caption is missing or empty."""
    errors = builder.errors
    n_errors = len(errors)
    usable = []
    for i, s in enumerate(samples):
        if s.error is not None:
            errors.append((s.key, s.error))
        elif builder.with_captions and not (s.text or "").strip():
            errors.append((s.key, "empty caption"))
        else:
            usable.append(i)
    vectors: dict[str, np.ndarray] = {}
    if builder.modality == "images":
        result = model.embed_images([samples[i].data for i in usable], batch_size=batch_size, on_error="skip")
        errors.extend((samples[usable[e.index]].key, e.reason) for e in result.errors)
        ok = [usable[j] for j in result.indices.tolist()]
        vectors["img"] = result.embeddings  # (len(ok), E)
    else:
        ok = usable
    if "text" in builder.kinds:
        result = model.embed_texts([samples[i].text for i in ok], on_error="skip")
        errors.extend((samples[ok[e.index]].key, e.reason) for e in result.errors)
        keep = result.indices.tolist()  # texts that worked, of those whose image (if any) worked
        if "img" in vectors and len(keep) < len(ok):
            vectors["img"] = vectors["img"][keep]
        ok = [ok[j] for j in keep]
        vectors["text"] = result.embeddings
    builder.add(samples, vectors, ok)
    return len(errors) - n_errors


def embed_corpus(model, inputs: Sequence[str], out_dir: str | os.PathLike, *, modality: str = "images",
                 column: str | None = None, captions: bool = False, shard_size: int = 10_000,
                 resume: bool = False, dtype: str = "float16", batch_size: int = 32, chunk_batches: int = 16,
                 progress: bool = True, model_id: str | None = None, parts: list[Part] | None = None) -> JobSummary:
    """Embed a corpus into a job directory of shards (layout: fastclip/jobs/writer.py), streaming.

    Args:
        model: a fastclip model (``fastclip.load``).
        inputs: files, folders, globs, brace patterns or URLs (fastclip/jobs/sources.py ``open_inputs``):
            image files and folders, WebDataset tars, Parquet files, or (``modality="texts"``) text files with
            one text a line and Parquet text columns.
        modality: "images" or "texts".
        column: the Parquet column holding image bytes / image paths / texts (default: found by name).
        captions: images jobs also embed each sample's caption into ``text_emb/`` (a missing caption is then an
            error of that sample).
        shard_size: samples per output shard for folders, Parquet and text files (a tar is one shard).
        resume: continue the job already in ``out_dir`` (same settings): finished shards are kept, the
            unfinished one is redone. Without it, a directory already holding a job is refused.
        dtype: "float16" or "float32" for the stored vectors.
        batch_size: items per encoder call; chunk_batches: batches of samples read at a time.
        model_id: how the model is named in ``job.json`` (a resume must name the same); default its config name.
        parts: ``open_inputs(inputs, ...)`` already called with the same settings (not listed again).

    Returns a JobSummary.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if captions and modality != "images":
        raise ValueError("captions=True embeds the captions of an images job; a texts job embeds texts already")
    if shard_size < 1 or batch_size < 1 or chunk_batches < 1:
        raise ValueError("shard_size, batch_size and chunk_batches must be >= 1")
    if modality == "texts" or captions:
        model._require_tokenizer("embed texts")
    start = time.perf_counter()
    if parts is None:
        parts = open_inputs(list(inputs), modality=modality, column=column, shard_size=shard_size)
    kinds = ("img", "text") if captions else (("img",) if modality == "images" else ("text",))
    manifest = {"format": 1, "model": model_id or model.cfg.name, "embed_dim": model.cfg.embed_dim,
                "modality": modality, "captions": captions, "inputs": [os.fspath(i) for i in inputs],
                "column": column, "shard_size": shard_size, "dtype": dtype, "parts": [p.name for p in parts]}
    check_output(out_dir, dtype)
    check_manifest(out_dir, manifest, resume)
    writer = ShardWriter(out_dir, kinds, len(parts), dtype)
    writer.remove_temporaries()
    summary = JobSummary()
    sizes = [p.size for p in parts]
    total = sum(sizes) if all(s is not None for s in sizes) else None  # type: ignore[misc]
    from tqdm.auto import tqdm

    with tqdm(total=total, disable=not progress, desc=f"embedding {modality}", unit="item") as bar:
        for i, part in enumerate(parts):
            if writer.done(i):
                rows, failed = writer.counts(i)
                summary.shards_skipped += 1
                summary.samples += rows + failed
                summary.embedded += rows
                summary.failed += failed
                bar.update(rows + failed)
                continue
            builder = _ShardBuilder(kinds, modality, captions)
            for chunk in _part_chunks(part, batch_size * chunk_batches):
                failed = _embed_chunk(model, chunk, builder, batch_size)
                summary.samples += len(chunk)
                summary.failed += failed
                summary.embedded += len(chunk) - failed
                bar.update(len(chunk))
                bar.set_postfix(errors=summary.failed, shard=f"{i + 1}/{len(parts)}")
            writer.write(i, builder.rows(model.cfg.embed_dim))
            summary.shards_written += 1
    summary.seconds = time.perf_counter() - start
    return summary


def embed_to_memory(model, inputs: Sequence[str], *, modality: str = "images", column: str | None = None,
                    batch_size: int = 32, chunk_batches: int = 16, progress: bool = True,
                    parts: list[Part] | None = None) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """The same streaming read and embedding, kept in memory for small jobs (``fastclip embed --out f.npy``):
    (N, E) float32 embeddings, their N keys in input order, and the (key, reason) of every failed sample
    (``chunk_batches``, ``parts``: as for embed_corpus)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    kinds = ("img",) if modality == "images" else ("text",)
    builder = _ShardBuilder(kinds, modality, with_captions=False)
    if parts is None:
        parts = open_inputs(list(inputs), modality=modality, column=column)
    from tqdm.auto import tqdm

    with tqdm(disable=not progress, desc=f"embedding {modality}", unit="item") as bar:
        for part in parts:
            for chunk in _part_chunks(part, batch_size * chunk_batches):
                _embed_chunk(model, chunk, builder, batch_size)
                bar.update(len(chunk))
                bar.set_postfix(errors=len(builder.errors))
    rows = builder.rows(model.cfg.embed_dim)
    return rows.embeddings[kinds[0]], builder.keys, builder.errors
