"""Fused LayerNorm (+ residual add) (kernels/layer_norm.py) vs eager PyTorch, on a GPU.

    pytest bench/bench_layer_norm.py --benchmark-group-by=group --benchmark-columns=median,rounds

Shapes: every tower's (tokens, width) at batch 256 (bench/gpu_model.py::workloads): ViT-B-32,
ViT-B-16, ViT-L-14, ViT-H-14, SigLIP SO400M-384 and CLIP text; fp16 and bf16; plain and with the
fused residual add (``y, s = layer_norm(h, ..., residual=x)``: s = x + h, y = LN(s)).

Peers: ``eager`` = ``F.layer_norm`` on the input dtype (torch keeps fp32 statistics inside), after
``x + r`` with a residual; ``ref`` = ``fastclip.ref.layer_norm`` (the ref backend: an fp32 round trip,
as OpenCLIP's LayerNormFp32). GB/s is reported on the fused minimum bytes (x [+ r] read, y [+ s]
written) for every impl (``gpu_bench.record``). Without a CUDA device the module skips at collection.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the Triton LayerNorm kernel needs a GPU "
                "(modelled numbers: docs/gpu.md, `python bench/gpu_report.py --markdown`)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

import gpu_bench as gb  # noqa: E402
import gpu_model as gm  # noqa: E402
from fastclip import ref  # noqa: E402
from fastclip.kernels.layer_norm import layer_norm  # noqa: E402

BATCH = 256
EPS = 1e-5


@pytest.mark.parametrize("dtype", gb.dtype_params())
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("w", gm.workloads(BATCH), ids=lambda w: w.label.replace(" ", "_").replace(",", ""))
def test_layer_norm(benchmark, w, residual, dtype):
    M, N = w.tokens, w.W
    benchmark.group = f"layer_norm {w.label}: {M} x {N}{' + residual' if residual else ''}"
    with gb.skip_if_oom(benchmark.group):
        x = torch.randn(M, N, device="cuda", dtype=dtype)
        r = torch.randn(M, N, device="cuda", dtype=dtype) if residual else None
        weight = 1 + 0.1 * torch.randn(N, device="cuda", dtype=dtype)
        bias = 0.1 * torch.randn(N, device="cuda", dtype=dtype)

        if residual:
            def ours():
                return layer_norm(x, weight, bias, EPS, residual=r)

            def eager():
                return F.layer_norm(x + r, (N,), weight, bias, EPS)

            def reference():
                return ref.layer_norm(x, weight, bias, EPS, residual=r)
        else:
            def ours():
                return layer_norm(x, weight, bias, EPS)

            def eager():
                return F.layer_norm(x, (N,), weight, bias, EPS)

            def reference():
                return ref.layer_norm(x, weight, bias, EPS)

        got = ours()
        y = got[0] if residual else got
        tol = gb.low_precision_atol(dtype)
        torch.testing.assert_close(y.float(), eager().float(), atol=tol, rtol=tol)
        del got, y

        op = gm.layer_norm(M, N, residual)
        gb.record(benchmark, ours, {"eager": eager, "ref": reference}, op.flops, op.bytes)
    for gpu in gm.GPUS:
        benchmark.extra_info[f"model_{gpu.name.split()[0]}_bound_us"] = round(op.time(gpu) * 1e6, 1)
        peer = gm.time_of(gm.layer_norm_eager(M, N, residual), gpu)
        benchmark.extra_info[f"model_{gpu.name.split()[0]}_speedup_vs_eager"] = round(peer / op.time(gpu), 2)
