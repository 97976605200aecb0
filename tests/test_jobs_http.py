"""Job inputs over http:// (fsspec's HTTP backend, aiohttp) from a real local HTTP server: WebDataset tars by
brace pattern and glob, single image URLs and a text file, with the same rows as the same files read from disk."""
import functools
import http.server
import threading

import numpy as np
import pytest

import fastclip
from fastclip.jobs import embed_corpus, open_inputs
from helpers.upstream import save_tiny_openai_checkpoint
from test_jobs import STORED_FP16_ATOL, _jpeg, _read_job, _write_tar

pytest.importorskip("aiohttp", reason="fsspec's http:// backend needs aiohttp (in fastclip's test extra)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder of two tars, two JPEGs and a text file, served on 127.0.0.1 -> (folder, base URL)."""
    root = tmp_path_factory.mktemp("www")
    for t in range(2):
        _write_tar(root / f"{t:05d}.tar", [(f"{t:05d}{s:04d}", {"jpg": _jpeg(10 * t + s), "txt": f"cap {t} {s}".encode()})
                                           for s in range(5)] + [(f"{t:05d}0009", {"jpg": b"\xff\xd8 broken"})])
    (root / "a.jpg").write_bytes(_jpeg(50))
    (root / "b.jpg").write_bytes(_jpeg(51, size=(33, 57)))
    (root / "texts.txt").write_text("a dog\n\na cat on a mat\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return fastclip.load(save_tiny_openai_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-openai.pt"))


def test_http_tars_equal_the_local_files(model, served, tmp_path):
    root, base = served
    remote = embed_corpus(model, [base + "/{00000..00001}.tar"], tmp_path / "remote", captions=True, progress=False)
    local = embed_corpus(model, [str(root / "{00000..00001}.tar")], tmp_path / "local", captions=True, progress=False)
    assert (remote.embedded, remote.failed, remote.shards_written) == (local.embedded, local.failed, 2) == (10, 2, 2)
    for kind in ("img", "text"):
        r_emb, r_meta, r_err = _read_job(tmp_path / "remote", kind)
        l_emb, l_meta, l_err = _read_job(tmp_path / "local", kind)
        assert r_meta.column("key").to_pylist() == l_meta.column("key").to_pylist()
        assert r_err.column("key").to_pylist() == ["000000009", "000010009"]
        np.testing.assert_array_equal(r_emb, l_emb)
    want = model.embed_images([_jpeg(s) for s in range(5)] + [_jpeg(10 + s) for s in range(5)])
    np.testing.assert_allclose(_read_job(tmp_path / "remote")[0], want, atol=STORED_FP16_ATOL, rtol=0)


def test_http_image_urls_and_text_file(model, served):
    _, base = served
    samples = [s for p in open_inputs([base + "/b.jpg", base + "/a.jpg"]) for s in p.samples()]
    assert [s.key for s in samples] == [base + "/b.jpg", base + "/a.jpg"]
    assert samples[0].data == _jpeg(51, size=(33, 57)) and samples[1].data == _jpeg(50)
    assert [p.name for p in open_inputs([base + "/*.tar"])] == [base + "/00000.tar", base + "/00001.tar"]  # a listing
    with pytest.raises(FileNotFoundError, match=f"no such file or folder: '{base}/missing.jpg'"):
        open_inputs([base + "/a.jpg", base + "/missing.jpg"])
    texts = [s for p in open_inputs([base + "/texts.txt"], modality="texts") for s in p.samples()]
    assert [(s.key, s.text) for s in texts] == [(base + "/texts.txt:1", "a dog"), (base + "/texts.txt:2", ""),
                                                (base + "/texts.txt:3", "a cat on a mat")]
