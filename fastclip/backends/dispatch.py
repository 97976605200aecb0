"""The op table: the only way model code reaches a compute op, and backend resolution.

Backends: ``ref`` (fastclip/ref.py, any device), ``cpu`` (the C++ kernels of ``fastclip._C``, CPU
tensors; ``cpp`` is accepted as an alias) and ``triton`` (CUDA). A backend is resolved once, when a
model is created: explicit argument > ``FASTCLIP_BACKEND`` environment variable > device default
(CUDA -> ``triton``; CPU -> ``cpu`` if ``fastclip._C`` loads, else ``ref``).
An explicitly requested backend that cannot run raises BackendUnavailableError naming the reason; only
``auto`` falls back. On a CPU without the C++ extension that fallback warns once per process.
For tests, the triton backend also runs on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter); ``auto`` never picks it on a CPU.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from .. import ref
from ..errors import BackendUnavailableError

BACKENDS = ("ref", "cpu", "triton")
ALIASES = {"cpp": "cpu"}  # older name of the C++ CPU backend
_EXPECTED = "'auto', 'ref', 'cpu' (alias 'cpp'), 'triton'"
_fallback_warned = False  # the auto -> ref fallback on a CPU warns once per process


class EncoderBlockWeights(NamedTuple):
    """The parameters of one pre-norm transformer block, as ``OpTable.encoder_block`` takes them: LayerNorms
    as (gain (W,), bias (W,), eps), linear layers as (weight (N, K), bias (N,)); ``in_proj`` (3W, W) holds q, k
    and v; ``fc`` (mlp, W) is followed by ``act``; ``heads`` divides W."""

    ln_1: tuple
    in_proj: tuple
    out_proj: tuple
    ln_2: tuple
    fc: tuple
    proj: tuple
    act: str
    heads: int


@dataclass(frozen=True)
class OpTable:
    """One backend's implementation of every op (signatures as in fastclip/ref.py). The fields are the op
    names (``OP_NAMES``): adding an op is adding a field here and its function to fastclip/ref.py."""

    backend: str
    linear: Callable
    linear_act: Callable
    bias_act: Callable
    layer_norm: Callable
    attention: Callable
    normalize_project: Callable
    l2_normalize: Callable
    rotary: Callable
    resample_positions: Callable
    conv2d_act: Callable
    # A fused op a table may have (None where it has none; not in OP_NAMES): one pre-norm transformer block,
    # ``encoder_block(x, pending, weights, causal, key_mask) -> (s, m)`` or None for arguments it does not take,
    # the model then composing the block from the ops above (fastclip/models/transformer.py apply_split).
    # It runs its own layers: a table made by replacing ``linear`` / ``layer_norm`` / ``attention`` must set it
    # to None (or to a fused op of its own), as the int8 table and the calibration tap do.
    encoder_block: Callable | None = None


FUSED_NAMES: tuple[str, ...] = ("encoder_block",)
OP_NAMES: tuple[str, ...] = tuple(f.name for f in fields(OpTable) if f.name not in ("backend", *FUSED_NAMES))


def _ref_table() -> OpTable:
    return OpTable("ref", **{name: getattr(ref, name) for name in OP_NAMES})


def compose_linear_act(linear: Callable, bias_act: Callable) -> Callable:
    """``linear_act`` as a table's own ``linear`` then its ``bias_act`` (for backends that do not fuse it)."""
    def linear_act(x, weight, bias, act, upcast=False):
        """act(x @ weight.T + bias).  x: (..., K), weight: (N, K), bias: (N,) or None -> (..., N)."""
        return bias_act(linear(x, weight, None, upcast=upcast), bias, act, upcast=upcast)

    return linear_act


def _module_table(backend: str, module_name: str) -> OpTable:
    """Build a table from a module exposing `op_table() -> dict` (ops it does not provide fall back to ref;
    a missing ``linear_act`` is composed from the table's own ``linear`` and ``bias_act``)."""
    module = importlib.import_module(module_name)
    base = {name: getattr(ref, name) for name in OP_NAMES}
    own = module.op_table()
    base.update(own)
    if "linear_act" not in own:
        base["linear_act"] = compose_linear_act(base["linear"], base["bias_act"])
    return OpTable(backend, **base)


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "ref":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, not on {device}"
        try:
            importlib.import_module("fastclip._C")
            importlib.import_module("fastclip.backends.cpu.ops")
        except ImportError as exc:
            return (f"the C++ extension fastclip._C is not available ({exc}); build it with `pip install -e .` "
                    "(needs a C++17 compiler such as g++)")
        return None
    if backend == "triton":
        return _why_triton_unavailable(device)
    return f"unknown backend {backend!r}; expected one of {_EXPECTED}"


def triton_interpret() -> bool:
    """TRITON_INTERPRET is set (as Triton parses it): Triton kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _why_triton_unavailable(device: torch.device) -> str | None:
    """The triton backend runs on CUDA devices; on CPU tensors only under TRITON_INTERPRET=1 (tests).

    ``auto`` never picks it on a CPU (the CPU candidates are cpu and ref), interpreter or not.
    """
    interpret = device.type == "cpu" and triton_interpret()
    if device.type != "cuda" and not interpret:
        hint = " (set TRITON_INTERPRET=1 to run it on CPU tensors for testing)" if device.type == "cpu" else ""
        return f"the triton backend needs a CUDA device, the model is on {device}{hint}"
    try:
        importlib.import_module("triton")
        kernels = importlib.import_module("fastclip.kernels.ops")
    except ImportError as exc:
        return f"triton kernels are unavailable ({exc})"
    if interpret and not kernels.interpreted():
        return ("TRITON_INTERPRET=1 was set after the Triton kernels were imported (Triton fixes interpreted vs "
                "compiled at import); set it before importing fastclip.kernels")
    return None


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """Pick the backend name ("ref", "cpu" or "triton") for a model on ``device`` (see module docstring)."""
    global _fallback_warned
    device = torch.device(device)
    requested = backend if backend not in (None, "") else os.environ.get("FASTCLIP_BACKEND", "auto")
    requested = requested.lower()
    if requested != "auto":
        name = ALIASES.get(requested, requested)
        reason = _why_unavailable(name, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} was requested but cannot run: {reason}")
        return name
    if device.type == "cuda":
        return "triton" if _why_unavailable("triton", device) is None else "ref"
    reason = _why_unavailable("cpu", device)
    if reason is None:
        return "cpu"
    if device.type == "cpu" and not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"fastclip is using its slow reference ops on this CPU: {reason}. Pass backend='ref' "
                      "to choose them explicitly.", stacklevel=2)
    return "ref"


def get_ops(backend: str) -> OpTable:
    """The op table of a resolved backend name ("cpp" is accepted for "cpu")."""
    backend = ALIASES.get(backend, backend)
    if backend == "ref":
        return _ref_table()
    if backend == "cpu":
        return _module_table("cpu", "fastclip.backends.cpu.ops")
    if backend == "triton":
        return _module_table("triton", "fastclip.kernels.ops")
    raise BackendUnavailableError(f"unknown backend {backend!r}; expected one of {_EXPECTED}")
