"""The fused ``encoder_block`` of the cpu backend's fp32 table and of the int8 table (csrc/encoder_block.cpp,
fastclip/backends/cpu/encoder_block.py, fastclip/backends/int8_block.py): a whole pre-norm block in one call
must give the op-by-op path's result bit for bit -- image and causal text towers, batch 1 and odd batches, a
pending residual, NaFlex-style prefix key masks, with the AVX-512 paths on and off -- and must decline (None,
so the model composes the block) what it does not take."""
from __future__ import annotations

import dataclasses
import platform

import pytest
import torch

if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("fastclip._C is built on Linux x86-64 only", allow_module_level=True)

import fastclip  # noqa: E402
from fastclip import _C  # noqa: E402
from fastclip.backends import int8  # noqa: E402
from fastclip.backends.cpu import encoder_block as block_kernel  # noqa: E402
from fastclip.backends.cpu import linear as fp32_linear  # noqa: E402

pytestmark = pytest.mark.skipif(int8.KERNEL is None, reason="no int8 kernel on this CPU")


def _model(name: str, precision: str = "int8"):
    model = fastclip.create_model(name, seed=0, backend="cpu", precision=precision)
    return model, dataclasses.replace(model.ops, encoder_block=None)


@pytest.fixture(params=[True, False], ids=["avx512-on", "avx512-off"])
def avx512(request):
    previous = _C.set_avx512(request.param)
    yield request.param
    _C.set_avx512(previous)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip", "tiny-avgpool-quickgelu"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_towers_equal_the_ops(tiny_config_dir, monkeypatch, avx512, precision, name, batch):
    model, composed = _model(name, precision)
    calls = []
    kernel = block_kernel.run_block
    monkeypatch.setattr(block_kernel, "run_block", lambda *a, **k: calls.append(k["int8"]) or kernel(*a, **k))
    size = model.cfg.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    tokens = torch.randint(1, model.cfg.text.vocab_size, (batch, model.cfg.text.context_length),
                           generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        fused = model.encode_image(pixels), model.encode_text(tokens)
        assert calls and set(calls) == {precision == "int8"}, "the table did not fuse the blocks"
        model.ops = composed
        plain = model.encode_image(pixels), model.encode_text(tokens)
    for got, want in zip(fused, plain, strict=True):
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize("lengths", [None, (7, 3)])
def test_pending_residual_and_prefix_key_mask(tiny_config_dir, avx512, precision, lengths):
    model, composed = _model("tiny-clip", precision)
    block = model.visual.transformer.resblocks[0]
    gen = torch.Generator().manual_seed(0)
    B, L, W = 2, 7, block.ln_1.weight.shape[0]
    x, pending = torch.randn(B, L, W, generator=gen), torch.randn(B, L, W, generator=gen)
    key_mask = None if lengths is None else torch.arange(L) < torch.tensor(lengths)[:, None]  # (B, L) prefixes
    with torch.inference_mode():
        for p in (None, pending):
            fused = model.ops.encoder_block(x, p, block.weights(), False, key_mask)
            assert fused is not None
            plain = block.apply_split(x, p, composed, False, key_mask)
            for got, want in zip(fused, plain, strict=True):
                assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_declines_what_it_does_not_take(tiny_config_dir, precision):
    model, _ = _model("tiny-clip", precision)
    block = model.visual.transformer.resblocks[0]
    W = block.ln_1.weight.shape[0]
    x = torch.randn(2, 5, W)
    holes = torch.tensor([[True, False, True, True, True], [True] * 5])  # not a prefix mask
    with torch.inference_mode():
        assert model.ops.encoder_block(x, None, block.weights(), False, holes) is None
        assert model.ops.encoder_block(x.transpose(0, 1), None, block.weights(), False, None) is None
        assert model.ops.encoder_block(x.double(), None, block.weights(), False, None) is None
    assert model.ops.encoder_block(x.requires_grad_(), None, block.weights(), False, None) is None
    gated = block.weights()._replace(act="swiglu")
    with torch.inference_mode():
        assert model.ops.encoder_block(x, None, gated, False, None) is None
    assert fastclip.create_model("tiny-clip", seed=0, backend="ref", precision="int8").ops.encoder_block is None
    assert fastclip.create_model("tiny-clip", seed=0, backend="ref").ops.encoder_block is None


def test_fp32_declines_above_the_kernels_rows(tiny_config_dir):
    """fp32 blocks fuse only where every layer takes the packed-panel kernel (M <= KERNEL_MAX_ROWS)."""
    model, _ = _model("tiny-clip", "fp32")
    block = model.visual.transformer.resblocks[0]
    W = block.ln_1.weight.shape[0]
    limit = fp32_linear.KERNEL_MAX_ROWS[_C.linear_panel_width()]
    with torch.inference_mode():
        assert model.ops.encoder_block(torch.randn(1, limit, W), None, block.weights(), False, None) is not None
        assert model.ops.encoder_block(torch.randn(1, limit + 1, W), None, block.weights(), False, None) is None


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_weights_changed_in_place_are_used(tiny_config_dir, precision):
    """The fused path's operands follow an in-place change of the fp32 masters, as the ops do."""
    model, composed = _model("tiny-clip", precision)
    pixels = torch.randn(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    with torch.inference_mode():
        before = model.encode_image(pixels)
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.mlp.c_proj.weight.mul_(-1.0)
            block.ln_1.weight.mul_(0.5)
    with torch.inference_mode():
        fused = model.encode_image(pixels)
        model.ops = composed
        plain = model.encode_image(pixels)
    assert not torch.equal(fused, before)
    assert torch.equal(fused, plain)


def test_binding_rejects_bad_arguments():
    layer = (0, 0, 0, 0, 0)
    args = dict(int8=True, x=1, pending=0, s_out=1, m_out=1, scratch=1, B=1, L=1, W=6, H=4, mlp=8, ln1_w=1, ln1_b=1,
                ln1_eps=1e-5, ln2_w=1, ln2_b=1, ln2_eps=1e-5, qkv=layer, out=layer, fc=layer, proj=layer, act=0,
                causal=False)
    with pytest.raises(ValueError, match="multiple of H"):
        _C.encoder_block(**args)
    with pytest.raises(ValueError, match="null pointer"):
        _C.encoder_block(**{**args, "H": 2})
    with pytest.raises(ValueError, match="unknown activation"):
        _C.encoder_block(**{**args, "H": 2, "act": 99})
    fp32_layer = (1, 7, 0, 0, 0)  # a panel width no path has
    with pytest.raises(ValueError, match="panel width"):
        _C.encoder_block(**{**args, "H": 2, "int8": False, "qkv": fp32_layer, "out": fp32_layer, "fc": fp32_layer,
                            "proj": fp32_layer})
