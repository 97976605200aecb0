"""fp32 parity of fastclip's reference path with open_clip and transformers on random weights.

Every parameter of the upstream model is perturbed with small noise (zero biases and unit LayerNorm
weights would hide key-map bugs), the weights go through fastclip's key maps, and encode_image /
encode_text must equal the upstream's to max-abs <= UPSTREAM_ATOL (fastclip/tolerance.py), before and
after L2 normalisation, for batch sizes 1, 3 and 5 with end-of-text at various positions (last position,
early, with padding). The table of every error is printed at the end of the run.
"""
from __future__ import annotations

import pytest
import torch

from fastclip.tolerance import FP32_SCALAR_RTOL, SAME_MODEL_ATOL, SAME_MODEL_RTOL, UPSTREAM_ATOL
from helpers.upstream import (
    OPENCLIP_TINY,
    assert_matches,
    clip_tokens,
    fastclip_from_hf,
    fastclip_from_openclip,
    openclip_upstream,
)

BATCHES = [1, 3, 5]
CASES = [
    "ViT-B-32-quickgelu",  # full size, QuickGELU, OpenAI's shape
    "ViT-B-16",  # full size, GELU, OpenCLIP
    *OPENCLIP_TINY,  # non-default widths / pooling (fastclip/models/tiny.py)
    "hf-clip",  # transformers CLIPModel, small
    "hf-siglip",  # transformers SiglipModel, small
]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    """(upstream, fastclip model) for one case; built once per module, dropped after its tests."""
    name = request.param
    if name == "ViT-B-32-quickgelu":
        up = request.getfixturevalue("oc_b32_quickgelu")
    elif name == "ViT-B-16":
        up = openclip_upstream("ViT-B-16", seed=2)
    elif name in OPENCLIP_TINY:
        up = request.getfixturevalue("oc_tiny")[name]
    elif name == "hf-clip":
        up = request.getfixturevalue("hf_clip")
        return name, up, fastclip_from_hf(up.model, name)
    else:
        up = request.getfixturevalue("hf_siglip")
        return name, up, fastclip_from_hf(up.model, name)
    return name, up, fastclip_from_openclip(name, up.model.state_dict())


@pytest.mark.parametrize("batch", BATCHES)
def test_encode_parity(case, batch):
    name, up, model = case
    assert model.backend == "ref"
    assert_matches(model, up, batch, name, "parity")


def test_logit_scale_and_bias(case):
    name, up, model = case
    ref_scale = up.model.logit_scale.detach().exp()
    torch.testing.assert_close(model.logit_scale.detach(), ref_scale.reshape(model.logit_scale.shape),
                               rtol=FP32_SCALAR_RTOL, atol=0)
    ref_bias = getattr(up.model, "logit_bias", None)
    if ref_bias is None:
        assert model.logit_bias is None
    else:
        torch.testing.assert_close(model.logit_bias.detach().reshape(-1), ref_bias.detach().reshape(-1),
                                   rtol=FP32_SCALAR_RTOL, atol=0)


def test_forward_matches_encode(case):
    """forward() returns OpenCLIP's tuple: normalised features, exp(logit_scale)[, logit_bias]."""
    name, up, model = case
    images, tokens = up.inputs(1)
    with torch.no_grad():
        out = model(images, tokens)
        same = dict(rtol=SAME_MODEL_RTOL, atol=SAME_MODEL_ATOL)
        torch.testing.assert_close(out[0], model.encode_image(images, normalize=True), **same)
        torch.testing.assert_close(out[1], model.encode_text(tokens, normalize=True), **same)
    assert len(out) == (4 if name == "hf-siglip" else 3)


def test_text_after_end_of_text_is_ignored_by_causal_towers(oc_b32_quickgelu):
    """Cutting a causal sequence after its end-of-text changes nothing: garbage after it, or a shorter
    context, gives the same embedding (fastclip relies on this to skip padding)."""
    model = fastclip_from_openclip("ViT-B-32-quickgelu", oc_b32_quickgelu.model.state_dict())
    tokens = clip_tokens(3, seed=7)  # end-of-text at 1, 38, 9
    noisy = tokens.clone()
    for row in range(3):
        eot = int((tokens[row] == 49407).nonzero()[0])
        noisy[row, eot + 1:] = torch.randint(1, 49000, (76 - eot,))
    with torch.no_grad():
        ref = oc_b32_quickgelu.model.encode_text(tokens)
        assert (model.encode_text(noisy) - ref).abs().max() <= UPSTREAM_ATOL
        assert (model.encode_text(tokens[:, :40]) - ref).abs().max() <= UPSTREAM_ATOL
