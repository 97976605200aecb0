"""precision="int8": int8 linear layers against the fp32 model on the same weights.

The numerics contract (fastclip/tolerance.py): per-item cosine >= MIN_COSINE (0.99) to the fp32
embeddings, and retrieval agreement with fp32 (the INT8_* bars). The model has ViT-B-32's widths
(768 / 512, heads 12 / 8, MLP x4, patch 32 at 224 px) with 4 blocks per tower, so every linear layer has
the real shapes; it is saved as a checkpoint and loaded back with ``fastclip.load(..., precision="int8")``.
"""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import fastclip
from fastclip import tolerance
from fastclip.backends import int8 as quant
from fastclip.backends.dispatch import get_ops
from helpers.upstream import EOT, SOT, clip_tokens, make_images

MODEL = "int8-test-ViT-B-32-4-blocks"
N = 64  # images and texts per batch
MIN_COSINE = tolerance.MIN_COSINE


@pytest.fixture(scope="module")
def models(tmp_path_factory, int8_gemm):
    """(fp32 model, int8 model loaded from the fp32 model's checkpoint, checkpoint path), per int8 GEMM."""
    folder = tmp_path_factory.mktemp("int8")
    raw = {"embed_dim": 512,
           "vision_cfg": {"image_size": 224, "layers": 4, "width": 768, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 4}}
    (folder / f"{MODEL}.json").write_text(json.dumps(raw))
    fastclip.add_model_config(folder / f"{MODEL}.json")
    fp32 = fastclip.create_model(MODEL, seed=0)
    path = folder / "weights.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, str(path))
    int8 = fastclip.load(MODEL, pretrained=path, precision="int8")
    return fp32, int8, path


@pytest.fixture(scope="module")
def inputs():
    """64 images close to each other (one base image + noise, so nearest neighbours are hard to tell
    apart) and 64 distinct CLIP token rows of 4 to 40 tokens (start, random ids, end-of-text, padding)."""
    base = make_images(1, 224, seed=1)
    images = base + 0.5 * make_images(N, 224, seed=2)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.zeros(N, 77, dtype=torch.long)
    for row, length in enumerate(torch.randint(4, 41, (N,), generator=gen).tolist()):
        tokens[row, :length] = torch.randint(1, SOT, (length,), generator=gen)
        tokens[row, 0], tokens[row, length - 1] = SOT, EOT
    return images, tokens


@pytest.fixture(scope="module")
def embeddings(models, inputs):
    """{"fp32" | "int8": (image (N, 512), text (N, 512))}, L2-normalised."""
    images, tokens = inputs
    out = {}
    with torch.inference_mode():
        for name, model in zip(("fp32", "int8"), models[:2], strict=True):
            out[name] = (model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True))
    return out


def _top1_agreement(a: torch.Tensor, b: torch.Tensor, dim: int) -> float:
    return (a.argmax(dim) == b.argmax(dim)).float().mean().item()


def test_per_item_cosine_to_fp32(embeddings):
    for tower, f, q in zip(("image", "text"), embeddings["fp32"], embeddings["int8"], strict=True):
        cosine = F.cosine_similarity(q, f, dim=-1)
        assert cosine.min().item() >= MIN_COSINE, f"{tower}: per-item cosine {cosine.min():.5f} < {MIN_COSINE}"


def test_retrieval_agreement(embeddings):
    """Self-retrieval: each int8 embedding's nearest fp32 neighbour is its own. The batch is
    built so that neighbours are close -- every image has another within cosine > 0.99 -- which makes
    this stricter than the per-item cosine bar: every item must be told apart from one that near.

    Cross-modal top-1 agreement between the fp32 and int8 similarity matrices (images x texts):
    image -> text, where one image's fp32 scores over the 64 texts spread over ~0.1, some 20x int8's score
    error (asserted: more than INT8_SPREAD_MARGIN x), must agree for >= INT8_I2T_AGREEMENT (95%) of queries
    (a near-tie may flip). Text -> image has a floor only against a broken int8 path
    (INT8_T2I_AGREEMENT_FLOOR; chance is 1/64): random weights put all image embeddings within cosine ~0.998
    of each other, so one text's scores over the 64 images spread over less than 0.01, the order of int8's
    score error (asserted: the spread is below INT8_SPREAD_MARGIN x the error), and near-ties flip.
    """
    (fi, ft), (qi, qt) = embeddings["fp32"], embeddings["int8"]
    own = torch.arange(N)
    closest = (fi @ fi.T).fill_diagonal_(-1).max(dim=1).values  # (N,) nearest other image, fp32
    assert closest.min().item() > MIN_COSINE, "the image batch is not hard enough for self-retrieval"
    self_image = ((qi @ fi.T).argmax(1) == own).float().mean().item()
    self_text = ((qt @ ft.T).argmax(1) == own).float().mean().item()
    s_fp32, s_int8 = fi @ ft.T, qi @ qt.T  # (images, texts)
    t2i, i2t = _top1_agreement(s_fp32, s_int8, 0), _top1_agreement(s_fp32, s_int8, 1)
    spread_i2t = (s_fp32.amax(1) - s_fp32.amin(1)).median().item()
    spread_t2i = (s_fp32.amax(0) - s_fp32.amin(0)).median().item()
    error = (s_fp32 - s_int8).abs().max().item()
    assert self_image == 1.0 and self_text == 1.0
    assert spread_i2t > tolerance.INT8_SPREAD_MARGIN * error, "image -> text scores are too close for the agreement bar"
    assert spread_t2i < tolerance.INT8_SPREAD_MARGIN * error, "text -> image scores spread enough for a stricter bar"
    assert i2t >= tolerance.INT8_I2T_AGREEMENT, f"image -> text top-1 agreement {i2t:.3f}"
    assert t2i >= tolerance.INT8_T2I_AGREEMENT_FLOOR, f"text -> image top-1 agreement {t2i:.3f}"


def test_int8_model_state(models, inputs):
    fp32, int8, _ = models
    blocks = fp32.cfg.vision.layers + fp32.cfg.text.layers
    assert int8.precision == "int8" and fp32.precision == "fp32"
    assert "precision='int8'" in repr(int8)
    assert len(int8.int8_weights) == 6 * blocks  # qkv (and its q / kv halves), out_proj, c_fc, c_proj per block
    assert not any(p.requires_grad for p in int8.parameters())
    assert int8.dtype == torch.float32  # fp32 master weights, state dict unchanged
    assert int8.state_dict().keys() == fp32.state_dict().keys()
    images, tokens = inputs[0][:4], inputs[1][:4]
    with torch.inference_mode():
        before = int8.encode_image(images)
        assert not torch.equal(before, fp32.encode_image(images))  # the int8 GEMM really ran
        backend = int8.backend
        try:
            int8.set_backend("ref")  # keeps the int8 linear layers; only the fp32 ops change
            assert int8.precision == "int8" and int8.backend == "ref"
            assert int8.ops.linear is not get_ops("ref").linear
            after = int8.encode_image(images)
        finally:
            int8.set_backend(backend)
    # the same int8 GEMMs; the fp32 ops' rounding differences move a few activation roundings
    assert F.cosine_similarity(after, before, dim=-1).min().item() > tolerance.INT8_SAME_GEMM_COSINE
    out = int8.encode_text(tokens)  # outside inference_mode: frozen weights, no graph
    assert out.shape == (4, 512) and not out.requires_grad


def test_packs_follow_the_gemm(models, int8_gemm, monkeypatch):
    """Each int8 layer is packed for the GEMM in use; a bad FASTCLIP_INT8_GEMM is a clear error."""
    entries = [models[1].int8_weights.lookup(w, b) for w, b in quant.int8_linears(models[1])]
    packs = [e.pack for e in entries if e is not None and e.pack is not None]
    assert len(packs) == len(entries) > 0
    kernel = quant.KERNEL.Int8Pack if quant.KERNEL is not None else ()
    assert all(isinstance(p, kernel) != (int8_gemm == "fbgemm") for p in packs)
    with pytest.raises(ValueError, match="FASTCLIP_INT8_GEMM='int4'"):
        quant.choose_gemm("int4")
    monkeypatch.setenv("FASTCLIP_INT8_GEMM", "int4")
    with pytest.raises(ValueError, match="FASTCLIP_INT8_GEMM"):
        fastclip.create_model(MODEL, precision="int8")


def test_made_under_inference_mode(models, inputs):
    """A model made inside torch.inference_mode() is the model made outside it: normal tensors, packed alike."""
    with torch.inference_mode():
        inside = fastclip.load(MODEL, pretrained=models[2], precision="int8")
        assert not any(p.is_inference() for p in inside.parameters())
        got, want = inside.encode_image(inputs[0][:4]), models[1].encode_image(inputs[0][:4])
    assert torch.equal(got, want)


def test_embed_api_in_int8(models):
    fp32, int8, _ = models
    texts = ["a photo of a cat", "a diagram of a bridge", "two dogs on a beach"]
    got, want = int8.embed_texts(texts), fp32.embed_texts(texts)
    assert got.shape == (3, 512)
    assert F.cosine_similarity(torch.from_numpy(got), torch.from_numpy(want), dim=-1).min().item() >= MIN_COSINE


def test_int8_linear_op(int8_gemm):
    """The int8 table's linear against F.linear on one layer; unpacked weights run the fp32 op."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 768, generator=gen)
    w, b = torch.randn(3072, 768, generator=gen) * 0.02, torch.randn(3072, generator=gen)
    weights = quant.Int8Weights()
    weights.add(w, b)
    base = get_ops("ref")
    ops = quant.int8_ops(base, weights)
    want = F.linear(x, w, b)
    got = ops.linear(x, w, b)
    assert got.shape == want.shape == (2, 50, 3072)
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < tolerance.INT8_LINEAR_REL, f"int8 linear relative error {rel:.4f}"
    other = torch.randn(64, 768, generator=gen)
    assert torch.equal(ops.linear(x, other), F.linear(x, other))  # not packed -> fp32
    assert torch.equal(ops.linear(x, w), F.linear(x, w))  # packed with a bias, called without -> fp32
    for half_w, half_b in zip(w.split([1024, 2048]), b.split([1024, 2048]), strict=True):
        weights.add(half_w, half_b)
    q_w, q_b = w.split([1024, 2048])[0], b.split([1024, 2048])[0]  # fresh views, as pooled attention makes them
    assert weights.lookup(q_w, q_b) is not None and weights.lookup(q_w.clone(), q_b) is None
    w.mul_(2)  # an in-place change re-quantises on the next call
    want = F.linear(x, w, b)
    assert ((ops.linear(x, w, b) - want).norm() / want.norm()).item() < tolerance.INT8_LINEAR_REL
    weights.add(w, None)  # as an MLP's c_fc: packed without its bias, which linear_act adds with GELU
    want = F.gelu(F.linear(x, w, b))
    got = ops.linear_act(x, w, b, "gelu")
    assert ((got - want).norm() / want.norm()).item() < tolerance.INT8_LINEAR_REL
    fused = weights.with_bias(w, b)  # on the kernel, the bias and GELU run in its epilogue
    assert (fused is not None) == (int8_gemm == "kernel")
    if fused is not None:
        assert torch.equal(got, quant.KERNEL.linear_int8(x, fused, "gelu"))


def test_tiny_model_in_place_weight_change(tiny_config_dir, int8_gemm):
    """Another pooling (mean of patches, QuickGELU); a weight edited in place is re-quantised."""
    fp32 = fastclip.create_model("tiny-avgpool-quickgelu", seed=1)
    int8 = fastclip.create_model("tiny-avgpool-quickgelu", seed=1, precision="int8")
    images, tokens = make_images(8, 64, seed=4), clip_tokens(8, seed=5)
    with torch.no_grad():
        for model in (fp32, int8):
            model.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(3.0)
        for f, q in ((fp32.encode_image(images), int8.encode_image(images)),
                     (fp32.encode_text(tokens), int8.encode_text(tokens))):
            assert F.cosine_similarity(q, f, dim=-1).min().item() >= MIN_COSINE


def test_clear_errors(models, monkeypatch):
    path = models[2]
    for device in ("meta", "cuda"):
        with pytest.raises(ValueError, match="CPU only"):
            fastclip.create_model(MODEL, device=device, precision="int8")
        with pytest.raises(ValueError, match="CPU only"):
            fastclip.load(MODEL, pretrained=path, device=device, precision="int8")
    with pytest.raises(ValueError, match="not triton"):
        fastclip.load(MODEL, pretrained=path, precision="int8", backend="triton")
    monkeypatch.setenv("FASTCLIP_BACKEND", "triton")  # the environment's choice is checked too
    with pytest.raises(ValueError, match="not triton"):
        models[1].set_backend(None)
    assert models[1].backend in ("cpu", "cpp", "ref")  # unchanged by the refused switch
    with pytest.raises(ValueError, match="int8"):
        fastclip.create_model(MODEL, precision="int4")
    x = torch.randn(3, 768)
    ops = quant.int8_ops(get_ops("ref"), models[1].int8_weights)
    block = models[1].visual.transformer.resblocks[0]
    with pytest.raises(RuntimeError, match="no backward"):
        ops.linear(x.requires_grad_(), block.attn.in_proj_weight, block.attn.in_proj_bias)
