"""End to end through the public API on Hugging Face directories: fastclip.load(dir) with the
directory's own tokenizer and preprocessor, against transformers' processor + model on the same files."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import fastclip

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
    np.testing.assert_allclose(text_emb, out.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(image_emb, out.image_embeds.numpy(), atol=1e-4)

    # one template that is the label itself: classify's logits are exactly the model's logits_per_image
    probs = model.classify(photos, TEXTS, templates=["{}"])
    logits = out.logits_per_image
    expected = torch.sigmoid(logits) if family == "siglip" else torch.softmax(logits, dim=-1)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-4)


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
