"""precision="bf16" on the CPU: oneDNN's packed bf16 GEMMs (fastclip/backends/cpu/linear_bf16.py), the bf16
attention and LayerNorm of the cpu backend, against the fp32 reference by the low-precision rule
(fastclip/tolerance.py), whole models against open_clip run in bf16,
and the refusal on CPUs without bf16 instructions (run here by FASTCLIP_DISABLE_AVX512=1 on any CPU).

The GEMM and model tests need AVX512-BF16 or AMX-BF16; on other CPUs they are skipped with that reason, and the
refusal test checks what those CPUs do instead. The attention and LayerNorm tests run on every CPU.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import fastclip
from fastclip import ref, tolerance
from fastclip.backends import bf16
from fastclip.backends.cpu import onednn
from fastclip.backends.dispatch import get_ops
from fastclip.loading import keymaps
from fastclip.loading.factory import _build
from helpers.upstream import OPENCLIP_TINY

BF16 = torch.bfloat16
HAS_BF16 = bf16.why_not_bf16("cpu") is None
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason=f"this CPU cannot run bf16: {bf16.why_not_bf16('cpu')}")


def _operands(M: int, K: int, N: int, seed: int, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(BF16)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(BF16)
    b = torch.randn(N, generator=gen).to(BF16) if bias else None
    return x, w, b


def _check_linear(out, x, w, b, act: str, what: str):
    up = (t if t is None else t.float() for t in (x, w, b))
    ref32 = ref.linear_act(*up, act)  # fp32, from the same bf16 operands
    ref_low = ref.linear_act(x, w, b, act)
    assert out.dtype == BF16 and out.shape == ref_low.shape
    tolerance.check_low_precision(out.float(), ref32, ref_low.float(), BF16, what)


@needs_bf16
@pytest.mark.parametrize("M, K, N", [(1, 64, 48), (7, 768, 3072), (50, 3072, 768), (197, 96, 130)])
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "quick_gelu", "swiglu"])
def test_linear_act_bf16_matches_reference(M, K, N, act):
    ops = get_ops("cpu")
    x, w, b = _operands(M, K, 2 * N if act == "swiglu" else N, seed=M + N)
    with torch.inference_mode():
        _check_linear(ops.linear_act(x, w, b, act), x, w, b, act, f"linear_act {act} M={M}")
        if act == "none":
            _check_linear(ops.linear(x, w, None), x, w, None, "none", f"linear M={M}, no bias")


@needs_bf16
def test_linear_bf16_layouts_and_weight_changes():
    """3-d and strided inputs take the packed path; a weight changed in place is repacked."""
    ops = get_ops("cpu")
    x, w, b = _operands(24, 96, 80, seed=5)
    x3 = x.view(2, 12, 96)
    strided = torch.randn(96, 24).to(BF16).t()  # (24, 96), unit stride on rows
    with torch.no_grad():
        out = ops.linear(x3, w, b)
        assert out.shape == (2, 12, 80)
        _check_linear(out.view(24, 80), x, w, b, "none", "3-d input")
        _check_linear(ops.linear(strided, w, b), strided, w, b, "none", "strided input")
        assert onednn.PACKS.get(w, create=False) is not None, "the bf16 weight was not packed"
        w.mul_(-2.0)
        _check_linear(ops.linear(x, w, b), x, w, b, "none", "after an in-place change of the weight")


def _bf16_qkv(B: int, H: int, Lq: int, Lk: int, D: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, max(Lq, Lk), 3, H, D, generator=gen).to(BF16)  # a QKV GEMM's output, split as models do
    q, k, v = (qkv[:, :L, i].transpose(1, 2) for i, L in ((0, Lq), (1, Lk), (2, Lk)))  # (B, H, L, D) views
    return q, k, v


def _rotary_tables(L: int, D: int, dtype: torch.dtype):
    angles = torch.arange(L, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1.0, D // 2)[None]  # (L, D/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# The bf16 attention and LayerNorm run on any CPU (the fp32 kernel on fp32 copies; torch's LayerNorm).
@pytest.mark.parametrize("B, H, Lq, Lk, D, kind", [
    (2, 3, 17, 17, 64, "plain"), (3, 12, 197, 197, 64, "rotary"), (2, 4, 1, 50, 32, "rotary pooled query"),
    (2, 2, 77, 77, 64, "causal"), (3, 2, 40, 40, 48, "key mask"), (1, 2, 20, 20, 96, "rotary bf16 tables")])
def test_attention_bf16_matches_reference(B, H, Lq, Lk, D, kind):
    """bf16 q, k, v (strided views of one QKV tensor) -> bf16, by the attention rule of the tolerance policy
    against the fp32 reference on the same bf16 values, with rotary angles, a causal mask or a key mask."""
    ops = get_ops("cpu")
    q, k, v = _bf16_qkv(B, H, Lq, Lk, D, seed=Lq + D)
    kw: dict = {}
    kw32: dict = {}  # the same arguments with fp32 rotary tables, for the fp32 reference
    if "rotary" in kind:
        cos, sin = _rotary_tables(Lk, D, BF16 if "bf16 tables" in kind else torch.float32)
        start = 1 if "pooled" in kind else 0
        kw["rotary"], kw32["rotary"] = (cos, sin, start), (cos.float(), sin.float(), start)
    if kind == "causal":
        kw["causal"] = True
    if kind == "key mask":
        kw["key_mask"] = torch.arange(Lk)[None] < torch.tensor([Lk, 23, 5])[:, None]  # (B, Lk) padded rows
    with torch.inference_mode():
        out = ops.attention(q, k, v, **kw)
        ref32 = ref.attention(q.float(), k.float(), v.float(), **{**kw, **kw32})
        ref_low = ref.attention(q, k, v, **kw)
    assert out.dtype == BF16 and out.shape == ref_low.shape
    err, ref_err = tolerance.check_low_precision(out.float(), ref32, ref_low.float(), BF16, f"attention {kind}",
                                                 atol=tolerance.ATTENTION_LOW_PRECISION_ATOL[BF16])
    assert err <= ref_err, f"attention {kind}: bf16 via fp32 ({err:.2e}) is less exact than bf16 products ({ref_err:.2e})"


@pytest.mark.parametrize("shape", [(7, 768), (3, 197, 768), (2, 50, 2048)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_bf16_matches_reference(shape, residual):
    """bf16 LayerNorm (+ residual): the low-precision rule against fp32 on the same bf16 values; the residual
    sum is the bf16 sum the reference returns, bit for bit."""
    ops = get_ops("cpu")
    gen = torch.Generator().manual_seed(shape[-1] + residual)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(BF16)
    r = torch.randn(shape, generator=gen).to(BF16) if residual else None
    w, b = (torch.randn(shape[-1], generator=gen).to(BF16) for _ in range(2))
    with torch.inference_mode():
        out = ops.layer_norm(x, w, b, 1e-6, residual=r)
        want = ref.layer_norm(x, w, b, 1e-6, residual=r)
    y, s = out if residual else (out, None)
    y_ref, s_ref = want if residual else (want, None)
    if residual:
        assert s.dtype == BF16 and torch.equal(s, s_ref)
    x_in = (s_ref if residual else x).float()
    ref32 = ref.layer_norm(x_in, w.float(), b.float(), 1e-6)
    assert y.dtype == BF16 and y.shape == x.shape
    tolerance.check_low_precision(y.float(), ref32, y_ref.float(), BF16, f"layer_norm {shape} residual={residual}")


@needs_bf16
@pytest.mark.parametrize("name", OPENCLIP_TINY)
def test_bf16_model_matches_open_clip_bf16(oc_tiny, name):
    """fastclip in bf16 is as close to open_clip fp32 as open_clip itself run in bf16 (raw embeddings)."""
    up = oc_tiny[name]
    images, tokens = up.inputs(4)
    want_img, want_txt = up.outputs(4)
    low = copy.deepcopy(up.model).to(BF16)
    with torch.no_grad():
        low_img, low_txt = low.encode_image(images.to(BF16)).float(), low.encode_text(tokens).float()
    sd = keymaps.from_openclip({k: v.detach().clone() for k, v in up.model.state_dict().items()})
    model = _build(fastclip.get_model_config(name), sd, "<memory>", "cpu", "bf16", "cpu")
    assert model.precision == "bf16" and model.backend == "cpu"
    with torch.no_grad():
        img, txt = model.encode_image(images).float(), model.encode_text(tokens).float()
    tolerance.check_low_precision(img, want_img, low_img, BF16, f"{name} image embeddings")
    tolerance.check_low_precision(txt, want_txt, low_txt, BF16, f"{name} text embeddings")


def test_bf16_refused_without_bf16_instructions(monkeypatch, tiny_config_dir):
    """On a CPU without AVX512-BF16 / AMX-BF16 (here: made to look like one) bf16 is refused by name."""
    monkeypatch.setenv("FASTCLIP_DISABLE_AVX512", "1")
    assert bf16.cpu_bf16_instructions() == []
    with pytest.raises(ValueError, match="AVX512-BF16 or AMX-BF16"):
        fastclip.create_model("tiny-clip", precision="bf16")
    fastclip.create_model("tiny-clip", precision="fp32")  # the fast precisions still load


def test_bf16_check_matches_the_cpu():
    """The check agrees with /proc/cpuinfo: bf16 runs exactly where the CPU lists avx512_bf16 or amx_bf16."""
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    held_to_avx2 = os.environ.get("FASTCLIP_DISABLE_AVX512", "").strip().lower() in ("1", "true", "yes", "on")
    listed = bool(flags & {"avx512_bf16", "amx_bf16"}) and not held_to_avx2  # .ci/emulate-avx2 holds it to AVX2
    assert bool(bf16.cpu_bf16_instructions()) == listed
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not HAS_BF16
    else:
        assert HAS_BF16 == listed
    assert bf16.why_not_bf16("cuda") is None  # GPUs are not judged by the CPU's instructions
    bf16.check_bf16("cpu", "triton")  # interpreted Triton kernels (tests, gpu_check --smoke) run bf16 on any CPU
    if not HAS_BF16:
        with pytest.raises(ValueError, match="needs AVX512-BF16 or AMX-BF16"):
            bf16.check_bf16("cpu", "cpu")
