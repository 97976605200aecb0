"""``precision="bf16"`` on the CPU: which CPUs run it, and the reason when one cannot.

A bf16 model keeps its weights in bf16 and runs its GEMMs through oneDNN (``cpu`` backend:
fastclip/backends/cpu/linear_bf16.py), which multiplies bf16 with fp32 accumulation; LayerNorm runs
torch's kernel with fp32 statistics, and attention runs the fp32 kernel on fp32 copies of q, k and v, rounding
its result to bf16 once (fastclip/backends/cpu/layer_norm.py, attention.py). oneDNN has real bf16 instructions only on CPUs
with AVX512-BF16 (Cooper Lake, Sapphire Rapids and newer Xeons, AMD Zen 4/5) or AMX-BF16; elsewhere it
would convert in software and run slower than fp32, so ``precision="bf16"`` is refused there with the
reason (fp32 or int8 are the fast precisions on those CPUs). ``FASTCLIP_DISABLE_AVX512=1`` makes an
AVX-512 machine behave as an AVX2-only one here too.
"""
from __future__ import annotations

import os

import torch

_SET = ("1", "true", "yes", "on")


def cpu_bf16_instructions() -> list[str]:
    """The bf16 instruction sets this CPU offers oneDNN ("avx512_bf16", "amx_bf16"), as torch detects them."""
    if os.environ.get("FASTCLIP_DISABLE_AVX512", "").strip().lower() in _SET:
        return []
    found = []
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        found.append("avx512_bf16")
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        found.append("amx_bf16")
    return found


def why_not_bf16(device: torch.device | str) -> str | None:
    """None if a bf16 model can run fast on ``device``, else the reason it cannot (CPUs only; GPUs pass)."""
    device = torch.device(device)
    if device.type != "cpu":
        return None
    if not torch.backends.mkldnn.is_available():
        return "precision='bf16' on the CPU needs a PyTorch build with oneDNN (mkldnn); this one has none"
    if not cpu_bf16_instructions() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        capability = torch.backends.cpu.get_cpu_capability()
        return (f"precision='bf16' on the CPU needs AVX512-BF16 or AMX-BF16 instructions, and this CPU has neither "
                f"(torch reports {capability}); without them bf16 is emulated and slower than fp32. "
                "Use precision='fp32' or 'int8' on this CPU")
    return None


def check_bf16(device: torch.device | str, backend: str | None = None) -> None:
    """Raise ValueError naming the reason if a bf16 model cannot run on ``device``. An explicit
    ``backend="triton"`` is not judged by the CPU: on CPU tensors its kernels run only under Triton's
    interpreter (tests, ``bench/gpu_check.py --smoke``), which computes bf16 whatever the CPU has."""
    if backend is not None and backend.strip().lower() == "triton":
        return
    reason = why_not_bf16(device)
    if reason is not None:
        raise ValueError(reason)
