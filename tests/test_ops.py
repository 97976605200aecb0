"""Backend resolution (explicit > FASTCLIP_BACKEND > device default) and the reference ops against
independent PyTorch implementations, at fp32 tolerances on awkward shapes."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

import fastclip
from fastclip import BackendUnavailableError, ref
from fastclip.backends.dispatch import OP_NAMES, get_ops, resolve_backend

FP32 = dict(rtol=1e-5, atol=1e-5)
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "head_width": 32, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def no_cpp(monkeypatch):
    """As if fastclip._C were not built (whether or not it is in this checkout), no backend variables."""
    monkeypatch.setitem(sys.modules, "fastclip._C", None)  # `import fastclip._C` now raises ImportError
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter lets triton run on CPU tensors


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ops_cfg") / "ops-tiny.json"
    path.write_text(__import__("json").dumps(TINY))
    return fastclip.add_model_config(path)[0]


# ---------------------------------------------------------------- backend resolution
def test_explicit_ref(no_cpp, monkeypatch, tiny_name):
    monkeypatch.setenv("FASTCLIP_BACKEND", "triton")  # an explicit argument wins over the environment
    assert resolve_backend("ref", "cpu") == "ref"
    model = fastclip.create_model(tiny_name, backend="ref")
    assert model.backend == "ref" and model.ops.backend == "ref" and "backend='ref'" in repr(model)


def test_triton_on_cpu_is_refused(no_cpp, tiny_name):
    with pytest.raises(BackendUnavailableError, match="triton.*CUDA"):
        resolve_backend("triton", "cpu")
    with pytest.raises(BackendUnavailableError, match="triton"):
        fastclip.create_model(tiny_name, backend="triton")
    model = fastclip.create_model(tiny_name, backend="ref")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        model.set_backend("triton")
    assert model.backend == "ref"  # a refused switch leaves the model as it was


def test_cpu_without_extension_is_refused(no_cpp, tiny_name):
    with pytest.raises(BackendUnavailableError, match=r"fastclip\._C") as info:
        resolve_backend("cpu", "cpu")
    assert "pip install" in str(info.value)
    with pytest.raises(BackendUnavailableError, match="cpp"):
        fastclip.create_model(tiny_name, backend="cpp")


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(BackendUnavailableError, match="auto.*ref.*cpu.*cpp.*triton"):
        resolve_backend("tensorrt", "cpu")


def test_auto_falls_back_to_ref(no_cpp, tiny_name, monkeypatch):
    monkeypatch.setattr("fastclip.backends.dispatch._fallback_warned", False)
    with pytest.warns(UserWarning, match="reference ops"):
        assert resolve_backend("auto", "cpu") == "ref"
    assert resolve_backend(None, "cpu") == "ref"
    model = fastclip.create_model(tiny_name)
    assert model.backend == "ref" and "backend='ref'" in repr(model)


def test_environment_variable_is_honoured(no_cpp, monkeypatch, tiny_name):
    monkeypatch.setenv("FASTCLIP_BACKEND", "ref")
    assert fastclip.create_model(tiny_name).backend == "ref"
    monkeypatch.setenv("FASTCLIP_BACKEND", "TRITON")  # an environment request is explicit too: no fallback
    with pytest.raises(BackendUnavailableError, match="triton"):
        resolve_backend(None, "cpu")
    with pytest.raises(BackendUnavailableError, match="triton"):
        fastclip.create_model(tiny_name)
    monkeypatch.setenv("FASTCLIP_BACKEND", "cpp")
    with pytest.raises(BackendUnavailableError, match=r"fastclip\._C"):
        fastclip.create_model(tiny_name)


def test_ref_table_is_complete():
    table = get_ops("ref")
    assert table.backend == "ref"
    assert all(getattr(table, name) is getattr(ref, name) for name in OP_NAMES)


# ---------------------------------------------------------------- reference ops vs torch
def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("length", [1, 50, 77, 197])
def test_attention_vs_sdpa(length, head_dim, causal):
    q, k, v = (_randn(2, 3, length, head_dim, seed=s) for s in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ref.attention(q, k, v, causal=causal), expected, **FP32)


@pytest.mark.parametrize("lq, lk", [(1, 197), (1, 50), (7, 77)])
def test_cross_attention_vs_sdpa(lq, lk):
    """Attention pooling: a few queries over all tokens (Lq != Lk, never causal)."""
    q, k, v = _randn(2, 4, lq, 80, seed=1), _randn(2, 4, lk, 80, seed=2), _randn(2, 4, lk, 80, seed=3)
    torch.testing.assert_close(ref.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), **FP32)
    with pytest.raises(ValueError, match="Lq == Lk"):
        ref.attention(q, k, v, causal=True)


def test_attention_upcast_keeps_the_dtype():
    q, k, v = (_randn(1, 2, 77, 64, seed=s, dtype=torch.float16) for s in range(3))
    out = ref.attention(q, k, v, causal=True, upcast=True)
    assert out.dtype == torch.float16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("shape", [(2, 77, 512), (3, 80), (1, 197, 768), (5, 1152)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_layer_norm_vs_module(shape, eps):
    ln = torch.nn.LayerNorm(shape[-1], eps=eps)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * _randn(shape[-1], seed=1))
        ln.bias.copy_(0.1 * _randn(shape[-1], seed=2))
        x = 3 * _randn(*shape, seed=3) + 0.5
        torch.testing.assert_close(ref.layer_norm(x, ln.weight, ln.bias, eps), ln(x), **FP32)
        half = ref.layer_norm(x.half(), ln.weight.half(), ln.bias.half(), eps)  # normalised in fp32
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), ln(x.half().float()), rtol=0, atol=2e-2)


ACTS = {
    "gelu": torch.nn.GELU(),
    "gelu_tanh": torch.nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU(),  # open_clip's x * sigmoid(1.702 x)
    "none": torch.nn.Identity(),
    # SwiGLU in timm's packed layout (GluMlp with gate_last=False): silu of the first half times the second
    "swiglu": lambda x: torch.nn.SiLU()(x[..., : x.shape[-1] // 2]) * x[..., x.shape[-1] // 2:],
}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_act(act, with_bias):
    x, bias = 4 * _randn(3, 50, 3072, seed=1), _randn(3072, seed=2) if with_bias else None
    expected = ACTS[act](x + bias if with_bias else x)
    torch.testing.assert_close(ref.bias_act(x, bias, act), expected, **FP32)
    assert set(ref.ACTIVATIONS) == set(ACTS)


def test_quick_gelu_formula_and_unknown_activation():
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(ref.bias_act(x, None, "quick_gelu"), x / (1 + torch.exp(-1.702 * x)), **FP32)
    with pytest.raises(ValueError, match="relu"):
        ref.bias_act(x, None, "relu")


def test_linear_and_l2_normalize():
    x, w, b = _randn(3, 77, 512, seed=1), _randn(1536, 512, seed=2) / math.sqrt(512), _randn(1536, seed=3)
    torch.testing.assert_close(ref.linear(x, w, b), x @ w.T + b, **FP32)
    y = _randn(5, 768, seed=4)
    torch.testing.assert_close(ref.l2_normalize(y), y / y.norm(dim=-1, keepdim=True), **FP32)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("proj_kind", ["proj", "proj+bias", "none"])
def test_normalize_project(normalize, proj_kind):
    width, embed = 768, 512
    x = 2 * _randn(5, width, seed=1)
    w, b = 1 + 0.1 * _randn(width, seed=2), 0.1 * _randn(width, seed=3)
    proj = None if proj_kind == "none" else _randn(width, embed, seed=4) / math.sqrt(width)
    proj_bias = _randn(embed, seed=5) if proj_kind == "proj+bias" else None
    expected = torch.nn.functional.layer_norm(x, (width,), w, b, 1e-6)
    if proj is not None:
        expected = torch.nn.functional.linear(expected, proj.T, proj_bias)
    if normalize:
        expected = expected / expected.norm(dim=-1, keepdim=True)
    out = ref.normalize_project(x, w, b, 1e-6, proj, proj_bias, normalize=normalize)
    torch.testing.assert_close(out, expected, **FP32)
