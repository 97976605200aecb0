"""Fused bias + activation (kernels/bias_act.py) vs eager PyTorch, on a GPU.

    pytest bench/bench_bias_act.py --benchmark-group-by=group --benchmark-columns=median,rounds

Shapes: every tower's MLP hidden activation (tokens, mlp_width) at batch 256
(bench/gpu_model.py::workloads); the activation of the tower's config (gelu for OpenCLIP, gelu_tanh
for SigLIP) and quick_gelu (OpenAI checkpoints); fp16 and bf16.

Peer: ``eager`` = ``fastclip.ref.bias_act`` = ``act(x + bias)`` in eager PyTorch (``F.gelu`` /
``F.gelu(approximate="tanh")``, or ``x * torch.sigmoid(1.702 * x)`` as OpenAI CLIP and OpenCLIP's
QuickGELU write it), which is what the ref backend runs. GB/s is on the fused minimum bytes (x read,
y written once; ``gpu_bench.record``). Without a CUDA device the module skips at collection.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the Triton bias+activation kernel needs a GPU "
                "(modelled numbers: docs/gpu.md, `python bench/gpu_report.py --markdown`)", allow_module_level=True)

import gpu_bench as gb  # noqa: E402
import gpu_model as gm  # noqa: E402
from fastclip import ref  # noqa: E402
from fastclip.kernels.bias_act import bias_act  # noqa: E402

BATCH = 256
CASES = [(w, act) for w in gm.workloads(BATCH) for act in dict.fromkeys((w.act, "quick_gelu"))]


@pytest.mark.parametrize("dtype", gb.dtype_params())
@pytest.mark.parametrize("w, act", CASES, ids=[f"{w.label.replace(' ', '_').replace(',', '')}-{a}" for w, a in CASES])
def test_bias_act(benchmark, w, act, dtype):
    M, N = w.tokens, w.Mw
    benchmark.group = f"bias_act {w.label}: {M} x {N} {act}"
    with gb.skip_if_oom(benchmark.group):
        x = torch.randn(M, N, device="cuda", dtype=dtype)
        bias = 0.1 * torch.randn(N, device="cuda", dtype=dtype)

        def ours():
            return bias_act(x, bias, act)

        def eager():
            return ref.bias_act(x, bias, act)

        tol = gb.low_precision_atol(dtype)
        torch.testing.assert_close(ours().float(), eager().float(), atol=tol, rtol=tol)
        op = gm.bias_act(M, N, act)
        gb.record(benchmark, ours, {"eager": eager}, op.flops, op.bytes)
    for gpu in gm.GPUS:
        short = gpu.name.split()[0]
        benchmark.extra_info[f"model_{short}_bound_us"] = round(op.time(gpu) * 1e6, 1)
        benchmark.extra_info[f"model_{short}_bound"] = op.bound(gpu)
        peer = gm.time_of(gm.bias_act_eager(M, N, act), gpu)
        benchmark.extra_info[f"model_{short}_speedup_vs_eager"] = round(peer / op.time(gpu), 2)
