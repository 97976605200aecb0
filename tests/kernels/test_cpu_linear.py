"""``linear`` / ``linear_act`` of the cpu backend (fastclip/backends/cpu/linear.py): the packed-panel kernel of
csrc/linear.cpp on both its paths -- AVX-512 (32-column panels) where the CPU has it, AVX2 + FMA (16-column
panels) on every CPU the extension runs on, the ``path`` fixture selecting one with ``_C.set_avx512`` -- and MKL's
packed GEMM or oneDNN's above each path's row limit, under the fp32 rule of fastclip/tolerance.py: against the reference ops
run in float64 on the same inputs, at most FP32_ERROR_FACTOR x the fp32 reference's own error.

Awkward shapes: rows 1..13 around the tiles (12 rows on AVX-512, 6 on AVX2), 24..128, and 300 / 400 (several
row blocks; the row limits are lifted for these); columns around both panel widths (1, 7, 8, 9, 15, 16, 17, 31,
32, 33, 2309); depths around the 256-deep k chunk (1, 7, 255, 256, 257, 513, 3072); strided inputs; every
activation code of the extension. Then the layout of a cached pack when the path changes, and the pack cache:
row views find their pack, in-place changes repack, freed weights drop theirs, inference tensors are never packed.
"""
from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys

import pytest
import torch

if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("fastclip._C is built on Linux x86-64 only", allow_module_level=True)

from fastclip import _C, ref, tolerance  # noqa: E402
from fastclip.backends.cpu import linear as cpu_linear  # noqa: E402  (an ImportError here: rebuild with `pip install -e .`)

ACTS = tuple(_C.activation_codes())  # every code the kernel's epilogue implements
CPU_HAS_AVX512F = "avx512f" in open("/proc/cpuinfo").read().split()
AVX512_DISABLED = os.environ.get("FASTCLIP_DISABLE_AVX512", "") not in ("", "0")
PANELS = {"avx512": 32, "avx2": 16}  # path -> its panel width (_C.linear_panel_width())


@pytest.fixture(autouse=True)
def _fresh_packs(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_KERNEL", cpu_linear.KERNEL_AVAILABLE)
    monkeypatch.setattr(cpu_linear, "_MKL_PACK", cpu_linear.MKL_PACK_AVAILABLE)
    monkeypatch.setattr(cpu_linear, "_PACKING", True)
    cpu_linear.clear_packed_weights()
    with torch.no_grad():
        yield
    cpu_linear.clear_packed_weights()


@pytest.fixture(params=list(PANELS))
def path(request):
    """Runs the test on one path of the kernel; yields its panel width. AVX-512 is skipped only where this
    process cannot run it (no AVX-512F, or FASTCLIP_DISABLE_AVX512 set); AVX2 runs wherever the extension does."""
    if request.param == "avx512" and not _C.avx512_present():
        pytest.skip("this CPU lacks AVX-512F" if not CPU_HAS_AVX512F else "FASTCLIP_DISABLE_AVX512 is set")
    _C.set_avx512(request.param == "avx512")
    try:
        assert _C.linear_panel_width() == PANELS[request.param]
        yield PANELS[request.param]
    finally:
        _C.set_avx512(True)


@pytest.fixture
def unlimited_rows(monkeypatch):
    """The kernel takes any number of rows (no MKL above the row limits), to test it beyond them."""
    for panel in PANELS.values():
        monkeypatch.setitem(cpu_linear.KERNEL_MAX_ROWS, panel, 1 << 30)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def operands(M: int, K: int, N: int, seed: int = 0):
    x = torch.randn(M, K, generator=gen(seed))
    weight = torch.randn(N, K, generator=gen(seed + 1)) / K ** 0.5
    bias = torch.randn(N, generator=gen(seed + 2))
    return x, weight, bias


def check(got, x, weight, bias, act="none"):
    """The fp32 rule for ``got`` = act(x @ W^T + b): the reference ops run in float64 and in fp32."""
    wide = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = ref.linear_act(wide(x), wide(weight), wide(bias), act)
    what = f"linear_act {act} x{tuple(x.shape)} W{tuple(weight.shape)} bias={bias is not None}"
    tolerance.check_fp32(got, ref64, ref.linear_act(x, weight, bias, act), what)


def assert_kernel_ran(panel: int, packs: int = 1):
    """The kernel ran (``packs`` packs, each in the layout of ``panel``), not MKL."""
    assert len(cpu_linear._KERNEL_PACKS) == packs and len(cpu_linear._MKL_PACKS) == 0
    assert all(entry[1].pack[0] == panel for entry in cpu_linear._KERNEL_PACKS._entries.values())


def test_kernel_runs_on_every_avx2_cpu():
    """The kernel runs wherever the extension does (AVX2 + FMA), on its AVX-512 path exactly where the CPU
    has AVX-512F and FASTCLIP_DISABLE_AVX512 is unset (a build that lost a path fails here, not silently);
    test_cpu_ops.py checks _C.avx512_present() against /proc/cpuinfo."""
    assert cpu_linear.KERNEL_AVAILABLE and _C.linear_supported() and _C.cpu_supported()
    assert _C.avx512_present() == (CPU_HAS_AVX512F and not AVX512_DISABLED)
    assert _C.linear_panel_width() == (32 if _C.avx512_present() else 16)
    assert set(cpu_linear.KERNEL_MAX_ROWS) == set(PANELS.values())


SHAPES = [  # (M, K, N)
    (1, 1, 1), (1, 7, 15), (2, 255, 16), (3, 256, 17), (5, 513, 8), (6, 64, 9), (7, 33, 7), (11, 257, 31),
    (12, 64, 32), (13, 100, 33), (24, 768, 2309), (25, 3072, 40), (50, 768, 2304), (50, 3072, 768),
    (97, 512, 65), (128, 384, 96), (300, 257, 50), (400, 768, 40),
]


@pytest.mark.usefixtures("unlimited_rows")
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
def test_kernel_linear(path, M, K, N):
    x, weight, bias = operands(M, K, N)
    check(cpu_linear.linear(x, weight, bias), x, weight, bias)
    check(cpu_linear.linear(x, weight), x, weight, None)
    assert_kernel_ran(path)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("M,K,N", [(1, 33, 47), (7, 300, 23), (50, 768, 3072), (13, 3072, 768)])
def test_kernel_linear_act(path, M, K, N, act):
    """The fused epilogue: bias and activation, against ref.linear_act (linear, then bias_act)."""
    x, weight, bias = operands(M, K, N, seed=3)
    check(cpu_linear.linear_act(x, weight, bias, act), x, weight, bias, act)
    check(cpu_linear.linear_act(x, weight, None, act), x, weight, None, act)
    assert_kernel_ran(path)


def test_kernel_strided_and_batched_inputs(path):
    """x as (B, L, K), as rows of a wider tensor, with a non-unit inner stride and broadcast; a transposed weight."""
    x, weight, bias = operands(60, 96, 70)
    wide = torch.randn(60, 200, generator=gen(9))
    wide[:, 13:109] = x
    xs = wide[:, 13:109]  # row stride 200
    check(cpu_linear.linear(xs, weight, bias), x, weight, bias)
    x3 = x.view(3, 20, 96)
    check(cpu_linear.linear(x3, weight, bias), x3, weight, bias)
    xt = x.t().contiguous().t()  # inner stride 60
    check(cpu_linear.linear(xt, weight, bias), x, weight, bias)
    row = x[:1].expand(7, 96)  # one row broadcast (row stride 0), as SigLIP's pooling probe is
    check(cpu_linear.linear(row, weight, bias), row, weight, bias)
    wt = weight.t().contiguous().t()  # a non-contiguous weight is packed from a copy
    check(cpu_linear.linear(x, wt, bias), x, weight, bias)
    assert_kernel_ran(path, packs=2)


def test_kernel_results_do_not_depend_on_threads(path):
    """Each output element is summed by one thread in one order: 1 and 2 threads agree bit for bit."""
    x, weight, bias = operands(50, 768, 2304, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_linear.linear_act(x, weight, bias, "gelu")
        torch.set_num_threads(2)
        two = cpu_linear.linear_act(x, weight, bias, "gelu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_switching_paths_on_one_cached_weight():
    """The cached pack of a weight has the layout of the path that made it: after set_avx512 flips, the next
    call repacks for the path that runs now (never reading the other layout), in place of the old pack. Both
    paths sum each output in the same order (one FMA chain over k), so they agree bit for bit."""
    x, weight, bias = operands(9, 300, 50, seed=7)
    results = {}
    try:
        for on in (True, False, True, False):
            _C.set_avx512(on)
            panel = _C.linear_panel_width()
            y = cpu_linear.linear_act(x, weight, bias, "quick_gelu")
            check(y, x, weight, bias, "quick_gelu")
            check(cpu_linear.linear(x[:1], weight), x[:1], weight, None)
            assert_kernel_ran(panel)
            results.setdefault(panel, y)
    finally:
        _C.set_avx512(True)
    assert len(results) == (2 if _C.avx512_present() else 1)
    assert all(torch.equal(y, results[16]) for y in results.values())


def test_a_pack_runs_only_on_its_own_path():
    """_C refuses a panel width that is not the running path's (a stale pack) and unknown widths."""
    x, weight, _ = operands(4, 40, 20)
    y = torch.empty(4, 20)
    ops = dict(x=x.data_ptr(), sx=40, bias=0, y=y.data_ptr(), sy=20, M=4, N=20, K=40, act=0)
    other = 16 if _C.linear_panel_width() == 32 else 32
    packed = torch.zeros(_C.linear_packed_size(N=20, K=40, panel=32))
    with pytest.raises(RuntimeError, match="path"):
        _C.linear(packed=packed.data_ptr(), panel=other, **ops)
    with pytest.raises(RuntimeError, match="path"):
        _C.linear_pack(w=weight.data_ptr(), ldw=40, N=20, K=40, panel=other, out=packed.data_ptr())
    with pytest.raises(ValueError, match="panel"):
        _C.linear(packed=packed.data_ptr(), panel=8, **ops)
    with pytest.raises(ValueError, match="panel"):
        _C.linear_packed_size(N=20, K=40, panel=24)
    assert _C.linear_packed_size(N=20, K=40, panel=16) == 32 * 40 == _C.linear_packed_size(N=20, K=40, panel=32)


def _large_gemms() -> list:
    """Both large-M GEMMs; one this torch lacks is skipped with the reason."""
    params = []
    for name in cpu_linear.LARGE_GEMMS:
        try:
            cpu_linear.choose_large_gemm(name)
            params.append(name)
        except ValueError as exc:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=str(exc))))
    return params


@pytest.mark.parametrize("large_gemm", _large_gemms())
@pytest.mark.parametrize("case", ["above the kernel's rows", "kernel off"])
def test_large_gemm_path(path, case, large_gemm, monkeypatch):
    """Above the running path's KERNEL_MAX_ROWS rows, or with the kernel off: the large-M GEMM -- MKL, packed
    on the second call with the same M, or oneDNN, packed once for any M; linear_act adds bias_act."""
    monkeypatch.setattr(cpu_linear, "LARGE_GEMM", large_gemm)
    M = cpu_linear.KERNEL_MAX_ROWS[path] + 1
    if case == "kernel off":
        monkeypatch.setattr(cpu_linear, "_KERNEL", False)
        M = 50
    x, weight, bias = operands(M, 80, 96)
    for act in ("none", "quick_gelu", "quick_gelu"):  # F.linear, then pack, then packed
        check(cpu_linear.linear_act(x, weight, bias, act), x, weight, bias, act)
    assert len(cpu_linear._KERNEL_PACKS) == 0
    if large_gemm == "onednn":
        assert len(cpu_linear._MKL_PACKS) == 0 and cpu_linear.onednn.PACKS.get(weight, create=False) is not None
    elif cpu_linear.MKL_PACK_AVAILABLE:
        assert cpu_linear._MKL_PACKS.get(weight).m == M and len(cpu_linear.onednn.PACKS) == 0
    check(cpu_linear.linear(x[:M - 1], weight), x[:M - 1], weight, None)


def test_large_gemm_choice(monkeypatch):
    """oneDNN on CPUs not made by Intel, MKL on Intel's (where MKL runs its own fast code); a bad name is refused."""
    default = cpu_linear.choose_large_gemm(None)  # this CPU's (before the vendor is faked below)
    for vendor, want in (("GenuineIntel", "mkl"), ("AuthenticAMD", "onednn"), ("", "mkl")):
        monkeypatch.setattr(cpu_linear, "_cpu_vendor", lambda vendor=vendor: vendor)
        assert cpu_linear.choose_large_gemm(None) == (want if cpu_linear.onednn.AVAILABLE else "mkl")
    assert cpu_linear.choose_large_gemm(" MKL ") == "mkl"
    with pytest.raises(ValueError, match="FASTCLIP_LARGE_GEMM='blas'"):
        cpu_linear.choose_large_gemm("blas")
    probe = "from fastclip.backends.cpu import linear as cpu_linear; print(cpu_linear.LARGE_GEMM)"
    for setting, want in (("mkl", "mkl"), ("blas", default)):
        env = {**os.environ, "FASTCLIP_LARGE_GEMM": setting}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [want]
        assert ("FASTCLIP_LARGE_GEMM='blas'" in out.stderr) == (setting == "blas")  # a bad value warns


def test_packs_follow_the_weight():
    """Row views find their pack; an in-place change, new storage or a freed weight never leaves a stale
    pack in use; inference tensors are never packed."""
    in_proj = torch.randn(96, 32, generator=gen(0))
    bias = torch.randn(96, generator=gen(1))
    x = torch.randn(5, 32, generator=gen(2))
    for _ in range(3):  # fresh view objects on every call, as pooled attention cuts them
        wq, wkv = in_proj.split([32, 64])
        bq, bkv = bias.split([32, 64])
        check(cpu_linear.linear(x, wq, bq), x, wq, bq)
        check(cpu_linear.linear(x, wkv, bkv), x, wkv, bkv)
    assert len(cpu_linear._KERNEL_PACKS) == 2
    in_proj.mul_(-2.0)  # in place: the version counter moves
    wq = in_proj[:32]
    check(cpu_linear.linear(x, wq, bq), x, wq, bq)
    in_proj.data = torch.randn(96, 32, generator=gen(3))  # new storage
    check(cpu_linear.linear(x, in_proj, bias), x, in_proj, bias)
    count = len(cpu_linear._KERNEL_PACKS)
    del in_proj, wq, wkv
    gc.collect()
    assert len(cpu_linear._KERNEL_PACKS) < count  # the freed weight's packs are gone
    with torch.inference_mode():
        w_inf = torch.randn(40, 32)
        for _ in range(3):
            check(cpu_linear.linear(x, w_inf), x, w_inf, None)
    assert all(watch[0]() is not w_inf for watches, _ in cpu_linear._KERNEL_PACKS._entries.values()
               for watch in watches)


def test_what_the_kernels_do_not_take_runs_the_reference():
    """Autograd, other dtypes and empty inputs run the reference op; bad shapes raise its error."""
    x, weight, bias = operands(4, 16, 8)
    with torch.enable_grad():
        xg = x.clone().requires_grad_()
        y = cpu_linear.linear_act(xg, weight, bias, "gelu")
        y.sum().backward()
        assert xg.grad is not None and xg.grad.shape == x.shape
    half = cpu_linear.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, ref.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16()))
    assert cpu_linear.linear(x[:0], weight, bias).shape == (0, 8)
    with pytest.raises(RuntimeError):
        cpu_linear.linear(torch.randn(4, 15), weight, bias)
    with pytest.raises(ValueError, match="activation"):
        cpu_linear.linear_act(x, weight, bias, "relu6")


def test_packing_off_runs_the_reference(monkeypatch):
    """FASTCLIP_MKL_PACK=0 turns every packed path off: no packs, F.linear (the reference's, bit for bit),
    and for linear_act the C++ bias_act after it."""
    probe = "from fastclip.backends.cpu import linear as cpu_linear; print(cpu_linear._PACKING, cpu_linear._KERNEL, cpu_linear._MKL_PACK)"
    env = {**os.environ, "FASTCLIP_MKL_PACK": "0"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]
    monkeypatch.setattr(cpu_linear, "_KERNEL", False)
    monkeypatch.setattr(cpu_linear, "_MKL_PACK", False)
    monkeypatch.setattr(cpu_linear, "_PACKING", False)
    for rows in (50, 300):
        x, weight, bias = operands(rows, 64, 96)
        for _ in range(2):
            assert torch.equal(cpu_linear.linear(x, weight, bias), ref.linear(x, weight, bias))
            check(cpu_linear.linear_act(x, weight, bias, "gelu"), x, weight, bias, "gelu")
    assert len(cpu_linear._KERNEL_PACKS) == 0 and len(cpu_linear._MKL_PACKS) == 0 and len(cpu_linear.onednn.PACKS) == 0
