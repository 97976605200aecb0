"""The C++ CPU kernels (fastclip._C through fastclip.backends.cpu) against the reference ops, fp32.

Awkward shapes: sequence lengths 1/50/77/197/257, head dims 64/72/80/104 and odd ones, widths
768/1152/1664 and odd ones, causal and not, q/k/v as non-contiguous views of a packed qkv tensor,
with and without residual / bias, pooled-row gather. Then whole models: tiny configs (cpp vs ref to
~1e-5) and a full-size ViT-B-32 (to 1e-4). Tolerance: torch.testing's fp32 defaults unless stated.

On Linux x86-64 the extension is part of the install, so a missing build fails here; elsewhere
setup.py does not build it and the module is skipped.
"""
from __future__ import annotations

import os
import platform
import re

import pytest
import torch
from torch.testing import assert_close

if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("fastclip._C is built on Linux x86-64 only", allow_module_level=True)

import fastclip  # noqa: E402
from helpers.upstream import register_configs
from fastclip import _C, ref  # noqa: E402
from fastclip.backends.cpu import ops as cpu_ops  # noqa: E402  (an ImportError here: rebuild with `pip install -e .`)
from fastclip.backends.dispatch import get_ops, resolve_backend  # noqa: E402

ACTS = ("none", "gelu", "gelu_tanh", "quick_gelu")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def packed_qkv(B: int, L: int, H: int, D: int, seed: int = 0):
    """q, k, v (B, H, L, D): strided views of one (B, L, 3*H*D) tensor, as the model makes them."""
    qkv = torch.randn(B, L, 3 * H * D, generator=gen(seed)).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


# ---------------------------------------------------------------------------------------- attention
@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    """The attention kernel with its AVX-512 tiles (where the CPU has AVX-512F) and with its AVX2 tiles."""
    if request.param == "avx512" and "avx512f" not in open("/proc/cpuinfo").read().split():
        pytest.skip("this CPU lacks AVX-512F: the kernel runs its AVX2 tiles (the avx2 cases)")
    _C.set_avx512(request.param == "avx512")
    yield request.param
    _C.set_avx512(True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 72, 80, 104])
@pytest.mark.parametrize("L", [1, 50, 77, 197, 257])
def test_attention_packed_views(L, D, causal, isa):
    q, k, v = packed_qkv(2, L, 3, D, seed=L * D)
    assert not q.is_contiguous()
    out = cpu_ops.attention(q, k, v, causal=causal)
    assert_close(out, ref.attention(q, k, v, causal=causal))
    assert out.transpose(1, 2).is_contiguous()  # the model's transpose(1, 2).reshape is free


@pytest.mark.parametrize("D", [1, 13, 33, 40, 128])
@pytest.mark.parametrize("L", [3, 64, 129, 300])
def test_attention_odd_head_dims(L, D, isa):
    q, k, v = (torch.randn(1, 2, L, D, generator=gen(i)) for i in range(3))
    for causal in (False, True):
        assert_close(cpu_ops.attention(q, k, v, causal=causal), ref.attention(q, k, v, causal=causal))


@pytest.mark.parametrize("Lk", [1, 50, 257, 729])
def test_attention_cross(Lk, isa):
    """A pooling probe (Lq = 1) or a few queries attending to Lk keys; k/v separate strided views."""
    for Lq in (1, 5):
        q = torch.randn(3, 4, Lq, 72, generator=gen(Lk))
        kv = torch.randn(3, Lk, 2, 4, 72, generator=gen(Lk + 1)).permute(2, 0, 3, 1, 4)
        assert_close(cpu_ops.attention(q, kv[0], kv[1]), ref.attention(q, kv[0], kv[1]))


def test_attention_large_scores_and_batches(isa):
    """Scores far from 0 (the online max must rescale correctly across key blocks), many (b, h)."""
    q, k, v = packed_qkv(5, 197, 4, 64, seed=7)
    q = q * 6
    for causal in (False, True):
        assert_close(cpu_ops.attention(q, k, v, causal=causal), ref.attention(q, k, v, causal=causal))


# ---------------------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("D", [768, 1152, 1664, 1, 7, 13, 1003])
def test_layer_norm(D):
    x = torch.randn(3, 19, D, generator=gen(D)) * 3 + 40  # a large mean: the variance must be two-pass
    r = torch.randn(3, 19, D, generator=gen(D + 1))
    w, b = torch.randn(D, generator=gen(2)), torch.randn(D, generator=gen(3))
    assert_close(cpu_ops.layer_norm(x, w, b, 1e-5), ref.layer_norm(x, w, b, 1e-5))
    y, s = cpu_ops.layer_norm(x, w, b, 1e-6, residual=r)
    y_ref, s_ref = ref.layer_norm(x, w, b, 1e-6, residual=r)
    assert_close(s, s_ref, rtol=0, atol=0)
    assert_close(y, y_ref)


def test_layer_norm_strided_rows():
    """Rows of a wider tensor (x[..., :D] has row stride > D) and a transposed batch."""
    big = torch.randn(4, 10, 1200, generator=gen(0))
    x, r = big[..., :768], big[..., 400:1168]
    w, b = torch.randn(768, generator=gen(1)), torch.randn(768, generator=gen(2))
    assert_close(cpu_ops.layer_norm(x, w, b, 1e-5), ref.layer_norm(x, w, b, 1e-5))
    for got, want in zip(cpu_ops.layer_norm(x, w, b, 1e-5, r), ref.layer_norm(x, w, b, 1e-5, r)):
        assert_close(got, want)
    xt = torch.randn(10, 4, 768, generator=gen(3)).transpose(0, 1)
    assert_close(cpu_ops.layer_norm(xt, w, b, 1e-5), ref.layer_norm(xt, w, b, 1e-5))


# ---------------------------------------------------------------------------------------- bias + activation
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N", [3072, 4304, 5120, 13, 1])
def test_bias_act(N, act):
    x = torch.randn(7, 11, N, generator=gen(N)) * 4
    bias = torch.randn(N, generator=gen(N + 1))
    assert_close(cpu_ops.bias_act(x, bias, act), ref.bias_act(x, bias, act))
    assert_close(cpu_ops.bias_act(x, None, act), ref.bias_act(x, None, act))


@pytest.mark.parametrize("act", ACTS)
def test_bias_act_extremes(act):
    """Tails of the activations (exp under/overflow) and NaN; +-inf give torch's result or the limit."""
    x = torch.tensor([-1e4, -100.0, -60.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 60.0, 100.0, 1e4,
                      float("nan")]).repeat(2, 1)
    assert_close(cpu_ops.bias_act(x, None, act), ref.bias_act(x, None, act), equal_nan=True)
    inf = torch.tensor([[float("inf"), float("-inf")]])
    want = ref.bias_act(inf, None, act)
    if act == "gelu":  # torch's erf-based GELU gives NaN at +inf; the kernel gives the limit, +inf
        want[0, 0] = float("inf")
    assert_close(cpu_ops.bias_act(inf, None, act), want, equal_nan=True)


def test_bias_act_strided_input():
    x = torch.randn(6, 3100, generator=gen(0))[:, 5:3077]  # row stride 3100, width 3072
    bias = torch.randn(3072, generator=gen(1))
    assert_close(cpu_ops.bias_act(x, bias, "gelu"), ref.bias_act(x, bias, "gelu"))


# ---------------------------------------------------------------------------------------- normalize_project
@pytest.mark.parametrize("W,E", [(768, 512), (1152, 1152), (1664, 1280), (13, 7), (80, 96)])
def test_normalize_project(W, E):
    tokens = torch.randn(5, 9, W, generator=gen(W)) + 2
    w, b = torch.randn(W, generator=gen(1)), torch.randn(W, generator=gen(2))
    proj = torch.randn(W, E, generator=gen(3)) * W ** -0.5
    pb = torch.randn(E, generator=gen(4))
    index = torch.tensor([0, 8, -1, 4, 3])
    for normalize in (False, True):
        # the class-token rows x[:, 0]: a strided (B, W) view
        args = (w, b, 1e-5, proj, None, normalize)
        assert_close(cpu_ops.normalize_project(tokens[:, 0], *args), ref.normalize_project(tokens[:, 0], *args))
        # token states + pooled index, with a projection bias
        args = (w, b, 1e-6, proj, pb, normalize)
        assert_close(cpu_ops.normalize_project(tokens, *args, index=index),
                     ref.normalize_project(tokens, *args, index=index))
        # no projection (SigLIP's vision tower projects nothing)
        args = (w, b, 1e-6, None, None, normalize)
        assert_close(cpu_ops.normalize_project(tokens.mean(1), *args), ref.normalize_project(tokens.mean(1), *args))


def test_normalize_project_transposed_proj_and_bad_index():
    tokens = torch.randn(3, 6, 64, generator=gen(0))
    w, b = torch.ones(64), torch.zeros(64)
    proj_t = torch.randn(32, 64, generator=gen(1)).t()  # (64, 32), unit stride on W, not on E
    args = (w, b, 1e-5, proj_t, None, True)
    assert_close(cpu_ops.normalize_project(tokens[:, 1], *args), ref.normalize_project(tokens[:, 1], *args))
    with pytest.raises(IndexError):
        cpu_ops.normalize_project(tokens, *args, index=torch.tensor([0, 6, 1]))


# ---------------------------------------------------------------------------------------- dispatch and fallbacks
def test_fallbacks_to_reference():
    """Low precision, autograd and upcast run the reference op itself (same values, gradients flow)."""
    q, k, v = (t.to(torch.bfloat16) for t in packed_qkv(1, 10, 2, 16))
    assert torch.equal(cpu_ops.attention(q, k, v), ref.attention(q, k, v))
    x = torch.randn(4, 32, generator=gen(0), dtype=torch.float16)
    w, b = torch.ones(32, dtype=torch.float16), torch.zeros(32, dtype=torch.float16)
    assert torch.equal(cpu_ops.layer_norm(x, w, b, 1e-5), ref.layer_norm(x, w, b, 1e-5))
    with torch.enable_grad():
        xg = torch.randn(4, 32, requires_grad=True)
        cpu_ops.bias_act(xg, torch.zeros(32), "gelu").sum().backward()
        assert xg.grad is not None
    x32 = torch.randn(4, 32)
    assert torch.equal(cpu_ops.bias_act(x32, None, "gelu", upcast=True), ref.bias_act(x32, None, "gelu", upcast=True))
    with pytest.raises(ValueError):
        cpu_ops.bias_act(x32, None, "relu")
    with pytest.raises(ValueError):
        cpu_ops.attention(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), causal=True)


def test_backend_resolution_and_thread_pool():
    assert resolve_backend("auto", "cpu") == "cpu"
    table = get_ops("cpu")
    for name, fn in cpu_ops.op_table().items():
        assert getattr(table, name) is fn
    # the kernels use torch's OpenMP runtime (other wheels, e.g. sentencepiece, may load their own copy)
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))  # site-packages: torch/lib or torch.libs
    runtime = os.path.realpath(_C.openmp_runtime())
    assert runtime.startswith(os.path.join(os.path.realpath(torch_dir), "torch")), runtime
    maps = {os.path.realpath(line.split()[-1]) for line in open("/proc/self/maps") if re.search(r"omp[^/]*\.so", line)}
    assert runtime in maps
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert _C.num_threads() == n and _C.team_size() == n
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- whole models
TINY = {
    # head dims 104 (vision) and 80 (text), GELU, class-token pooling, causal text pooled at argmax
    "cpu-ops-tiny-clip": {
        "embed_dim": 96,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 208, "head_width": 104, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 160, "heads": 2, "layers": 2},
    },
    # SigLIP-like: attention-pool head (cross-attention, Lq = 1), gelu_tanh, head dim 72, no projection,
    # non-causal text pooled at the last token with a projection bias
    "cpu-ops-tiny-siglip": {
        "embed_dim": 144, "family": "siglip", "init_logit_bias": -10,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 144, "head_width": 72, "layers": 2,
                       "act": "gelu_tanh", "class_token": False, "no_ln_pre": True, "patch_bias": True,
                       "pool_type": "map", "proj": False, "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 128, "heads": 2, "layers": 2,
                     "act": "gelu_tanh", "no_causal_mask": True, "pool_type": "last", "proj_bias": True,
                     "norm_kwargs": {"eps": 1e-6}},
    },
    # QuickGELU, mean-pooled patches with the LayerNorm after pooling, text pooled at the first end-of-text
    "cpu-ops-tiny-avgpool": {
        "embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 48, "patch_size": 8, "width": 96, "head_width": 32, "layers": 2,
                       "pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "pool_type": "eos", "eos_id": 49407},
    },
}


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    register_configs(tmp_path_factory, "cpu_ops_configs", TINY)
    return sorted(TINY)


def clip_tokens(B: int, L: int, vocab: int, seed: int) -> torch.Tensor:
    """Start token, random words, an end-of-text (the highest id) at varying positions, zero padding."""
    g = gen(seed)
    tokens = torch.zeros(B, L, dtype=torch.long)
    for i in range(B):
        n = int(torch.randint(1, L - 1, (1,), generator=g))
        tokens[i, 0] = vocab - 2
        tokens[i, 1:n] = torch.randint(1, vocab - 2, (n - 1,), generator=g)
        tokens[i, n] = vocab - 1
    return tokens


def encode_both(model, images, tokens, normalized: bool = True):
    """(cpu-backend outputs, ref outputs): encode_image / encode_text, raw and (if ``normalized``) L2-normalised."""
    out = {}
    for backend in ("ref", "cpu"):
        model.set_backend(backend)
        assert model.backend == backend
        out[backend] = [model.encode_image(images), model.encode_text(tokens)]
        if normalized:
            out[backend] += [model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)]
    return out["cpu"], out["ref"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_model_cpp_matches_ref(tiny_configs, name):
    model = fastclip.create_model(name, backend="cpu", seed=0)
    assert model.backend == "cpu" and "backend='cpu'" in repr(model)
    cfg = model.cfg
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen(1))
    tokens = clip_tokens(3, cfg.text.context_length, cfg.text.vocab_size, seed=2)
    for got, want in zip(*encode_both(model, images, tokens)):
        assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vit_b32_cpp_matches_ref():
    """Full-size ViT-B-32, random weights, batch 2: encode_image / encode_text agree to 1e-4."""
    model = fastclip.create_model("ViT-B-32", backend="cpu", seed=0)
    images = torch.randn(2, 3, 224, 224, generator=gen(3))
    tokens = clip_tokens(2, 77, 49408, seed=4)
    for got, want in zip(*encode_both(model, images, tokens, normalized=False)):
        err = (got - want).abs().max().item()
        assert err <= 1e-4, f"ViT-B-32 cpp vs ref: max-abs error {err:.3e}"
