"""Fused tower head (kernels/normalize_project.py) vs eager PyTorch, on a GPU.

    pytest bench/bench_normalize_project.py --benchmark-group-by=group --benchmark-columns=median,rounds

The head of every class-token / end-of-text tower (bench/gpu_model.py::workloads; SigLIP's attention
pooling has no such head): gather the pooled token of (B, L, W) token states, LayerNorm,
``@ proj`` (W, E), L2-normalise; B = 256 and 4096 (where the kernel switches to 32/64-row tiles), fp16
and bf16. Image towers pool the class token through the strided view ``x[:, 0]``, text towers the
end-of-text position through ``index=``, exactly as fastclip/models/transformer.py calls the op.

Peers: ``eager`` = ``F.normalize(F.layer_norm(pooled) @ proj)`` in the input dtype (text: pooled =
``x[arange(B), index]``); ``ref`` = ``fastclip.ref.normalize_project`` (the ref backend, an fp32
LayerNorm round trip). At these sizes every implementation is launch-bound (the modelled GPU work is
1-4 µs; docs/gpu.md), so each impl is also timed inside a CUDA graph (``<impl>_graph_ms``,
``graph_speedup_vs_<peer>``: GPU time without host launch cost); ``<impl>_ms`` (plain do_bench)
includes the host dispatch cost whenever it exceeds the GPU time, which is what eager callers pay.
Without a CUDA device the module skips at collection.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the Triton normalize_project kernel needs a GPU "
                "(modelled numbers: docs/gpu.md, `python bench/gpu_report.py --markdown`)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

import gpu_bench as gb  # noqa: E402
import gpu_model as gm  # noqa: E402
from fastclip import ref  # noqa: E402
from fastclip.kernels.normalize_project import normalize_project  # noqa: E402

EPS = 1e-5
CASES = [w for batch in (256, 4096) for w in gm.workloads(batch) if w.E is not None]


@pytest.mark.parametrize("dtype", gb.dtype_params())
@pytest.mark.parametrize("w", CASES, ids=[f"{w.label.replace(' ', '_').replace(',', '')}-B{w.B}" for w in CASES])
def test_normalize_project(benchmark, w, dtype):
    B, L, W, E = w.B, w.L, w.W, w.E
    benchmark.group = f"normalize_project {w.label}: B={B} W={W} -> E={E}"
    with gb.skip_if_oom(benchmark.group):
        tokens = torch.randn(B, L, W, device="cuda", dtype=dtype)
        ln_w = 1 + 0.1 * torch.randn(W, device="cuda", dtype=dtype)
        ln_b = 0.1 * torch.randn(W, device="cuda", dtype=dtype)
        proj = torch.randn(W, E, device="cuda", dtype=dtype) * W ** -0.5
        if w.tower == "text":
            index = torch.randint(1, L, (B,), device="cuda")
            rows = torch.arange(B, device="cuda")

            def ours():
                return normalize_project(tokens, ln_w, ln_b, EPS, proj, None, True, index=index)

            def eager():
                return F.normalize(F.layer_norm(tokens[rows, index], (W,), ln_w, ln_b, EPS) @ proj, dim=-1)

            def reference():
                return ref.normalize_project(tokens, ln_w, ln_b, EPS, proj, None, True, index=index)
        else:
            pooled = tokens[:, 0]  # (B, W) strided view: the class token

            def ours():
                return normalize_project(pooled, ln_w, ln_b, EPS, proj, None, True)

            def eager():
                return F.normalize(F.layer_norm(pooled, (W,), ln_w, ln_b, EPS) @ proj, dim=-1)

            def reference():
                return ref.normalize_project(pooled, ln_w, ln_b, EPS, proj, None, True)

        tol = gb.low_precision_atol(dtype) / 4  # unit-norm rows: entries are ~1/sqrt(E)
        torch.testing.assert_close(ours().float(), reference().float(), atol=tol, rtol=0)
        op = gm.normalize_project(B, W, E, normalize=True)
        gb.record(benchmark, ours, {"eager": eager, "ref": reference}, op.flops, op.bytes, graph=True)
    for gpu in gm.GPUS:
        benchmark.extra_info[f"model_{gpu.name.split()[0]}_bound_us"] = round(op.time(gpu) * 1e6, 2)
