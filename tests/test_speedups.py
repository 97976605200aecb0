"""The exact speed-ups against the paths they replace, and the backend name.

* backend "cpu" (alias "cpp"); ``auto`` without the C++ extension warns once and uses ``ref``;
* last-block trimming vs the untrimmed tower (``trim_last_block = False``) and vs the block's full output;
* pixel mean/std folded into the patch embedding vs normalised pixels;
* texts grouped by length vs input-order batches;
* the next image batch is prepared while the current one is encoded.
"""
from __future__ import annotations

import sys
import threading
import warnings

import numpy as np
import pytest
import torch

import fastclip
from fastclip import BackendUnavailableError, tolerance
from fastclip.backends import dispatch as ops
from fastclip.backends.dispatch import get_ops, resolve_backend
from fastclip.data.text_batches import plan_batches

SAME_MODEL = dict(rtol=tolerance.SAME_MODEL_RTOL, atol=tolerance.SAME_MODEL_ATOL)  # equivalent fp32 paths
# The tiny configs (fastclip/models/tiny.py): class-token pooling with causal argmax text (QuickGELU); a
# SigLIP shape (attention pool, patch bias, Inception mean/std, squash, bidirectional text pooled last);
# mean-pooled patches with text pooled at the first end of text; causal text pooled at the first token.
CONFIGS = ["tiny-clip", "tiny-siglip", "tiny-avgpool-quickgelu", "tiny-first-token"]
WORDS = "a photo of the small red cat sitting on an old wooden chair near window in morning light".split()


@pytest.fixture(scope="module")
def names(tiny_config_dir):
    return list(CONFIGS)


def _model(name: str, backend: str = "ref", seed: int = 0):
    """A tiny model with noise on every parameter (unit LayerNorms and zero biases are no special case)."""
    model = fastclip.create_model(name, backend=backend, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _captions(n: int, seed: int = 0) -> list[str]:
    """n captions of 5..40 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 41)))) for _ in range(n)]


def _photos(n: int, seed: int = 0) -> list[np.ndarray]:
    """n smooth random RGB images of varied sizes (uint8 arrays)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        out.append(np.ascontiguousarray(base.repeat(8, 0).repeat(8, 1)[:h, :w]))
    return out


# ---------------------------------------------------------------------------------- backend name
@pytest.fixture
def no_extension(monkeypatch):
    """As if fastclip._C were not built; the once-per-process warning not yet given."""
    monkeypatch.setitem(sys.modules, "fastclip._C", None)  # `import fastclip._C` now raises ImportError
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_fallback_warned", False)


def test_cpu_is_the_name_and_cpp_an_alias(names):
    assert resolve_backend("cpu", "cpu") == resolve_backend("cpp", "cpu") == resolve_backend("auto", "cpu") == "cpu"
    assert get_ops("cpp").backend == get_ops("cpu").backend == "cpu"
    model = fastclip.create_model(names[0], backend="cpp")
    assert model.backend == "cpu" and "backend='cpu'" in repr(model)
    with pytest.raises(BackendUnavailableError, match="'cpu' \\(alias 'cpp'\\)"):
        resolve_backend("onnx", "cpu")


def test_auto_without_extension_warns_once_and_uses_ref(no_extension, names):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [resolve_backend("auto", "cpu") for _ in range(3)] == ["ref"] * 3
        assert resolve_backend(None, "cpu") == "ref"
        assert fastclip.create_model(names[0]).backend == "ref"
        assert resolve_backend("ref", "cpu") == "ref"
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "fastclip._C" in message and "pip install -e ." in message and "backend='ref'" in message


@pytest.mark.parametrize("name", ["cpu", "cpp", "CPU"])
def test_explicit_cpu_without_extension_raises(no_extension, names, name):
    with pytest.raises(BackendUnavailableError, match=rf"'{name.lower()}' was requested.*fastclip\._C.*pip install"):
        resolve_backend(name, "cpu")
    with pytest.raises(BackendUnavailableError, match=r"fastclip\._C"):
        fastclip.create_model(names[0], backend=name)


# ---------------------------------------------------------------------------------- last-block trimming
@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("causal", [True, False])
def test_pooled_block_equals_the_full_block_rows(backend, causal):
    """apply_pooled == apply_op's rows index[b], for repeated, first and last positions."""
    from fastclip.models.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 2, 128, "gelu", 1e-5)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] == 64 else 0.0))
        x = torch.randn(6, 19, 64)
        index = torch.tensor([18, 0, 7, 7, 18, 3])
        table = get_ops(backend)
        full = block.apply_op(x, table, causal)[torch.arange(6), index]  # (6, 64)
        torch.testing.assert_close(block.apply_pooled(x, table, causal, index), full, **SAME_MODEL)
        last = torch.full((6,), 18)  # every query at the end: one attention call over all keys
        torch.testing.assert_close(block.apply_pooled(x, table, causal, last), block.apply_op(x, table, causal)[:, 18],
                                   **SAME_MODEL)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_trimmed_towers_equal_untrimmed(names, name, backend):
    model = _model(name, backend)
    S = model.cfg.vision.image_size
    pixels = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    tokens = model.tokenizer(["a cat", "a photo of a very small dog on a chair", "x " * 100])  # EOT at 3, 11, 76
    with torch.no_grad():
        trimmed = model.encode_image(pixels), model.encode_text(tokens)
        model.visual.trim_last_block = model.text.trim_last_block = False
        full = model.encode_image(pixels), model.encode_text(tokens)
    for what, a, b in zip(("image", "text"), trimmed, full, strict=True):
        torch.testing.assert_close(a, b, **SAME_MODEL, msg=lambda m, what=what: f"{name} {what} trimmed vs untrimmed: {m}")


# ---------------------------------------------------------------------------------- folded pixel norm
@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_folded_pixel_norm_equals_normalised_pixels(names, name, backend):
    model = _model(name, backend)
    photos = _photos(5)
    folded = model.embed_images(photos, batch_size=2)
    model.fold_pixel_norm = False
    plain = model.embed_images(photos, batch_size=2)
    err = np.abs(folded - plain).max() / np.abs(plain).max()
    assert err <= tolerance.FOLDED_PIXEL_NORM_REL, f"{name}: folded vs normalised pixels, relative max error {err:.2e}"


def test_folded_pixel_norm_full_size_vit_b32():
    model = fastclip.create_model("ViT-B-32", seed=0)
    pixels, _, _ = model.preprocess.batch(_photos(2, seed=3), raw=True)  # (2, 3, 224, 224) uint8
    normalised = torch.stack([model.preprocess.normalise(p.permute(1, 2, 0).numpy()) for p in pixels])
    with torch.no_grad():
        want = model.visual.apply_op(normalised, model.ops)
        got = model.visual.apply_op(pixels, model.ops, pixel_norm=model.preprocess.pixel_norm)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tolerance.FOLDED_PIXEL_NORM_REL, f"ViT-B-32 folded vs normalised: relative max error {err:.2e}"
    with pytest.raises(ValueError, match="uint8"):
        model.visual.apply_op(normalised, model.ops, pixel_norm=model.preprocess.pixel_norm)


def test_folded_weights_follow_weight_changes(names):
    """The folded conv1 is kept between calls, and refolded after conv1's weights change in place."""
    model = _model("tiny-siglip")
    photos = _photos(3, seed=5)
    before = model.embed_images(photos)
    norm = model.preprocess.pixel_norm
    with torch.inference_mode():
        kept = model.visual._folded_conv(norm)[0]
    assert model.visual._folded_conv(norm)[0] is kept and not kept.is_inference()  # kept, and packable
    with torch.no_grad():
        model.visual.conv1.weight.mul_(1.5)
        model.visual.conv1.bias.add_(0.1)
    after = model.embed_images(photos)
    model.fold_pixel_norm = False
    np.testing.assert_allclose(after, model.embed_images(photos), **SAME_MODEL)
    assert np.abs(after - before).max() > tolerance.CHANGED_OUTPUT_MIN


# ---------------------------------------------------------------------------------- text grouping
def _spy_encode_text(model, monkeypatch) -> list[torch.Tensor]:
    seen = []
    original = model.encode_text

    def encode_text(tokens, normalize=False):
        seen.append(tokens.clone())
        return original(tokens, normalize=normalize)

    monkeypatch.setattr(model, "encode_text", encode_text)
    return seen


def test_grouped_texts_equal_ungrouped_in_input_order(names, monkeypatch):
    model = _model("tiny-clip", "cpu")
    model.text_window_batches = 2  # 23 texts in batches of 4: windows of 8
    texts = _captions(23)
    seen = _spy_encode_text(model, monkeypatch)
    grouped = model.embed_texts(texts, batch_size=4)
    assert all(len(t) <= 4 for t in seen) and sum(len(t) for t in seen) == 23
    flat = torch.cat([model.text.pool_index(t) for t in seen])  # (23,) pooled positions in call order
    for start, stop in ((0, 8), (8, 16), (16, 23)):  # texts within one window run in increasing length
        assert torch.equal(flat[start:stop], flat[start:stop].sort().values), flat
    model.group_texts_by_length = False
    ungrouped = model.embed_texts(texts, batch_size=4)
    with torch.no_grad():
        direct = model.encode_text(model.tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(grouped, ungrouped, **SAME_MODEL)
    np.testing.assert_allclose(grouped, direct, **SAME_MODEL)


def _brute_force_cost(lengths, batch_size, overhead):
    """The cheapest cost over every way to cut ``lengths`` (ascending) into contiguous batches."""
    n, best = len(lengths), [0] + [float("inf")] * len(lengths)
    for stop in range(1, n + 1):
        for start in range(max(0, stop - batch_size), stop):
            best[stop] = min(best[stop], best[start] + (stop - start) * lengths[stop - 1] + overhead)
    return best[n]


@pytest.mark.parametrize("seed", range(6))
def test_plan_batches_is_optimal_and_capped(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(3, 40, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).tolist())
    batch_size, overhead = [1, 3, 8, 64][seed % 4], [0, 16, 200][seed % 3]
    spans = plan_batches(lengths, batch_size, overhead)
    assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == len(lengths)
    assert all(0 < b - a <= batch_size for a, b in spans)
    cost = sum((b - a) * lengths[b - 1] + overhead for a, b in spans)
    assert cost == _brute_force_cost(lengths, batch_size, overhead)


def test_plan_batches_errors():
    assert plan_batches([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([3, 4], 0)
    with pytest.raises(ValueError, match="ascending"):
        plan_batches([5, 4], 4)


def test_grouping_keeps_skip_indices(names):
    model = _model("tiny-avgpool-quickgelu", "cpu")
    texts = _captions(9, seed=2)
    items = texts[:2] + [""] + texts[2:6] + [7] + texts[6:]
    result = model.embed_texts(items, batch_size=2, on_error="skip")
    assert result.indices.tolist() == [0, 1, 3, 4, 5, 6, 8, 9, 10]
    assert [e.index for e in result.errors] == [2, 7]
    model.group_texts_by_length = False
    np.testing.assert_allclose(result.embeddings, model.embed_texts(texts, batch_size=2), **SAME_MODEL)


def test_bidirectional_text_is_not_reordered(names, monkeypatch):
    model = _model("tiny-siglip", "cpu")
    texts = _captions(7, seed=4)
    seen = _spy_encode_text(model, monkeypatch)
    model.embed_texts(texts, batch_size=3)
    assert torch.equal(torch.cat(seen), model.tokenizer(texts))  # input order, full length


# ---------------------------------------------------------------------------------- image overlap
def test_next_batch_is_prepared_while_encoding(names, monkeypatch):
    """Batch 1 is decoded while batch 0 is still being encoded (the encoder waits for that to happen)."""
    model = _model("tiny-clip", "cpu")
    started = {}
    second_started = threading.Event()
    batch, encode = model.preprocess.batch, model._encode_prepared

    def spy_batch(items, **kw):
        started[kw["index_offset"]] = True
        if kw["index_offset"] == 2:
            second_started.set()
        return batch(items, **kw)

    overlapped = []

    def spy_encode(pixels, folded):
        if not overlapped:
            overlapped.append(second_started.wait(timeout=30))
        return encode(pixels, folded)

    monkeypatch.setattr(model.preprocess, "batch", spy_batch)
    monkeypatch.setattr(model, "_encode_prepared", spy_encode)
    photos = _photos(5)
    out = model.embed_images(photos, batch_size=2)
    assert overlapped == [True] and sorted(started) == [0, 2, 4]
    monkeypatch.undo()
    np.testing.assert_allclose(out, model.embed_images(photos, batch_size=5), **SAME_MODEL)
