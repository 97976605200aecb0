"""End to end through the public API on Hugging Face directories: fastclip.load(dir) with the
directory's own tokenizer and preprocessor, against transformers' processor + model on the same files."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import fastclip
from fastclip import tolerance

TEXTS = ["a photo of a kato", "sen ri mu pa", "Quira drane! SOBEL tor.", "ve"]


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]


def _hf_features(hf_model, directory, texts, images):
    processor = transformers.AutoProcessor.from_pretrained(directory)
    is_siglip = isinstance(hf_model, transformers.SiglipModel)
    kwargs = dict(padding="max_length", max_length=hf_model.config.text_config.max_position_embeddings) if is_siglip \
        else dict(padding=True)
    batch = processor(text=texts, images=images, return_tensors="pt", truncation=True, **kwargs)
    with torch.no_grad():
        out = hf_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       **({} if is_siglip else {"attention_mask": batch["attention_mask"]}))
    return out


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_embed_and_classify_match_transformers(family, hf_siglip, hf_siglip_dir, hf_clip, hf_clip_dir, photos):
    up, directory = (hf_siglip, hf_siglip_dir) if family == "siglip" else (hf_clip, hf_clip_dir)
    model = fastclip.load(directory)
    assert (model.logit_bias is not None) == (family == "siglip")
    out = _hf_features(up.model, directory, TEXTS, photos)

    text_emb = model.embed_texts(TEXTS)
    image_emb = model.embed_images(photos)
    np.testing.assert_allclose(text_emb, out.text_embeds.numpy(), atol=tolerance.UPSTREAM_ATOL)
    np.testing.assert_allclose(image_emb, out.image_embeds.numpy(), atol=tolerance.UPSTREAM_ATOL)

    # one template that is the label itself: classify's logits are exactly the model's logits_per_image
    probs = model.classify(photos, TEXTS, templates=["{}"])
    logits = out.logits_per_image
    expected = torch.sigmoid(logits) if family == "siglip" else torch.softmax(logits, dim=-1)
    np.testing.assert_allclose(probs, expected.numpy(), atol=tolerance.UPSTREAM_ATOL)


def test_get_tokenizer_by_name_and_dir(hf_siglip_dir, hf_clip_dir):
    import open_clip

    clip_tok = fastclip.get_tokenizer("ViT-B-32")
    reference = open_clip.get_tokenizer("ViT-B-32")
    assert torch.equal(clip_tok(TEXTS), reference(TEXTS))
    assert torch.equal(fastclip.get_tokenizer(hf_clip_dir)(TEXTS), reference(TEXTS))
    siglip_tok = fastclip.get_tokenizer(hf_siglip_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_siglip_dir)
    expected = hf_tok(TEXTS, padding="max_length", max_length=siglip_tok.context_length, truncation=True,
                      return_tensors="pt")["input_ids"]
    assert torch.equal(siglip_tok(TEXTS), expected)
    with pytest.raises(fastclip.UnknownModelError):
        fastclip.get_tokenizer("ViT-Unknown-7")


# ---------------------------------------------------------------- a SigLIP directory without tokenizer files
SIGLIP_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def siglip_dir_without_tokenizer(hf_siglip, tmp_path_factory):
    """What ``SiglipModel.save_pretrained`` (+ the image processor) writes: no tokenizer files."""
    directory = tmp_path_factory.mktemp("hf_siglip_no_tokenizer")
    hf_siglip.model.save_pretrained(directory)
    size = hf_siglip.image_size
    transformers.SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(directory)
    assert not [f for f in SIGLIP_TOKENIZER_FILES if (directory / f).exists()]
    return directory


def _assert_names_missing_files_and_fixes(message: str, directory) -> None:
    for needle in (str(directory), *SIGLIP_TOKENIZER_FILES, "hf download", "--local-dir",
                   "model.tokenizer = fastclip.get_tokenizer("):
        assert needle in message, f"{needle!r} not in: {message}"


def test_siglip_directory_without_tokenizer_loads(hf_siglip, hf_siglip_dir, siglip_dir_without_tokenizer, photos):
    directory = siglip_dir_without_tokenizer
    hf_model = transformers.SiglipModel.from_pretrained(directory).eval()  # transformers loads it
    model = fastclip.load(directory)
    assert model.tokenizer is None and model.cfg.family == "siglip"
    from fastclip.data.tokenizers import MissingTokenizerError

    _, tokens = hf_siglip.inputs(3)
    with torch.no_grad():
        ref = hf_model.get_text_features(input_ids=tokens)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
        got = model.encode_text(tokens)
    assert (got - ref).abs().max().item() <= tolerance.UPSTREAM_ATOL
    assert model.embed_images(photos[:1]).shape == (1, model.cfg.embed_dim)  # images need no tokenizer

    for call in (lambda: model.embed_texts(["a photo of a kato"]),
                 lambda: model.classify(photos[:1], ["kato", "sen"])):
        with pytest.raises(MissingTokenizerError) as info:
            call()
        assert isinstance(info.value, fastclip.FastclipError)
        _assert_names_missing_files_and_fixes(str(info.value), directory)

    # the fix the message gives: a tokenizer from a directory that has the files
    model.tokenizer = fastclip.get_tokenizer(hf_siglip_dir)
    reference = fastclip.load(hf_siglip_dir)
    np.testing.assert_allclose(model.embed_texts(TEXTS), reference.embed_texts(TEXTS), atol=tolerance.SAME_MODEL_ATOL)


def test_service_text_inputs_without_tokenizer_say_which_files(siglip_dir_without_tokenizer):
    import httpx

    from fastclip.server import create_app
    from helpers.server_utils import data_uri, noise_image, running_server, wait_ready

    model = fastclip.load(siglip_dir_without_tokenizer)
    with running_server(create_app(model, max_wait_ms=5)) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client)
            image = data_uri(noise_image(1))
            assert client.post("/v1/embeddings", json={"input": [image]}).status_code == 200
            for path, body in (("/v1/embeddings", {"input": ["a photo of a kato", image]}),
                               ("/v1/classify", {"input": [image], "labels": ["kato", "sen"]})):
                r = client.post(path, json=body)
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["code"] == "no_tokenizer"
                _assert_names_missing_files_and_fixes(error["message"], siglip_dir_without_tokenizer)
