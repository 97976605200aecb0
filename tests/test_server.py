"""fastclip serve: a real uvicorn server on a loopback port; responses against the model's own
embed_texts / embed_images / classify, the official openai client, auth, URL allow-list, limits."""
import base64
import contextlib
import http.server
import io
import threading

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import fastclip
from fastclip import tolerance
from fastclip.server import ServerConfig, create_app
from helpers.server_utils import data_uri, metric_samples, noise_image, png_bytes, running_server, wait_ready

ATOL = tolerance.SAME_MODEL_ATOL  # fp32; batching changes GEMM summation order slightly


@pytest.fixture(scope="module")
def model(tiny_config_dir):
    return fastclip.create_model("tiny-avgpool-quickgelu", seed=0)


@pytest.fixture(scope="module")
def server(model):
    with running_server(create_app(model, max_wait_ms=5)) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client)
            yield url, client


def _rows(response) -> np.ndarray:
    body = response.json()
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


def _eot_counts(model, texts) -> int:
    """Tokens up to and including end-of-text in each tokenized row (independent of tokenizer.encode)."""
    tokens = model.tokenizer(texts).numpy()
    return int(sum(np.argmax(row == model.tokenizer.eot_token_id) + 1 for row in tokens))


def test_mixed_request_equals_embed_texts_and_images(server, model):
    _, client = server
    imgs = [noise_image(1), noise_image(2, (70, 30))]
    jpeg = io.BytesIO()
    imgs[1].save(jpeg, format="JPEG", quality=90)
    texts = ["a photo of a cat", "Ünïcödé ✨ text", "x " * 200]
    body = {"input": [texts[0], data_uri(imgs[0]), {"type": "text", "text": texts[1]},
                      {"type": "image", "image": base64.b64encode(jpeg.getvalue()).decode()},
                      {"type": "text", "text": texts[2]}]}
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    got = _rows(r)
    want_t = model.embed_texts(texts)
    want_i = model.embed_images([png_bytes(imgs[0]), jpeg.getvalue()])
    np.testing.assert_allclose(got[[0, 2, 4]], want_t, atol=ATOL)
    np.testing.assert_allclose(got[[1, 3]], want_i, atol=ATOL)
    assert r.json()["usage"] == {"prompt_tokens": _eot_counts(model, texts), "total_tokens": _eot_counts(model, texts)}
    assert r.json()["model"] == "tiny-avgpool-quickgelu" and r.json()["object"] == "list"


def test_openai_client_float_and_base64(server, model):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    texts = ["two dogs in a park", "a diagram of a transformer"]
    want = model.embed_texts(texts)
    # NOT_GIVEN: the client asks for base64 and decodes it; an explicit "base64" returns the strings
    for fmt in ("float", "base64", openai.NOT_GIVEN):
        resp = client.embeddings.create(model="tiny-avgpool-quickgelu", input=texts, encoding_format=fmt)
        rows = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
                for d in resp.data]
        got = np.array(rows, dtype=np.float32)
        np.testing.assert_allclose(got, want, atol=ATOL)
        assert resp.usage.prompt_tokens == _eot_counts(model, texts)
    single = client.embeddings.create(model="tiny-avgpool-quickgelu", input=texts[0])
    np.testing.assert_allclose(single.data[0].embedding, want[0], atol=ATOL)
    img = noise_image(7)
    resp = client.embeddings.create(model="tiny-avgpool-quickgelu", input=[data_uri(img)])
    np.testing.assert_allclose(resp.data[0].embedding, model.embed_images([png_bytes(img)])[0], atol=ATOL)
    assert [m.id for m in client.models.list()] == ["tiny-avgpool-quickgelu"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="text-embedding-3-small", input="hi")


def test_base64_is_little_endian_float32(server, model):
    _, client = server
    r = client.post("/v1/embeddings", json={"input": ["a red car"], "encoding_format": "base64"})
    row = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(row, model.embed_texts(["a red car"])[0], atol=ATOL)


def test_classify_equals_model_classify(server, model):
    _, client = server
    imgs = [noise_image(3), noise_image(4, (64, 90))]
    labels, templates = ["cat", "coffee", "astronaut"], ["a photo of a {}.", "a drawing of a {}."]
    r = client.post("/v1/classify", json={"input": [data_uri(i) for i in imgs], "labels": labels,
                                          "templates": templates})
    assert r.status_code == 200, r.text
    probs = np.array([d["probabilities"] for d in r.json()["data"]])
    want = model.classify([png_bytes(i) for i in imgs], labels, templates=templates)
    np.testing.assert_allclose(probs, want, atol=ATOL)
    assert [d["label"] for d in r.json()["data"]] == [labels[k] for k in want.argmax(1)]
    bad = client.post("/v1/classify", json={"input": [data_uri(imgs[0])], "labels": ["a"], "templates": ["no slot"]})
    assert bad.status_code == 400 and "templates[0]" in bad.json()["error"]["message"]


def test_health_ready_metrics(server):
    _, client = server
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client.post("/v1/embeddings", json={"input": "hello"})
    client.post("/v1/embeddings", json={"input": "hello", "bogus": 1})
    text = client.get("/metrics").text
    req = metric_samples(text, "fastclip_requests")
    assert req[("fastclip_requests_total", (("endpoint", "/v1/embeddings"), ("status", "200")))] >= 1
    assert req[("fastclip_requests_total", (("endpoint", "/v1/embeddings"), ("status", "400")))] >= 1
    assert metric_samples(text, "fastclip_errors")[("fastclip_errors_total", (("kind", "invalid_request"),))] >= 1
    assert metric_samples(text, "fastclip_batch_size")[("fastclip_batch_size_count", (("modality", "text"),))] >= 1
    lat = metric_samples(text, "fastclip_request_latency_seconds")
    assert lat[("fastclip_request_latency_seconds_count", (("endpoint", "/v1/embeddings"),))] >= 2
    assert ("fastclip_queue_depth", (("modality", "image"),)) in metric_samples(text, "fastclip_queue_depth")


def test_errors_name_the_item(server):
    _, client = server
    tiny = data_uri(Image.new("RGB", (1, 1)))
    cases = [
        ({"input": ["ok", tiny]}, 400, "input[1]", "at least"),
        ({"input": ["ok", "  "]}, 400, "input[1]", "empty text"),
        ({"input": ["ok", {"type": "image", "image": "%%%"}]}, 400, "input[1]", "base64"),
        ({"input": [{"type": "image", "image": "/etc/passwd"}]}, 400, "input[0]", "base64"),
        ({"input": [{"type": "image", "image": "file:///etc/passwd"}]}, 400, "input[0]", "scheme"),
        ({"input": [{"type": "image", "image": "http://127.0.0.1:1/a.png"}]}, 400, "input[0]", "disabled"),
        ({"input": ["data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\ntruncated").decode()]},
         400, "input[0]", "image"),
        ({"input": [{"type": "image", "image": "x", "url": "y"}]}, 400, "input[0]", "unknown field"),
        ({"input": [1, 2, 3]}, 400, "input", "token arrays"),
        ({"input": "hi", "dimensions": 3}, 400, "dimensions", "dimensions"),
    ]
    for body, status, param, words in cases:
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"] and param in err["message"], (body, err)
    assert client.get("/ready").status_code == 200


def test_limits(model):
    cfg = ServerConfig(max_items=4, max_image_bytes=50_000, max_image_pixels=100_000, max_body_bytes=300_000)
    with running_server(create_app(model, cfg)) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        bomb = io.BytesIO()
        Image.new("RGB", (2000, 2000)).save(bomb, format="PNG")  # ~4 Mpx in a few KB
        assert len(bomb.getvalue()) < 50_000
        big = png_bytes(noise_image(0, (200, 200)))
        assert len(big) > 50_000
        cases = [
            ({"input": ["a"] * 5}, 413, "too_many_items"),
            ({"input": ["a", "data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode()]}, 413,
             "image_too_large"),
            ({"input": ["data:image/png;base64," + base64.b64encode(big).decode()]}, 413, "image_too_large"),
            ({"input": ["a" * 400_000]}, 413, "body_too_large"),
        ]
        for body, status, code in cases:
            r = client.post("/v1/embeddings", json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        assert "too many pixels" in client.post("/v1/embeddings", json=cases[1][0]).json()["error"]["message"]
        assert client.get("/ready").status_code == 200
        assert client.post("/v1/embeddings", json={"input": ["a"] * 4}).status_code == 200


def test_bearer_auth(model):
    with running_server(create_app(model, api_key="sekret")) as (url, _), httpx.Client(base_url=url) as client:
        wait_ready(client)
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200
        assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 401
        r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).embeddings.create(model="x", input="a")
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        got = ok.embeddings.create(model="tiny-avgpool-quickgelu", input=["a tree"]).data[0].embedding
        np.testing.assert_allclose(got, model.embed_texts(["a tree"])[0], atol=ATOL)


@contextlib.contextmanager
def _image_host(payload: bytes):
    """A loopback HTTP server: /img.png -> payload, /moved -> 302 to /img.png, anything else 404."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            elif self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join(10)


def test_url_inputs_only_from_allowed_hosts(model):
    payload = png_bytes(noise_image(11))
    with _image_host(payload) as host:
        app = create_app(model, allow_url_hosts=("127.0.0.1",))
        with running_server(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client)
            r = client.post("/v1/embeddings", json={"input": [{"type": "image", "image": host + "/img.png"}]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(_rows(r)[0], model.embed_images([payload])[0], atol=ATOL)
            port = host.rsplit(":", 1)[1]
            for ref, words in ((host + "/moved", "HTTP 302"), (host + "/nothing", "HTTP 404"),
                               (f"http://localhost:{port}/img.png", "allow-list")):
                r = client.post("/v1/embeddings", json={"input": ["a", {"type": "image", "image": ref}]})
                assert 400 <= r.status_code < 500 and words in r.json()["error"]["message"], r.text
                assert r.json()["error"]["param"] == "input[1]"
