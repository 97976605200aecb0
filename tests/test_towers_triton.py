"""The ResNet image tower and the BERT-style text towers on the triton table (Triton's interpreter on a CPU,
compiled on a GPU: tests/helpers/device.py) against the reference ops, on tiny random perturbed models."""
import json

import pytest
import torch

import fastclip
from fastclip.tolerance import UPSTREAM_ATOL, max_abs
from helpers.device import DEVICE

VIT = {"image_size": 32, "patch_size": 16, "width": 64, "head_width": 32, "layers": 1}
CLIP_TEXT = {"context_length": 16, "vocab_size": 300, "width": 64, "heads": 2, "layers": 1}


def _bert_text(model_type: str, pooler: str, proj: str) -> dict:
    hf = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 40, "type_vocab_size": 2,
          "pad_token_id": 1 if model_type != "bert" else 0, "layer_norm_eps": 1e-5, "hidden_act": "gelu"}
    return {"hf_model_name": f"tiny-{model_type}", "hf_model_config": hf, "hf_pooler_type": pooler,
            "hf_proj_type": proj, "context_length": 16}


CONFIGS = {
    "tiny-triton-RN": {"embed_dim": 32, "vision_cfg": {"layers": [1, 2, 1, 1], "width": 8, "image_size": 64},
                       "text_cfg": CLIP_TEXT},
    "tiny-triton-xlmr": {"embed_dim": 32, "vision_cfg": VIT, "text_cfg": _bert_text("xlm-roberta", "mean_pooler", "mlp")},
    "tiny-triton-bert": {"embed_dim": 32, "vision_cfg": VIT,
                         "text_cfg": _bert_text("bert", "cls_last_hidden_state_pooler", "linear")},
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton_towers")
    for name, raw in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(raw))
    fastclip.add_model_config(folder)


def _pair(name: str):
    """(ref model, triton model) holding the same perturbed weights (BatchNorm statistics included)."""
    ref = fastclip.create_model(name, backend="ref", seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, t in ref.state_dict().items():
            if t.is_floating_point():
                noise = 0.05 * torch.randn(t.shape, generator=gen)
                t.add_(noise.abs() if key.endswith("running_var") else noise)
    tri = fastclip.create_model(name, backend="ref", seed=0)
    tri.load_state_dict(ref.state_dict())
    return ref, tri.to(DEVICE).set_backend("triton")


def test_resnet_tower_on_triton(registered):
    ref, tri = _pair("tiny-triton-RN")
    assert tri.backend == "triton"
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref.encode_image(pixels)
        got = tri.encode_image(pixels.to(DEVICE)).cpu()
    assert want.abs().max() > 1e-3  # not a degenerate output
    assert max_abs(got, want) <= UPSTREAM_ATOL


@pytest.mark.parametrize("name", ["tiny-triton-xlmr", "tiny-triton-bert"])
def test_bert_text_tower_on_triton(registered, name):
    ref, tri = _pair(name)
    pad = ref.cfg.text.pad_token_id
    tokens = torch.full((3, 16), pad, dtype=torch.long)
    gen = torch.Generator().manual_seed(3)
    for row, length in enumerate((16, 5, 9)):  # padding differs per row: the key mask matters
        tokens[row, :length] = torch.randint(3, 300, (length,), generator=gen)
    with torch.inference_mode():
        want = ref.encode_text(tokens)
        got = tri.encode_text(tokens.to(DEVICE)).cpu()
    assert max_abs(got, want) <= UPSTREAM_ATOL
