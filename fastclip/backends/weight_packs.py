"""Tensors derived from weights -- packed copies for a GEMM, int8 copies, folded patch weights -- made once
per version of the weights they come from, and found again by where those weights live.

One cache type for all of them (``DerivedWeights``), keyed the same way:

* by each source tensor's (data pointer, shape, strides, dtype), so views of a weight's rows -- the q and
  kv halves of ``in_proj_weight`` that trimmed last blocks and attention pooling cut on every call --
  find their entry without remaking it;
* each entry keeps a weak reference to the tensor that owns each source's memory (a view's base) and
  that owner's version counter: memory reused by another tensor never matches, an in-place change of a
  source remakes the entry on its next use, and an entry dies with its sources.

Inference tensors have no version counter, so a change to them cannot be seen: ``get`` neither keeps nor
returns derived values for them (the caller computes without the cache), except for entries made on
purpose with ``add`` (int8 packs made when a model is quantised), which are then kept as they are.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable

import torch

_CONSTANT = -1  # the "version" of an inference tensor added on purpose: it is taken never to change


def _owner(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _where(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _watch(t: torch.Tensor | None, forget) -> tuple | None:
    """(weak reference to t's owner, the owner's version) for t, or None for an absent tensor."""
    if t is None:
        return None
    owner = _owner(t)
    version = _CONSTANT if owner.is_inference() else owner._version  # a view shares its base's counter
    return weakref.ref(owner, forget), version


def _fresh(watches: tuple, tensors: tuple) -> bool:
    for watch, t in zip(watches, tensors, strict=True):
        if t is None or watch is None:
            if (t is None) != (watch is None):
                return False
            continue
        ref, version = watch
        owner = _owner(t)
        if ref() is not owner:
            return False
        if version != _CONSTANT and version != owner._version:
            return False
    return True


class DerivedWeights:
    """``get(*tensors)`` -> ``make(*tensors)``, computed once per version of ``tensors`` (see the module
    docstring). ``extra`` (a hashable, e.g. the pixel normalisation a patch weight is folded with) is part
    of the key and, when given, passed on: ``make(*tensors, extra)``."""

    def __init__(self, make: Callable[..., object]):
        self._make = make
        self._entries: dict = {}  # key -> (watches, value)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _key(self, tensors: tuple, extra: Hashable) -> tuple:
        return (*(_where(t) for t in tensors), extra)

    def _store(self, key: tuple, tensors: tuple, value: object) -> object:
        entries = self._entries
        record: list = []

        def forget(ref, key=key):  # a source died: drop its entry (unless a newer one took the key)
            current = entries.get(key)
            if current is not None and current is record[0]:
                entries.pop(key, None)

        entry = (tuple(_watch(t, forget) for t in tensors), value)
        record.append(entry)
        with self._lock:
            entries[key] = entry
        return value

    def _made(self, tensors: tuple, extra: Hashable) -> object:
        return self._make(*tensors) if extra is None else self._make(*tensors, extra)

    def add(self, *tensors: torch.Tensor | None, extra: Hashable = None) -> object:
        """Make the value for ``tensors`` now and keep it (inference tensors included: taken as constant)."""
        return self._store(self._key(tensors, extra), tensors, self._made(tensors, extra))

    def get(self, *tensors: torch.Tensor | None, extra: Hashable = None, create: bool = True):
        """The value for ``tensors`` as they are now, remade if one changed in place; ``create=False``: None
        unless an entry was made before (by ``add`` or an earlier ``get``). None for inference tensors that
        were not added on purpose."""
        key = self._key(tensors, extra)
        entry = self._entries.get(key)
        if entry is not None:
            if _fresh(entry[0], tensors):
                return entry[1]
            return self._store(key, tensors, self._made(tensors, extra))
        if not create or any(t is not None and _owner(t).is_inference() for t in tensors):
            return None
        return self._store(key, tensors, self._made(tensors, extra))
