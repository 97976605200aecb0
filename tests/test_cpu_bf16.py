"""precision="bf16" on the CPU: oneDNN's packed bf16 GEMMs (fastclip/backends/cpu/linear_bf16.py) against the
fp32 reference by the low-precision rule (fastclip/tolerance.py), whole models against open_clip run in bf16,
and the refusal on CPUs without bf16 instructions (run here by FASTCLIP_DISABLE_AVX512=1 on any CPU).

The accuracy tests need AVX512-BF16 or AMX-BF16; on other CPUs they are skipped with that reason, and the
refusal test checks what those CPUs do instead.
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
