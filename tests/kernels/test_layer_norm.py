"""kernels/layer_norm.py vs fastclip.ref.layer_norm on DEVICE (compiled on a GPU, else the Triton interpreter).

The rules of fastclip/tolerance.py: fp32 against the reference run in float64 (at most FP32_ERROR_FACTOR x
the fp32 reference's own error, plus a few ulp); fp16/bf16 against the fp32 reference (at most 2x the error
of the reference op run in the same low dtype, plus LOW_PRECISION_ATOL). Widths are the CLIP ones
(768, 1024, 1152, 1280, 1664: most not powers of two) and small odd ones; row counts are not multiples
of the rows-per-program block.
"""
import pytest
import torch

from fastclip import ref, tolerance
from fastclip.kernels import layer_norm as ln_mod
from fastclip.kernels.layer_norm import layer_norm
from helpers.device import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
EPS = 1e-5


def _inputs(rows, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + width + rows)
    # an offset and a few large activations, as CLIP's residual stream has
    x = (torch.randn(rows, width, generator=g) * 2 + 0.7)
    x[:, :: max(1, width // 7)] *= 8
    w = 1 + 0.3 * torch.randn(width, generator=g)
    b = 0.2 * torch.randn(width, generator=g)
    r = torch.randn(rows, width, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (x, w, b, r))


def check(record_error, out, x, w, b, eps, dtype, what, ref_w=None, ref_b=None):
    """``out`` against ref.layer_norm(x, w, b) under tolerance.check: the reference runs in the wider dtype
    and in ``dtype`` (with ``ref_w``/``ref_b`` for the latter where given); errors go to the summary table."""
    wide = tolerance.wider(dtype)
    cast = lambda t: None if t is None else t.to(wide)  # noqa: E731
    expected = ref.layer_norm(cast(x), cast(w), cast(b), eps)
    ref_low = ref.layer_norm(x, w if ref_w is None else ref_w, b if ref_b is None else ref_b, eps)
    record_error("layer_norm", NAMES[dtype], *tolerance.check(out, expected, ref_low, dtype, what))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("width", [100, 768, 1152, 1280, 1664])
@pytest.mark.parametrize("rows", [1, 13])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_reference(dtype, width, rows, residual, record_error):
    x, w, b, r = _inputs(rows, width, dtype)
    if residual:
        y, s = layer_norm(x, w, b, EPS, residual=r)
        s_ref = x + r  # the unfused model code: add in the low dtype, then normalise
        assert torch.equal(s, s_ref), f"x + residual differs: max {(s.float() - s_ref.float()).abs().max():.3e}"
        src = s_ref
    else:
        y = layer_norm(x, w, b, EPS)
        src = x
    assert y.shape == x.shape and y.dtype == dtype
    check(record_error, y, src, w, b, EPS, dtype, f"layer_norm {dtype} width={width} rows={rows} residual={residual}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_batched_strided_rows_and_no_affine(dtype, record_error):
    """(B, L, W) input whose rows are a strided view (a slice of a wider tensor); weight/bias None."""
    big, w, b, r = _inputs(3 * 7, 200, dtype, seed=3)
    x = big.view(3, 7, 200)[..., :150]  # row stride 200, width 150
    assert not x.is_contiguous()
    y = layer_norm(x, None, None, 1e-6)
    ones, zeros = torch.ones(150, dtype=dtype, device=DEVICE), torch.zeros(150, dtype=dtype, device=DEVICE)
    check(record_error, y, x, None, None, 1e-6, dtype, "strided, no affine", ref_w=ones, ref_b=zeros)
    res = r.view(3, 7, 200)[..., 50:]
    y2, s = layer_norm(x, w[:150], b[:150], 1e-6, residual=res)
    assert torch.equal(s, x + res)
    check(record_error, y2, x + res, w[:150], b[:150], 1e-6, dtype, "strided residual")


def test_fp32_weights_on_low_precision_input(record_error):
    """An fp16 activation with fp32 LayerNorm parameters (mixed checkpoints) is normalised in fp32."""
    x, w, b, _ = _inputs(5, 96, torch.float16)
    y = layer_norm(x, w.float(), b.float(), EPS)
    check(record_error, y, x, w.float(), b.float(), EPS, torch.float16, "fp32 params", ref_w=w, ref_b=b)


def test_empty_rows_and_custom_op():
    x = torch.empty(0, 64, device=DEVICE)
    assert layer_norm(x, torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE), EPS).shape == (0, 64)
    x, w, b, r = _inputs(4, 64, torch.float32)
    torch.library.opcheck(torch.ops.fastclip.layer_norm.default, (x, w, b, EPS),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastclip.add_layer_norm.default, (x, r, w, b, EPS),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_clear_errors():
    x, w, b, r = _inputs(4, 64, torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        layer_norm(x, w[:63], b, EPS)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        layer_norm(x, w, torch.zeros(2, 32, device=DEVICE), EPS)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer_norm(x.double(), w, b, EPS)
    with pytest.raises(ValueError, match="residual shape"):
        layer_norm(x, w, b, EPS, residual=r[:3])
    with pytest.raises(ValueError, match="residual must match x"):
        layer_norm(x, w, b, EPS, residual=r.half())
    with pytest.raises(ValueError, match="exceeds the single-block limit"):
        wide = ln_mod.MAX_WIDTH + 1
        layer_norm(torch.zeros(1, wide, device=DEVICE), None, None, EPS)
    with pytest.raises(ValueError, match="non-empty last dim"):
        layer_norm(torch.zeros(3, 0, device=DEVICE), None, None, EPS)


def test_block_config_rationale():
    """Tiles stay at 4096 elements (2-4 rows) for CLIP widths; wide rows get 8 warps."""
    for width in (768, 1024, 1152, 1280, 1664):
        cfg = ln_mod.block_config(width)
        assert cfg["BLOCK_N"] >= width and cfg["BLOCK_M"] * cfg["BLOCK_N"] == 4096 and cfg["num_warps"] == 4
    assert ln_mod.block_config(16384)["num_warps"] == 8

