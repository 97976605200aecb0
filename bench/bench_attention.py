"""Fused attention (kernels/attention.py) vs torch SDPA (flash and memory-efficient backends), on a GPU.

    pytest bench/bench_attention.py --benchmark-group-by=group --benchmark-columns=median,rounds

Shapes: each tower's self-attention at batch 256 (bench/gpu_model.py::workloads, read from the model
configs): ViT-B-32 (L=50), ViT-B-16 (197), ViT-L-14 (257, H=16), ViT-H-14 (Dh=80), SigLIP SO400M at
384 px (L=729, H=16, Dh=72) and CLIP text (77, causal); fp16 and bf16. q/k/v are strided views of
one packed (B, L, 3, H, Dh) tensor, as the model's qkv projection produces them, for every impl.

Numbers of record (``extra_info``, see ``gpu_bench.record``): do_bench medians per implementation
(``fastclip_ms``, ``sdpa_flash_ms``, ``sdpa_efficient_ms``), TFLOP/s on the useful FLOPs
``4·B·H·L²·Dh`` (half the scores when causal) and GB/s on the minimum bytes (q, k, v read once, o
written once), ``speedup_vs_<peer>``, and the autotuned config. Compare them with the model in
docs/gpu.md. Without a CUDA device the module skips at collection.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the Triton attention kernel and SDPA's flash backend need a GPU "
                "(modelled numbers: docs/gpu.md, `python bench/gpu_report.py --markdown`)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import gpu_bench as gb  # noqa: E402
import gpu_model as gm  # noqa: E402
from fastclip import ref  # noqa: E402
from fastclip.kernels import attention as attn_kernel  # noqa: E402

BATCH = 256
PEERS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def _sdpa(q, k, v, causal, backend):
    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


@pytest.mark.parametrize("dtype", gb.dtype_params())
@pytest.mark.parametrize("w", gm.workloads(BATCH), ids=lambda w: w.label.replace(" ", "_").replace(",", ""))
def test_attention(benchmark, w, dtype):
    benchmark.group = f"attention {w.label}: B={w.B} L={w.L} H={w.H} Dh={w.Dh}{' causal' if w.causal else ''}"
    with gb.skip_if_oom(benchmark.group):
        qkv = torch.randn(w.B, w.L, 3, w.H, w.Dh, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, Dh) strided views, as in MultiheadAttention.self_attention

        def ours():
            return attn_kernel.attention(q, k, v, causal=w.causal)

        out = ours()  # autotunes once for this shape
        n = 4  # output check on a few sequences against the fp32 reference (numerics proper: tests/kernels)
        expected = ref.attention(q[:n], k[:n], v[:n], causal=w.causal, upcast=True).float()
        torch.testing.assert_close(out[:n].float(), expected, atol=gb.low_precision_atol(dtype), rtol=0)
        del out, expected

        op = gm.attention(w.B, w.H, w.L, w.Dh, w.causal)
        peers = {name: _sdpa(q, k, v, w.causal, backend) for name, backend in PEERS.items()}
        gb.record(benchmark, ours, peers, op.flops, op.bytes)
    best = getattr(attn_kernel._attn_fwd_tuned, "best_config", None)
    if best is not None:
        benchmark.extra_info["config"] = str(best)
    benchmark.extra_info["model_tile"] = "x".join(map(str, gm.attention_tile(w.L, w.L, w.Dh, w.causal)))
    for gpu in gm.GPUS:
        benchmark.extra_info[f"model_{gpu.name.split()[0]}_bound_us"] = round(op.time(gpu) * 1e6, 1)
