"""Shard-by-shard output of an embedding job, in clip-retrieval's layout.

A job directory holds, for each output shard ``i`` (zero-padded to the width of the last shard's number, so
the files sort in shard order)::

    img_emb/img_emb_{i}.npy          (rows, E) embeddings of the images (images jobs)
    text_emb/text_emb_{i}.npy        (rows, E) embeddings of the texts (texts jobs, or images jobs with captions)
    metadata/metadata_{i}.parquet    one row per embedding row: key, image_path (images jobs), caption
    errors/errors_{i}.parquet        the shard's samples that failed: key, reason
    job.json                         what the job is (model, inputs, settings, its parts), checked on resume

clip-retrieval's tools and autofaiss read ``img_emb/`` / ``text_emb/`` and ``metadata/`` as they are. Every file
is written under a temporary name (``.{name}.tmp``) and renamed into place; the metadata file is renamed last,
so a shard is finished exactly when its metadata file exists. A job killed at any point leaves at most
temporary files and embeddings without metadata, which a resumed job rewrites.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DTYPES = ("float16", "float32")
MANIFEST = "job.json"


@dataclass
class ShardRows:
    """What one output shard holds, row-aligned: ``embeddings[kind]`` (rows, E) for kind "img" / "text", the
    metadata columns (lists of ``rows`` values each) and the failed samples as (key, reason) pairs."""

    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, list] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)


def _write_atomic(path: Path, write) -> Path:
    """``write(file)`` into ``.{name}.tmp`` beside ``path``, flushed to disk; returns the temporary path
    (renamed into place by the caller once every file of the shard is written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


class ShardWriter:
    """Writes and recognises the output shards of one job directory (see the module docstring).

    kinds: the embedding folders this job fills, a subset of ("img", "text"); n_shards: how many shards the job
    has (sets the zero-padding of the file names); dtype: "float16" or "float32" for the stored vectors.
    """

    def __init__(self, out_dir: str | os.PathLike, kinds: tuple[str, ...], n_shards: int, dtype: str = "float16"):
        check_output(out_dir, dtype)
        self.root = Path(out_dir)
        self.kinds, self.dtype = kinds, np.dtype(dtype)
        self.width = len(str(max(n_shards - 1, 0)))
        for folder in (*(f"{k}_emb" for k in kinds), "metadata", "errors"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def _path(self, folder: str, stem: str, i: int, ext: str) -> Path:
        return self.root / folder / f"{stem}_{i:0{self.width}d}{ext}"

    def metadata_path(self, i: int) -> Path:
        return self._path("metadata", "metadata", i, ".parquet")

    def done(self, i: int) -> bool:
        """Whether shard ``i`` was finished (its metadata file, renamed last, exists)."""
        return self.metadata_path(i).exists()

    def counts(self, i: int) -> tuple[int, int]:
        """(rows, failed samples) of finished shard ``i``, read from its parquet footers."""
        import pyarrow.parquet as pq

        errors = self._path("errors", "errors", i, ".parquet")
        failed = pq.ParquetFile(errors).metadata.num_rows if errors.exists() else 0
        return pq.ParquetFile(self.metadata_path(i)).metadata.num_rows, failed

    def remove_temporaries(self) -> None:
        """Delete ``.*.tmp`` files a killed job left behind."""
        for folder in self.root.iterdir():
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink()

    def write(self, i: int, shard: ShardRows) -> None:
        """Write shard ``i``: every file under a temporary name first, then renamed, the metadata last."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = len(next(iter(shard.metadata.values()))) if shard.metadata else 0
        staged = []  # (temporary, final) paths in rename order
        for kind in self.kinds:
            emb = shard.embeddings[kind]  # (rows, E)
            if emb.shape[0] != rows:
                raise ValueError(f"shard {i}: {emb.shape[0]} {kind} embeddings for {rows} metadata rows")
            final = self._path(f"{kind}_emb", f"{kind}_emb", i, ".npy")
            stored = np.ascontiguousarray(emb, dtype=self.dtype)
            staged.append((_write_atomic(final, lambda f, a=stored: np.save(f, a)), final))
        errors = pa.table({"key": pa.array([k for k, _ in shard.errors], pa.string()),
                           "reason": pa.array([r for _, r in shard.errors], pa.string())})
        final = self._path("errors", "errors", i, ".parquet")
        staged.append((_write_atomic(final, lambda f: pq.write_table(errors, f)), final))
        metadata = pa.table({name: pa.array(values, pa.string()) for name, values in shard.metadata.items()})
        final = self.metadata_path(i)
        staged.append((_write_atomic(final, lambda f: pq.write_table(metadata, f)), final))
        for tmp, final in staged:
            os.replace(tmp, final)


def check_output(out_dir: str | os.PathLike, dtype: str) -> None:
    """ValueError unless ``dtype`` is a stored-vector dtype and ``out_dir`` a local directory."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if "://" in str(out_dir):
        raise ValueError(f"the output must be a local directory (atomic renames), got {out_dir}")


def check_manifest(out_dir: str | os.PathLike, manifest: dict, resume: bool) -> None:
    """Write ``job.json`` for a new job, or check that a resumed job is the same job.

    Raises FileExistsError when the directory already holds a job and ``resume`` is False (nothing is
    overwritten), and ValueError naming the settings that differ when a resumed job is not the same job.
    """
    root = Path(out_dir)
    path = root / MANIFEST
    if path.exists():
        if not resume:
            raise FileExistsError(f"{root} already holds an embedding job ({path}); resume it (--resume / "
                                  "resume=True) or choose a new output directory")
        previous = json.loads(path.read_text())
        differ = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
        if differ:
            raise ValueError(f"cannot resume the job in {root}: these settings differ from the ones it was started "
                             f"with: {', '.join(differ)} (start a new output directory for a different job)")
        return
    if root.exists() and any(p.name != MANIFEST for p in root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no embedding job; choose a new output directory")
    root.mkdir(parents=True, exist_ok=True)
    tmp = _write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    os.replace(tmp, path)
