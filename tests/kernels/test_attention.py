"""kernels/attention.py on DEVICE: compiled on CUDA tensors where there is a GPU, else under the Triton
interpreter on CPU tensors (tests/helpers/device.py).

Tolerances (fastclip/tolerance.py):
  fp32       the fp32 rule against fastclip.ref.attention (or SDPA) run in float64 on the same inputs: the
             kernel's error is at most FP32_ERROR_FACTOR x the fp32 reference's own, plus a few ulp;
  fp16/bf16  max-abs error vs the fp32 reference <= 2 x that of the reference op run in the same low
             dtype + ATTENTION_LOW_PRECISION_ATOL (a tenth of an ulp at 1.0).
Shapes are awkward on purpose: lengths 1, 50, 77, 197 (not multiples of any block), head dims 72,
80, 104 (padded to BLOCK_D=128 with masked loads). B*H stays small: the interpreter is slow.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastclip import ref, tolerance
from fastclip.kernels import attention as attn_mod
from fastclip.kernels.attention import attention
from helpers.device import DEVICE, INTERPRET

NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def make_qkv(B, H, Lq, Lk, Dh, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, Dh, generator=gen) * scale
    k = torch.randn(B, H, Lk, Dh, generator=gen) * scale
    v = torch.randn(B, H, Lk, Dh, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def sdpa(q, k, v, causal=False, key_padding_mask=None):
    """torch SDPA (bool attn_mask: True = attend), in the inputs' dtype."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    allowed = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        allowed = allowed & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def widened(*tensors):
    """The inputs in the reference's wider dtype: float64 for fp32 data, fp32 for fp16/bf16."""
    wide = tolerance.wider(tensors[0].dtype)
    return tuple(t.to(wide) for t in tensors)


def check(out, q, k, v, causal, record, key_padding_mask=None, label="attention"):
    """Compare a kernel output with the reference under its dtype's rule (fastclip/tolerance.py); returns the
    error against the wider reference."""
    assert out.shape == q.shape and out.dtype == q.dtype
    if key_padding_mask is None:
        expected = ref.attention(*widened(q, k, v), causal=causal)
        low = ref.attention(q, k, v, causal=causal)
    else:  # the reference op has no mask: SDPA is the reference, run wider and in the kernel's dtype
        expected = sdpa(*widened(q, k, v), causal, key_padding_mask)
        low = sdpa(q, k, v, causal, key_padding_mask)
    what = f"{label} {NAMES[q.dtype]} {tuple(q.shape)} causal={causal}"
    if q.dtype == torch.float32:
        err, ref_err = tolerance.check_fp32(out, expected, low, what)
    else:
        err, ref_err = tolerance.check_low_precision(out, expected, low, q.dtype, what,
                                                     atol=tolerance.ATTENTION_LOW_PRECISION_ATOL[q.dtype])
    record(label, NAMES[q.dtype], err, ref_err)
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: NAMES[d])
@pytest.mark.parametrize("head_dim", [64, 72, 80, 104])
@pytest.mark.parametrize("length", [1, 50, 77, 197])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference(dtype, head_dim, length, causal, record_error):
    B, H = (2, 2) if length < 100 else (1, 2)
    q, k, v = make_qkv(B, H, length, length, head_dim, dtype, seed=length + head_dim)
    check(attention(q, k, v, causal=causal), q, k, v, causal, record_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: NAMES[d])
@pytest.mark.parametrize("lq, lk", [(1, 257), (77, 50), (3, 729)])
def test_cross_attention_lengths(dtype, lq, lk, record_error):
    """Lq != Lk (attention pooling: a few queries over all patch tokens)."""
    q, k, v = make_qkv(1, 2, lq, lk, 64, dtype, seed=lq * lk)
    check(attention(q, k, v), q, k, v, False, record_error)


def test_fp32_matches_sdpa(record_error):
    """The fp32 rule with torch's SDPA (in float64 and fp32) as the reference."""
    for causal in (False, True):
        q, k, v = make_qkv(2, 2, 77, 77, 80, torch.float32, seed=7)
        err, ref_err = tolerance.check_fp32(attention(q, k, v, causal=causal), sdpa(*widened(q, k, v), causal),
                                            sdpa(q, k, v, causal), f"attention vs SDPA causal={causal}")
        record_error("attention vs SDPA", "fp32", err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: NAMES[d])
def test_large_scores_are_stable(dtype, record_error):
    """Scores in the hundreds: exp overflows unless the running max is subtracted."""
    q, k, v = make_qkv(1, 2, 50, 50, 64, dtype, seed=3, scale=6.0)
    check(attention(q, k, v), q, k, v, False, record_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: NAMES[d])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_mask(dtype, causal, record_error):
    B, H, L, Dh = 3, 2, 77, 72
    q, k, v = make_qkv(B, H, L, L, Dh, dtype, seed=11)
    lengths = torch.tensor([77, 40, 5], device=DEVICE)  # row b attends to keys < lengths[b]
    kpm = torch.arange(L, device=DEVICE)[None, :] >= lengths[:, None]  # (B, L) True = padded
    out = attention(q, k, v, causal=causal, key_padding_mask=kpm)
    check(out, q, k, v, causal, record_error, key_padding_mask=kpm, label="attention+mask")


def test_fully_masked_rows_are_zero(record_error):
    q, k, v = make_qkv(2, 2, 50, 50, 64, torch.float32, seed=5)
    kpm = torch.zeros(2, 50, dtype=torch.bool, device=DEVICE)
    kpm[1] = True  # batch 1 sees no key at all
    kpm[0, :10] = True  # causal rows 0..9 of batch 0 see no key either
    out = attention(q, k, v, causal=True, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0, :, :10] == 0).all()
    # rows >= 10 of batch 0: causal + padding, against the dense computation (float64 and fp32)
    pos = torch.arange(50, device=DEVICE)
    allowed = (pos[:, None] >= pos[None, :]) & ~kpm[0][None, :]

    def dense(dtype):
        scores = (q[0].to(dtype) @ k[0].to(dtype).transpose(-1, -2)) / math.sqrt(64)
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)[:, 10:] @ v[0].to(dtype)

    err, ref_err = tolerance.check_fp32(out[0, :, 10:], dense(torch.float64), dense(torch.float32), "causal + padding")
    record_error("attention+mask", "fp32", err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: NAMES[d])
def test_packed_qkv_views_are_not_copied(dtype, record_error):
    """q, k, v as strided views of one (B, L, 3, H, Dh) projection output, as the model produces them."""
    B, L, H, Dh = 2, 197, 2, 80
    gen = torch.Generator().manual_seed(13)
    qkv = torch.randn(B, L, 3, H, Dh, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh), non-contiguous
    assert not q.is_contiguous() and q.data_ptr() != k.data_ptr()
    out = attention(q, k, v)
    check(out, q.contiguous(), k.contiguous(), v.contiguous(), False, record_error)
    # (B, L, H, Dh) memory: the block's next reshape to (B, L, H*Dh) is a view
    merged = out.transpose(1, 2).reshape(B, L, H * Dh)
    assert merged.data_ptr() == out.data_ptr() and out.transpose(1, 2).is_contiguous()


def test_transposed_and_sliced_inputs():
    q, k, v = make_qkv(1, 2, 77, 77, 64, torch.float16, seed=17)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, L, Dh) view of (B, L, H, Dh)
    big = torch.zeros(1, 2, 77, 128, dtype=torch.float16, device=DEVICE)
    big[..., 32:96] = k
    ks = big[..., 32:96]  # inner stride 1, row stride 128, offset 32
    assert not qt.is_contiguous() and not ks.is_contiguous()
    torch.testing.assert_close(attention(qt, ks, v, causal=True), attention(q, k, v, causal=True), rtol=0, atol=0)


def test_custom_op_and_torch_compile():
    q, k, v = make_qkv(1, 2, 50, 50, 64, torch.float32, seed=19)
    kpm = torch.zeros(1, 50, dtype=torch.bool, device=DEVICE)
    kpm[0, 45:] = True
    expected = attention(q, k, v, True, kpm)
    torch.testing.assert_close(torch.ops.fastclip.attention(q, k, v, True, kpm), expected, rtol=0, atol=0)

    def block(q, k, v, kpm):  # the op inside a traced graph; the fake impl supplies shape and strides
        o = torch.ops.fastclip.attention(q * 1.0, k, v, True, kpm)
        return o.transpose(1, 2).reshape(1, 50, 128)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # the same launches: the same values
    torch.testing.assert_close(compiled(q, k, v, kpm), expected.transpose(1, 2).reshape(1, 50, 128), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fastclip.attention.default, (q, k, v, False, None))


def test_autotune_config_pruning():
    for fp32 in (False, True):
        for block_d in (16, 32, 64, 128):
            pool = attn_mod.configs_for(fp32, block_d)
            assert 1 <= len(pool) <= 3 and all(any(c is a for a in attn_mod.CONFIGS) for c in pool)
            short = attn_mod.configs_for(fp32, block_d, lq=50)
            assert short and all(c.kwargs["BLOCK_M"] <= 64 for c in short)
    named = {"Q": torch.empty(1, dtype=torch.float16), "Lq": 197}
    assert attn_mod._prune_configs(attn_mod.CONFIGS, named, BLOCK_D=128) == attn_mod.configs_for(False, 128, 197)


def test_empty_batch():
    q, k, v = make_qkv(0, 2, 7, 7, 64, torch.float16)
    assert attention(q, k, v).shape == (0, 2, 7, 64)


# ---------------------------------------------------------------- bad inputs: clear errors, before launch
def _qkv(**kw):
    return make_qkv(1, 2, 10, 10, 64, torch.float16, **kw)


@pytest.mark.parametrize("case, exc, message", [
    ("3d", ValueError, "4-d tensor"),
    ("k_shape", ValueError, "shapes do not match"),
    ("k_heads", ValueError, "shapes do not match"),
    ("v_len", ValueError, "shapes do not match"),
    ("dtype_mix", TypeError, "dtypes differ"),
    ("int", TypeError, "supported: float16, bfloat16, float32"),
    ("fp64", TypeError, "supported: float16, bfloat16, float32"),
    ("head_dim", ValueError, "head dim 160 is not supported"),
    ("causal_lengths", ValueError, "causal attention needs Lq == Lk"),
    ("mask_dtype", ValueError, "key_padding_mask must be a bool tensor"),
    ("mask_shape", ValueError, "key_padding_mask must be a bool tensor of shape (B, Lk)"),
    ("device", ValueError, "different devices"),
])
def test_bad_inputs(case, exc, message):
    q, k, v = _qkv()
    kwargs = {}
    if case == "3d":
        q = q[0]
    elif case == "k_shape":
        k = k[..., :32]
    elif case == "k_heads":
        k, v = k[:, :1], v[:, :1]
    elif case == "v_len":
        v = v[:, :, :5]
    elif case == "dtype_mix":
        v = v.float()
    elif case == "int":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif case == "fp64":
        q, k, v = (t.double() for t in (q, k, v))
    elif case == "head_dim":
        q, k, v = make_qkv(1, 2, 10, 10, 160, torch.float16)
    elif case == "causal_lengths":
        q = q[:, :, :4]
        kwargs["causal"] = True
    elif case == "mask_dtype":
        kwargs["key_padding_mask"] = torch.zeros(1, 10, dtype=torch.uint8, device=DEVICE)
    elif case == "mask_shape":
        kwargs["key_padding_mask"] = torch.zeros(2, 10, dtype=torch.bool, device=DEVICE)
    elif case == "device":
        v = v.to("meta")
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        attention(q, k, v, **kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """Compiled kernels refuse CPU tensors with an error naming the fix (the interpreter runs them)."""
    assert attn_mod.INTERPRETED == INTERPRET
    monkeypatch.setattr(attn_mod, "INTERPRETED", False)
    q, k, v = (t.cpu() for t in _qkv())
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention(q, k, v)
