"""Input readers of the large embedding job: specs (files, folders, globs, brace patterns, URLs) -> Parts.

``open_inputs`` turns the job's input specs into a deterministic list of ``Part``s; each Part becomes one output
shard and streams its ``Sample``s with ``Part.samples()``. Every file is opened through fsspec, so local paths and
``file://``, ``memory://``, ``s3://``, ``gs://``, ``http(s)://`` URLs work alike (the remote ones need their fsspec
backend: s3fs, gcsfs, aiohttp). Kinds of input, by file name:

* image files and folders (images mode): all image paths, in the order given, folders expanded recursively and
  sorted (non-image files in folders ignored), are pooled and cut into Parts of ``shard_size`` paths.
  ``Sample.data`` is the local path (opened by ``fastclip.data.images.load_image``) or, for a remote file, its
  bytes (fetched PATH_FETCH_BATCH files at a time); key = the path as given / found.
* WebDataset tars (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``; img2dataset's layout): one Part per
  tar, read as a stream. Members ``{key}.{ext}`` sharing a key (the member path up to the first dot of its
  basename) form one sample: the image member is ``data``, ``{key}.txt`` the caption.
* Parquet (``.parquet``): a column of image bytes (binary, or a struct with a ``bytes`` field as HF datasets store
  ``Image`` features), of image paths/URLs (string) or of texts (texts mode); each file cut into row ranges of
  ``shard_size``. Keys: the ``key`` column, else ``"{file}:{row}"`` (row counted from 0).
* Text files (``.txt``, texts mode): one text per line; key ``"{file}:{line}"`` (line counted from 1, as editors
  show it); cut into Parts of ``shard_size`` lines (Part names use 0-based ``[start:stop]`` line ranges).

Bad samples never raise while a Part is read: they come out as Samples with ``error`` set.
"""
from __future__ import annotations

import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
IMAGE_COLUMNS = ("image", "jpg", "png", "bytes", "path", "url")  # default column, images mode, first present
TEXT_COLUMNS = ("caption", "text")  # default column in texts mode; the caption column in images mode
PARQUET_BATCH_ROWS = 256  # rows per pyarrow batch while a parquet Part streams
PATH_FETCH_BATCH = 64  # remote image files fetched together (fs.cat_ranges) while a Part of image paths streams
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
             "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
_IMAGE_EXTS = {e[1:] for e in IMAGE_EXTENSIONS}  # tar member extensions, without the dot
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset: key = path up to the basename's 1st dot
_BRACES = re.compile(r"\{[^{}]*(,|\.\.)[^{}]*\}")

__all__ = ["Sample", "Part", "open_inputs", "IMAGE_EXTENSIONS"]


@dataclass
class Sample:
    key: str                  # stable id of the sample, unique within its Part
    data: bytes | str | None  # images: encoded image bytes, or an image path/URL str; texts: None
    text: str | None          # the caption (tar {key}.txt, parquet caption/text column) or, in texts mode, the text
    error: str | None = None  # reason, when reading this sample already failed


@dataclass
class Part:
    """One unit of input that becomes one output shard; parts are listed in a deterministic order.

    ``reader`` is a picklable callable (a functools.partial of a module function) returning the samples.
    """

    name: str                 # e.g. "shards/00003.tar", "data.parquet[20000:30000]", "photos/[0:10000]"
    size: int | None          # number of samples if known without reading (folders, parquet, text files), else None
    reader: Callable[[], Iterator[Sample]] | None = field(default=None, repr=False, compare=False)

    def samples(self) -> Iterator[Sample]:
        """Stream this Part's samples (never loads a whole tar / parquet file into memory)."""
        if self.reader is None:
            raise ValueError(f"part {self.name!r} has no reader")
        return self.reader()


# --- filesystems --------------------------------------------------------------------------------------------

def _filesystem(url: str):
    """(fsspec filesystem, its path of ``url``); ImportError naming the package when a backend is missing."""
    try:
        import fsspec.core
    except ImportError:
        raise ImportError("reading job inputs needs fsspec: pip install fsspec") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        proto = url.split("://", 1)[0]
        pkg = _BACKENDS.get(proto)
        hint = f"pip install {pkg}" if pkg else f"install the fsspec backend for {proto}://"
        raise ImportError(f"reading {url!r} needs the fsspec backend for {proto}:// ({e}): {hint}") from e


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _join(base: str, rel: str) -> str:
    return rel if not base else base + rel if base.endswith("/") else f"{base}/{rel}"


def _shown(fs, base: str, found: str) -> str:
    """``found`` (a path of ``fs``) written the way the spec ``base`` it was found under was written."""
    root = fs._strip_protocol(base or ".").rstrip("/")
    if found.startswith(root + "/") or not root:
        return _join(base, found[len(root):].lstrip("/"))
    return fs.unstrip_protocol(found)


def _sorted_paths(paths) -> list[str]:
    return sorted(paths, key=lambda p: p.split("/"))  # component-wise, as sorting pathlib paths


def _brace_expand(spec: str) -> list[str]:
    if not _BRACES.search(spec):
        return [spec]
    try:
        import braceexpand
    except ImportError:
        raise ImportError(f"the brace pattern {spec!r} needs braceexpand: pip install braceexpand") from None
    return list(braceexpand.braceexpand(spec))


def _infos(fs, paths: list[str]) -> list[dict | None]:
    """fs.info of each path, None where missing; one listing per parent folder instead of one call per path."""
    listings: dict[str, dict] = {}
    out = []
    for p in paths:
        parent = p.rstrip("/").rsplit("/", 1)[0] if "/" in p.rstrip("/") else ""
        if len(paths) > 1 and parent not in listings:
            try:
                listings[parent] = {fs._strip_protocol(i["name"]).rstrip("/"): i for i in fs.ls(parent, detail=True)}
            except (OSError, ValueError):
                listings[parent] = {}
        info = listings.get(parent, {}).get(fs._strip_protocol(p).rstrip("/"))
        if info is None:
            try:
                info = fs.info(p)
            except FileNotFoundError:
                info = None
        out.append(info)
    return out


# --- resolving specs into files -----------------------------------------------------------------------------

def _kind(name: str, modality: str) -> str:
    low = name.lower()
    if low.endswith(TAR_SUFFIXES):
        kind = "tar"
    elif low.endswith(".parquet"):
        kind = "parquet"
    elif modality == "texts":
        kind = "text" if low.endswith(".txt") else "?"
    else:
        kind = "image"  # unknown kinds are treated as image files
    if modality == "texts" and kind not in ("text", "parquet"):
        raise ValueError(f"texts mode reads .txt and .parquet files, got {name!r}")
    return kind


def _in_folder(name: str, modality: str) -> bool:
    low = name.lower()
    if modality == "texts":
        return low.endswith((".txt", ".parquet"))
    return posixpath.splitext(low)[1] in IMAGE_EXTENSIONS


def _folder(fs, path: str, shown: str, modality: str) -> list[tuple]:
    files = [f for f in fs.find(path) if _in_folder(f, modality)]
    if not files:
        wanted = ".txt, .parquet" if modality == "texts" else ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"folder {shown!r} holds no input files ({wanted}); for tar or parquet shards "
                                "give a glob such as 'shards/*.tar'")
    return [(_kind(f, modality), fs, f, _shown(fs, shown, f)) for f in _sorted_paths(files)]


def _resolve(spec: str, modality: str) -> list[tuple]:
    """spec -> [(kind, fs, path in fs, name as shown)] in order; FileNotFoundError when it matches nothing."""
    expanded = _brace_expand(spec)
    via = f" (from {spec!r})" if expanded != [spec] else ""
    out: list[tuple] = []
    concrete: list[tuple] = []  # (fs, path, shown) of the expanded names without glob characters

    def flush():
        for (fs, p, shown), info in zip(concrete, _infos(concrete[0][0], [c[1] for c in concrete]), strict=True):
            if info is None:
                raise FileNotFoundError(f"no such file or folder: {shown!r}{via}")
            if info.get("type") == "directory":
                out.extend(_folder(fs, p, shown, modality))
            else:
                out.append((_kind(shown, modality), fs, p, shown))
        concrete.clear()

    for s in expanded:
        fs, p = _filesystem(s)
        magic = re.search(r"[*?\[]", s)
        if magic is None:
            if concrete and concrete[0][0] is not fs:
                flush()
            concrete.append((fs, p, s))
            continue
        if concrete:
            flush()
        base = s[:s.rfind("/", 0, magic.start()) + 1]
        found = fs.glob(p, detail=True)
        if not found:
            raise FileNotFoundError(f"no files match {s!r}{via}")
        for f in _sorted_paths(found):
            shown = _shown(fs, base, f)
            if found[f].get("type") == "directory":
                out.extend(_folder(fs, f, shown, modality))
            else:
                out.append((_kind(shown, modality), fs, f, shown))
    if concrete:
        flush()
    return out


# --- tars ---------------------------------------------------------------------------------------------------

class _TarInfo(tarfile.TarInfo):
    """Records why a streamed tar ended: a zero block (a proper end) or a short / bad header (truncated)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.end_reason = e
            raise


def _tar_sample(key: str, members: list[tuple[str, bytes | None]]) -> Sample:
    image = next((data for ext, data in members if ext in _IMAGE_EXTS), None)
    text = next((data for ext, data in members if ext == "txt"), None)
    caption = text.decode("utf-8", errors="replace") if text is not None else None
    if image is None:
        listed = ", ".join("." + ext for ext, _ in members)
        return Sample(key, None, caption, f"no image in sample (members: {listed})")
    return Sample(key, image, caption)


def _tar_samples(fs, path: str, name: str) -> Iterator[Sample]:
    """Stream one WebDataset tar: consecutive members sharing a key are one Sample; a tar that cannot be read
    ends with one error Sample ``{name}#truncated`` (or ``{name}#unreadable`` when it cannot be opened)."""
    f = None
    try:
        f = fs.open(path, "rb")
        tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=_TarInfo)
    except _TAR_ERRORS as e:
        if f is not None:
            f.close()
        yield Sample(f"{name}#unreadable", None, None, f"cannot open tar: {type(e).__name__}: {e}")
        return
    key, members, count, error = None, [], 0, None
    try:
        for m in tar:
            tar.members = []  # stream mode keeps every TarInfo; drop them to stay in constant memory
            if not m.isfile() or not (match := _MEMBER.match(m.name)):
                continue
            if match[1] != key:
                if key is not None:
                    yield _tar_sample(key, members)
                    count += 1
                key, members = match[1], []
            ext = match[2].lower()
            members.append((ext, tar.extractfile(m).read() if ext in _IMAGE_EXTS or ext == "txt" else None))
        end = getattr(tar, "end_reason", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            error = f"the tar ends without its end-of-archive blocks ({type(end).__name__}: {end})"
    except _TAR_ERRORS as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        tar.close()
        f.close()
    if error is None:
        if key is not None:
            yield _tar_sample(key, members)
        return
    last = f" (the incomplete sample {key!r} is left out)" if key is not None else ""
    yield Sample(f"{name}#truncated", None, None, f"tar truncated or corrupt after {count} samples{last}: {error}")


# --- parquet ------------------------------------------------------------------------------------------------

def _guarded(name: str, reader, *args) -> Iterator[Sample]:
    """``reader(*args)``'s Samples; a failure to read on (a vanished or corrupt file) ends them with one error
    Sample ``{name}#unreadable`` instead of raising mid-job."""
    try:
        import pyarrow as pa

        errors: tuple = (OSError, EOFError, pa.ArrowException)
    except ImportError:
        errors = (OSError, EOFError)
    count = 0
    try:
        for sample in reader(*args):
            count += 1
            yield sample
    except errors as e:
        yield Sample(f"{name}#unreadable", None, None,
                     f"reading stopped after {count} samples: {type(e).__name__}: {e}")


def _view(pa, kind: str, t) -> bool:
    """pa.types.is_binary_view / is_string_view (pyarrow >= 16), False on older pyarrow."""
    check = getattr(pa.types, f"is_{kind}_view", None)
    return bool(check and check(t))


def _column_kind(schema, column: str, modality: str) -> str:
    import pyarrow as pa

    t = schema.field(column).type
    if modality == "images" and (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                 or pa.types.is_fixed_size_binary(t) or _view(pa, "binary", t)):
        return "bytes"
    if modality == "images" and pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or _view(pa, "string", t):
        return "string"
    wanted = "binary, a struct with a 'bytes' field, or string" if modality == "images" else "string"
    raise ValueError(f"parquet column {column!r} has type {t}; {modality} mode needs {wanted}")


def _pick_column(names: list[str], column: str | None, modality: str, shown: str) -> str:
    if column is not None:
        if column not in names:
            raise ValueError(f"parquet file {shown!r} has no column {column!r}; its columns: {', '.join(names)}")
        return column
    candidates = IMAGE_COLUMNS if modality == "images" else TEXT_COLUMNS
    for c in candidates:
        if c in names:
            return c
    raise ValueError(f"parquet file {shown!r} has none of the default {modality} columns ({', '.join(candidates)}); "
                     f"name one with column=...; its columns: {', '.join(names)}")


def _parquet_parts(fs, path: str, shown: str, modality: str, column: str | None, shard_size: int) -> list[Part]:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            meta, schema = pf.metadata, pf.schema_arrow
    except Exception as e:
        raise ValueError(f"cannot read the parquet file {shown!r}: {type(e).__name__}: {e}") from e
    names = list(schema.names)
    col = _pick_column(names, column, modality, shown)
    kind = _column_kind(schema, col, modality)
    caption = next((c for c in TEXT_COLUMNS if c in names and c != col), None) if modality == "images" else None
    key = "key" if "key" in names and col != "key" else None
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    parts = []
    for a in range(0, meta.num_rows, shard_size):
        b = min(a + shard_size, meta.num_rows)
        name = f"{shown}[{a}:{b}]"
        parts.append(Part(name, b - a, partial(_guarded, name, _parquet_samples, fs, path, shown, modality, col,
                                               kind, caption, key, groups, a, b)))
    return parts


def _parquet_value(v, kind: str, modality: str, column: str):
    """(data, text, error) of one cell."""
    if kind == "struct" and v is not None:
        v = v.get("bytes") if v.get("bytes") is not None else v.get("path")
    if v is None:
        return None, None, f"null value in column {column!r}"
    if modality == "texts":
        return None, v, None if v.strip() else "empty text"
    return v, None, None


def _parquet_samples(fs, path, shown, modality, col, kind, caption, key, groups, start, stop) -> Iterator[Sample]:
    """Rows [start, stop) of one parquet file: only the row groups and columns needed, in batches."""
    import pyarrow.parquet as pq

    first, row, picked = 0, 0, []
    for i, n in enumerate(groups):  # row groups overlapping [start, stop)
        if row + n > start and row < stop:
            if not picked:
                first = row
            picked.append(i)
        row += n
    columns = [c for c in (col, caption, key) if c is not None]
    with fs.open(path, "rb") as f:
        row = first
        for batch in pq.ParquetFile(f).iter_batches(PARQUET_BATCH_ROWS, row_groups=picked, columns=columns):
            lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
            if hi > lo:
                part = batch.slice(lo, hi - lo)
                values = part.column(col).to_pylist()
                captions = part.column(caption).to_pylist() if caption else [None] * len(values)
                keys = part.column(key).to_pylist() if key else [None] * len(values)
                for j, (v, cap, k) in enumerate(zip(values, captions, keys, strict=True)):
                    data, text, error = _parquet_value(v, kind, modality, col)
                    name = str(k) if k is not None else f"{shown}:{row + lo + j}"
                    yield Sample(name, data, text if modality == "texts" else cap, error)
            row += batch.num_rows
            if row >= stop:
                return


# --- text files ---------------------------------------------------------------------------------------------

def _line_offsets(f, shard_size: int) -> tuple[int, list[int]]:
    """(number of lines, byte offset of line k * shard_size for each k) of a binary file, in one pass."""
    offsets, lines, pos, last = [0], 0, 0, b"\n"
    while chunk := f.read(1 << 20):
        i = 0
        while True:
            need = len(offsets) * shard_size - lines  # newlines still to pass before the next cut
            have = chunk.count(b"\n", i)
            if have < need:
                lines += have
                break
            for _ in range(need):
                i = chunk.index(b"\n", i) + 1
            lines += need
            offsets.append(pos + i)
        pos += len(chunk)
        last = chunk[-1:]
    return lines + (last != b"\n"), offsets


def _text_parts(fs, path: str, shown: str, shard_size: int) -> list[Part]:
    with fs.open(path, "rb") as f:
        total, offsets = _line_offsets(f, shard_size)
    parts = []
    for k, a in enumerate(range(0, total, shard_size)):
        b = min(a + shard_size, total)
        name = f"{shown}[{a}:{b}]"
        parts.append(Part(name, b - a, partial(_guarded, name, _text_samples, fs, path, shown, a, b, offsets[k])))
    return parts


def _text_samples(fs, path: str, shown: str, start: int, stop: int, offset: int) -> Iterator[Sample]:
    """Lines [start, stop) (0-based) of a text file whose line ``start`` begins at byte ``offset``."""
    with fs.open(path, "rb") as f:
        f.seek(offset)
        for i in range(start, stop):
            raw = f.readline()
            key = f"{shown}:{i + 1}"
            if not raw:
                yield Sample(key, None, None, "the file is shorter than when it was counted")
                continue
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Sample(key, None, None, f"not valid UTF-8: {e}")
                continue
            if i == 0:
                text = text.removeprefix("\ufeff")
            yield Sample(key, None, text, None if text.strip() else "empty text")


# --- image paths --------------------------------------------------------------------------------------------

def _path_samples(paths: tuple[tuple, ...]) -> Iterator[Sample]:
    """(key, local path or None, fs, path in fs) -> Samples: a local file as its path str (opened by the image
    loader), a remote one as its bytes, fetched PATH_FETCH_BATCH at a time with fs.cat_ranges (concurrently on
    async backends)."""
    for a in range(0, len(paths), PATH_FETCH_BATCH):
        window = paths[a:a + PATH_FETCH_BATCH]
        fetched: dict = {}  # index in window -> bytes or the exception
        for fs in {id(e[2]): e[2] for e in window if e[1] is None}.values():
            mine = [i for i, e in enumerate(window) if e[1] is None and e[2] is fs]
            got = fs.cat_ranges([window[i][3] for i in mine], None, None, on_error="return")
            fetched.update(zip(mine, got, strict=True))
        for i, (key, local, _, _) in enumerate(window):
            data = local if local is not None else fetched[i]
            if isinstance(data, BaseException):
                yield Sample(key, None, None, f"cannot read the image file: {type(data).__name__}: {data}")
            else:
                yield Sample(key, data, None)


def open_inputs(specs: Sequence[str], *, modality: str = "images", column: str | None = None,
                shard_size: int = 10_000) -> list[Part]:
    """specs: files, folders, globs (``shards/*.tar``), brace patterns (``shards/{00000..00099}.tar``), URLs.

    Returns the Parts in a deterministic order: the specs' order (glob matches and folder contents sorted),
    with all image paths pooled into consecutive Parts placed where the first of them appears.
    ``column``: the parquet column to read (default: the first of IMAGE_COLUMNS / TEXT_COLUMNS present).
    Raises FileNotFoundError naming a spec that matches nothing, ValueError for a bad column or file kind.
    """
    if isinstance(specs, str):
        raise TypeError("open_inputs expects a sequence of specs; wrap a single spec in a list")
    if modality not in ("images", "texts"):
        raise ValueError(f"modality must be 'images' or 'texts', got {modality!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    parts: list[Part | None] = []  # None marks where the pooled image-path Parts go
    paths: list[tuple] = []  # (key, local path or None, fs, path in fs) of every image file
    sources: list[str] = []  # the specs that gave image paths
    for spec in specs:
        for kind, fs, path, shown in _resolve(str(spec), modality):
            if kind == "image":
                if not paths:
                    parts.append(None)
                if not sources or sources[-1] != spec:
                    sources.append(spec)
                local = (path if "://" in shown else shown) if _is_local(fs) else None
                paths.append((shown, local, fs, path))
            elif kind == "tar":
                parts.append(Part(shown, None, partial(_tar_samples, fs, path, shown)))
            elif kind == "parquet":
                parts.extend(_parquet_parts(fs, path, shown, modality, column, shard_size))
            else:
                parts.extend(_text_parts(fs, path, shown, shard_size))
    label = sources[0] if len(set(sources)) == 1 else "images"
    pooled = [Part(f"{label}[{a}:{a + len(chunk)}]", len(chunk), partial(_path_samples, tuple(chunk)))
              for a in range(0, len(paths), shard_size) for chunk in [paths[a:a + shard_size]]]
    out: list[Part] = []
    for p in parts:
        out.extend(pooled if p is None else [p])
    return out
