"""Job inputs over s3:// (s3fs) and gs:// (gcsfs) from real local object-store servers (moto's S3 server,
gcp-storage-emulator's GCS JSON API): WebDataset tars by brace pattern and glob, single image objects, a text file
and a Parquet file, with the same rows as the same files read from disk; the CLI once per store; clear errors for
objects that are not there.

Both filesystems are pointed at the servers the way a user does it, through the environment:

* s3fs: ``AWS_ENDPOINT_URL_S3=http://HOST:PORT`` (botocore, read when a client is made) or
  ``FSSPEC_S3_ENDPOINT_URL=http://HOST:PORT`` (fsspec's config, read when fsspec is imported: used by the CLI test),
  plus ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION``;
* gcsfs: ``STORAGE_EMULATOR_HOST=http://HOST:PORT``, ``FSSPEC_GCS_TOKEN=anon`` (no credential lookup) and
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (else gcsfs asks the emulator for the bucket's layout over gRPC
  first). The last two are read at import time, so in this process the fixture applies what they do (the
  fsspec config entry and the registry entry of gs://) and the CLI test sets the variables themselves.
"""
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastclip
from fastclip.jobs import embed_corpus, open_inputs
from helpers.upstream import save_tiny_openai_checkpoint
from test_jobs import STORED_FP16_ATOL, _jpeg, _read_job, _write_tar

pytest.importorskip("s3fs", reason="the s3:// backend of fsspec (in fastclip's test extra)")
moto_server = pytest.importorskip("moto.server", reason="moto[server] runs a local S3 server (in the test extra)")
pytest.importorskip("gcsfs", reason="the gs:// backend of fsspec (in fastclip's test extra)")
gcs_emulator = pytest.importorskip("gcp_storage_emulator.server",
                                   reason="gcp-storage-emulator runs a local GCS server (in the test extra)")

BUCKET = "bucket"
PARQUET_ROWS = 5  # row 3 holds bytes that are no image
BAD_IMAGE = "not a recognised image file (unknown format or corrupt header)"  # the reason recorded


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The files every store holds, on disk: shards/0000{0,1}.tar (5 good samples + 1 corrupt each, img2dataset
    layout), images/a.jpg, images/b.jpg, texts.txt, pairs.parquet (columns img_bytes, caption)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "shards").mkdir()
    for t in range(2):
        _write_tar(root / "shards" / f"{t:05d}.tar",
                   [(f"{t:05d}{s:04d}", {"jpg": _jpeg(10 * t + s), "txt": f"cap {t} {s}".encode()}) for s in range(5)]
                   + [(f"{t:05d}0009", {"jpg": b"\xff\xd8 broken", "txt": b"broken"})])
    (root / "images").mkdir()
    (root / "images" / "a.jpg").write_bytes(_jpeg(50))
    (root / "images" / "b.jpg").write_bytes(_jpeg(51, size=(33, 57)))
    (root / "texts.txt").write_text("a dog\n\na cat on a mat\n")
    images = [_jpeg(60 + i) if i != 3 else b"not an image" for i in range(PARQUET_ROWS)]
    pq.write_table(pa.table({"img_bytes": pa.array(images, pa.binary()),
                             "caption": [f"pair {i}" for i in range(PARQUET_ROWS)]}), root / "pairs.parquet",
                   row_group_size=2)
    return root


@dataclass
class Store:
    name: str      # "s3" or "gs"
    base: str      # URL of the bucket, e.g. "s3://bucket"
    env: dict      # what a user sets in a fresh shell to reach the server (the CLI test's environment)


def _upload(fs, root):
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fs.pipe(f"{BUCKET}/{path.relative_to(root).as_posix()}", path.read_bytes())


def _s3(mp, root, tmp):
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
        mp.delenv(var, raising=False)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_CONFIG_FILE": str(tmp / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none")}
    for var, value in {**creds, "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}.items():
        mp.setenv(var, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    _upload(fs, root)
    return server.stop, {**creds, "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}"}, s3fs.S3FileSystem


def _gs(mp, root, tmp):
    import fsspec.config
    import gcsfs.core
    from fsspec.registry import _registry

    server = gcs_emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    host, port = server._api._httpd.server_address
    mp.setenv("STORAGE_EMULATOR_HOST", f"http://{host}:{port}")
    mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})  # what FSSPEC_GCS_TOKEN=anon gives at import
    for proto in ("gs", "gcs"):  # what GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false gives at import
        mp.setitem(_registry, proto, gcsfs.core.GCSFileSystem)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    _upload(gcsfs.core.GCSFileSystem(), root)
    env = {"STORAGE_EMULATOR_HOST": f"http://{host}:{port}", "FSSPEC_GCS_TOKEN": "anon",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    return server.stop, env, gcsfs.core.GCSFileSystem


@pytest.fixture(scope="module", params=["s3", "gs"])
def store(request, corpus, tmp_path_factory):
    """A local server of the store holding ``corpus`` in BUCKET, the process's environment pointing at it."""
    with pytest.MonkeyPatch.context() as mp:
        stop, env, fs_class = (_s3 if request.param == "s3" else _gs)(mp, corpus, tmp_path_factory.mktemp("cfg"))
        try:
            yield Store(request.param, f"{request.param}://{BUCKET}", env)
        finally:
            fs_class.clear_instance_cache()
            stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_openai_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-openai.pt")


@pytest.fixture(scope="module")
def model(checkpoint):
    return fastclip.load(checkpoint)


def _assert_same_job(out, local, kinds=("img", "text")):
    for kind in kinds:
        r_emb, r_meta, r_err = _read_job(out, kind)
        l_emb, l_meta, l_err = _read_job(local, kind)
        assert r_meta.column("key").to_pylist() == l_meta.column("key").to_pylist()
        assert r_err.column("key").to_pylist() == l_err.column("key").to_pylist()
        assert r_err.column("reason").to_pylist() == l_err.column("reason").to_pylist()
        np.testing.assert_array_equal(r_emb, l_emb)


def test_tars_by_braces_and_glob_equal_the_local_files(model, store, corpus, tmp_path):
    names = [f"{store.base}/shards/00000.tar", f"{store.base}/shards/00001.tar"]
    assert [p.name for p in open_inputs([store.base + "/shards/*.tar"])] == names  # a listing of the bucket
    local = embed_corpus(model, [str(corpus / "shards/{00000..00001}.tar")], tmp_path / "local", captions=True,
                         progress=False)
    for i, spec in enumerate([store.base + "/shards/{00000..00001}.tar", store.base + "/shards/*.tar"]):
        remote = embed_corpus(model, [spec], tmp_path / f"r{i}", captions=True, progress=False)
        assert (remote.embedded, remote.failed, remote.shards_written) == (local.embedded, local.failed, 2) == (10, 2, 2)
        _assert_same_job(tmp_path / f"r{i}", tmp_path / "local")
        _, meta, errors = _read_job(tmp_path / f"r{i}")
        assert errors.column("key").to_pylist() == ["000000009", "000010009"]
        assert errors.column("reason").to_pylist() == [BAD_IMAGE] * 2
        assert meta.column("caption").to_pylist()[:2] == ["cap 0 0", "cap 0 1"]
    want = model.embed_images([_jpeg(s) for s in range(5)] + [_jpeg(10 + s) for s in range(5)])
    np.testing.assert_allclose(_read_job(tmp_path / "r1")[0], want, atol=STORED_FP16_ATOL, rtol=0)


def test_image_objects_and_text_file_give_the_local_rows(model, store, corpus, tmp_path):
    urls = [store.base + "/images/b.jpg", store.base + "/images/a.jpg"]
    samples = [s for p in open_inputs(urls) for s in p.samples()]
    assert [s.key for s in samples] == urls
    assert [s.data for s in samples] == [(corpus / "images/b.jpg").read_bytes(), (corpus / "images/a.jpg").read_bytes()]
    embed_corpus(model, urls, tmp_path / "img", progress=False)
    embed_corpus(model, [str(corpus / "images/b.jpg"), str(corpus / "images/a.jpg")], tmp_path / "img_local",
                 progress=False)
    np.testing.assert_array_equal(_read_job(tmp_path / "img")[0], _read_job(tmp_path / "img_local")[0])
    assert _read_job(tmp_path / "img")[1].column("key").to_pylist() == urls

    remote = [s for p in open_inputs([store.base + "/texts.txt"], modality="texts") for s in p.samples()]
    local = [s for p in open_inputs([str(corpus / "texts.txt")], modality="texts") for s in p.samples()]
    assert [(s.key, s.text, s.error) for s in remote] == [
        (f"{store.base}/texts.txt:{i}", s.text, s.error) for i, s in enumerate(local, 1)]
    assert [s.text for s in remote] == ["a dog", "", "a cat on a mat"] and remote[1].error == "empty text"
    embed_corpus(model, [store.base + "/texts.txt"], tmp_path / "txt", modality="texts", progress=False)
    text, meta, errors = _read_job(tmp_path / "txt", "text")
    assert meta.column("caption").to_pylist() == ["a dog", "a cat on a mat"]
    assert errors.column("key").to_pylist() == [store.base + "/texts.txt:2"]
    np.testing.assert_allclose(text, model.embed_texts(["a dog", "a cat on a mat"]), atol=STORED_FP16_ATOL, rtol=0)


def test_parquet_column_equals_the_local_file(model, store, corpus, tmp_path):
    url = store.base + "/pairs.parquet"
    with pytest.raises(ValueError, match=f"parquet file '{url}' has none of the default images columns .*"
                                         "its columns: img_bytes, caption"):
        open_inputs([url])
    remote = embed_corpus(model, [url], tmp_path / "remote", column="img_bytes", captions=True, shard_size=3,
                          progress=False)
    embed_corpus(model, [str(corpus / "pairs.parquet")], tmp_path / "local", column="img_bytes", captions=True,
                 shard_size=3, progress=False)
    assert (remote.embedded, remote.failed, remote.shards_written) == (4, 1, 2)
    for kind in ("img", "text"):
        r_emb, r_meta, r_err = _read_job(tmp_path / "remote", kind)
        l_emb, l_meta, l_err = _read_job(tmp_path / "local", kind)
        assert r_meta.column("key").to_pylist() == [f"{url}:{i}" for i in (0, 1, 2, 4)]
        assert [k.rsplit(":", 1)[1] for k in l_meta.column("key").to_pylist()] == ["0", "1", "2", "4"]
        assert r_err.column("key").to_pylist() == [f"{url}:3"]
        assert r_err.column("reason").to_pylist() == [BAD_IMAGE]
        assert r_err.column("reason").to_pylist() == l_err.column("reason").to_pylist()
        np.testing.assert_array_equal(r_emb, l_emb)
    np.testing.assert_allclose(_read_job(tmp_path / "remote")[0], model.embed_images([_jpeg(60 + i) for i in (0, 1, 2, 4)]),
                               atol=STORED_FP16_ATOL, rtol=0)


def test_cli_reads_the_store_configured_by_environment(checkpoint, model, store, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "STORAGE_EMULATOR", "GCSFS_"))}
    env.update(store.env, OMP_NUM_THREADS="1")
    out = tmp_path / "job"
    proc = subprocess.run([sys.executable, "-m", "fastclip", "embed", store.base + "/shards/*.tar", "--model",
                           str(checkpoint), "--out", str(out), "--captions", "-q"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "10 embedded, 2 failed of 12 samples; 2 shards written" in proc.stderr
    img, meta, errors = _read_job(out)
    assert meta.column("key").to_pylist() == [f"0000{t}000{s}" for t in range(2) for s in range(5)]
    assert errors.column("key").to_pylist() == ["000000009", "000010009"]
    want = model.embed_images([_jpeg(s) for s in range(5)] + [_jpeg(10 + s) for s in range(5)])
    np.testing.assert_allclose(img, want, atol=STORED_FP16_ATOL, rtol=0)


def test_missing_objects_are_clear_errors(model, store, tmp_path):
    base = store.base
    cases = [
        ([base + "/nope/*.tar"], f"no files match '{base}/nope/*.tar'"),
        ([base + "/shards/00007.tar"], f"no such file or folder: '{base}/shards/00007.tar'"),
        ([base + "/shards/{00000..00002}.tar"],
         f"no such file or folder: '{base}/shards/00002.tar' (from '{base}/shards/{{00000..00002}}.tar')"),
        ([base + "/images/a.jpg", base + "/images/missing.jpg"],
         f"no such file or folder: '{base}/images/missing.jpg'"),
    ]
    for i, (specs, message) in enumerate(cases):
        with pytest.raises(FileNotFoundError) as excinfo:
            embed_corpus(model, specs, tmp_path / f"job{i}", progress=False)
        assert str(excinfo.value) == message
        assert not (tmp_path / f"job{i}").exists()  # refused before anything is written
