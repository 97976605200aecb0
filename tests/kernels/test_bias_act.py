"""kernels/bias_act.py vs fastclip.ref.bias_act on DEVICE (compiled on a GPU, else the Triton interpreter).

The rules of fastclip/tolerance.py: fp32 against the reference run in float64 (at most FP32_ERROR_FACTOR x
the fp32 reference's own error, plus a few ulp); fp16/bf16 against the fp32 reference (at most 2x the
error of the reference op run in the same low dtype, plus LOW_PRECISION_ATOL). Every activation, with and
without bias; widths that are not powers of two (and one above the 512-column tile), row counts that are
not multiples of the row block.
"""
import pytest
import torch

from fastclip import ref, tolerance
from fastclip.kernels import bias_act as ba_mod
from fastclip.kernels.bias_act import ACTIVATIONS, bias_act
from helpers.device import DEVICE

# exp() overflows to inf inside sigmoid for very negative inputs under the interpreter (numpy warns);
# the result is the correct limit 0.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def check(record_error, out, expected, ref_low, dtype, what):
    """tolerance.check, with the errors kept for the summary table (tests/kernels/conftest.py)."""
    record_error("bias_act", NAMES[dtype], *tolerance.check(out, expected, ref_low, dtype, what))


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    x = torch.randn(shape, generator=g) * 3  # covers the curved part of every GELU and both tails
    x.view(-1)[::17] *= 10  # and a few far-out values (|x| ~ 30-50: sigmoid/erf saturation)
    bias = torch.randn(shape[-1], generator=g)
    return x.to(DEVICE, dtype), bias.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 96), (13, 300), (3, 5, 1100)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(dtype, act, shape, has_bias, record_error):
    x, bias = _inputs(shape, dtype)
    bias = bias if has_bias else None
    y = bias_act(x, bias, act)
    width = shape[-1] // 2 if act == "swiglu" else shape[-1]  # swiglu: silu(first half) * second half
    assert y.shape == (*shape[:-1], width) and y.dtype == dtype
    wide = tolerance.wider(dtype)
    expected = ref.bias_act(x.to(wide), None if bias is None else bias.to(wide), act)
    ref_low = ref.bias_act(x, bias, act)
    check(record_error, y, expected, ref_low, dtype, f"bias_act {act} {dtype} {shape} bias={has_bias}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_strided_rows_and_fp32_bias(dtype, record_error):
    """Rows that are a slice of a wider tensor (row stride != width) and an fp32 bias on a low-dtype x."""
    big, _ = _inputs((9, 700), dtype, seed=1)
    x = big[:, 100:612]
    bias = torch.linspace(-1, 1, 512, device=DEVICE)
    y = bias_act(x, bias, "gelu")
    wide = tolerance.wider(dtype)
    expected = ref.bias_act(x.to(wide), bias.to(wide), "gelu")
    check(record_error, y, expected, ref.bias_act(x, bias.to(dtype), "gelu"), dtype, "strided")


def test_empty_and_custom_op():
    assert bias_act(torch.empty(0, 8, device=DEVICE), torch.zeros(8, device=DEVICE), "gelu").shape == (0, 8)
    x, b = _inputs((4, 40), torch.float32)
    for act in ("quick_gelu", "swiglu"):
        torch.library.opcheck(torch.ops.fastclip.bias_act.default, (x, b, act),
                              test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_clear_errors():
    x, b = _inputs((4, 40), torch.float32)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        bias_act(x, b, "relu")
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        bias_act(x, b[:39], "gelu")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        bias_act(x.to(torch.int32), None, "none")
    with pytest.raises(ValueError, match="at least one dim"):
        bias_act(torch.tensor(1.0, device=DEVICE), None, "gelu")
    with pytest.raises(ValueError, match="'swiglu' needs an even last dim"):
        bias_act(x[:, :39], None, "swiglu")
    with pytest.raises(ValueError, match="bias must be a float tensor"):
        bias_act(x, torch.zeros(40, dtype=torch.int64, device=DEVICE), "gelu")


def test_block_config_rationale():
    """512-column tiles of 4096 elements for MLP widths; narrow rows get one tile across."""
    assert ba_mod.block_config(3072) == {"BLOCK_M": 8, "BLOCK_N": 512, "num_warps": 4, "num_stages": 1}
    assert ba_mod.block_config(96)["BLOCK_N"] == 128

