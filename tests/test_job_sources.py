"""fastclip.jobs.sources: job input specs (folders, tars, parquet, text files, globs, braces, URLs) -> Parts."""
import io
import pickle
import sys
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fastclip.cli import _expand_paths
from fastclip.data.images import load_image
from fastclip.jobs.sources import IMAGE_EXTENSIONS, Part, Sample, open_inputs


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4 + i % 3, 5, 3), i * 7 % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _img2dataset(start: int, n: int) -> list[tuple[str, bytes]]:
    """img2dataset's layout: {key}.jpg, {key}.txt, {key}.json consecutive for each key."""
    out = []
    for i in range(start, start + n):
        out += [(f"{i:09d}.jpg", _png(i)), (f"{i:09d}.txt", f"caption {i}".encode()),
                (f"{i:09d}.json", b'{"url": "x"}')]
    return out


def _all(parts: list[Part]) -> list[Sample]:
    return [s for p in parts for s in p.samples()]


# --- tars ---------------------------------------------------------------------------------------------------

def test_tar_img2dataset_layout(tmp_path, monkeypatch):
    members = _img2dataset(0, 2) + [
        ("sub/", None),  # a folder member: skipped
        ("000000002.txt", b"caption only"), ("000000002.json", b"{}"),  # no image
        ("a/b/000123.JPG", _png(9)), ("a/b/000123.txt", "caf\u00e9".encode()),  # key keeps the folder
        ("a/b/000124.seg.png", b"mask"), ("a/b/000124.webp", _png(4)),  # ext "seg.png" is not the image
        (".hidden", b"x"), ("README", b"no dot: not a sample member"),
    ]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(_tar_bytes(members))
    monkeypatch.chdir(tmp_path)
    parts = open_inputs(["shards/00000.tar"], column="ignored-for-tars")
    assert [(p.name, p.size) for p in parts] == [("shards/00000.tar", None)]
    got = list(parts[0].samples())
    assert [s.key for s in got] == ["000000000", "000000001", "000000002", "a/b/000123", "a/b/000124"]
    assert [s.data for s in got] == [_png(0), _png(1), None, _png(9), _png(4)]
    assert [s.text for s in got] == ["caption 0", "caption 1", "caption only", "caf\u00e9", None]
    assert [s.error for s in got] == [None, None, "no image in sample (members: .txt, .json)", None, None]
    assert load_image(got[0].data).size == (5, 4)  # the bytes decode as the image written


@pytest.mark.parametrize("suffix, mode", [(".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar.xz", "w:xz")])
def test_compressed_tars(tmp_path, suffix, mode):
    path = tmp_path / f"s{suffix}"
    path.write_bytes(_tar_bytes(_img2dataset(5, 3), mode))
    got = _all(open_inputs([str(path)]))
    assert [(s.key, s.data, s.text, s.error) for s in got] == [
        (f"{i:09d}", _png(i), f"caption {i}", None) for i in range(5, 8)]


def _cut_points(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmembers()


@pytest.mark.parametrize("where", ["data", "header", "boundary", "end-blocks"])
def test_truncated_tar(tmp_path, where):
    """A tar cut anywhere yields the samples before the cut, then one '#truncated' error Sample (the
    sample being read at the cut is left out); it never raises."""
    raw = _tar_bytes(_img2dataset(0, 4))
    members = _cut_points(raw)
    m, end = members[7], members[-1]  # 000000002.txt (2nd member of the 3rd sample), the last member
    end_of_data = end.offset_data + -(-end.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # padded to a block
    cut = {"data": m.offset_data + 3, "header": m.offset + 100, "boundary": m.offset,
           "end-blocks": end_of_data}[where]  # end-blocks: every member complete, the zero blocks missing
    path = tmp_path / "cut.tar"
    path.write_bytes(raw[:cut])
    got = _all(open_inputs([str(path)]))
    n_ok = 3 if where == "end-blocks" else 2
    assert [s.key for s in got] == [f"{i:09d}" for i in range(n_ok)] + [f"{path}#truncated"]
    assert all(s.error is None and s.data == _png(i) for i, s in enumerate(got[:-1]))
    last = got[-1]
    assert last.data is None and last.error.startswith(f"tar truncated or corrupt after {n_ok} samples")
    assert f"'{n_ok:09d}' is left out" in last.error


def test_truncated_tar_gz(tmp_path):
    raw = _tar_bytes(_img2dataset(0, 40), "w:gz")
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(raw[: len(raw) // 2])
    got = _all(open_inputs([str(path)]))
    assert got[-1].key == f"{path}#truncated" and got[-1].error
    assert 0 < len(got) - 1 < 40
    assert [s.key for s in got[:-1]] == [f"{i:09d}" for i in range(len(got) - 1)]
    assert all(s.error is None and s.data == _png(i) for i, s in enumerate(got[:-1]))


def test_unreadable_tar(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    gone = tmp_path / "gone.tar"
    gone.write_bytes(_tar_bytes(_img2dataset(0, 1)))
    parts = open_inputs([str(bad), str(gone)])
    gone.unlink()  # vanished between planning and reading
    got = [list(p.samples()) for p in parts]
    assert [[s.key for s in g] for g in got] == [[f"{bad}#unreadable"], [f"{gone}#unreadable"]]
    assert got[0][0].error.startswith("cannot open tar: ReadError")
    assert got[1][0].error.startswith("cannot open tar: FileNotFoundError")


# --- parquet ------------------------------------------------------------------------------------------------

def _spy_row_groups(monkeypatch) -> list:
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, row_groups=None, columns=None, **kw):
        calls.append((list(row_groups), list(columns)))
        return real(self, batch_size, row_groups=row_groups, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    return calls


def test_parquet_binary_column_parts(tmp_path, monkeypatch):
    n = 10
    images = [_png(i) if i != 6 else None for i in range(n)]
    table = pa.table({"key": [f"k{i}" for i in range(n)], "jpg": pa.array(images, pa.binary()),
                      "caption": [f"c{i}" for i in range(n)], "other": list(range(n))})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=3)  # row groups [0:3] [3:6] [6:9] [9:10]
    parts = open_inputs([str(path)], shard_size=4)
    assert [(p.name, p.size) for p in parts] == [(f"{path}[0:4]", 4), (f"{path}[4:8]", 4), (f"{path}[8:10]", 2)]
    calls = _spy_row_groups(monkeypatch)
    got = list(parts[1].samples())
    assert calls == [([1, 2], ["jpg", "caption", "key"])]  # only the row groups and columns needed
    assert [s.key for s in got] == ["k4", "k5", "k6", "k7"]
    assert [s.data for s in got] == [_png(4), _png(5), None, _png(7)]
    assert [s.text for s in got] == ["c4", "c5", "c6", "c7"]
    assert [s.error for s in got] == [None, None, "null value in column 'jpg'", None]
    assert [s.key for s in _all(parts)] == [f"k{i}" for i in range(n)]


def test_parquet_hf_image_struct(tmp_path):
    """HF datasets' Image feature: struct<bytes: binary, path: string>; the key is "{file}:{row}"."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": _png(0), "path": None}, {"bytes": None, "path": "img/1.png"}, None,
            {"bytes": None, "path": None}, {"bytes": _png(4), "path": "x.png"}]
    table = pa.table({"image": pa.array(rows, image_type), "text": ["t0", "t1", "t2", None, "t4"]})
    path = tmp_path / "hf.parquet"
    pq.write_table(table, path, row_group_size=2)
    got = _all(open_inputs([str(path)], shard_size=3))
    assert [s.key for s in got] == [f"{path}:{i}" for i in range(5)]
    assert [s.data for s in got] == [_png(0), "img/1.png", None, None, _png(4)]
    assert [s.text for s in got] == ["t0", "t1", "t2", None, "t4"]
    assert [s.error for s in got] == [None, None, "null value in column 'image'", "null value in column 'image'",
                                      None]


def test_parquet_path_column_and_texts(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"url": ["http://a/0.jpg", "http://a/1.jpg", "http://a/2.jpg"],
                             "path": ["0.jpg", None, "2.jpg"], "caption": ["a dog", "", None],
                             "text": ["x", "y", "z"]}), path)
    images = _all(open_inputs([str(path)]))  # default: "path" comes before "url"
    assert [(s.data, s.text, s.error) for s in images] == [
        ("0.jpg", "a dog", None), (None, "", "null value in column 'path'"), ("2.jpg", None, None)]
    assert [s.data for s in _all(open_inputs([str(path)], column="url"))] == [f"http://a/{i}.jpg" for i in range(3)]
    texts = _all(open_inputs([str(path)], modality="texts"))  # default: "caption"
    assert [(s.key, s.data, s.text, s.error) for s in texts] == [
        (f"{path}:0", None, "a dog", None), (f"{path}:1", None, "", "empty text"),
        (f"{path}:2", None, None, "null value in column 'caption'")]
    assert [s.text for s in _all(open_inputs([str(path)], modality="texts", column="text"))] == ["x", "y", "z"]


def test_vanished_or_corrupt_files_end_in_an_error_sample(tmp_path):
    """A parquet or text file that cannot be read when its Part streams gives one error Sample, no exception."""
    pq.write_table(pa.table({"caption": ["a", "b", "c"]}), tmp_path / "c.parquet")
    (tmp_path / "t.txt").write_text("a\nb\n")
    parts = open_inputs([str(tmp_path / "c.parquet"), str(tmp_path / "t.txt")], modality="texts")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 overwritten with junk PAR1")
    (tmp_path / "t.txt").unlink()
    got = [list(p.samples()) for p in parts]
    assert [[s.key for s in g] for g in got] == [[f"{parts[0].name}#unreadable"], [f"{parts[1].name}#unreadable"]]
    assert got[0][0].error.startswith("reading stopped after 0 samples: ArrowInvalid")
    assert got[1][0].error.startswith("reading stopped after 0 samples: FileNotFoundError")


def test_parquet_bad_columns(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"n": [1, 2], "name": ["a", "b"]}), path)
    with pytest.raises(ValueError, match=r"no column 'jpeg'; its columns: n, name"):
        open_inputs([str(path)], column="jpeg")
    with pytest.raises(ValueError, match=r"none of the default images columns \(image, jpg, png, bytes, path, url\)"):
        open_inputs([str(path)])
    with pytest.raises(ValueError, match=r"none of the default texts columns \(caption, text\).*columns: n, name"):
        open_inputs([str(path)], modality="texts")
    with pytest.raises(ValueError, match=r"column 'n' has type int64; images mode needs binary"):
        open_inputs([str(path)], column="n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="cannot read the parquet file"):
        open_inputs([str(tmp_path / "broken.parquet")])


# --- folders and loose image files --------------------------------------------------------------------------

def test_folders_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["photos/b.jpg", "photos/a.PNG", "photos/sub/c.webp", "photos/a-b.gif", "photos/notes.txt",
                 "photos/sub/.DS_Store", "loose.jpg", "odd.xyz"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    parts = open_inputs(["loose.jpg", "photos/", "odd.xyz"], shard_size=2)
    keys = ["loose.jpg", "photos/a-b.gif", "photos/a.PNG", "photos/b.jpg", "photos/sub/c.webp", "odd.xyz"]
    assert keys[1:5] == _expand_paths(["photos/"])  # the same files, in the same order, as the CLI's listing
    assert [(p.name, p.size) for p in parts] == [("images[0:2]", 2), ("images[2:4]", 2), ("images[4:6]", 2)]
    got = _all(parts)
    assert [s.key for s in got] == keys and [s.data for s in got] == keys  # unknown kinds: image files
    assert all(s.text is None and s.error is None for s in got)
    one = open_inputs(["photos"], shard_size=10)
    assert [(p.name, p.size) for p in one] == [("photos[0:4]", 4)]
    assert [s.key for s in one[0].samples()] == ["photos/a-b.gif", "photos/a.PNG", "photos/b.jpg",
                                                 "photos/sub/c.webp"]
    assert ".png" in IMAGE_EXTENSIONS and ".txt" not in IMAGE_EXTENSIONS


def test_part_order_and_pickling(tmp_path):
    (tmp_path / "x.tar").write_bytes(_tar_bytes(_img2dataset(0, 1)))
    (tmp_path / "a.jpg").write_bytes(_png(1))
    pq.write_table(pa.table({"image": [_png(2)]}), tmp_path / "t.parquet")
    specs = [str(tmp_path / n) for n in ["x.tar", "a.jpg", "t.parquet", "a.jpg"]]
    parts = open_inputs(specs)  # the image paths are pooled where the first of them appears
    assert [p.name for p in parts] == [specs[0], f"{specs[1]}[0:2]", f"{specs[2]}[0:1]"]
    again = pickle.loads(pickle.dumps(parts))  # Parts travel to worker processes
    assert [p.name for p in again] == [p.name for p in open_inputs(specs)]
    assert [(s.key, s.data) for s in _all(again)] == [("000000000", _png(0)), (specs[1], specs[1]),
                                                      (specs[1], specs[1]), (f"{specs[2]}:0", _png(2))]


# --- text files ---------------------------------------------------------------------------------------------

def test_text_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffa cat\r\n\nb dog\n   \nzebra \u00e9\nno newline".encode())
    parts = open_inputs([str(path)], modality="texts", shard_size=2)
    assert [(p.name, p.size) for p in parts] == [(f"{path}[0:2]", 2), (f"{path}[2:4]", 2), (f"{path}[4:6]", 2)]
    got = [list(p.samples()) for p in reversed(parts)][::-1]  # each Part reads on its own, in any order
    flat = [s for g in got for s in g]
    assert [s.key for s in flat] == [f"{path}:{i}" for i in range(1, 7)]
    assert [s.text for s in flat] == ["a cat", "", "b dog", "   ", "zebra \u00e9", "no newline"]
    assert [s.error for s in flat] == [None, "empty text", None, "empty text", None, None]
    assert all(s.data is None for s in flat)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    bad = _all(open_inputs([str(tmp_path / "bad.txt")], modality="texts"))
    assert bad[0].text == "ok" and bad[1].error.startswith("not valid UTF-8")


def test_text_file_cut_across_read_chunks(tmp_path):
    """Part boundaries recorded while counting a file read in 1 MiB chunks land on the right lines."""
    n = 150_000
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i}\n" for i in range(n)))  # ~1.6 MB
    parts = open_inputs([str(path)], modality="texts", shard_size=40_000)
    assert [p.size for p in parts] == [40_000, 40_000, 40_000, 30_000]
    for k in (1, 3):
        texts = [s.text for s in parts[k].samples()]
        assert texts == [f"line {i}" for i in range(40_000 * k, min(40_000 * (k + 1), n))]
    path.write_text("a\nb\n")  # a whole number of Parts, ending on a newline
    assert [p.size for p in open_inputs([str(path)], modality="texts", shard_size=2)] == [2]


# --- globs, braces, URLs ------------------------------------------------------------------------------------

@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i in (2, 0, 1):  # written out of order
        (d / f"{i:05d}.tar").write_bytes(_tar_bytes(_img2dataset(10 * i, 2)))
    return d


def test_globs(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir.parent)
    parts = open_inputs(["shards/*.tar"])
    assert [(p.name, p.size) for p in parts] == [(f"shards/{i:05d}.tar", None) for i in range(3)]
    assert [s.key for s in _all(parts)] == [f"{i:09d}" for i in (0, 1, 10, 11, 20, 21)]
    assert [p.name for p in open_inputs(["*/0000[12].tar"])] == ["shards/00001.tar", "shards/00002.tar"]
    assert [p.name for p in open_inputs([str(shard_dir / "*.tar")])] == [
        str(shard_dir / f"{i:05d}.tar") for i in range(3)]


def test_brace_patterns(shard_dir, monkeypatch):
    pytest.importorskip("braceexpand", reason="braceexpand is not installed: pip install braceexpand")
    monkeypatch.chdir(shard_dir.parent)
    parts = open_inputs(["shards/{00002..00000}.tar", "shards/0000{0,1}.t*"])
    assert [p.name for p in parts] == ["shards/00002.tar", "shards/00001.tar", "shards/00000.tar",
                                       "shards/00000.tar", "shards/00001.tar"]
    with pytest.raises(FileNotFoundError, match=r"'shards/00003.tar' \(from 'shards/\{00000..00003\}.tar'\)"):
        open_inputs(["shards/{00000..00003}.tar"])


def test_brace_pattern_needs_braceexpand(monkeypatch):
    monkeypatch.setitem(sys.modules, "braceexpand", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"'s/\{0..9\}.tar' needs braceexpand: pip install braceexpand"):
        open_inputs(["s/{0..9}.tar"])


def test_file_url(shard_dir, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(_png(3))
    parts = open_inputs([f"file://{shard_dir}/*.tar", f"file://{tmp_path}/photos"])
    assert [p.name for p in parts] == [f"file://{shard_dir}/{i:05d}.tar" for i in range(3)] + [
        f"file://{tmp_path}/photos[0:1]"]
    got = _all(parts)
    assert [s.key for s in got[:2]] == ["000000000", "000000001"] and got[0].data == _png(0)
    assert got[-1].key == f"file://{tmp_path}/photos/a.png"
    assert got[-1].data == str(tmp_path / "photos" / "a.png")  # a local path the image loader opens
    assert load_image(got[-1].data).size == (5, 4)


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/fastclip-test", recursive=True)


def test_memory_filesystem(memfs):
    """A remote-style URL: tars, parquet, a folder of images (read as bytes) and text, all through fsspec."""
    for i in (1, 0):
        memfs.pipe(f"/fastclip-test/shards/{i:05d}.tar", _tar_bytes(_img2dataset(10 * i, 2)))
    buf = io.BytesIO()
    pq.write_table(pa.table({"png": [_png(7), _png(8)], "caption": ["p7", "p8"]}), buf)
    memfs.pipe("/fastclip-test/data.parquet", buf.getvalue())
    memfs.pipe("/fastclip-test/photos/z/b.jpg", _png(5))
    memfs.pipe("/fastclip-test/photos/a.jpg", _png(6))
    memfs.pipe("/fastclip-test/photos/skip.json", b"{}")
    memfs.pipe("/fastclip-test/texts.txt", b"one\ntwo\n")
    base = "memory://fastclip-test"
    parts = open_inputs([f"{base}/shards/*.tar", f"{base}/data.parquet", f"{base}/photos/"])
    assert [(p.name, p.size) for p in parts] == [
        (f"{base}/shards/00000.tar", None), (f"{base}/shards/00001.tar", None), (f"{base}/data.parquet[0:2]", 2),
        (f"{base}/photos/[0:2]", 2)]
    got = _all(parts)
    assert [(s.key, s.data, s.text) for s in got] == [
        ("000000000", _png(0), "caption 0"), ("000000001", _png(1), "caption 1"),
        ("000000010", _png(10), "caption 10"), ("000000011", _png(11), "caption 11"),
        (f"{base}/data.parquet:0", _png(7), "p7"), (f"{base}/data.parquet:1", _png(8), "p8"),
        (f"{base}/photos/a.jpg", _png(6), None), (f"{base}/photos/z/b.jpg", _png(5), None)]
    parts = open_inputs([f"{base}/photos/a.jpg", f"{base}/photos/z/b.jpg"])
    memfs.rm("/fastclip-test/photos/a.jpg")  # gone before it is read: an error Sample, not an exception
    got = _all(parts)
    assert got[0].data is None and got[0].error.startswith("cannot read the image file: FileNotFoundError")
    assert got[1].data == _png(5) and got[1].error is None
    texts = _all(open_inputs([f"{base}/texts.txt"], modality="texts"))
    assert [(s.key, s.text) for s in texts] == [(f"{base}/texts.txt:1", "one"), (f"{base}/texts.txt:2", "two")]


def test_missing_fsspec_backend(monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "s3",  # as if s3fs were not installed
                        {"class": "fastclip_no_such_module.S3FileSystem", "err": "Install s3fs to access S3"})
    with pytest.raises(ImportError, match=r"'s3://bucket/shards/\*.tar' needs the fsspec backend for s3://.*"
                                          r"pip install s3fs"):
        open_inputs(["s3://bucket/shards/*.tar"])
    with pytest.raises(ValueError, match="Protocol not known: nosuchproto"):
        open_inputs(["nosuchproto://x/y.tar"])


# --- bad specs ----------------------------------------------------------------------------------------------

def test_bad_specs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-tars").mkdir()
    (tmp_path / "only-tars" / "0.tar").write_bytes(_tar_bytes([]))
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=f"no such file or folder: '{tmp_path}/missing.tar'"):
        open_inputs([str(tmp_path / "a.jpg"), str(tmp_path / "missing.tar")])
    with pytest.raises(FileNotFoundError, match=r"no files match '.*/\*.parquet'"):
        open_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(FileNotFoundError, match=r"folder '.*/empty' holds no input files \(.bmp, .gif"):
        open_inputs([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match=r"give a glob such as 'shards/\*.tar'"):
        open_inputs([str(tmp_path / "only-tars")])
    with pytest.raises(ValueError, match=r"texts mode reads .txt and .parquet files, got '.*a.jpg'"):
        open_inputs([str(tmp_path / "a.jpg")], modality="texts")
    with pytest.raises(ValueError, match="modality must be 'images' or 'texts', got 'audio'"):
        open_inputs([str(tmp_path / "a.jpg")], modality="audio")
    with pytest.raises(ValueError, match="shard_size must be an int >= 1, got 0"):
        open_inputs([str(tmp_path / "a.jpg")], shard_size=0)
    with pytest.raises(TypeError, match="wrap a single spec in a list"):
        open_inputs(str(tmp_path / "a.jpg"))
    assert open_inputs([]) == []
    with pytest.raises(ValueError, match="has no reader"):
        Part("x", 0).samples()
