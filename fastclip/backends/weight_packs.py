"""Packed copies of weight tensors, made on first use and found again by where the weight lives.

A pack is keyed by the weight's (data pointer, shape, strides), so views of a packed weight's rows --
the q and kv halves of ``in_proj_weight`` that trimmed last blocks and attention pooling cut on every
call -- find their pack without repacking. Each entry keeps a weak reference to the tensor that owns
the memory (a view's base) and that owner's version counter: memory reused by another tensor never
matches, an in-place change of the weight makes a new pack, and an entry dies with its weight.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch


def _owner(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


class WeightPacks:
    """``get(weight)`` -> ``make(weight)``, computed once per weight version (see the module docstring).

    Inference tensors have no version counter to watch, so they are never packed (``get`` returns None).
    """

    def __init__(self, make: Callable[[torch.Tensor], object]):
        self._make = make
        self._entries: dict = {}  # key -> (weakref to owner, owner version, pack)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, weight: torch.Tensor):
        owner = _owner(weight)
        if weight.is_inference() or owner.is_inference():
            return None
        key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()))
        version = owner._version  # a view shares its base's version counter
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is owner and entry[1] == version:
            return entry[2]
        pack = self._make(weight)
        entries = self._entries

        def forget(ref, key=key):  # the owner died: drop its entry (unless a newer one took the key)
            current = entries.get(key)
            if current is not None and current[0] is ref:
                entries.pop(key, None)

        with self._lock:
            self._entries[key] = (weakref.ref(owner, forget), version, pack)
        return pack
