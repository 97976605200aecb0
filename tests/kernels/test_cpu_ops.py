"""The C++ CPU kernels (fastclip._C through fastclip.backends.cpu) against the reference ops, fp32.

Awkward shapes: sequence lengths 1/50/77/197/257, head dims 64/72/80/104 and odd ones, widths
768/1152/1664 and odd ones, causal and not, q/k/v as non-contiguous views of a packed qkv tensor,
with and without residual / bias, pooled-row gather. Then whole models: tiny configs and a full-size
ViT-B-32. Tolerance: the fp32 rule of fastclip/tolerance.py -- against the reference run in float64 on the
same inputs (the whole model in float64 for the model tests), the kernels' error is at most
FP32_ERROR_FACTOR x the fp32 reference's own error, plus a few ulp.

The attention kernel has AVX2 and AVX-512 tiles: the ``isa`` fixture runs both where the CPU has AVX-512
(``_C.set_avx512(False)`` selects the AVX2 ones); the linear kernel's AVX-512 / MKL split is covered by
test_cpu_linear.py, and ``FASTCLIP_DISABLE_AVX512=1`` (the whole extension as on an AVX2-only CPU) below.

On Linux x86-64 the extension is part of the install, so a missing build fails here; elsewhere
setup.py does not build it and the module is skipped.
"""
from __future__ import annotations

import copy
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("fastclip._C is built on Linux x86-64 only", allow_module_level=True)

import fastclip  # noqa: E402
from fastclip import _C, ref, tolerance  # noqa: E402
from fastclip.backends.cpu import ops as cpu_ops  # noqa: E402  (an ImportError here: rebuild with `pip install -e .`)
from fastclip.backends.dispatch import get_ops, resolve_backend  # noqa: E402
from fastclip.models import tiny  # noqa: E402

ACTS = ("none", "gelu", "gelu_tanh", "quick_gelu")
ROOT = Path(__file__).resolve().parents[2]
CPU_HAS_AVX512F = "avx512f" in open("/proc/cpuinfo").read().split()
AVX512_SKIP_REASON = ("this CPU lacks AVX-512F" if not CPU_HAS_AVX512F else
                      "FASTCLIP_DISABLE_AVX512 is set: the extension runs as on an AVX2-only CPU")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _wide(a):
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def check(record_error, op: str, got, ref_fn, *args, **kwargs):
    """``got`` (a cpu-backend fp32 result, or a tuple of them) against ``ref_fn(*args, **kwargs)`` under the fp32
    rule: the reference runs in float64 (floating tensors cast) and in fp32 on the same arguments."""
    ref64 = ref_fn(*map(_wide, args), **{k: _wide(v) for k, v in kwargs.items()})
    ref32 = ref_fn(*args, **kwargs)
    pairs = zip(got, ref64, ref32, strict=True) if isinstance(got, tuple) else [(got, ref64, ref32)]
    for out, r64, r32 in pairs:
        record_error(op, "fp32", *tolerance.check_fp32(out, r64, r32, op))


def packed_qkv(B: int, L: int, H: int, D: int, seed: int = 0):
    """q, k, v (B, H, L, D): strided views of one (B, L, 3*H*D) tensor, as the model makes them."""
    qkv = torch.randn(B, L, 3 * H * D, generator=gen(seed)).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


# ---------------------------------------------------------------------------------------- attention
@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    """The attention kernel with its AVX-512 tiles (where the CPU has AVX-512F) and with its AVX2 tiles."""
    if request.param == "avx512" and not _C.avx512_present():
        pytest.skip(f"{AVX512_SKIP_REASON}; the avx2 cases run its AVX2 tiles")
    _C.set_avx512(request.param == "avx512")
    yield request.param
    _C.set_avx512(True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 72, 80, 104])
@pytest.mark.parametrize("L", [1, 50, 77, 197, 257])
def test_attention_packed_views(L, D, causal, isa, record_error):
    q, k, v = packed_qkv(2, L, 3, D, seed=L * D)
    assert not q.is_contiguous()
    out = cpu_ops.attention(q, k, v, causal=causal)
    check(record_error, f"cpu attention {isa}", out, ref.attention, q, k, v, causal=causal)
    assert out.transpose(1, 2).is_contiguous()  # the model's transpose(1, 2).reshape is free


@pytest.mark.parametrize("D", [1, 13, 33, 40, 128])
@pytest.mark.parametrize("L", [3, 64, 129, 300])
def test_attention_odd_head_dims(L, D, isa, record_error):
    q, k, v = (torch.randn(1, 2, L, D, generator=gen(i)) for i in range(3))
    for causal in (False, True):
        check(record_error, f"cpu attention {isa}", cpu_ops.attention(q, k, v, causal=causal), ref.attention, q, k, v,
              causal=causal)


@pytest.mark.parametrize("Lk", [1, 50, 257, 729])
def test_attention_cross(Lk, isa, record_error):
    """A pooling probe (Lq = 1) or a few queries attending to Lk keys; k/v separate strided views."""
    for Lq in (1, 5):
        q = torch.randn(3, 4, Lq, 72, generator=gen(Lk))
        kv = torch.randn(3, Lk, 2, 4, 72, generator=gen(Lk + 1)).permute(2, 0, 3, 1, 4)
        check(record_error, f"cpu attention {isa}", cpu_ops.attention(q, kv[0], kv[1]), ref.attention, q, kv[0], kv[1])


def test_attention_large_scores_and_batches(isa, record_error):
    """Scores far from 0 (the online max must rescale correctly across key blocks), many (b, h)."""
    q, k, v = packed_qkv(5, 197, 4, 64, seed=7)
    q = q * 6
    for causal in (False, True):
        check(record_error, f"cpu attention {isa}", cpu_ops.attention(q, k, v, causal=causal), ref.attention, q, k, v,
              causal=causal)


# ---------------------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("D", [768, 1152, 1664, 1, 7, 13, 1003])
def test_layer_norm(D, record_error):
    x = torch.randn(3, 19, D, generator=gen(D)) * 3 + 40  # a large mean: the variance must be two-pass
    r = torch.randn(3, 19, D, generator=gen(D + 1))
    w, b = torch.randn(D, generator=gen(2)), torch.randn(D, generator=gen(3))
    check(record_error, "cpu layer_norm", cpu_ops.layer_norm(x, w, b, 1e-5), ref.layer_norm, x, w, b, 1e-5)
    got = cpu_ops.layer_norm(x, w, b, 1e-6, residual=r)  # (y, x + r)
    check(record_error, "cpu layer_norm", got, ref.layer_norm, x, w, b, 1e-6, residual=r)
    assert_close(got[1], x + r, rtol=0, atol=0)  # the same one fp32 addition per element


def test_layer_norm_strided_rows(record_error):
    """Rows of a wider tensor (x[..., :D] has row stride > D) and a transposed batch."""
    big = torch.randn(4, 10, 1200, generator=gen(0))
    x, r = big[..., :768], big[..., 400:1168]
    w, b = torch.randn(768, generator=gen(1)), torch.randn(768, generator=gen(2))
    check(record_error, "cpu layer_norm", cpu_ops.layer_norm(x, w, b, 1e-5), ref.layer_norm, x, w, b, 1e-5)
    check(record_error, "cpu layer_norm", cpu_ops.layer_norm(x, w, b, 1e-5, r), ref.layer_norm, x, w, b, 1e-5, r)
    xt = torch.randn(10, 4, 768, generator=gen(3)).transpose(0, 1)
    check(record_error, "cpu layer_norm", cpu_ops.layer_norm(xt, w, b, 1e-5), ref.layer_norm, xt, w, b, 1e-5)


# ---------------------------------------------------------------------------------------- bias + activation
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N", [3072, 4304, 5120, 13, 1])
def test_bias_act(N, act, record_error):
    x = torch.randn(7, 11, N, generator=gen(N)) * 4
    bias = torch.randn(N, generator=gen(N + 1))
    check(record_error, "cpu bias_act", cpu_ops.bias_act(x, bias, act), ref.bias_act, x, bias, act)
    check(record_error, "cpu bias_act", cpu_ops.bias_act(x, None, act), ref.bias_act, x, None, act)


@pytest.mark.parametrize("act", ACTS)
def test_bias_act_extremes(act, record_error):
    """Tails of the activations (exp under/overflow) and NaN; +-inf give torch's result or the limit."""
    x = torch.tensor([-1e4, -100.0, -60.0, -20.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 60.0, 100.0, 1e4,
                      float("nan")]).repeat(2, 1)
    check(record_error, "cpu bias_act", cpu_ops.bias_act(x, None, act), ref.bias_act, x, None, act)  # NaN stays NaN
    inf = torch.tensor([[float("inf"), float("-inf")]])
    want = ref.bias_act(inf, None, act)
    if act == "gelu":  # torch's erf-based GELU gives NaN at +inf; the kernel gives the limit, +inf
        want[0, 0] = float("inf")
    assert_close(cpu_ops.bias_act(inf, None, act), want, rtol=0, atol=0, equal_nan=True)  # limits are exact


@pytest.mark.parametrize("N", [2730, 1366, 16, 2])  # SwiGLU widths 2 x 1365 (EVA02-B), 2 x 683, short rows
def test_bias_act_gated(N, record_error):
    """swiglu: silu(gate) * value of the halves [gate; value] (N -> N/2), with and without bias, from rows of
    a wider tensor; extreme gates (exp under/overflow) included."""
    x = (torch.randn(5, 9, N + 6, generator=gen(N)) * 4)[..., 3:N + 3]  # row stride N + 6
    x[0, 0, : N // 2] = torch.linspace(-1e4, 1e4, N // 2)
    bias = torch.randn(N, generator=gen(N + 1))
    for b in (bias, None):
        got = cpu_ops.bias_act(x, b, "swiglu")
        assert got.shape == (5, 9, N // 2)
        check(record_error, "cpu bias_act", got, ref.bias_act, x, b, "swiglu")
    w = torch.randn(N, 48, generator=gen(2))  # the MLP's fc1: the GEMM, then the gate kernel
    h = torch.randn(3, 7, 48, generator=gen(3))
    check(record_error, "cpu linear_act", cpu_ops.linear_act(h, w, bias, "swiglu"), ref.linear_act, h, w, bias, "swiglu")


def test_bias_act_strided_input(record_error):
    x = torch.randn(6, 3100, generator=gen(0))[:, 5:3077]  # row stride 3100, width 3072
    bias = torch.randn(3072, generator=gen(1))
    check(record_error, "cpu bias_act", cpu_ops.bias_act(x, bias, "gelu"), ref.bias_act, x, bias, "gelu")


# ---------------------------------------------------------------------------------------- normalize_project
@pytest.mark.parametrize("W,E", [(768, 512), (1152, 1152), (1664, 1280), (13, 7), (80, 96)])
def test_normalize_project(W, E, record_error):
    tokens = torch.randn(5, 9, W, generator=gen(W)) + 2
    w, b = torch.randn(W, generator=gen(1)), torch.randn(W, generator=gen(2))
    proj = torch.randn(W, E, generator=gen(3)) * W ** -0.5
    pb = torch.randn(E, generator=gen(4))
    index = torch.tensor([0, 8, -1, 4, 3])
    for normalize in (False, True):
        # the class-token rows x[:, 0]: a strided (B, W) view
        args = (w, b, 1e-5, proj, None, normalize)
        check(record_error, "cpu normalize_project", cpu_ops.normalize_project(tokens[:, 0], *args),
              ref.normalize_project, tokens[:, 0], *args)
        # token states + pooled index, with a projection bias
        args = (w, b, 1e-6, proj, pb, normalize)
        check(record_error, "cpu normalize_project", cpu_ops.normalize_project(tokens, *args, index=index),
              ref.normalize_project, tokens, *args, index=index)
        # no projection (SigLIP's vision tower projects nothing)
        args = (w, b, 1e-6, None, None, normalize)
        check(record_error, "cpu normalize_project", cpu_ops.normalize_project(tokens.mean(1), *args),
              ref.normalize_project, tokens.mean(1), *args)


def test_normalize_project_transposed_proj_and_bad_index(record_error):
    tokens = torch.randn(3, 6, 64, generator=gen(0))
    w, b = torch.ones(64), torch.zeros(64)
    proj_t = torch.randn(32, 64, generator=gen(1)).t()  # (64, 32), unit stride on W, not on E
    args = (w, b, 1e-5, proj_t, None, True)
    check(record_error, "cpu normalize_project", cpu_ops.normalize_project(tokens[:, 1], *args), ref.normalize_project,
          tokens[:, 1], *args)
    with pytest.raises(IndexError):
        cpu_ops.normalize_project(tokens, *args, index=torch.tensor([0, 6, 1]))


# ---------------------------------------------------------------------------------------- dispatch and fallbacks
def test_fallbacks_to_reference():
    """fp16, autograd and upcast run the reference op itself (same values, gradients flow); bf16 attention and
    LayerNorm have paths of their own (tests/test_cpu_bf16.py)."""
    q, k, v = (t.to(torch.float16) for t in packed_qkv(1, 10, 2, 16))
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
# The tiny configs (fastclip/models/tiny.py): head dims 32 to 104, class-token, attention-pool and mean
# pooling, causal and bidirectional text pooled at argmax, eos and the last token.
TINY = ("tiny-clip", "tiny-siglip", "tiny-bigG-like", "tiny-avgpool-quickgelu")


@pytest.fixture(scope="module")
def tiny_configs(tiny_config_dir):
    return list(TINY)


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


def encode_all(model, images, tokens, normalized: bool = True):
    """{"cpu", "ref", "float64"}: encode_image / encode_text, raw and (if ``normalized``) L2-normalised, of the
    cpu backend, the reference backend, and the reference backend on a float64 copy of the model."""
    def encode(m, pixels):
        out = [m.encode_image(pixels), m.encode_text(tokens)]
        if normalized:
            out += [m.encode_image(pixels, normalize=True), m.encode_text(tokens, normalize=True)]
        return out

    out = {}
    for backend in ("ref", "cpu"):
        model.set_backend(backend)
        assert model.backend == backend
        out[backend] = encode(model, images)
    out["float64"] = encode(copy.deepcopy(model).to(torch.float64).set_backend("ref"), images.double())
    return out


def check_model(record_error, label: str, out: dict) -> None:
    """The fp32 rule on every output: the cpu backend against the float64 model, the fp32 reference beside it."""
    for i, (got, ref32, ref64) in enumerate(zip(out["cpu"], out["ref"], out["float64"], strict=True)):
        assert ref64.dtype == torch.float64
        record_error(label, "fp32", *tolerance.check_fp32(got, ref64, ref32, f"{label} output {i}"))


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_cpp_matches_ref(tiny_configs, name, isa, record_error):
    model = fastclip.create_model(name, backend="cpu", seed=0)
    assert model.backend == "cpu" and "backend='cpu'" in repr(model)
    cfg = model.cfg
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen(1))
    tokens = clip_tokens(3, cfg.text.context_length, cfg.text.vocab_size, seed=2)
    check_model(record_error, f"cpu tiny model {isa}", encode_all(model, images, tokens))


def test_vit_b32_cpp_matches_ref(record_error):
    """Full-size ViT-B-32, random weights, batch 2: encode_image / encode_text under the fp32 rule."""
    model = fastclip.create_model("ViT-B-32", backend="cpu", seed=0)
    images = torch.randn(2, 3, 224, 224, generator=gen(3))
    tokens = clip_tokens(2, 77, 49408, seed=4)
    check_model(record_error, "cpu ViT-B-32", encode_all(model, images, tokens, normalized=False))



# ---------------------------------------------------------------------------------------- FASTCLIP_DISABLE_AVX512
AVX2_SCRIPT = """
import copy, json, sys, torch, fastclip
from fastclip import _C
from fastclip.backends.cpu import linear
config, inputs, result = sys.argv[1:]
model = fastclip.create_model(fastclip.add_model_config(config)[0], backend="cpu", seed=0)
pixels, tokens = torch.load(inputs)
out = {}
with torch.no_grad():
    for backend in ("ref", "cpu"):
        model.set_backend(backend)
        out[backend] = [model.encode_image(pixels), model.encode_text(tokens)]
    wide = copy.deepcopy(model).to(torch.float64).set_backend("ref")
    out["float64"] = [wide.encode_image(pixels.double()), wide.encode_text(tokens)]
flags = dict(avx512_present=_C.avx512_present(), linear_supported=_C.linear_supported(),
             linear_kernel=linear.KERNEL_AVAILABLE, panel=_C.linear_panel_width())
torch.save(dict(flags=flags, out=out), result)
"""


def run_tiny_model_in_subprocess(tmp_path, disable_avx512: bool) -> dict:
    """tiny-bigG-like's outputs ({"cpu", "ref", "float64"}) and _C's AVX-512 flags, from a fresh process with
    FASTCLIP_DISABLE_AVX512=1 or with the variable unset (head dims 104 and 80: the attention tiles' tails)."""
    config = tiny.write_configs(tmp_path / "configs", ["tiny-bigG-like"]) / "tiny-bigG-like.json"
    size = tiny.TINY_CONFIGS["tiny-bigG-like"]["vision_cfg"]["image_size"]
    torch.save((torch.randn(3, 3, size, size, generator=gen(1)), clip_tokens(3, 77, 49408, seed=2)),
               tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "FASTCLIP_DISABLE_AVX512"}
    if disable_avx512:
        env["FASTCLIP_DISABLE_AVX512"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    result = tmp_path / "result.pt"
    proc = subprocess.run([sys.executable, "-c", AVX2_SCRIPT, str(config), str(tmp_path / "inputs.pt"), str(result)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


def test_disable_avx512_runs_the_avx2_paths(tmp_path, record_error):
    """FASTCLIP_DISABLE_AVX512=1: no AVX-512 anywhere in _C (AVX2 attention tiles, the packed linear kernel's
    16-column AVX2 panels), and a whole model on the cpu backend still meets the fp32 rule."""
    result = run_tiny_model_in_subprocess(tmp_path, disable_avx512=True)
    assert result["flags"] == dict(avx512_present=False, linear_supported=True, linear_kernel=True, panel=16)
    check_model(record_error, "cpu tiny model no-avx512", result["out"])


def test_avx512_present_follows_cpuinfo(tmp_path):
    """With FASTCLIP_DISABLE_AVX512 unset, _C reports AVX-512 exactly where /proc/cpuinfo has avx512f (the
    kernels also need AVX2 and FMA, which every AVX-512F CPU has); in this process, the variable decides."""
    result = run_tiny_model_in_subprocess(tmp_path, disable_avx512=False)
    assert result["flags"] == dict(avx512_present=CPU_HAS_AVX512F, linear_supported=True, linear_kernel=True,
                                   panel=32 if CPU_HAS_AVX512F else 16)
    disabled = os.environ.get("FASTCLIP_DISABLE_AVX512", "") not in ("", "0")
    assert _C.avx512_present() == (CPU_HAS_AVX512F and not disabled)
