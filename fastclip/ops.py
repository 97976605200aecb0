"""The op table: the only way model code reaches a compute op, and backend resolution.

A backend is resolved once, when a model is created:
explicit argument > ``FASTCLIP_BACKEND`` environment variable > device default
(CUDA -> ``triton``; CPU -> ``cpp`` if ``fastclip._C`` loads, else ``ref``).
An explicitly requested backend that cannot run raises BackendUnavailableError; only ``auto`` falls back.
For tests, the triton backend also runs on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter); ``auto`` never picks it on a CPU.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import ref
from .errors import BackendUnavailableError

BACKENDS = ("ref", "cpp", "triton")
OP_NAMES = ("linear", "bias_act", "layer_norm", "attention", "normalize_project", "l2_normalize")


@dataclass(frozen=True)
class OpTable:
    """One backend's implementation of every op in OP_NAMES (signatures as in fastclip/ref.py)."""

    backend: str
    linear: Callable
    bias_act: Callable
    layer_norm: Callable
    attention: Callable
    normalize_project: Callable
    l2_normalize: Callable


def _ref_table() -> OpTable:
    return OpTable("ref", **{name: getattr(ref, name) for name in OP_NAMES})


def _module_table(backend: str, module_name: str) -> OpTable:
    """Build a table from a module exposing `op_table(ref_table) -> dict` (ops it does not fuse fall back to ref)."""
    module = importlib.import_module(module_name)
    base = {name: getattr(ref, name) for name in OP_NAMES}
    base.update(module.op_table())
    return OpTable(backend, **base)


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "ref":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, not on {device}"
        try:
            importlib.import_module("fastclip._C")
            importlib.import_module("fastclip.cpu_ops")
        except ImportError as exc:
            return f"the C++ extension fastclip._C is not built ({exc}); reinstall with `pip install -e .`"
        return None
    if backend == "triton":
        return _why_triton_unavailable(device)
    return f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}"


def triton_interpret() -> bool:
    """TRITON_INTERPRET is set (as Triton parses it): Triton kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _why_triton_unavailable(device: torch.device) -> str | None:
    """The triton backend runs on CUDA devices; on CPU tensors only under TRITON_INTERPRET=1 (tests).

    ``auto`` never picks it on a CPU (the CPU candidates are cpp and ref), interpreter or not.
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
    """Pick the backend name for a model on ``device`` (see module docstring)."""
    device = torch.device(device)
    requested = backend if backend not in (None, "") else os.environ.get("FASTCLIP_BACKEND", "auto")
    requested = requested.lower()
    if requested != "auto":
        reason = _why_unavailable(requested, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} was requested but cannot run: {reason}")
        return requested
    candidates = ("triton", "ref") if device.type == "cuda" else ("cpp", "ref")
    for name in candidates:
        if _why_unavailable(name, device) is None:
            return name
    return "ref"


def get_ops(backend: str) -> OpTable:
    """The op table of a resolved backend name."""
    if backend == "ref":
        return _ref_table()
    if backend == "cpp":
        return _module_table("cpp", "fastclip.cpu_ops")
    if backend == "triton":
        return _module_table("triton", "fastclip.kernels.ops")
    raise BackendUnavailableError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
