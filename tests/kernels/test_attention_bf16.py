"""The attention kernel's bf16 products (``bf16_dots``, csrc/attention_bf16.h) on fp32 inputs, as int8 models
call it: against the reference by the attention rule of the low-precision policy (fastclip/tolerance.py) --
the error to the fp32 reference at most twice that of the reference run in bf16, plus
ATTENTION_LOW_PRECISION_ATOL -- over odd head dims and key counts, more keys than one softmax block, causal
and key-length masks, rotary angles and strided QKV views. Where the CPU lacks AVX512-BF16 (or AVX-512 is
switched off) the same calls must give the fp32 kernel's result bit for bit; both are run on any CPU that has
the instructions.
"""
from __future__ import annotations

import platform

import pytest
import torch

if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("fastclip._C is built on Linux x86-64 only", allow_module_level=True)

import fastclip  # noqa: E402
from fastclip import _C, ref, tolerance  # noqa: E402
from fastclip.backends import int8  # noqa: E402
from fastclip.backends.cpu import attention as cpu_attention  # noqa: E402

BF16 = torch.bfloat16
CASES = [  # B, H, Lq, Lk, D, kind
    (2, 3, 197, 197, 64, "plain"), (1, 2, 300, 300, 33, "causal"), (2, 2, 5, 513, 13, "cross"),
    (3, 2, 64, 64, 80, "key lengths"), (2, 4, 50, 50, 64, "rotary"), (1, 1, 1, 1, 1, "plain"),
    (1, 2, 17, 257, 128, "cross")]


def _inputs(B: int, H: int, Lq: int, Lk: int, D: int, kind: str):
    gen = torch.Generator().manual_seed(Lq * 7 + Lk + D)
    L = max(Lq, Lk)
    qkv = torch.randn(B, L, 3, H, D, generator=gen)  # a QKV GEMM's output, split as models do
    q, k, v = (qkv[:, :n, i].transpose(1, 2) for i, n in ((0, Lq), (1, Lk), (2, Lk)))  # (B, H, n, D) views
    kw: dict = {}
    if kind == "causal":
        kw["causal"] = True
    if kind == "key lengths":
        kw["key_mask"] = torch.arange(Lk)[None] < torch.tensor([Lk, 23, 5])[:, None]  # (B, Lk) prefix masks
    if kind == "rotary":
        angles = torch.arange(L, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1.0, D // 2)[None]
        kw["rotary"] = (angles.cos(), angles.sin(), 1)
    return q, k, v, kw


@pytest.fixture
def avx512_on():
    was = _C.set_avx512(True)
    yield
    _C.set_avx512(was)


@pytest.mark.parametrize("B, H, Lq, Lk, D, kind", CASES)
def test_bf16_dots_match_reference(B, H, Lq, Lk, D, kind, avx512_on):
    q, k, v, kw = _inputs(B, H, Lq, Lk, D, kind)
    with torch.inference_mode():
        out = cpu_attention.attention(q, k, v, bf16_dots=True, **kw)
        fp32 = cpu_attention.attention(q, k, v, **kw)
        if not cpu_attention.bf16_dots_supported():  # no AVX512-BF16 here: the fp32 kernel, bit for bit
            assert torch.equal(out, fp32)
            return
        ref32 = ref.attention(q, k, v, **kw)
        ref_low = ref.attention(q.to(BF16), k.to(BF16), v.to(BF16), **kw).float()
    assert out.shape == ref32.shape and out.dtype == torch.float32
    tolerance.check_low_precision(out, ref32, ref_low, BF16, f"attention bf16_dots {kind}",
                                  atol=tolerance.ATTENTION_LOW_PRECISION_ATOL[BF16])
    assert not torch.equal(out, fp32), "bf16_dots ran the fp32 products"


def test_bf16_dots_follow_the_avx512_switch():
    q, k, v, _ = _inputs(1, 2, 40, 40, 64, "plain")
    was = _C.set_avx512(False)
    try:
        assert not cpu_attention.bf16_dots_supported()
        assert torch.equal(cpu_attention.attention(q, k, v, bf16_dots=True), cpu_attention.attention(q, k, v))
        with pytest.raises(ValueError, match="AVX512-BF16"):  # the raw kernel refuses rather than guess
            out = torch.empty_like(q)
            _C.attention(q=q.data_ptr(), q_strides=q.stride()[:3], k=k.data_ptr(), k_strides=k.stride()[:3],
                         v=v.data_ptr(), v_strides=v.stride()[:3], out=out.data_ptr(), out_strides=out.stride()[:3],
                         B=1, H=2, Lq=40, Lk=40, D=64, causal=False, scale=0.125, bf16_dots=True)
    finally:
        _C.set_avx512(was)


def test_int8_models_take_bf16_products(tiny_config_dir):
    """The int8 op table runs the cpu backend's attention with bf16_dots; the fp32 table does not."""
    if int8.KERNEL is None:
        pytest.skip("no int8 kernel on this CPU")  # pragma: no cover - the extension is built on x86-64 Linux
    fp32 = fastclip.create_model("tiny-clip", seed=0, backend="cpu")
    quantized = fastclip.create_model("tiny-clip", seed=0, backend="cpu", precision="int8")
    assert fp32.ops.attention is cpu_attention.attention
    assert quantized.ops.attention.func is cpu_attention.attention
    assert quantized.ops.attention.keywords == {"bf16_dots": True}
