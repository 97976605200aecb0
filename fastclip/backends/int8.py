"""``precision="int8"``: int8 weights and activations on the CPU, int32 accumulation.

Scheme (per linear layer y = x @ W.T + b):

- weights: symmetric int8 per output channel, ``W[n] ~ scale[n] * Wq[n]`` with ``scale[n] = max|W[n]| / 127``,
  quantised once and pre-packed for the int8 GEMM (``quantize_model``); the fp32 master weights stay in
  the model, so ``state_dict`` is unchanged. Which weights: those each module declares in its
  ``int8_linears()`` (``Int8Linears``); a matrix no module declares, as int8 or as exempt, is an error;
- activations: asymmetric uint8 with one scale / zero point per call, from the tensor's min and max
  (dynamic quantisation, nothing to calibrate);
- the GEMM: PyTorch's ``quantized::linear_dynamic`` (fbgemm / oneDNN, VNNI where the CPU has it),
  int32 accumulation, dequantised with the bias into fp32.

Only ``linear`` changes: layer norm, attention, bias + activation and the pooled-row projections run
the fp32 ops of the model's backend (``cpu``, the C++ kernels, or ``ref``). The int8 table looks the packed weight up by
the fp32 weight tensor it is called with (or a row view of one that was packed); a weight that is not
packed runs the fp32 op. A packed weight whose fp32 master changed in place is
re-quantised on its next use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from .dispatch import OpTable, compose_linear_act
from .weight_packs import DerivedWeights

# fbgemm's int8 kernel without VNNI sums pairs of u8*s8 products in int16, which can saturate; 7-bit
# activations (reduce_range) avoid it. With VNNI (vpdpbusd) the sums are int32 and all 8 bits are used.
REDUCE_RANGE = not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported())
# The quantized engine the weights are packed for (fbgemm measured fastest inside ViT-B-32 here); a
# packed weight carries its engine, so torch's global engine setting does not matter at run time.
ENGINE = next((e for e in ("fbgemm", "x86", "onednn") if e in torch.backends.quantized.supported_engines), None)


def why_not_int8(device: torch.device | str, backend: str | None) -> str | None:
    """None if an int8 model can run on ``device`` with ``backend`` (None: ``FASTCLIP_BACKEND``, as the
    op table resolves it), else the reason it cannot."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"int8 precision runs on the CPU only, not on {device.type!r} (use fp16 or bf16 on GPUs)"
    backend = backend or os.environ.get("FASTCLIP_BACKEND", "")
    if backend.strip().lower() == "triton":
        return "int8 precision runs with the cpu or ref backend, not triton (the Triton kernels are GPU kernels)"
    if ENGINE is None:
        return ("this PyTorch build has no x86 int8 GEMM engine (fbgemm, x86 or onednn; it has "
                f"{torch.backends.quantized.supported_engines})")
    return None


def check_int8(device: torch.device | str, backend: str | None) -> None:
    """Raise ValueError naming the reason if an int8 model cannot run on ``device`` with ``backend``."""
    reason = why_not_int8(device, backend)
    if reason is not None:
        raise ValueError(reason)


@contextlib.contextmanager
def _engine(name: str):
    """Pack for ``name`` without leaving torch's global quantized engine changed."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@torch.no_grad()
def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """A (N, K) fp32 weight (and its (N,) bias) as a pre-packed per-channel int8 GEMM operand."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()  # (N,)
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the quantized-tensor deprecation notice
        wq = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
    b = None if bias is None else bias.detach().float().contiguous()
    with _engine(ENGINE):
        return torch.ops.quantized.linear_prepack(wq, b)


class Int8Weights:
    """The packed int8 copies of a model's linear weights, in the cache every derived weight uses
    (fastclip/backends/weight_packs.py): keyed by where a weight and its bias live, so views of a packed
    layer's rows -- the q and kv halves of ``in_proj_weight`` that trimmed last blocks and attention pooling
    split off on every call -- find their pack too, and a weight changed in place is re-quantised on its
    next use. Only the (weight, bias) pairs added here are int8; any other linear runs the fp32 op.
    """

    def __init__(self):
        self._packs = DerivedWeights(pack_linear)
        self.nbytes = 0  # int8 weights + fp32 biases held by the packs (besides the fp32 masters)

    def add(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._packs.add(weight, bias)
        self.nbytes += weight.numel() + (0 if bias is None else 4 * bias.numel())

    def __len__(self) -> int:
        return len(self._packs)

    def lookup(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject | None:
        """The pack of ``weight`` with this ``bias`` (re-quantised if either changed), or None."""
        return self._packs.get(weight, bias, create=False)


class Int8Linears(Protocol):
    """A module whose linear layers run in int8 under ``precision="int8"``.

    ``int8_linears()`` yields each (weight (N, K), bias (N,) or None) exactly as the module passes them to
    ``ops.linear`` (row views included); ``int8_exempt`` names (dotted, relative to the module) the
    matrices it holds that are not linear layers or stay fp32 on purpose (embeddings, the patch
    embedding, projections of the pooled rows).
    """

    int8_exempt: tuple[str, ...]

    def int8_linears(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]: ...


def _matrix_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters() if p.ndim >= 2}


def int8_linears(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every (weight, bias) the modules of ``model`` declare as int8 linear layers (see Int8Linears).

    Raises ValueError naming any matrix parameter that no module declares either as an int8 linear or as
    exempt, so a new block cannot silently stay fp32 under ``precision="int8"``.
    """
    pairs, covered = [], set()
    for module in model.modules():
        for name in getattr(module, "int8_exempt", ()):
            holder, _, leaf = name.rpartition(".")
            if getattr(module.get_submodule(holder), leaf) is not None:  # an optional parameter may be None
                covered.add(id(module.get_parameter(name)))
        if hasattr(module, "int8_linears"):
            for weight, bias in module.int8_linears():
                pairs.append((weight, bias))
                covered.add(id(weight if weight._base is None else weight._base))
    missing = [name for key, name in _matrix_names(model).items() if key not in covered]
    if missing:
        raise ValueError(
            f"precision='int8': the parameters {', '.join(missing)} are neither int8 linear layers nor exempt; "
            "the module that owns them must list them in int8_linears() or int8_exempt "
            "(fastclip/backends/int8.py, Int8Linears)")
    return pairs


def quantize_model(model: nn.Module) -> Int8Weights:
    """Pack every linear layer the modules of ``model`` (fp32, on the CPU) declare as int8 (see
    Int8Linears); returns the packs.

    The parameters are frozen (``requires_grad=False``): int8 layers have no backward.
    """
    for p in model.parameters():
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ValueError(f"int8 quantisation needs fp32 CPU weights, got {p.dtype} on {p.device}")
    pairs = int8_linears(model)
    model.requires_grad_(False)
    weights = Int8Weights()
    for weight, bias in pairs:
        weights.add(weight, bias)
    return weights


def int8_ops(base: OpTable, weights: Int8Weights) -> OpTable:
    """``base`` with its ``linear`` replaced by the int8 GEMM for every weight in ``weights``."""
    fp32_linear = base.linear

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, upcast: bool = False):
        """y = x @ weight.T + bias.  x: (..., K) fp32, weight: (N, K), bias: (N,) -> (..., N) fp32."""
        if upcast or x.dtype != torch.float32 or x.numel() == 0:
            return fp32_linear(x, weight, bias, upcast=upcast)
        if x.device.type != "cpu":
            raise ValueError(f"int8 models run on the CPU, got an input on {x.device}")
        pack = weights.lookup(weight, bias)
        if pack is None:
            return fp32_linear(x, weight, bias)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("int8 linear layers have no backward; run the model under torch.no_grad() "
                               "or torch.inference_mode(), or use precision='fp32' to train")
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]}")
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.quantized.linear_dynamic(x2 if x2.is_contiguous() else x2.contiguous(), pack,
                                               REDUCE_RANGE)
        return y.view(*x.shape[:-1], weight.shape[0])

    return dataclasses.replace(base, linear=linear, linear_act=compose_linear_act(linear, base.bias_act))
