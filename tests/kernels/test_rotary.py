"""The ``rotary`` op (rotary position embeddings, interleaved pairs) of the cpu backend (csrc/rotary.cpp) and
the Triton kernel (kernels/rotary.py, on DEVICE: compiled on a GPU, else the interpreter) against
``fastclip.ref.rotary``, by the rules of fastclip/tolerance.py: fp32 against the reference in float64,
fp16 / bf16 against the fp32 reference. q / k come as strided views of a packed (B, L, 3, H, Dh) projection;
head widths 64 / 88 / 96 / 112 (EVA-02, PE-Core) and short odd ones; with and without a class token.
(The angles' agreement with timm's rotation is tests/test_eva.py's.)
"""
from __future__ import annotations

import platform

import pytest
import torch

from fastclip import ref, tolerance
from fastclip.kernels.rotary import block_config, rotary
from helpers.device import DEVICE

CPP = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SHAPES = [(2, 12, 197, 64, 1), (3, 2, 50, 88, 1), (1, 3, 17, 96, 0), (2, 1, 9, 112, 1), (2, 2, 5, 6, 2)]


def _inputs(B, H, L, D, start, seed=0):
    """q and k: (B, H, L, D) views of a packed (B, L, 3, H, D) projection; cos / sin (L - start, D/2)."""
    g = torch.Generator().manual_seed(seed + B * L * D)
    qkv = torch.randn(B, L, 3, H, D, generator=g) * 2
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
    angles = torch.randn(L - start, D // 2, generator=g) * 4
    return q, k, angles.cos(), angles.sin()


def _check(record_error, backend, out, x, cos, sin, start, dtype, what):
    wide = tolerance.wider(dtype)
    expected = ref.rotary(x.to(wide), cos.to(wide), sin.to(wide), start=start)
    ref_low = ref.rotary(x, cos.to(dtype), sin.to(dtype), start=start)
    assert out.shape == x.shape and out.dtype == dtype, what
    assert torch.equal(out[:, :, :start].cpu(), x[:, :, :start].cpu()), f"{what}: class tokens must pass unchanged"
    record_error(f"{backend} rotary", NAMES[dtype], *tolerance.check(out, expected, ref_low, dtype, what))


@pytest.mark.skipif(not CPP, reason="fastclip._C is built on Linux x86-64 only")
@pytest.mark.parametrize("B,H,L,D,start", SHAPES)
def test_cpu_matches_reference(B, H, L, D, start, record_error):
    from fastclip.backends.cpu import ops as cpu_ops

    q, k, cos, sin = _inputs(B, H, L, D, start)
    for x in (q, k, q.contiguous()):
        out = cpu_ops.rotary(x, cos, sin, start=start)
        _check(record_error, "cpu", out, x, cos, sin, start, torch.float32, f"cpu {B, H, L, D, start}")
        assert out.transpose(1, 2).is_contiguous()  # the (B, L, H, D) layout the attention kernel reads


@pytest.mark.skipif(not CPP, reason="fastclip._C is built on Linux x86-64 only")
def test_cpu_falls_back_and_refuses_bad_shapes():
    from fastclip.backends.cpu import ops as cpu_ops

    q, _, cos, sin = _inputs(1, 2, 9, 8, 1)
    low = cpu_ops.rotary(q.to(torch.bfloat16), cos, sin, start=1)  # not fp32: the reference op
    assert torch.equal(low, ref.rotary(q.to(torch.bfloat16), cos, sin, start=1))
    with pytest.raises(ValueError, match=r"rotary: x \(1, 2, 9, 8\) with start 0 needs cos and sin of shape \(9, 4\)"):
        cpu_ops.rotary(q, cos, sin, start=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("B,H,L,D,start", SHAPES[1:])  # 197 tokens x 12 heads is slow under the interpreter
def test_triton_matches_reference(B, H, L, D, start, dtype, record_error):
    q, k, cos, sin = _inputs(B, H, L, D, start)
    q, k, cos, sin = (t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), cos, sin))
    for x in (q, k):
        out = rotary(x, cos, sin, start=start)
        _check(record_error, "triton", out, x, cos, sin, start, dtype, f"triton {B, H, L, D, start} {dtype}")


def test_triton_custom_op_and_errors():
    q, _, cos, sin = _inputs(1, 2, 9, 8, 1)
    q, cos, sin = q.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE)
    torch.library.opcheck(torch.ops.fastclip.rotary.default, (q.contiguous(), cos, sin, 1),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match=r"needs cos and sin of shape \(8, 4\)"):
        rotary(q, cos[:7], sin[:7], start=1)
    with pytest.raises(ValueError, match="even Dh"):
        rotary(q[..., :7], cos, sin, start=1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        rotary(q.to(torch.int32), cos, sin, start=1)


def test_block_config():
    """~2048 pairs per program: 64 tokens at head width 64, a power-of-two pair block over Dh/2."""
    assert block_config(64) == {"BLOCK_L": 64, "BLOCK_P": 32, "num_warps": 4, "num_stages": 1}
    assert block_config(88)["BLOCK_P"] == 64 and block_config(112)["BLOCK_P"] == 64


# ---------------------------------------------------------------- rotary fused into the attention op
def _attention_inputs(B, H, L, D, start, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, L, 3, H, D, generator=g).permute(2, 0, 3, 1, 4)  # (B, H, L, D) views each
    angles = torch.randn(L - start, D // 2, generator=g) * 4
    return q, k, v, angles.cos(), angles.sin()


def _rotated_then_attended(q, k, v, cos, sin, start, **kw):
    """The unfused definition, in float64: ref.rotary on q and k by position, then ref.attention."""
    q, k, v, cos, sin = (t.double() for t in (q, k, v, cos, sin))
    return ref.attention(ref.rotary_positions(q, cos, sin, start), ref.rotary_positions(k, cos, sin, start), v, **kw)


@pytest.mark.skipif(not CPP, reason="fastclip._C is built on Linux x86-64 only")
@pytest.mark.parametrize("B,H,L,D,start", [(2, 12, 197, 64, 1), (1, 3, 257, 88, 1), (3, 2, 50, 96, 0), (1, 2, 7, 6, 1)])
def test_cpu_attention_with_rotary(B, H, L, D, start, record_error):
    """The C++ attention kernel rotating q blocks and each head's keys as it loads them == rotate, then
    attend: self-attention, the pooled class-token query (position 0, unrotated when start = 1) and a prefix
    key mask (NaFlex-style padding, kept in the kernel)."""
    from fastclip import _C
    from fastclip.backends.cpu import ops as cpu_ops

    q, k, v, cos, sin = _attention_inputs(B, H, L, D, start)
    mask = torch.arange(L)[None, :] < torch.tensor([L, L - 3, L // 2])[:B, None]  # (B, L) prefix masks
    for isa in ([True, False] if _C.avx512_present() else [False]):
        _C.set_avx512(isa)
        try:
            cases = {"self": (q, {}), "pooled": (q[:, :, :1], {}), "masked": (q, {"key_mask": mask})}
            for what, (qq, kw) in cases.items():
                out = cpu_ops.attention(qq, k, v, rotary=(cos, sin, start), **kw)
                want = _rotated_then_attended(qq, k, v, cos, sin, start, **kw)
                ref32 = ref.attention(qq, k, v, rotary=(cos, sin, start), **kw)
                record_error("cpu attention+rotary", "fp32",
                             *tolerance.check_fp32(out, want, ref32, f"cpu attention rotary {what} avx512={isa}"))
        finally:
            _C.set_avx512(True)


@pytest.mark.skipif(not CPP, reason="fastclip._C is built on Linux x86-64 only")
def test_cpu_attention_rotary_falls_back_and_checks_angles():
    from fastclip.backends.cpu import ops as cpu_ops

    q, k, v, cos, sin = _attention_inputs(1, 2, 9, 8, 1)
    with pytest.raises(ValueError, match="9 tokens from position 1 need 8 rows of angles, got 5"):
        cpu_ops.attention(q, k, v, rotary=(cos[:5], sin[:5], 1))
    scattered = torch.tensor([[True, False] * 4 + [True]])  # not a prefix: the reference op, rotary included
    want = ref.attention(q, k, v, key_mask=scattered, rotary=(cos, sin, 1))
    assert torch.equal(cpu_ops.attention(q, k, v, key_mask=scattered, rotary=(cos, sin, 1)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_triton_attention_with_rotary(dtype, record_error):
    """The triton op table's attention(rotary=): the rotary kernel on q and k, then the flash kernel."""
    from fastclip.kernels.ops import attention

    q, k, v, cos, sin = _attention_inputs(2, 2, 21, 64, 1)
    for what, qq in {"self": q, "pooled": q[:, :, :1]}.items():
        low = [t.to(DEVICE, dtype) for t in (qq, k, v)]
        out = attention(*low, rotary=(cos.to(DEVICE), sin.to(DEVICE), 1))
        want = _rotated_then_attended(*(t.cpu() for t in low), cos, sin, 1)
        ref_low = ref.attention(*(t.cpu() for t in low), rotary=(cos.to(dtype), sin.to(dtype), 1))
        if dtype == torch.float32:
            record_error("triton attention+rotary", "fp32", *tolerance.check_fp32(out.cpu(), want, ref_low, what))
        else:
            record_error("triton attention+rotary", "fp16",
                         *tolerance.check(out.cpu(), want.float(), ref_low, dtype, what))
