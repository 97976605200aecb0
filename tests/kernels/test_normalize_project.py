"""kernels/normalize_project.py vs fastclip.ref.normalize_project under the Triton interpreter.

The reference runs on the pooled rows ``x[arange(B), index]``; the kernel gathers them itself from the
(B, L, W) token states with ``index``, or takes pooled (B, W) rows (also a strided class-token view).
fp32: torch.testing.assert_close with fp32 tolerances. fp16/bf16 (DESIGN.md): the kernel's error
against the fp32 reference is at most 2x the error of the reference op run in the same low dtype, plus
a small atol. Shapes cover B above the 16-row block, W and E not multiples of the 64/128 tiles.
"""
import functools

import pytest
import torch

from fastclip import ref, tolerance
from fastclip.kernels.normalize_project import normalize_project

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_ERR: dict = {}  # dtype -> worst max-abs error seen (printed by test_zz_report)
EPS = 1e-5


check_close = functools.partial(tolerance.check_close, record=MAX_ERR)


def _f32(t):
    return None if t is None else t.float()


def _case(B, L, W, E, dtype, has_proj, has_pb, seed=0):
    g = torch.Generator().manual_seed(seed + B * 1000 + W + E)
    x = torch.randn(B, L, W, generator=g) * 2 + 0.5
    x[..., :: max(1, W // 5)] *= 6  # residual-stream outliers
    lw = 1 + 0.3 * torch.randn(W, generator=g)
    lb = 0.2 * torch.randn(W, generator=g)
    proj = torch.randn(W, E, generator=g) / W**0.5 if has_proj else None
    pb = torch.randn(E if has_proj else W, generator=g) * 0.1 if has_pb else None
    index = torch.randint(0, L, (B,), generator=g)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(lw), cast(lb), cast(proj), cast(pb), index


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(3, 7, 96, 40), (19, 5, 200, 300)], ids=lambda s: "B{}L{}W{}E{}".format(*s))
@pytest.mark.parametrize("has_proj,has_pb,normalize", [
    (True, False, False), (True, False, True), (True, True, True), (True, True, False),
    (False, False, True), (False, True, False),
], ids=["proj", "proj-l2", "proj-bias-l2", "proj-bias", "identity-l2", "identity-bias"])
@pytest.mark.parametrize("gather", [True, False], ids=["index", "pooled"])
def test_matches_reference(dtype, shape, has_proj, has_pb, normalize, gather):
    B, L, W, E = shape
    x, lw, lb, proj, pb, index = _case(B, L, W, E, dtype, has_proj, has_pb)
    pooled = x[torch.arange(B), index]  # (B, W)
    if gather:
        y = normalize_project(x, lw, lb, EPS, proj, pb, normalize, index=index)
    else:
        y = normalize_project(pooled, lw, lb, EPS, proj, pb, normalize)
    assert y.shape == (B, E if has_proj else W) and y.dtype == dtype
    ref32 = ref.normalize_project(pooled.float(), lw.float(), lb.float(), EPS, _f32(proj), _f32(pb), normalize)
    ref_low = ref.normalize_project(pooled, lw, lb, EPS, proj, pb, normalize)
    check_close(y, ref32, ref_low, dtype, f"normalize_project {dtype} {shape} proj={has_proj} bias={has_pb} "
                                          f"normalize={normalize} gather={gather}")
    if normalize:
        torch.testing.assert_close(y.float().norm(dim=-1), torch.ones(B), atol=1e-2 if dtype != torch.float32 else 1e-5,
                                   rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_class_token_view_and_int32_index(dtype):
    """Vision 'tok' pooling passes x[:, 0] (a strided view); text passes end-of-text positions as int32."""
    x, lw, lb, proj, _, _ = _case(4, 9, 160, 72, dtype, True, False, seed=1)
    cls = x[:, 0]
    assert not cls.is_contiguous()
    ref32 = ref.normalize_project(cls.float(), lw.float(), lb.float(), EPS, proj.float(), None, True)
    ref_low = ref.normalize_project(cls, lw, lb, EPS, proj, None, True)
    check_close(normalize_project(cls, lw, lb, EPS, proj, None, True), ref32, ref_low, dtype, "class-token view")
    zero = torch.zeros(4, dtype=torch.int32)
    check_close(normalize_project(x, lw, lb, EPS, proj, None, True, index=zero), ref32, ref_low, dtype, "index 0")


@pytest.mark.parametrize("dtype,B", [(torch.float16, 2100), (torch.bfloat16, 8200), (torch.float32, 2100)],
                         ids=["fp16-32rows", "bf16-64rows", "fp32-16rows"])
def test_large_batch_row_blocks(dtype, B):
    """Large B switches fp16/bf16 to 32/64-row tiles (fp32 stays at 16): still the reference."""
    x, lw, lb, proj, pb, index = _case(B, 2, 64, 48, dtype, True, True, seed=2)
    y = normalize_project(x, lw, lb, EPS, proj, pb, True, index=index)
    pooled = x[torch.arange(B), index]
    ref32 = ref.normalize_project(pooled.float(), lw.float(), lb.float(), EPS, proj.float(), pb.float(), True)
    check_close(y, ref32, ref.normalize_project(pooled, lw, lb, EPS, proj, pb, True), dtype, f"B={B}")


def test_transposed_proj_and_empty_batch():
    x, lw, lb, proj, pb, index = _case(5, 3, 64, 48, torch.float32, True, True)
    proj_t = proj.t().contiguous().t()  # same values, column-major
    y = normalize_project(x, lw, lb, EPS, proj_t, pb, True, index=index)
    pooled = x[torch.arange(5), index]
    torch.testing.assert_close(y, ref.normalize_project(pooled, lw, lb, EPS, proj, pb, True))
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
        normalize_project(x, lw, lb, EPS, proj, index=torch.tensor([0, 4, 1]))
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


def test_zz_report(capsys):
    with capsys.disabled():
        print("\nnormalize_project max-abs error vs fp32 reference: "
              + ", ".join(f"{str(d).split('.')[-1]} {e:.2e}" for d, e in MAX_ERR.items()))
