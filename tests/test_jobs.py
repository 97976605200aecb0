"""fastclip.jobs and `fastclip embed --out DIR`: clip-retrieval's layout shard by shard, rows aligned with their
metadata, bad samples recorded, resume after an exception and after SIGKILL, texts and captions."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import fastclip
from fastclip import tolerance
from fastclip.cli import main
from fastclip.jobs import embed_corpus
from helpers.upstream import save_tiny_openai_checkpoint

# fp16 storage of unit vectors: one fp16 rounding on top of the fp32 result
STORED_FP16_ATOL = tolerance.rounding_bound(1.0, torch.float16) + tolerance.REPEAT_ATOL


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small OpenAI-layout CLIP checkpoint (architecture inferred from its shapes when loaded)."""
    return save_tiny_openai_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-openai.pt")


@pytest.fixture(scope="module")
def model(checkpoint):
    return fastclip.load(checkpoint)


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path, samples):
    """samples: (key, {ext: bytes}) in img2dataset's layout."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _read_job(out, kind="img"):
    """All shards of a job directory: (embeddings float32, metadata table, errors table), in shard order."""
    embs = [np.load(p) for p in sorted((out / f"{kind}_emb").glob("*.npy"))]
    meta = pa.concat_tables([pq.read_table(p) for p in sorted((out / "metadata").glob("*.parquet"))])
    errors = pa.concat_tables([pq.read_table(p) for p in sorted((out / "errors").glob("*.parquet"))])
    return np.concatenate(embs).astype(np.float32), meta, errors


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three WebDataset tars of 7 samples each; sample 3 of each tar has a corrupt image, sample 5 of the
    second an empty caption."""
    d = tmp_path_factory.mktemp("wds")
    for t in range(3):
        samples = []
        for s in range(7):
            key = f"{t:05d}{s:04d}"
            image = b"\xff\xd8 not a jpeg" if s == 3 else _jpeg(100 * t + s)
            caption = "" if (t, s) == (1, 5) else f"caption {t} {s}"
            samples.append((key, {"jpg": image, "txt": caption.encode(), "json": json.dumps({"key": key}).encode()}))
        _write_tar(d / f"{t:05d}.tar", samples)
    return d


def test_tar_job_layout_rows_and_errors(model, shards, tmp_path):
    out = tmp_path / "job"
    summary = embed_corpus(model, [str(shards / "{00000..00002}.tar")], out, captions=True, progress=False)
    assert (summary.samples, summary.failed, summary.shards_written) == (21, 4, 3)
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{i}.npy" for i in range(3)]
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == [f"text_emb_{i}.npy" for i in range(3)]
    img, meta, errors = _read_job(out)
    text = np.concatenate([np.load(p) for p in sorted((out / "text_emb").glob("*.npy"))]).astype(np.float32)
    assert np.load(out / "img_emb" / "img_emb_0.npy").dtype == np.float16
    keys = meta.column("key").to_pylist()
    expected_keys = [f"{t:05d}{s:04d}" for t in range(3) for s in range(7) if s != 3 and (t, s) != (1, 5)]
    assert keys == expected_keys and meta.column("image_path").to_pylist() == keys
    assert sorted(errors.column("key").to_pylist()) == sorted([f"{t:05d}0003" for t in range(3)] + ["000010005"])
    reasons = dict(zip(errors.column("key").to_pylist(), errors.column("reason").to_pylist(), strict=True))
    assert reasons["000010005"] == "empty caption" and "image" in reasons["000000003"]
    # every row is the embedding of its own key's image and caption
    with tarfile.open(shards / "00001.tar") as tar:
        jpgs = {m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    rows = [i for i, k in enumerate(keys) if k.startswith("00001")]
    np.testing.assert_allclose(img[rows], model.embed_images([jpgs[keys[i]] for i in rows]), atol=STORED_FP16_ATOL)
    captions = meta.column("caption").to_pylist()
    np.testing.assert_allclose(text, model.embed_texts(captions), atol=STORED_FP16_ATOL)
    assert captions[0] == "caption 0 0"


def test_folder_shards_float32_and_refusals(model, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i in range(11):
        p = folder / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.jpg"
        p.write_bytes(_jpeg(i) if i != 4 else b"broken")
        paths.append(p)
    out = tmp_path / "job"
    summary = embed_corpus(model, [str(folder)], out, shard_size=4, dtype="float32", progress=False)
    assert (summary.shards_written, summary.embedded, summary.failed) == (3, 10, 1)
    img, meta, errors = _read_job(out)
    assert img.dtype == np.float32 and len(meta) == 10
    good = [k for k in meta.column("key").to_pylist()]
    np.testing.assert_allclose(img, model.embed_images(good), atol=tolerance.REPEAT_ATOL)
    assert errors.column("key").to_pylist() == [str(folder / "img04.jpg")]
    with pytest.raises(FileExistsError, match="resume"):
        embed_corpus(model, [str(folder)], out, shard_size=4, dtype="float32", progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        embed_corpus(model, [str(folder)], out, shard_size=5, dtype="float32", progress=False, resume=True)
    with pytest.raises(ValueError, match="local directory"):
        embed_corpus(model, [str(folder)], "s3://bucket/out", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        embed_corpus(model, [str(folder)], tmp_path / "other", dtype="int8", progress=False)


def test_resume_after_an_exception_redoes_only_the_unfinished_shard(model, shards, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    embed_corpus(model, [str(shards / "*.tar")], clean, progress=False)
    out = tmp_path / "job"
    real = type(model).embed_images
    calls = []

    def failing(self, items, **kw):
        calls.append(len(items))
        if len(calls) == 2:  # the second tar
            raise RuntimeError("interrupted")
        return real(self, items, **kw)

    monkeypatch.setattr(type(model), "embed_images", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        embed_corpus(model, [str(shards / "*.tar")], out, progress=False)
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["metadata_0.parquet"]
    monkeypatch.setattr(type(model), "embed_images", real)
    summary = embed_corpus(model, [str(shards / "*.tar")], out, progress=False, resume=True)
    assert (summary.shards_skipped, summary.shards_written, summary.samples) == (1, 2, 21)
    for kind in ("img_emb", "metadata", "errors"):
        assert sorted(p.name for p in (out / kind).iterdir()) == sorted(p.name for p in (clean / kind).iterdir())
    a, meta_a, err_a = _read_job(out)
    b, meta_b, err_b = _read_job(clean)
    np.testing.assert_array_equal(a, b)
    assert meta_a.equals(meta_b) and err_a.equals(err_b)


def test_texts_job_from_text_file_and_parquet_column(model, tmp_path):
    lines = ["a dog", "", "a cat on a mat", "two birds", "   ", "the sea"]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "texts"
    summary = embed_corpus(model, [str(tmp_path / "captions.txt")], out, modality="texts", shard_size=4,
                           progress=False)
    assert (summary.embedded, summary.failed, summary.shards_written) == (4, 2, 2)
    text, meta, errors = _read_job(out, "text")
    assert meta.column("caption").to_pylist() == ["a dog", "a cat on a mat", "two birds", "the sea"]
    np.testing.assert_allclose(text, model.embed_texts(meta.column("caption").to_pylist()), atol=STORED_FP16_ATOL)
    assert len(errors) == 2
    table = pa.table({"key": [f"k{i}" for i in range(5)], "caption": ["red", "green", None, "blue", "white"]})
    pq.write_table(table, tmp_path / "caps.parquet", row_group_size=2)
    summary = embed_corpus(model, [str(tmp_path / "caps.parquet")], tmp_path / "pq", modality="texts",
                           column="caption", progress=False)
    text, meta, errors = _read_job(tmp_path / "pq", "text")
    assert meta.column("key").to_pylist() == ["k0", "k1", "k3", "k4"] and errors.column("key").to_pylist() == ["k2"]
    np.testing.assert_allclose(text, model.embed_texts(["red", "green", "blue", "white"]), atol=STORED_FP16_ATOL)


def test_cli_directory_and_single_file_modes(checkpoint, model, shards, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["embed", str(shards / "*.tar"), "--model", str(checkpoint), "--out", str(out), "-q"]) == 0
    assert "18 embedded, 3 failed of 21 samples; 3 shards written" in capsys.readouterr().err
    img, meta, _ = _read_job(out)
    single = tmp_path / "one.npy"
    assert main(["embed", str(shards / "*.tar"), "--model", str(checkpoint), "--out", str(single), "-q"]) == 0
    err = capsys.readouterr().err
    assert "3 skipped" in err and "#" not in err.split("skipped", 1)[0]
    np.testing.assert_allclose(np.load(single), img, atol=STORED_FP16_ATOL)
    assert single.with_suffix(".paths.txt").read_text().split() == meta.column("key").to_pylist()
    assert main(["embed", str(shards / "*.tar"), "--model", str(checkpoint), "--out", str(out), "-q"]) == 2
    assert "resume" in capsys.readouterr().err
    texts = tmp_path / "captions.txt"
    texts.write_text("a dog\n\na cat\n")
    assert main(["embed", "--texts", str(texts), "--model", str(checkpoint), "--out", str(tmp_path / "t"), "-q"]) == 0
    text, meta, errors = _read_job(tmp_path / "t", "text")
    assert meta.column("caption").to_pylist() == ["a dog", "a cat"] and errors.column("reason").to_pylist() == [
        "empty text"]
    np.testing.assert_allclose(text, model.embed_texts(["a dog", "a cat"]), atol=STORED_FP16_ATOL)
    assert main(["embed", str(tmp_path / "nothing-*.tar"), "--model", str(checkpoint), "--out", str(tmp_path / "x"),
                 "-q"]) == 2
    assert "nothing-" in capsys.readouterr().err


def test_sigkill_loses_at_most_the_shard_in_progress(checkpoint, tmp_path):
    """A job killed with SIGKILL while it writes shards leaves only finished shards (metadata present and its
    rows equal to its embeddings'); --resume then finishes it equal to an uninterrupted run."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(48):
        (folder / f"{i:03d}.jpg").write_bytes(_jpeg(i, size=(64, 48)))
    cmd = [sys.executable, "-m", "fastclip", "embed", str(folder), "--model", str(checkpoint), "--shard-size", "4",
           "--batch-size", "2", "-q", "--out"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd + [str(tmp_path / "clean")], check=True, env=env, capture_output=True)
    out = tmp_path / "job"
    proc = subprocess.Popen(cmd + [str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = list((out / "metadata").glob("metadata_*.parquet")) if (out / "metadata").exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted((out / "metadata").glob("metadata_*.parquet"))
    assert 3 <= len(finished) < 12, "the job was killed mid-way"
    for meta in finished:
        i = meta.stem.split("_")[1]
        assert np.load(out / "img_emb" / f"img_emb_{i}.npy").shape[0] == pq.read_table(meta).num_rows == 4
    subprocess.run(cmd + [str(out), "--resume"], check=True, env=env, capture_output=True)
    assert not list(out.rglob(".*.tmp"))
    a, meta_a, _ = _read_job(out)
    b, meta_b, _ = _read_job(tmp_path / "clean")
    np.testing.assert_array_equal(a, b)
    assert meta_a.equals(meta_b)
