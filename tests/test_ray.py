"""fastclip.ray on a real local Ray cluster (2 CPUs): ImageEmbedder / TextEmbedder inside ``Dataset.map_batches``
against ``model.embed_images`` / ``embed_texts`` run in this process on the same items and the same weights (an
OpenCLIP directory of a perturbed tiny open_clip model, loaded by every actor with ``fastclip.load``). Rows are
compared by their key, since Ray Data does not keep the order of blocks."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

import fastclip
import fastclip.ray as fray
from fastclip import tolerance
from fastclip.models.tiny import TINY_CONFIGS
from fastclip.ray import ImageEmbedder, TextEmbedder
from helpers.upstream import openclip_upstream, save_state_dict

NAME = "tiny-clip"  # fastclip/models/tiny.py
CORRUPT = b"\xff\xd8\xff\xe0 definitely not a jpeg"
HALF = 0.5  # CPUs per actor where two actors and a read task share the 2 CPUs (else the read task never starts)
TEXTS = ["a photo of a cat", "", "a diagram of a very long and winding river delta seen from above", "   ",
         "two dogs", "a red bicycle leaning on a wall"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tiny_config_dir, tmp_path_factory):
    """An OpenCLIP directory (open_clip_config.json + open_clip_model.safetensors) of a perturbed tiny-clip:
    self-contained, so Ray's worker processes load it without the test's config registry."""
    up = openclip_upstream(NAME, seed=7)
    directory = tmp_path_factory.mktemp("tiny_clip_dir")
    save_state_dict(up.model.state_dict(), directory / "open_clip_model.safetensors", "safetensors")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIGS[NAME],
                                                                 "preprocess_cfg": {}}))
    return str(directory)


@pytest.fixture(scope="module")
def ref(model_dir):
    """The same model in this process: the reference every Ray result is compared with."""
    return fastclip.load(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five images of different sizes and formats: (paths, encoded bytes of each)."""
    folder = tmp_path_factory.mktemp("ray_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w, fmt) in enumerate([(60, 80, "JPEG"), (90, 50, "PNG"), (48, 48, "JPEG"), (120, 70, "PNG"),
                                     (33, 101, "JPEG")]):
        grad = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]  # smooth (H, W, 1)
        pixels = np.clip(grad + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)  # (H, W, 3)
        paths.append(str(folder / f"img{i}.{fmt.lower().replace('jpeg', 'jpg')}"))
        Image.fromarray(pixels).save(paths[-1], format=fmt)
    return paths, [open(p, "rb").read() for p in paths]


def _expected(ref, items, texts: bool = False) -> dict[int, np.ndarray]:
    """{position: embedding} of the items ``ref`` embeds, run with on_error="skip" in this process."""
    result = ref.embed_texts(items, on_error="skip") if texts else ref.embed_images(items, on_error="skip")
    return dict(zip(result.indices.tolist(), result.embeddings, strict=True))


def _check_rows(rows: list[dict], keys: list, expected: dict[int, np.ndarray], errors: dict[int, str], what: str,
                emb: str = "embedding", err: str = "error", key: str = "key") -> float:
    """Every key comes back once; rows in ``expected`` carry its embedding (SAME_MODEL_ATOL) and no error, rows
    in ``errors`` a null embedding and an error naming their key and containing that text. Returns the max-abs."""
    by_key = {r[key]: r for r in rows}
    assert len(rows) == len(keys) and sorted(by_key) == sorted(keys), f"{what}: rows lost, duplicated or renamed"
    assert set(expected) | set(errors) == set(range(len(keys)))
    worst = 0.0
    for i, k in enumerate(keys):
        row = by_key[k]
        if i in errors:
            assert row[emb] is None, f"{what}: row {k} failed but has an embedding"
            assert row[err] is not None and errors[i] in row[err] and repr(k) in row[err], (k, row[err])
            continue
        assert row[err] is None, f"{what}: row {k}: {row[err]}"
        got = np.asarray(row[emb], dtype=np.float32)
        assert got.shape == expected[i].shape
        np.testing.assert_allclose(np.linalg.norm(got), 1.0, atol=tolerance.UNIT_NORM_ATOL[torch.float32])
        worst = max(worst, float(np.abs(got - expected[i]).max()))
    assert worst <= tolerance.SAME_MODEL_ATOL, f"{what}: max-abs {worst:.2e} vs embed in this process"
    print(f"{what}: max-abs vs in-process embed {worst:.2e}")
    return worst


# -------------------------------------------------------------------------- actors: threads, device
def test_actor_sets_threads_to_its_cpus(cluster, model_dir):
    """An actor given 2 CPUs runs torch and the decoder on 2 threads, whatever OMP_NUM_THREADS said."""
    actor = ray.remote(ImageEmbedder).options(num_cpus=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "3"}})
    handle = actor.remote(model=model_dir)
    try:
        settings = ray.get(handle.settings.remote())
    finally:
        ray.kill(handle)
    assert settings["threads"] == 2 and settings["decode_threads"] == 2, settings
    assert settings["device"] == "cpu" and settings["backend"] in ("cpu", "ref"), settings


def test_gpu_assignment_picks_cuda_and_the_default_backend(model_dir, monkeypatch):
    """Ray's {"GPU": 1} (num_gpus=1) means device "cuda" and backend None (auto: triton); outside Ray the
    threads are left as they are."""
    calls, real_load = [], fastclip.load

    def load(name, pretrained=None, device="cpu", precision="fp32", backend=None):
        calls.append((device, backend, precision))
        return real_load(name, pretrained=pretrained, precision=precision)  # on the CPU: no GPU needed here

    before = torch.get_num_threads()
    monkeypatch.setattr(fastclip, "load", load)
    ImageEmbedder(model_dir)
    assert calls[-1] == ("cpu", None, "fp32") and torch.get_num_threads() == before
    monkeypatch.setattr(fray, "assigned_resources", lambda: {"CPU": 1.0, "GPU": 1.0})
    try:
        embedder = TextEmbedder(model_dir)
        assert calls[-1] == ("cuda", None, "fp32") and torch.get_num_threads() == 1 == embedder.threads
        ImageEmbedder(model_dir, device="cpu", backend="ref")
        assert calls[-1] == ("cpu", "ref", "fp32")
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------- Ray Data pipelines
def test_image_paths_from_items(cluster, model_dir, ref, images, tmp_path):
    """Paths (one missing) through from_items in Ray's numpy batch format: each row keeps its key."""
    paths, _ = images
    items = [paths[0], paths[1], str(tmp_path / "missing.png"), paths[2], paths[3], paths[4]]
    keys = [f"k{i:02d}" for i in range(len(items))]
    ds = ray.data.from_items([{"key": k, "image": p} for k, p in zip(keys, items, strict=True)], override_num_blocks=2)
    rows = ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"model": model_dir, "key_column": "key",
                                                                "batch_size": 2},
                          concurrency=1, batch_size=4, batch_format="numpy").take_all()
    _check_rows(rows, keys, _expected(ref, items), {2: "file not found"}, "paths (from_items, numpy batches)")


def test_image_bytes_and_structs_from_parquet(cluster, model_dir, ref, images, tmp_path):
    """A Parquet file of Hugging Face Image structs {bytes, path} (bytes win over a path that does not exist;
    a path alone; corrupt, truncated and null images) and of raw bytes, embedded by two chained actors."""
    paths, blobs = images
    structs = [{"bytes": blobs[0], "path": "not/there.jpg"}, {"bytes": blobs[1], "path": None},
               {"bytes": CORRUPT, "path": None}, {"bytes": None, "path": paths[2]}, None,
               {"bytes": blobs[3][: len(blobs[3]) // 2], "path": None},
               {"bytes": None, "path": str(tmp_path / "no.png")}]
    as_items = [blobs[0], blobs[1], CORRUPT, paths[2], None, blobs[3][: len(blobs[3]) // 2], str(tmp_path / "no.png")]
    raw = [blobs[4], CORRUPT, blobs[2], None, blobs[0], blobs[1], b""]
    keys = [f"p{i}" for i in range(len(structs))]
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"key": keys, "image": pa.array(structs, struct_type), "raw": pa.array(raw, pa.binary())}),
                   tmp_path / "images.parquet", row_group_size=3)
    ds = ray.data.read_parquet(str(tmp_path / "images.parquet"))
    ds = ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"model": model_dir, "key_column": "key"},
                        concurrency=1, num_cpus=HALF, batch_size=3, batch_format="pyarrow")
    ds = ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"model": model_dir, "column": "raw", "key_column": "key",
                                                              "embedding_column": "raw_emb", "error_column": "raw_err"},
                        concurrency=1, num_cpus=HALF, batch_size=4, batch_format="pyarrow")
    rows = ds.take_all()
    expected = _expected(ref, [x for x in as_items if x is not None])
    good = [i for i, x in enumerate(as_items) if x is not None]
    _check_rows(rows, keys, {good[j]: e for j, e in expected.items()},
                {2: "cannot open image", 4: "null value", 5: "truncated", 6: "file not found"},
                "HF structs (read_parquet, pyarrow batches)")
    good = [i for i, x in enumerate(raw) if x is not None]
    expected = _expected(ref, [raw[i] for i in good])
    _check_rows(rows, keys, {good[j]: e for j, e in expected.items()},
                {1: "cannot open image", 3: "null value", 6: "not a recognised image"},
                "raw bytes (read_parquet, chained)", emb="raw_emb", err="raw_err")


def test_texts_from_items(cluster, model_dir, ref):
    keys = [f"t{i}" for i in range(len(TEXTS))]
    items = [{"key": k, "caption": t} for k, t in zip(keys, TEXTS, strict=True)]
    ds = ray.data.from_items(items, override_num_blocks=2)
    rows = ds.map_batches(TextEmbedder, fn_constructor_kwargs={"model": model_dir, "column": "caption",
                                                               "key_column": "key", "batch_size": 2},
                          concurrency=1, batch_size=3, batch_format="pyarrow").take_all()
    _check_rows(rows, keys, _expected(ref, TEXTS, texts=True), {1: "empty text", 3: "empty text"},
                "texts (from_items)")


def _write_webdataset(path, images: list[bytes], texts: list[str]) -> list[str]:
    """A tar in img2dataset's layout: {key}.jpg, {key}.txt, {key}.json per sample; returns the keys."""
    keys = [f"{i:09d}" for i in range(len(images))]
    with tarfile.open(path, "w") as tar:
        for key, image, text in zip(keys, images, texts, strict=True):
            meta = json.dumps({"key": key, "caption": text, "status": "success"}).encode()
            for suffix, data in (("jpg", image), ("txt", text.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return keys


def test_webdataset_to_parquet_end_to_end(cluster, model_dir, ref, images, tmp_path):
    """read_webdataset(decoder=None) -> ImageEmbedder (jpg) -> TextEmbedder (txt) -> write_parquet, read back
    with pyarrow: one row per sample, both embeddings as fixed-size float32 lists, errors for the bad ones."""
    _, blobs = images
    jpgs = [blobs[0], blobs[2], CORRUPT, blobs[4], blobs[1], blobs[3]]
    texts = ["a cat", "a dog on a sofa", "a broken file", "", "a tree", "a bird in the sky"]
    keys = _write_webdataset(tmp_path / "shard-00000.tar", jpgs, texts)
    ds = ray.data.read_webdataset(str(tmp_path / "shard-00000.tar"), decoder=None)
    ds = ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"model": model_dir, "column": "jpg",
                                                              "key_column": "__key__"},
                        concurrency=1, num_cpus=HALF, batch_size=4, batch_format="pyarrow")
    ds = ds.map_batches(TextEmbedder, fn_constructor_kwargs={"model": model_dir, "column": "txt",
                                                             "key_column": "__key__",
                                                             "embedding_column": "text_embedding",
                                                             "error_column": "text_error"},
                        concurrency=1, num_cpus=HALF, batch_size=4, batch_format="pyarrow")
    ds.write_parquet(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out")
    dim = ref.cfg.embed_dim
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert table.schema.field("text_embedding").type == pa.list_(pa.float32(), dim)
    rows = table.to_pylist()
    _check_rows(rows, keys, _expected(ref, jpgs), {2: "cannot open image"}, "webdataset jpg -> parquet",
                key="__key__")
    _check_rows(rows, keys, _expected(ref, texts, texts=True), {3: "empty text"}, "webdataset txt -> parquet",
                emb="text_embedding", err="text_error", key="__key__")


# -------------------------------------------------------------------------- batches in this process
def test_batch_formats_and_arrays(model_dir, ref, images):
    """The same rows as a pyarrow.Table, a dict of numpy arrays and a pandas.DataFrame give the same table; Ray's
    tensor columns (one shape, or images of mixed shapes) are embedded as arrays."""
    import pandas as pd

    _, blobs = images
    embedder = ImageEmbedder(model_dir, batch_size=2)
    items = [blobs[0], CORRUPT, blobs[1], blobs[2]]
    keys = ["a", "b", "c", "d"]
    outs = [embedder(pa.table({"key": keys, "image": pa.array(items, pa.binary())})),
            embedder({"key": np.array(keys), "image": np.array(items, dtype=object)}),
            embedder(pd.DataFrame({"key": keys, "image": items}))]
    for out in outs:
        assert out.column_names == ["key", "image", "embedding", "error"] and out.column("key").to_pylist() == keys
        assert out.column("error").to_pylist()[0] is None and "cannot open image" in out.column("error")[1].as_py()
        assert out.column("embedding")[1].as_py() is None
    base = np.asarray([e for e in outs[0].column("embedding").to_pylist() if e is not None], np.float32)
    for out in outs[1:]:
        other = np.asarray([e for e in out.column("embedding").to_pylist() if e is not None], np.float32)
        np.testing.assert_allclose(other, base, atol=tolerance.REPEAT_ATOL)
    np.testing.assert_allclose(base, ref.embed_images([blobs[0], blobs[1], blobs[2]]), atol=tolerance.SAME_MODEL_ATOL)

    pils = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]  # (H, W, 3) uint8, mixed sizes
    same = np.stack([pils[2], pils[2]])  # (2, 48, 48, 3): a fixed-shape tensor column
    mixed = np.empty(len(pils), dtype=object)  # (5,) of (H, W, 3): a variable-shaped tensor column
    for i, a in enumerate(pils):
        mixed[i] = a
    for arrays in (same, mixed):
        out = embedder({"image": arrays})
        got = np.asarray(out.column("embedding").to_pylist(), np.float32)
        np.testing.assert_allclose(got, ref.embed_images(list(arrays)), atol=tolerance.SAME_MODEL_ATOL)


def test_bad_columns_are_named(model_dir):
    embedder = ImageEmbedder(model_dir)
    with pytest.raises(ValueError, match=r"column 'image' is not in the batch \(columns: jpg, __key__\)"):
        embedder(pa.table({"jpg": [b"x"], "__key__": ["0"]}))
    with pytest.raises(ValueError, match="key_column 'id'"):
        ImageEmbedder(model_dir, key_column="id")(pa.table({"image": [b"x"]}))
    with pytest.raises(ValueError, match="already has a column 'embedding'"):
        embedder(pa.table({"image": [b"x"], "embedding": [1.0]}))
    with pytest.raises(TypeError, match="column 'image' has type int64"):
        embedder(pa.table({"image": [1, 2]}))
    with pytest.raises(TypeError, match="column 'text' has type double"):
        TextEmbedder(model_dir)(pa.table({"text": [1.5]}))
    out = TextEmbedder(model_dir)(pa.table({"text": pa.array([b"caf\xc3\xa9", b"\xff\xfe", None], pa.binary())}))
    errors = out.column("error").to_pylist()
    assert errors[0] is None and "not UTF-8" in errors[1] and "null value" in errors[2]


def test_import_error_without_ray(model_dir, monkeypatch):
    """Without Ray, using fastclip.ray says how to install it; importing fastclip (or fastclip.ray) imports no Ray."""
    code = "import sys, fastclip, fastclip.ray; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'fastclip\[ray\]'"):
        ImageEmbedder(model_dir)
