"""kernels/normalize_project.py vs fastclip.ref.normalize_project on DEVICE (compiled on a GPU, else the Triton
interpreter).

The reference runs on the pooled rows ``x[arange(B), index]``; the kernel gathers them itself from the
(B, L, W) token states with ``index``, or takes pooled (B, W) rows (also a strided class-token view).
The rules of fastclip/tolerance.py: fp32 against the reference run in float64 (at most FP32_ERROR_FACTOR x
the fp32 reference's own error, plus a few ulp); fp16/bf16 against the fp32 reference (at most 2x the
error of the reference op run in the same low dtype, plus LOW_PRECISION_ATOL). Shapes cover B above the
16-row block, W and E not multiples of the 64/128 tiles.
"""
import pytest
import torch

from fastclip import ref, tolerance
from fastclip.kernels.normalize_project import normalize_project
from helpers.device import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
EPS = 1e-5


def check(record_error, out, pooled, lw, lb, proj, pb, normalize, dtype, what):
    """``out`` against ref.normalize_project on the pooled rows, run in the wider dtype and in ``dtype``, under
    tolerance.check; the errors go to the summary table."""
    wide = tolerance.wider(dtype)
    cast = lambda t: None if t is None else t.to(wide)  # noqa: E731
    expected = ref.normalize_project(cast(pooled), cast(lw), cast(lb), EPS, cast(proj), cast(pb), normalize)
    ref_low = ref.normalize_project(pooled, lw, lb, EPS, proj, pb, normalize)
    record_error("normalize_project", NAMES[dtype], *tolerance.check(out, expected, ref_low, dtype, what))


def _case(B, L, W, E, dtype, has_proj, has_pb, seed=0):
    g = torch.Generator().manual_seed(seed + B * 1000 + W + E)
    x = torch.randn(B, L, W, generator=g) * 2 + 0.5
    x[..., :: max(1, W // 5)] *= 6  # residual-stream outliers
    lw = 1 + 0.3 * torch.randn(W, generator=g)
    lb = 0.2 * torch.randn(W, generator=g)
    proj = torch.randn(W, E, generator=g) / W**0.5 if has_proj else None
    pb = torch.randn(E if has_proj else W, generator=g) * 0.1 if has_pb else None
    index = torch.randint(0, L, (B,), generator=g).to(DEVICE)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(x), cast(lw), cast(lb), cast(proj), cast(pb), index


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(3, 7, 96, 40), (19, 5, 200, 300)], ids=lambda s: "B{}L{}W{}E{}".format(*s))
@pytest.mark.parametrize("has_proj,has_pb,normalize", [
    (True, False, False), (True, False, True), (True, True, True), (True, True, False),
    (False, False, True), (False, True, False),
], ids=["proj", "proj-l2", "proj-bias-l2", "proj-bias", "identity-l2", "identity-bias"])
@pytest.mark.parametrize("gather", [True, False], ids=["index", "pooled"])
def test_matches_reference(dtype, shape, has_proj, has_pb, normalize, gather, record_error):
    B, L, W, E = shape
    x, lw, lb, proj, pb, index = _case(B, L, W, E, dtype, has_proj, has_pb)
    pooled = x[torch.arange(B, device=DEVICE), index]  # (B, W)
    if gather:
        y = normalize_project(x, lw, lb, EPS, proj, pb, normalize, index=index)
    else:
        y = normalize_project(pooled, lw, lb, EPS, proj, pb, normalize)
    assert y.shape == (B, E if has_proj else W) and y.dtype == dtype
    check(record_error, y, pooled, lw, lb, proj, pb, normalize, dtype,
          f"normalize_project {dtype} {shape} proj={has_proj} bias={has_pb} normalize={normalize} gather={gather}")
    if normalize:
        torch.testing.assert_close(y.float().norm(dim=-1), torch.ones(B, device=DEVICE), rtol=0,
                                   atol=tolerance.UNIT_NORM_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_class_token_view_and_int32_index(dtype, record_error):
    """Vision 'tok' pooling passes x[:, 0] (a strided view); text passes end-of-text positions as int32."""
    x, lw, lb, proj, _, _ = _case(4, 9, 160, 72, dtype, True, False, seed=1)
    cls = x[:, 0]
    assert not cls.is_contiguous()
    check(record_error, normalize_project(cls, lw, lb, EPS, proj, None, True), cls, lw, lb, proj, None, True, dtype,
          "class-token view")
    zero = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    check(record_error, normalize_project(x, lw, lb, EPS, proj, None, True, index=zero), cls, lw, lb, proj, None, True,
          dtype, "index 0")


@pytest.mark.parametrize("dtype,B", [(torch.float16, 2100), (torch.bfloat16, 8200), (torch.float32, 2100)],
                         ids=["fp16-32rows", "bf16-64rows", "fp32-16rows"])
def test_large_batch_row_blocks(dtype, B, record_error):
    """Large B switches fp16/bf16 to 32/64-row tiles (fp32 stays at 16): still the reference."""
    x, lw, lb, proj, pb, index = _case(B, 2, 64, 48, dtype, True, True, seed=2)
    y = normalize_project(x, lw, lb, EPS, proj, pb, True, index=index)
    pooled = x[torch.arange(B, device=DEVICE), index]
    check(record_error, y, pooled, lw, lb, proj, pb, True, dtype, f"B={B}")


def test_transposed_proj_and_empty_batch(record_error):
    x, lw, lb, proj, pb, index = _case(5, 3, 64, 48, torch.float32, True, True)
    proj_t = proj.t().contiguous().t()  # same values, column-major
    y = normalize_project(x, lw, lb, EPS, proj_t, pb, True, index=index)
    pooled = x[torch.arange(5, device=DEVICE), index]
    check(record_error, y, pooled, lw, lb, proj, pb, True, torch.float32, "column-major proj")
    assert normalize_project(x[:0], lw, lb, EPS, proj, pb, True, index=index[:0]).shape == (0, 48)


def test_custom_op():
    x, lw, lb, proj, pb, index = _case(3, 4, 32, 24, torch.float32, True, True)
    torch.library.opcheck(torch.ops.fastclip.normalize_project.default, (x, lw, lb, EPS, proj, pb, True, index),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_clear_errors():
    x, lw, lb, proj, pb, index = _case(3, 4, 32, 24, torch.float32, True, True)
    with pytest.raises(ValueError, match=r"need index= the pooled position"):
        normalize_project(x, lw, lb, EPS, proj)
    with pytest.raises(ValueError, match="x is already pooled"):
        normalize_project(x[:, 0], lw, lb, EPS, proj, index=index)
    with pytest.raises(IndexError, match=r"index values must lie in \[0, 4\)"):
        normalize_project(x, lw, lb, EPS, proj, index=torch.tensor([0, 4, 1], device=DEVICE))
    with pytest.raises(ValueError, match=r"index must be an int32/int64 tensor of shape \(3,\)"):
        normalize_project(x, lw, lb, EPS, proj, index=index.float())
    with pytest.raises(ValueError, match=r"proj must have shape \(32, E\)"):
        normalize_project(x[:, 0], lw, lb, EPS, proj[:31])
    with pytest.raises(ValueError, match="proj must match x"):
        normalize_project(x[:, 0], lw, lb, EPS, proj.half())
    with pytest.raises(ValueError, match=r"proj_bias must be a float tensor of shape \(24,\)"):
        normalize_project(x[:, 0], lw, lb, EPS, proj, pb[:5])
    with pytest.raises(ValueError, match=r"ln_weight must be a float tensor of shape \(32,\)"):
        normalize_project(x[:, 0], lw[:8], lb, EPS, proj)
    with pytest.raises(ValueError, match=r"pooled rows \(B, W\) or token states \(B, L, W\)"):
        normalize_project(x[None], lw, lb, EPS, proj)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        normalize_project(x[:, 0].double(), lw, lb, EPS, proj)

