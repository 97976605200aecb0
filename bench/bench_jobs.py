"""Large-job path: ``fastclip embed`` over WebDataset shards against the encoder alone and ``embed_images``.

    python -m pytest bench/bench_jobs.py --benchmark-json /tmp/jobs.json && python bench/report.py /tmp/jobs.json
    python -m pytest bench/bench_jobs.py --benchmark-disable -x      # smoke check: every row once

ViT-B-32 with random weights (bench/peers/'s weights), a corpus of JPEGs of img2dataset's usual kind (256 px on
the short side, photo-like content), in WebDataset tars of ``SHARD`` samples. Rows, each on the same images:

- ``encoder``: ``encode_image`` on already preprocessed (B, 3, 224, 224) batches: the rate the model alone allows;
- ``embed_images``: the in-memory API on the encoded bytes (decode + resize + encode, decode overlapped);
- ``job``: ``fastclip.jobs.embed_corpus`` from the tar files to a job directory (tar reading, decoding, encoding,
  shard writing, float16 vectors), as ``fastclip embed shards/*.tar --out DIR`` runs it.

Each row's ``extra_info`` has items_per_s; the job row adds its ratio to the encoder-only and embed_images rates.
"""
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rate
from fastclip import tolerance

IMAGES = 256
SHARD = 64
BATCH = 32
_RATES: dict[str, float] = {}


def _photo(rng, h=256, w=341) -> bytes:
    """A smooth, photo-like JPEG (low-frequency content compresses and decodes as photos do)."""
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = [_photo(rng) for _ in range(IMAGES)]
    folder = tmp_path_factory.mktemp("shards")
    for t in range(IMAGES // SHARD):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for s in range(SHARD):
                data = images[t * SHARD + s]
                info = tarfile.TarInfo(f"{t:05d}{s:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder, images


@pytest.fixture(scope="module")
def model():
    from peers import PeerSet

    return PeerSet("ViT-B-32").fastclip()


def _record(benchmark, name: str):
    rate(benchmark, IMAGES)
    if benchmark.stats:
        _RATES[name] = benchmark.extra_info["items_per_s"]
        for peer in ("encoder", "embed_images"):
            if name == "job" and peer in _RATES:
                benchmark.extra_info[f"ratio_to_{peer}"] = round(_RATES["job"] / _RATES[peer], 3)


def test_encoder(benchmark, model, corpus):
    _, images = corpus
    pixels, _, _ = model.preprocess.batch(images)  # (N, 3, 224, 224)

    def run():
        with torch.inference_mode():
            for start in range(0, IMAGES, BATCH):
                model.encode_image(pixels[start:start + BATCH], normalize=True)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, "encoder")


def test_embed_images(benchmark, model, corpus):
    _, images = corpus
    benchmark.pedantic(lambda: model.embed_images(images, batch_size=BATCH), rounds=3, warmup_rounds=1)
    _record(benchmark, "embed_images")


def test_job(benchmark, model, corpus, tmp_path):
    from fastclip.jobs import embed_corpus

    folder, images = corpus
    out = tmp_path / "job"

    def run():
        shutil.rmtree(out, ignore_errors=True)
        summary = embed_corpus(model, [str(folder / "*.tar")], out, batch_size=BATCH, progress=False)
        assert summary.embedded == IMAGES and summary.failed == 0

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, "job")
    stored = np.concatenate([np.load(p) for p in sorted(Path(out, "img_emb").glob("*.npy"))]).astype(np.float32)
    expected = model.embed_images(images[:BATCH], batch_size=BATCH)
    atol = tolerance.rounding_bound(1.0, torch.float16) + tolerance.REPEAT_ATOL  # stored as float16
    np.testing.assert_allclose(stored[:BATCH], expected, atol=atol)
