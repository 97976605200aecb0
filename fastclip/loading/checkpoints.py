"""Reading checkpoint files into flat {name: tensor} dicts without running code from them.

- ``.safetensors``: memory-mapped by safetensors.
- pickle-based ``torch.save`` files (``.bin``, ``.pt``, ``.pth``): ``torch.load(weights_only=True, mmap=True)``.
- TorchScript archives (OpenAI's ``.pt`` files): the tensors are read from the archive's ``data.pkl``
  by a restricted unpickler that builds only tensors and plain containers; the archive's code is never
  compiled or run. ``trust=True`` instead hands the file to ``torch.jit.load`` / ``torch.load`` with full
  unpickling, for files from sources you trust.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "weights")
_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict on the CPU (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        obj = _read_torchscript(path, trust)
    else:
        obj = _read_pickle(path, trust)
    return _flatten(obj, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None


def _read_pickle(path: Path, trust: bool):
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = (found.group(1) if found else text.strip().split("\n")[0] or type(exc).__name__).strip()
        detail = detail.split(" Please use")[0]  # torch's advice on allow-listing globals
        if "GLOBAL" in text or "add_safe_globals" in text:  # refers to classes/functions: refuse, don't call it corrupt
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors, which fastclip will not unpickle "
                f"({detail}). If you trust this file, load it with trust=True."
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({detail})") from None
    except Exception as exc:  # a damaged pickle can fail in many ways (EOFError, KeyError, OSError, ...)
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint: "
                              f"{type(exc).__name__}: {exc}") from None


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names)


# ---------------------------------------------------------------- TorchScript archives, read as data
class ScriptModuleState:
    """Stand-in for a TorchScript module object: keeps the attributes, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    tensor = torch.empty(0, dtype=storage.dtype)
    return tensor.set_(storage.untyped, offset, size, stride)


class _Storage:
    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype):
        self.untyped, self.dtype = untyped, dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "build_tensor_from_id"): None,
}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path):
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return ScriptModuleState
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        found = _SAFE_GLOBALS.get((module, name))
        if found is None:
            raise CheckpointError(
                f"TorchScript archive {self.path} refers to {module}.{name}, which fastclip will not load "
                f"without trust=True"
            )
        return found

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"TorchScript archive {self.path} has an unexpected storage record {pid!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
        return _Storage(untyped, dtype)


def _module_tensors(obj, prefix: str, out: dict) -> None:
    state = obj.__dict__.get("_state", {}) if isinstance(obj, ScriptModuleState) else obj
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, (ScriptModuleState, dict)):
            _module_tensors(value, f"{prefix}{name}.", out)


def _read_torchscript(path: Path, trust: bool):
    if trust:
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as exc:
            raise CheckpointError(f"TorchScript archive {path} could not be loaded: {exc}") from None
    try:
        with zipfile.ZipFile(path) as archive:
            data_name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if data_name is None:
                raise CheckpointError(f"TorchScript archive {path} has no data.pkl")
            prefix = data_name[: -len("data.pkl")]
            root = _ArchiveUnpickler(archive.read(data_name), archive, prefix, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # damaged archive or records (BadZipFile, KeyError, EOFError, RuntimeError, ...)
        raise CheckpointError(f"TorchScript archive {path} is corrupt: {type(exc).__name__}: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    _module_tensors(root, "", tensors)
    return tensors


# ---------------------------------------------------------------- unwrap training checkpoints
def _flatten(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):  # only reachable with trust=True
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"checkpoint {path} does not hold a state dict (found {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    if not out:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return out
