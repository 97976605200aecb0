"""``linear_int8`` (fastclip/backends/cpu/linear_int8.py, csrc/linear_int8.cpp): the small-M int8 GEMM with
per-row activation scales, on every path this CPU runs (avx512_vnni, avx512, avx_vnni, avx2; the switches
select each one), against an independent reference.

The reference quantises x per row and W per output channel here, in torch, with the kernel's documented
fp32 formulas (so the quantised operands are the same integers), dequantises them and runs the linear in
float64 and in fp32: the kernel sums the integers exactly in int32, so it is held to the fp32 rule of
fastclip/tolerance.py against that float64 result (only its fp32 epilogue rounds). Against the fp32 linear
of the unquantised operands, the relative error is held to INT8_LINEAR_REL (u8 activations) or
INT8_U7_LINEAR_REL (the u7 paths). Shapes cover partial panels (N around 16 and 64), K not a multiple of
4, M = 1..130 around the row tiles and past a row block, constant and all-zero rows, huge outliers in a
few columns, every activation, bias or none, strided x, NaN rows, and the sums that would saturate int16
with 8-bit activations on the vpmaddubsw paths.
"""
from __future__ import annotations

import platform

import pytest
import torch

if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("fastclip._C is built on Linux x86-64 only", allow_module_level=True)

from fastclip import _C, ref, tolerance  # noqa: E402
from fastclip.backends.cpu import linear_int8 as li8  # noqa: E402  (an ImportError here: rebuild with `pip install -e .`)

if not li8.available():
    pytest.skip("this CPU lacks AVX2/FMA: no int8 kernel", allow_module_level=True)

ACTS = ("none", "gelu", "gelu_tanh", "quick_gelu")
ALL_PATHS = ("avx512_vnni", "avx512", "avx_vnni", "avx2")
RUNNABLE = li8.paths()
CPU_FLAGS = set(open("/proc/cpuinfo").read().split())


@pytest.fixture(params=ALL_PATHS)
def kernel_path(request):
    """Each path in turn (skipped where this CPU, or FASTCLIP_DISABLE_AVX512 / _VNNI, rules it out)."""
    if request.param not in RUNNABLE:
        pytest.skip(f"path {request.param} does not run here (paths: {RUNNABLE})")
    with li8.use_path(request.param), torch.no_grad():
        yield request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def operands(M: int, K: int, N: int, seed: int = 0):
    x = torch.randn(M, K, generator=gen(seed))
    weight = torch.randn(N, K, generator=gen(seed + 1)) / K ** 0.5
    bias = torch.randn(N, generator=gen(seed + 2))
    return x, weight, bias


# ---------------------------------------------------------------------------------------- the reference
def quantize_rows_ref(x: torch.Tensor, levels: int):
    """Per-row asymmetric quantisation in fp32 as csrc/linear_int8.cpp documents it -> (q, scale, zero)."""
    x = x.float()
    lo, hi = x.amin(1).clamp(max=0.0), x.amax(1).clamp(min=0.0)
    scale = ((hi - lo) / levels).clamp(min=li8.MIN_ACT_SCALE)
    inv = 1.0 / scale
    zero = torch.round(-lo * inv).clamp(0, levels)
    q = (torch.round(x * inv[:, None]) + zero[:, None]).clamp(0, levels)
    return q, scale, zero


def quantize_weight_ref(weight: torch.Tensor):
    """Symmetric per-output-channel int8: scale max|W[n]| / 127 (1 for a zero row), q = round(W / scale)."""
    amax = weight.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(weight / scale[:, None]).clamp(-127, 127), scale


def reference(x2, qweight, w_scale, bias, act, levels):
    """(float64, fp32) results of the linear on the dequantised operands (x2: (M, K) rows)."""
    q, s, z = quantize_rows_ref(x2, levels)
    xd = s.double()[:, None] * (q.double() - z.double()[:, None])
    wd = w_scale.double()[:, None] * qweight.double()
    b64 = None if bias is None else bias.double()
    ref64 = ref.linear_act(xd, wd, b64, act)
    ref32 = ref.linear_act(xd.float(), wd.float(), None if bias is None else bias.float(), act)
    return ref64, ref32


def check(x, weight, bias, act="none", record=None, what=""):
    """linear_int8 on the active path vs the quantised reference (fp32 rule); returns the kernel's output."""
    pack = li8.pack_int8(weight, bias)
    qw, ws = quantize_weight_ref(weight)
    assert torch.equal(pack.qweight.float(), qw) and torch.equal(pack.w_scale[: weight.shape[0]], ws)
    out = li8.linear_int8(x, pack, act)
    assert out.shape == (*x.shape[:-1], weight.shape[0])
    x2 = x.reshape(-1, x.shape[-1])
    ref64, ref32 = reference(x2, qw, ws, bias, act, li8.levels())
    label = f"linear_int8[{li8.path()}] {act} x{tuple(x.shape)} W{tuple(weight.shape)} bias={bias is not None} {what}"
    err, ref_err = tolerance.check_fp32(out.reshape(ref64.shape), ref64, ref32, label)
    if record is not None:
        record(f"linear_int8 {li8.path()}", "fp32", err, ref_err)
    return out


def rel_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def fp32_rel_bound() -> float:
    return tolerance.INT8_LINEAR_REL if li8.levels() == 255 else tolerance.INT8_U7_LINEAR_REL


# ---------------------------------------------------------------------------------------- the tests
def test_paths_follow_the_cpu():
    """The paths this CPU offers follow /proc/cpuinfo (and the FASTCLIP_DISABLE_* switches); the default is
    the widest one with VNNI where there is one."""
    zmm = _C.avx512_present() and "avx512bw" in CPU_FLAGS
    assert ("avx512" in RUNNABLE) == zmm
    assert "avx2" in RUNNABLE
    if "avx512_vnni" in RUNNABLE:
        assert zmm and "avx512_vnni" in CPU_FLAGS
    if "avx_vnni" in RUNNABLE:
        assert "avx_vnni" in CPU_FLAGS
    best = [p for p in ALL_PATHS if p in RUNNABLE][0]
    assert li8.path() == RUNNABLE[0] == best
    for name in (p for p in ALL_PATHS if p not in RUNNABLE):
        with pytest.raises(ValueError, match="does not run here"), li8.use_path(name):
            pass
    assert li8.path() == best  # restored


SHAPES = [  # (M, K, N): panels of 16 columns in groups of 64, k in groups of 4, row tiles of <= 6 (4 on avx2)
    (1, 1, 1), (1, 3, 15), (2, 5, 16), (3, 7, 17), (4, 64, 31), (5, 100, 33), (6, 255, 63), (7, 256, 64),
    (12, 257, 65), (13, 33, 100), (25, 768, 129), (50, 768, 2304), (97, 3072, 80), (128, 512, 200),
    (130, 3072, 48), (1, 3072, 768), (700, 3072, 20),  # 700 x 3072: past one ~1 MiB row block
]


@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
def test_matches_the_quantised_reference(kernel_path, M, K, N, record_error):
    x, weight, bias = operands(M, K, N)
    check(x, weight, bias, record=record_error)
    check(x, weight, None, record=record_error)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("M,K,N", [(1, 33, 47), (2, 768, 3072), (13, 3072, 70)])
def test_activations(kernel_path, M, K, N, act, record_error):
    x, weight, bias = operands(M, K, N, seed=3)
    check(x, weight, bias, act, record=record_error)
    check(x, weight, None, act, record=record_error)


@pytest.mark.parametrize("M,K,N", [(50, 768, 768), (2, 768, 3072), (50, 3072, 768)])
def test_error_against_the_fp32_linear(kernel_path, M, K, N):
    """The int8 result vs the fp32 linear of the unquantised operands: about 1% (u8), 1.5% (u7)."""
    x, weight, bias = operands(M, K, N, seed=7)
    pack = li8.pack_int8(weight, bias)
    for act in ("none", "gelu"):
        err = rel_error(li8.linear_int8(x, pack, act), ref.linear_act(x, weight, bias, act))
        assert err <= fp32_rel_bound(), f"{li8.path()} {act}: relative error {err:.4f}"


def test_constant_and_zero_rows(kernel_path, record_error):
    """Rows of one value (the range is [0, c] or [c, 0]: c is a level, exactly), all-zero rows (bias only),
    tiny rows (below the smallest scale) and a single spike."""
    K, N = 70, 40
    x = torch.randn(9, K, generator=gen(1))
    x[0] = 0.0
    x[1] = 3.25
    x[2] = -0.7
    x[3] = 1e-35  # tiny: every value quantises to 0 (scale 1e-30)
    x[4] = 0.0
    x[4, 17] = 5.0
    x[5, ::2] = 2.0  # two values only
    x[5, 1::2] = -1.0
    _, weight, bias = operands(9, K, N, seed=11)
    out = check(x, weight, bias, record=record_error)
    torch.testing.assert_close(out[0], bias, rtol=0, atol=0)  # 0 * anything + bias, exactly
    exact = x[:3].double() @ weight.double().T + bias.double()  # constant rows are represented exactly
    qw, ws = quantize_weight_ref(weight)
    exact_q = x[:3].double() @ (ws.double()[:, None] * qw.double()).T + bias.double()
    assert (out[:3].double() - exact_q).abs().max() <= 8 * tolerance.FP32_EPS * exact_q.abs().max()
    assert rel_error(out[:3], exact) <= tolerance.INT8_LINEAR_REL


def test_outliers(kernel_path, record_error):
    """Huge values in a few input columns (per-channel outliers, as some checkpoints have) stay exact against
    the quantised reference; rows without them keep the usual error beside a row that has them, which one
    scale per call (per tensor) cannot do."""
    M, K, N = 24, 768, 256
    x, weight, bias = operands(M, K, N, seed=21)
    xo = x.clone()
    xo[:, [5, 300, 701]] *= 1e4  # every row: a few huge channels
    check(xo, weight, bias, record=record_error, what="(outlier columns)")
    wo = weight.clone()
    wo[:, 42] *= 300.0  # a weight column with outliers too: per-channel weight scales absorb it
    check(xo, wo, bias, record=record_error, what="(outlier columns in x and W)")
    mixed = x.clone()
    mixed[0, :8] = 5e3  # one row with outliers among normal rows
    out = check(mixed, weight, bias, record=record_error, what="(one outlier row)")
    fp32 = ref.linear(mixed, weight, bias)
    assert rel_error(out[1:], fp32[1:]) <= fp32_rel_bound()


def test_sums_that_would_saturate_int16(kernel_path):
    """Activations at the top level times weights of +-127 (and -128): with 8-bit activations a vpmaddubsw
    pair would be 2 * 255 * 127 = 64770 > 32767; the u7 paths use 127 levels (pairs <= 32512) and VNNI
    sums in int32, so every path is exact here."""
    K, N = 1024, 32
    x = torch.full((3, K), 2.0)
    x[1] = -2.0
    x[2, ::2] = 4.0  # levels L and L/2
    x[2, 1::2] = 0.0
    q = torch.full((N, K), 127, dtype=torch.int8)
    q[1::2] = -128  # int8's full range through pack_int8_quantized
    q[2::4, ::3] = -127
    scale = torch.full((N,), 1.0 / 127)
    pack = li8.pack_int8_quantized(q, scale)
    out = li8.linear_int8(x, pack)
    expected = x.double() @ (scale.double()[:, None] * q.double()).T  # x is exactly representable here
    assert (out.double() - expected).abs().max() <= 4 * tolerance.FP32_EPS * expected.abs().max()
    assert expected.abs().max() > 2000.0  # the sums are large (int16 would have wrapped or saturated)


def test_strided_and_batched_inputs(kernel_path, record_error):
    """x as rows of a wider tensor, as (B, L, K), with a non-unit inner stride, and one row broadcast."""
    x, weight, bias = operands(60, 96, 70)
    wide = torch.randn(60, 200, generator=gen(9))
    wide[:, 13:109] = x
    check(wide[:, 13:109], weight, bias, record=record_error, what="(row stride 200)")
    check(x.view(3, 20, 96), weight, bias, record=record_error)
    check(x.t().contiguous().t(), weight, bias, record=record_error, what="(inner stride 60)")
    check(x[:1].expand(7, 96), weight, bias, record=record_error, what="(row stride 0)")
    pack = li8.pack_int8(weight, bias)
    assert li8.linear_int8(x[:0], pack).shape == (0, 70)
    assert torch.equal(li8.linear_int8(wide[:, 13:109], pack), li8.linear_int8(x, pack))


def test_input_scale_is_applied_per_channel(kernel_path):
    """x_scale multiplies each row by a per-channel vector as it is quantised: the same bits as the kernel on
    x * x_scale (one fp32 multiply either way), strided rows included."""
    x, weight, bias = operands(50, 100, 40, seed=6)  # K = 100: a tail past the last 8 and the last 32
    x_scale = torch.rand(100, generator=gen(7)) * 4 + 0.05
    pack = li8.pack_int8(weight, bias)
    wide = torch.randn(50, 130, generator=gen(8))
    wide[:, 3:103] = x
    want = li8.linear_int8(x * x_scale, pack, "gelu")
    assert torch.equal(li8.linear_int8(x, pack, "gelu", x_scale=x_scale), want)
    assert torch.equal(li8.linear_int8(wide[:, 3:103], pack, "gelu", x_scale=x_scale), want)
    for bad in (x_scale[:99], x_scale.double(), torch.rand(200)[::2]):
        with pytest.raises(ValueError, match="x_scale"):
            li8.linear_int8(x, pack, x_scale=bad)


def test_non_finite_rows_give_nan(kernel_path):
    x, weight, bias = operands(8, 40, 20)
    x[2, 5] = float("nan")
    x[5, 0] = float("inf")
    out = li8.linear_int8(x, li8.pack_int8(weight, bias), "gelu")
    assert out[[2, 5]].isnan().all()
    assert out[[0, 1, 3, 4, 6, 7]].isfinite().all()


def test_results_do_not_depend_on_threads(kernel_path):
    """Each output element is summed by one thread in one order: 1 and 2 threads agree bit for bit."""
    x, weight, bias = operands(50, 768, 2304, seed=5)
    pack = li8.pack_int8(weight, bias)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = li8.linear_int8(x, pack, "quick_gelu")
        torch.set_num_threads(2)
        two = li8.linear_int8(x, pack, "quick_gelu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bad_inputs_are_refused():
    x, weight, bias = operands(4, 16, 8)
    pack = li8.pack_int8(weight, bias)
    with pytest.raises(ValueError, match="expected"):
        li8.linear_int8(torch.randn(4, 15), pack)
    with pytest.raises(TypeError, match="fp32"):
        li8.linear_int8(x.double(), pack)
    with pytest.raises(ValueError, match="activation"):
        li8.linear_int8(x, pack, "relu6")
    with pytest.raises(ValueError, match="65536"):
        li8.pack_int8(torch.zeros(2, li8.MAX_K + 1))
    with pytest.raises(ValueError, match="bias"):
        li8.pack_int8(weight, bias[:3])
    with pytest.raises(TypeError):  # keyword-only: positional integers never become pointers
        _C.linear_int8(*range(12))
    with pytest.raises(ValueError, match="sizes"):
        _C.linear_int8(x=x.data_ptr(), sx=16, packed=pack.packed.data_ptr(), w_scale=pack.w_scale.data_ptr(),
                       colsum=pack.colsum.data_ptr(), bias=pack.bias.data_ptr(), y=x.data_ptr(), sy=8, M=4, N=8,
                       K=li8.MAX_K + 1, act=0)
