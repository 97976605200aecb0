"""Property-based: malformed requests to fastclip serve only ever get a 4xx (never a 500, never a 200),
and the server is still ready and correct afterwards."""
import base64
import io

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import fastclip
from fastclip import tolerance
from fastclip.server import create_app
from helpers.server_utils import data_uri, metric_samples, noise_image, running_server, wait_ready

NAME = "tiny-avgpool-quickgelu"
EMBED_FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}
CLASSIFY_FIELDS = {"input", "labels", "templates", "model", "user"}

json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def bad_images(draw):
    """An image reference that must be refused: corrupt bytes, tiny images, bad base64, bad URIs."""
    kind = draw(st.sampled_from(["bytes", "tiny", "truncated", "b64", "uri", "scheme"]))
    if kind == "bytes":
        return "data:image/png;base64," + _b64(draw(st.binary(min_size=0, max_size=64)))
    if kind == "tiny":
        w, h = draw(st.integers(1, 7)), draw(st.integers(1, 64))
        buf = io.BytesIO()
        Image.new("RGB", (w, h) if draw(st.booleans()) else (h, w), (9, 9, 9)).save(buf, format="PNG")
        return _b64(buf.getvalue())
    if kind == "truncated":
        good = base64.b64decode(data_uri(noise_image(0)).split(",", 1)[1])
        # cut into the compressed pixels (a cut of only the trailing CRC and adler-32 bytes still decodes)
        return "data:image/png;base64," + _b64(good[:draw(st.integers(0, len(good) - 64))])
    if kind == "b64":
        return draw(st.text(alphabet="abcXYZ+/=!@# \n%", min_size=1, max_size=30).filter(lambda s: s.strip()))
    if kind == "uri":
        return draw(st.sampled_from(["data:", "data:image/png", "data:text/plain;base64,aGk=",
                                     "data:image/png,notbase64", "data:image/png;base64,"]))
    return draw(st.sampled_from(["file:///etc/passwd", "ftp://127.0.0.1/a.png", "http://127.0.0.1:9/a.png",
                                 "/etc/passwd", "C:\\\\x.png", "gopher://x"]))


good_items = st.sampled_from(["a photo of a cat", {"type": "text", "text": "a dog"}, data_uri(noise_image(5))])
bad_items = st.one_of(
    bad_images().filter(lambda ref: ref.startswith("data:image/")),  # other bare strings are texts
    bad_images().map(lambda ref: {"type": "image", "image": ref}),
    st.sampled_from(["", "   ", "\n\t", {"type": "text", "text": " "}, {"type": "text"}, {"type": "image"},
                     {"type": "video", "video": "x"}, {"text": "no type"}, {"type": "text", "text": "a", "x": 1},
                     {"type": "image", "image": 5}]),
    st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.none(), st.booleans(),
    st.lists(st.integers(0, 50000), max_size=4), st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
    .filter(lambda d: d.get("type") not in ("text", "image")),
)


@st.composite
def bad_inputs(draw):
    """An ``input`` value that is invalid: a bad item hidden among good ones, or a bad shape."""
    shape = draw(st.sampled_from(["among_good", "alone", "shape"]))
    if shape == "shape":
        return draw(st.sampled_from([[], {}, 3, None, True, [[]], [[1, 2]], [1, 2, 3], {"type": "text", "text": "a"}]))
    bad = draw(bad_items)
    if shape == "alone":
        return bad if isinstance(bad, str) else [bad]
    items = draw(st.lists(good_items, max_size=4))
    items.insert(draw(st.integers(0, len(items))), bad)
    return items


valid_embed = st.fixed_dictionaries({"input": st.lists(good_items, min_size=1, max_size=3)},
                                    optional={"encoding_format": st.sampled_from(["float", "base64"]),
                                              "model": st.just(NAME)})


@st.composite
def bad_embedding_bodies(draw):
    body = dict(draw(valid_embed))
    poison = draw(st.sampled_from(["input", "extra", "format", "model", "dimensions", "missing"]))
    if poison == "input":
        body["input"] = draw(bad_inputs())
    elif poison == "extra":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in EMBED_FIELDS))] = draw(json_values)
    elif poison == "format":
        body["encoding_format"] = draw(json_values.filter(lambda v: v not in ("float", "base64")))
    elif poison == "model":
        body["model"] = draw(json_values.filter(lambda v: v != NAME and v is not None))
    elif poison == "dimensions":
        body["dimensions"] = draw(st.integers().filter(lambda d: d != 64) | st.text(max_size=4) | st.booleans()
                                  | st.just(64.0))
    else:
        del body["input"]
    return body


@st.composite
def bad_classify_bodies(draw):
    body = {"input": [data_uri(noise_image(6))], "labels": ["cat", "dog"]}
    poison = draw(st.sampled_from(["input", "labels", "templates", "extra"]))
    if poison == "input":
        body["input"] = draw(bad_images() | st.sampled_from([[], ["a plain text"], [{"type": "text", "text": "t"}]]))
    elif poison == "labels":
        body["labels"] = draw(st.sampled_from([[], ["", "x"], ["a", "a"], "cat", [1], None]))
    elif poison == "templates":
        body["templates"] = draw(st.sampled_from([[], ["no placeholder"], ["{} and {}"], ["{0} x"], ["{}}"], [3]]))
    else:
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in CLASSIFY_FIELDS))] = draw(json_values)
    return body


requests = st.one_of(
    bad_embedding_bodies().map(lambda b: ("/v1/embeddings", {"json": b})),
    bad_classify_bodies().map(lambda b: ("/v1/classify", {"json": b})),
    json_values.filter(lambda v: not isinstance(v, dict) or "input" not in v)
    .map(lambda v: ("/v1/embeddings", {"json": v})),
    st.binary(max_size=64).map(lambda b: ("/v1/embeddings", {"content": b, "headers": {"content-type": "application/json"}})),
    st.binary(max_size=64).map(lambda b: ("/v1/classify", {"content": b})),
)


@pytest.fixture(scope="module")
def model(tiny_config_dir):
    return fastclip.create_model(NAME, seed=0)


@pytest.fixture(scope="module")
def client(model):
    with running_server(create_app(model, max_wait_ms=1)) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client)
            yield client


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_malformed_requests_get_4xx(client, request):
    path, kwargs = request
    r = client.post(path, **kwargs)
    assert 400 <= r.status_code < 500, (path, kwargs, r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"]


def test_still_ready_and_correct_after_fuzzing(client, model):
    assert client.get("/ready").status_code == 200 and client.get("/health").status_code == 200
    r = client.post("/v1/embeddings", json={"input": ["after the storm"]})
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], model.embed_texts(["after the storm"])[0],
                               atol=tolerance.SAME_MODEL_ATOL)
    errors = metric_samples(client.get("/metrics").text, "fastclip_errors")
    assert ("fastclip_errors_total", (("kind", "internal"),)) not in errors
    assert errors[("fastclip_errors_total", (("kind", "invalid_request"),))] >= 100
