"""Backend resolution (explicit > FASTCLIP_BACKEND > device default) and the reference ops against
independent PyTorch implementations on awkward shapes, under the fp32 rule of fastclip/tolerance.py (the
independent implementation, run in float64 and in fp32 on the same inputs, is the yardstick)."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

import fastclip
from fastclip import BackendUnavailableError, ref, tolerance
from fastclip.backends.dispatch import OP_NAMES, get_ops, resolve_backend


@pytest.fixture
def no_cpp(monkeypatch):
    """As if fastclip._C were not built (whether or not it is in this checkout), no backend variables."""
    monkeypatch.setitem(sys.modules, "fastclip._C", None)  # `import fastclip._C` now raises ImportError
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter lets triton run on CPU tensors


@pytest.fixture(scope="module")
def tiny_name(tiny_config_dir) -> str:
    return "tiny-first-token"  # one block per tower (fastclip/models/tiny.py)


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


def check_against(got, independent, *inputs, what: str) -> None:
    """The fp32 rule for a reference op's result ``got``, with ``independent`` (the computation written with
    other torch functions) run on ``inputs`` in float64 and in fp32 as the reference."""
    ref64 = independent(*(None if t is None else t.double() for t in inputs))
    tolerance.check_fp32(got, ref64, independent(*inputs), what)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("length", [1, 50, 77, 197])
def test_attention_vs_sdpa(length, head_dim, causal):
    q, k, v = (_randn(2, 3, length, head_dim, seed=s) for s in range(3))
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    check_against(ref.attention(q, k, v, causal=causal), sdpa, q, k, v, what="attention vs SDPA")


@pytest.mark.parametrize("lq, lk", [(1, 197), (1, 50), (7, 77)])
def test_cross_attention_vs_sdpa(lq, lk):
    """Attention pooling: a few queries over all tokens (Lq != Lk, never causal)."""
    q, k, v = _randn(2, 4, lq, 80, seed=1), _randn(2, 4, lk, 80, seed=2), _randn(2, 4, lk, 80, seed=3)
    check_against(ref.attention(q, k, v), F.scaled_dot_product_attention, q, k, v, what="cross-attention vs SDPA")
    with pytest.raises(ValueError, match="Lq == Lk"):
        ref.attention(q, k, v, causal=True)


def test_attention_upcast_keeps_the_dtype():
    q, k, v = (_randn(1, 2, 77, 64, seed=s, dtype=torch.float16) for s in range(3))
    out = ref.attention(q, k, v, causal=True, upcast=True)
    assert out.dtype == torch.float16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), expected, rtol=0,  # computed in fp32, rounded once to fp16
                               atol=tolerance.rounding_bound(expected.abs().max().item(), torch.float16))


@pytest.mark.parametrize("shape", [(2, 77, 512), (3, 80), (1, 197, 768), (5, 1152)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_layer_norm_vs_module(shape, eps):
    ln = torch.nn.LayerNorm(shape[-1], eps=eps)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * _randn(shape[-1], seed=1))
        ln.bias.copy_(0.1 * _randn(shape[-1], seed=2))
        x = 3 * _randn(*shape, seed=3) + 0.5
        module = lambda x, w, b: F.layer_norm(x, shape[-1:], w, b, eps)  # noqa: E731  (what ln(x) runs)
        torch.testing.assert_close(ln(x), module(x, ln.weight, ln.bias), rtol=0, atol=0)
        check_against(ref.layer_norm(x, ln.weight, ln.bias, eps), module, x, ln.weight, ln.bias, what="layer_norm")
        half = ref.layer_norm(x.half(), ln.weight.half(), ln.bias.half(), eps)  # normalised in fp32
        assert half.dtype == torch.float16
        expected = module(*(t.half().float() for t in (x, ln.weight, ln.bias)))  # then rounded once to fp16
        torch.testing.assert_close(half.float(), expected, rtol=0,
                                   atol=tolerance.rounding_bound(expected.abs().max().item(), torch.float16))


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
    module = lambda x, bias: ACTS[act](x if bias is None else x + bias)  # noqa: E731
    check_against(ref.bias_act(x, bias, act), module, x, bias, what=f"bias_act {act}")
    assert set(ref.ACTIVATIONS) == set(ACTS)


def test_quick_gelu_formula_and_unknown_activation():
    x = torch.linspace(-6, 6, 1001)
    check_against(ref.bias_act(x, None, "quick_gelu"), lambda x: x / (1 + torch.exp(-1.702 * x)), x, what="quick_gelu")
    with pytest.raises(ValueError, match="relu"):
        ref.bias_act(x, None, "relu")


def test_linear_and_l2_normalize():
    x, w, b = _randn(3, 77, 512, seed=1), _randn(1536, 512, seed=2) / math.sqrt(512), _randn(1536, seed=3)
    check_against(ref.linear(x, w, b), lambda x, w, b: x @ w.T + b, x, w, b, what="linear")
    y = _randn(5, 768, seed=4)
    check_against(ref.l2_normalize(y), lambda y: y / y.norm(dim=-1, keepdim=True), y, what="l2_normalize")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("proj_kind", ["proj", "proj+bias", "none"])
def test_normalize_project(normalize, proj_kind):
    width, embed = 768, 512
    x = 2 * _randn(5, width, seed=1)
    w, b = 1 + 0.1 * _randn(width, seed=2), 0.1 * _randn(width, seed=3)
    proj = None if proj_kind == "none" else _randn(width, embed, seed=4) / math.sqrt(width)
    proj_bias = _randn(embed, seed=5) if proj_kind == "proj+bias" else None

    def independent(x, w, b, proj, proj_bias):
        y = torch.nn.functional.layer_norm(x, (width,), w, b, 1e-6)
        if proj is not None:
            y = torch.nn.functional.linear(y, proj.T, proj_bias)
        return y / y.norm(dim=-1, keepdim=True) if normalize else y

    out = ref.normalize_project(x, w, b, 1e-6, proj, proj_bias, normalize=normalize)
    check_against(out, independent, x, w, b, proj, proj_bias, what=f"normalize_project {proj_kind}")
