"""SigLIP 2 NaFlex through the product, against transformers (``Siglip2Model`` + ``Siglip2ImageProcessor``) on a
tiny perturbed model saved with ``save_pretrained``:

* ``embed_images`` over images of many sizes: batches of similar patch counts, each padded only to its longest
  image, results in input order equal to each image embedded alone and to transformers;
* ``classify``: logits and sigmoid probabilities equal transformers' ``logits_per_image``;
* the service (``create_app``): mixed-size image requests through the batcher equal ``embed_images`` /
  ``classify``; ``fastclip verify``'s comparison on a NaFlex model;
* the names ``ViT-B-16-SigLIP2-naflex`` / ``ViT-SO400M-16-SigLIP2-naflex`` (tag ``webli``) and the hub id
  ``google/siglip2-base-patch16-naflex``, resolved offline from a fake hub cache.
"""
from __future__ import annotations

import concurrent.futures
import json

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import fastclip
from fastclip.backends import verify
from fastclip.cli import main as cli_main
from fastclip.errors import CheckpointError, ItemError
from fastclip.loading import hub, keymaps
from fastclip.models import config as model_config
from fastclip.models.clip import CLIP
from fastclip.server import create_app
from fastclip.tolerance import SAME_MODEL_ATOL, UPSTREAM_ATOL, max_abs
from helpers.server_utils import data_uri, running_server, wait_ready
from helpers.upstream import _TABLE, put_in_hub_cache, save_siglip2_naflex

PATCH, GRID, BUDGET, WIDTH = 8, 8, 48, 64  # 8-pixel patches, an 8 x 8 position grid, 48 patches, both towers 64
VOCAB, CTX = 300, 16
# (width, height): patch counts from 1 to 48, square, wide, tall, tiny and larger than the budget
SIZES = [(64, 48), (33, 100), (224, 224), (17, 9), (8, 300), (40, 40), (120, 16), (16, 16), (300, 20),
         (9, 9), (56, 56), (48, 64), (100, 33), (24, 8)]
LABELS = ["sen ka", "qui dra bel", "tor so xa mu"]
HUB_ID = "google/siglip2-base-patch16-naflex"


def make_images(sizes=SIZES, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


@pytest.fixture(scope="module")
def hf_naflex(tmp_path_factory):
    """(transformers Siglip2Model perturbed, its Siglip2ImageProcessor, the saved directory with a tokenizer)."""
    directory = tmp_path_factory.mktemp("hf_siglip2_naflex")
    model, processor = save_siglip2_naflex(directory, vision_width=WIDTH, text_width=WIDTH, patch=PATCH, grid=GRID,
                                           budget=BUDGET, vocab=VOCAB, context=CTX, seed=11)
    return model, processor, directory


@pytest.fixture(scope="module")
def model(hf_naflex):
    return fastclip.load(hf_naflex[2], backend="cpu")


@torch.no_grad()
def hf_image_embeddings(model_hf, processor, images) -> np.ndarray:
    """transformers' pooled image features of each image processed alone, L2-normalised: (N, E)."""
    rows = []
    for image in images:
        out = model_hf.get_image_features(**processor(images=[image], return_tensors="pt"))
        rows.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    return F.normalize(torch.cat(rows).float(), dim=-1).numpy()


def _record(case: str, batch: int, err: float) -> None:
    _TABLE.append(("naflex api", case, batch, err, err, 0.0, 0.0))


# ---------------------------------------------------------------- embed_images
def test_embed_images_batches_by_patch_count_in_input_order(hf_naflex, model, monkeypatch):
    model_hf, processor, _ = hf_naflex
    images = make_images()
    alone = np.concatenate([model.embed_images([image]) for image in images])  # (N, E), each its own batch
    want = hf_image_embeddings(model_hf, processor, images)

    windows, batches = [], []  # what embed_images preprocessed at once, and each encoder batch
    sequences, encode = model.preprocess.sequences, model._encode_prepared

    def spy_sequences(items, **kwargs):
        windows.append(len(items))
        return sequences(items, **kwargs)

    def spy_encode(batch, folded):
        batches.append((batch.pixel_values.shape[1], batch.spatial_shapes.prod(-1).tolist()))
        return encode(batch, folded)

    monkeypatch.setattr(model.preprocess, "sequences", spy_sequences)
    monkeypatch.setattr(model, "_encode_prepared", spy_encode)
    monkeypatch.setattr(model, "image_window_batches", 2)
    got = model.embed_images(images, batch_size=3)  # windows of 6 images

    assert windows == [6, 6, 2]  # bounded: one window is decoded at a time (plus the one prefetched)
    assert sorted(n for _, lengths in batches for n in lengths) == sorted(
        h * w for h, w in (model.preprocess.levels(im)[1] for im in images))  # every image encoded once
    for padded, lengths in batches:
        assert padded == max(lengths) and len(lengths) <= 3  # padded only to the batch's longest image
    rows = sum(padded * len(lengths) for padded, lengths in batches)
    lengths = [h * w for h, w in (model.preprocess.levels(im)[1] for im in images)]
    in_order = sum(len(lengths[s:s + 3]) * max(lengths[s:s + 3]) for s in range(0, len(lengths), 3))
    assert rows < in_order < len(images) * BUDGET, (rows, in_order)  # sorting cut the padding

    err_alone, err_hf = float(np.abs(got - alone).max()), float(np.abs(got - want).max())
    _record("embed_images mixed sizes vs each alone", len(images), err_alone)
    _record("embed_images mixed sizes vs transformers (L2)", len(images), err_hf)
    assert got.shape == (len(images), WIDTH) and got.dtype == np.float32
    assert err_alone <= SAME_MODEL_ATOL and err_hf <= UPSTREAM_ATOL, (err_alone, err_hf)

    monkeypatch.setattr(model, "fold_pixel_norm", False)  # float patches, the normalisation not folded
    unfolded = model.embed_images(images[::-1], batch_size=4)[::-1]
    assert float(np.abs(unfolded - want).max()) <= UPSTREAM_ATOL


def test_embed_images_skips_bad_items_and_shows_progress(hf_naflex, model, tmp_path, capsys):
    images = make_images(SIZES[:5], seed=3)
    items = [images[0], b"not an image", images[1], images[2], str(tmp_path / "missing.png"), images[3], images[4]]
    result = model.embed_images(items, batch_size=2, on_error="skip", progress=True)
    assert result.indices.tolist() == [0, 2, 3, 5, 6]
    assert sorted(e.index for e in result.errors) == [1, 4]
    alone = np.concatenate([model.embed_images([image]) for image in images])
    assert float(np.abs(result.embeddings - alone).max()) <= SAME_MODEL_ATOL
    assert "images" in capsys.readouterr().err  # the progress bar, as the other paths show it
    with pytest.raises(ItemError) as info:
        model.embed_images(items, batch_size=2)
    assert info.value.index == 1
    with pytest.raises(ValueError, match="batch_size"):
        model.embed_images(images, batch_size=0)
    assert model.embed_images([]).shape == (0, WIDTH)


# ---------------------------------------------------------------- classify
def test_classify_matches_transformers_logits_and_probabilities(hf_naflex, model):
    model_hf, processor, directory = hf_naflex
    images = make_images(seed=5)
    tokenizer = transformers.SiglipTokenizer.from_pretrained(directory)
    ids = tokenizer([f"a photo of a {label}." for label in LABELS], padding="max_length", truncation=True,
                    max_length=CTX, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # one forward over the processor's padded batch of every image
        want_logits = model_hf(input_ids=ids, **processor(images=images, return_tensors="pt")).logits_per_image
    want_probs = torch.sigmoid(want_logits).numpy()  # (N, C)

    weights = torch.from_numpy(model.classifier_weights(LABELS))  # (C, E)
    emb = torch.from_numpy(model.embed_images(images, batch_size=4))  # (N, E)
    scale, bias = float(model.logit_scale.detach()), float(model.logit_bias.detach())
    logits = scale * emb @ weights.T + bias  # (N, C)
    probs = model.classify(images, LABELS, batch_size=4)
    # the logits carry the embeddings' error times the logit scale: compare them on the cosine scale
    err_logits = max_abs((logits - bias) / scale, (want_logits - bias) / scale)
    err_probs = float(np.abs(probs - want_probs).max())
    _record("classify logits / scale vs logits_per_image", len(images), err_logits)
    _record("classify probabilities vs transformers", len(images), err_probs)
    assert probs.shape == (len(images), len(LABELS)) and err_probs <= UPSTREAM_ATOL and err_logits <= UPSTREAM_ATOL
    assert abs(scale - float(model_hf.logit_scale.detach().exp())) <= UPSTREAM_ATOL * scale
    assert abs(bias - float(model_hf.logit_bias.detach())) <= UPSTREAM_ATOL


# ---------------------------------------------------------------- the service and verify
def test_service_requests_of_mixed_sizes_equal_embed_images(model):
    images = make_images(seed=7)
    want = model.embed_images(images)
    groups = [images[0:5], images[5:9], images[9:]]  # three concurrent requests, coalesced by the batcher
    with running_server(create_app(model, max_wait_ms=50, max_batch=8)) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_ready(client)

            def post(group):
                r = client.post("/v1/embeddings", json={"input": [data_uri(im) for im in group]})
                assert r.status_code == 200, r.text
                return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                got = np.concatenate(list(pool.map(post, groups)))
            r = client.post("/v1/classify", json={"input": [data_uri(im) for im in images[:4]], "labels": LABELS})
            assert r.status_code == 200, r.text
            probs = np.array([d["probabilities"] for d in r.json()["data"]], dtype=np.float32)
    err = float(np.abs(got - want).max())
    _record("service /v1/embeddings mixed sizes vs embed_images", len(images), err)
    assert got.shape == want.shape and err <= SAME_MODEL_ATOL
    assert float(np.abs(probs - model.classify(images[:4], LABELS)).max()) <= SAME_MODEL_ATOL


def test_verify_compares_backends_on_a_naflex_model():
    (name, raw), = verify.NAFLEX_TINY_CONFIGS.items()
    pixels, _ = verify._inputs(model_config.parse_config(name, raw))
    assert not bool(pixels.mask.all()) and len(set(map(tuple, pixels.spatial_shapes.tolist()))) == 3  # padded
    backends = [("ref", "cpu"), *verify.available_backends()]
    rows = [r for b, d in backends for p in ("fp32", "bf16") for r in verify.check(b, d, p, verify.NAFLEX_TINY_CONFIGS)]
    assert len(rows) == 2 * len(backends)
    assert all(r["ok"] and r.get("error") is None for r in rows), verify.format_rows(rows)


def test_random_weight_naflex_model_preprocesses_to_patch_budgets(monkeypatch):
    """create_model of a NaFlex architecture (e.g. ``fastclip serve --random-weights``) gets NaFlex preprocessing."""
    (name, raw), = verify.NAFLEX_TINY_CONFIGS.items()
    model_config.list_models()
    monkeypatch.setitem(model_config._REGISTRY, name, raw)
    model = fastclip.create_model(name, backend="cpu")
    assert model.preprocess.cfg.max_num_patches == raw["vision_cfg"]["max_num_patches"]
    images = make_images(SIZES[:6], seed=2)
    batch, _, _ = model.preprocess.batch(images)
    assert len(set(map(tuple, batch.spatial_shapes.tolist()))) > 1  # aspect ratios kept, not squashed
    alone = np.concatenate([model.embed_images([image]) for image in images])
    assert float(np.abs(model.embed_images(images, batch_size=4) - alone).max()) <= SAME_MODEL_ATOL


# ---------------------------------------------------------------- names, tags and the hub
def _hf_siglip2_config(width: int, layers: int, heads: int, mlp: int) -> transformers.Siglip2Config:
    tower = dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads)
    return transformers.Siglip2Config(text_config=dict(tower, vocab_size=256000, max_position_embeddings=64),
                                      vision_config=dict(tower, patch_size=16, num_patches=256))


@pytest.mark.parametrize("name,repo,size", [
    ("ViT-B-16-SigLIP2-naflex", "google/siglip2-base-patch16-naflex", (768, 12, 12, 3072)),
    ("ViT-SO400M-16-SigLIP2-naflex", "google/siglip2-so400m-patch16-naflex", (1152, 27, 16, 4304)),
])
def test_naflex_names_are_listed_and_fit_transformers(name, repo, size, capsys):
    """Each name is listed with its tag, resolves to its hub repo, and its config builds exactly the parameters
    of transformers' Siglip2Model of that size (on the meta device, through the Hugging Face key map)."""
    assert cli_main(["models"]) == 0
    assert f"{name:32s} webli" in capsys.readouterr().out.splitlines()
    assert hub.pretrained_entry(name, "webli") == {"hf_hub": repo, "format": "hf"}
    cfg = fastclip.get_model_config(name)
    hf_cfg = _hf_siglip2_config(*size)
    assert cfg == keymaps.config_from_hf(hf_cfg.to_dict(), name)
    with torch.device("meta"):
        theirs = keymaps.from_hf(transformers.Siglip2Model(hf_cfg).state_dict(), cfg)
        ours = CLIP(cfg).state_dict()
    def shapes(sd):  # the logit scale and bias are scalars of one element in either shape (fastclip.load)
        return {k: (v.numel(),) if k in ("log_logit_scale", "logit_bias") else tuple(v.shape) for k, v in sd.items()}

    assert shapes(theirs) == shapes(ours)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache in a tmp dir with HF_HUB_OFFLINE set (huggingface_hub's constants patched too)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _tiny_named_config(directory) -> dict:
    """The tiny model as an OpenCLIP-shaped config (what the named architecture is for the real repo)."""
    hf = json.loads((directory / "config.json").read_text())
    v, t = hf["vision_config"], hf["text_config"]
    tower = {"width": WIDTH, "layers": 2, "act": "gelu_tanh", "norm_kwargs": {"eps": 1e-6}}
    return {"embed_dim": WIDTH, "init_logit_bias": -10, "family": "siglip", "tokenizer": "hf",
            "vision_cfg": {**tower, "type": "naflex", "patch_size": PATCH, "position_grid": GRID,
                           "max_num_patches": GRID * GRID, "head_width": WIDTH // v["num_attention_heads"],
                           "mlp_ratio": v["intermediate_size"] / WIDTH},
            "text_cfg": {**tower, "context_length": CTX, "vocab_size": VOCAB, "heads": t["num_attention_heads"],
                         "mlp_ratio": t["intermediate_size"] / WIDTH, "no_causal_mask": True, "pool_type": "last",
                         "proj_bias": True}}


def test_tag_and_hub_id_load_from_the_hub_cache(hf_naflex, offline_cache, monkeypatch):
    model_hf, processor, directory = hf_naflex
    put_in_hub_cache(offline_cache, HUB_ID, {f.name: f for f in directory.iterdir() if f.is_file()})
    images = make_images(SIZES[:6], seed=9)
    want = hf_image_embeddings(model_hf, processor, images)

    by_id = fastclip.load(HUB_ID, backend="cpu")  # a hub id: the cached transformers directory
    assert by_id.cfg.vision.type == "naflex" and by_id.preprocess.cfg.max_num_patches == BUDGET
    err_id = float(np.abs(by_id.embed_images(images, batch_size=4) - want).max())
    texts = ["sen ka tor", "qui dra belxa"]
    assert (fastclip.get_tokenizer(HUB_ID)(texts) == by_id.tokenizer(texts)).all()

    with pytest.raises(CheckpointError, match="lacks .vision_model.encoder.layers.2"):  # the tag reaches the cache;
        fastclip.load("ViT-B-16-SigLIP2-naflex", pretrained="webli")  # the 12-layer architecture refuses 2 layers
    model_config.list_models()  # the built-in registry is filled before one entry is swapped
    monkeypatch.setitem(model_config._REGISTRY, "ViT-B-16-SigLIP2-naflex", _tiny_named_config(directory))
    by_tag = fastclip.load("ViT-B-16-SigLIP2-naflex", pretrained="webli", backend="cpu")
    assert by_tag.cfg.name == "ViT-B-16-SigLIP2-naflex" and by_tag.preprocess.cfg.max_num_patches == BUDGET
    err_tag = float(np.abs(by_tag.embed_images(images, batch_size=4) - want).max())
    _record(f"hub id {HUB_ID} (cached) vs transformers", len(images), err_id)
    _record("tag ViT-B-16-SigLIP2-naflex/webli (cached) vs transformers", len(images), err_tag)
    assert err_id <= UPSTREAM_ATOL and err_tag <= UPSTREAM_ATOL, (err_id, err_tag)


def test_quantize_cli_calibrates_on_mixed_sizes(hf_naflex, model, tmp_path):
    """``fastclip quantize`` on a NaFlex directory: calibration batches of mixed aspect ratios (padded patch
    sequences), then the saved int8 file loads and embeds close to fp32 (per-item cosine >= 0.99)."""
    folder = tmp_path / "images"
    folder.mkdir()
    images = make_images()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    out = tmp_path / "naflex-int8.safetensors"
    directory = str(hf_naflex[2])
    assert cli_main(["quantize", directory, "--calibrate", str(folder), "--out", str(out), "--batch-size", "2",
                     "-q"]) == 0
    int8 = fastclip.load(directory, pretrained=out, precision="int8", backend="cpu")
    got, want = int8.embed_images(images), model.embed_images(images)  # (n, E) each, L2-normalised
    assert (got * want).sum(-1).min() >= 0.99
    with pytest.raises(CheckpointError, match="a model directory takes no pretrained= other than an int8 file"):
        fastclip.load(directory, pretrained=folder / "0.png")
