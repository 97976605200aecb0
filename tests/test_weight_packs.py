"""DerivedWeights, the one cache behind packed linear weights, int8 packs and folded patch weights."""
import gc

import torch

from fastclip.backends.weight_packs import DerivedWeights


class Counting:
    """A make function that records its calls and returns a fresh object each time."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1  # tensors are not kept in the value: it must not keep its sources alive
        return (self.calls, tuple(None if isinstance(a, torch.Tensor) else a for a in args))


def test_made_once_and_found_again_from_a_view():
    make = Counting()
    cache = DerivedWeights(make)
    w = torch.randn(6, 4)
    first = cache.get(w)
    assert cache.get(w) is first and make.calls == 1
    q, kv = w.split([2, 4])  # row views, as pooled attention cuts them on every call
    q_value = cache.get(q)
    assert cache.get(w.split([2, 4])[0]) is q_value and make.calls == 2
    assert cache.get(kv) is not q_value and make.calls == 3


def test_in_place_change_remakes_and_other_memory_never_matches():
    make = Counting()
    cache = DerivedWeights(make)
    w = torch.randn(3, 3)
    first = cache.get(w)
    with torch.no_grad():
        w.mul_(2)
    second = cache.get(w)
    assert second is not first and make.calls == 2
    assert cache.get(w.clone()) is not second and make.calls == 3


def test_entries_die_with_their_weights():
    cache = DerivedWeights(Counting())
    w = torch.randn(8, 8)
    cache.get(w)
    assert len(cache) == 1
    del w
    gc.collect()
    assert len(cache) == 0


def test_several_sources_and_an_extra_key():
    make = Counting()
    cache = DerivedWeights(make)
    w, b = torch.randn(4, 2), torch.randn(4)
    with_bias, without = cache.get(w, b), cache.get(w, None)
    assert with_bias is not without and make.calls == 2
    assert cache.get(w, b, extra=("norm", 1.0)) is not with_bias and make.calls == 3
    assert make.calls == 3 and cache.get(w, b, extra=("norm", 1.0))[1] == (None, None, ("norm", 1.0))
    with torch.no_grad():
        b.add_(1)  # a change of any source remakes
    assert cache.get(w, b) is not with_bias


def test_inference_tensors_only_when_added_on_purpose():
    make = Counting()
    cache = DerivedWeights(make)
    with torch.inference_mode():
        w = torch.randn(4, 4)
    assert cache.get(w) is None and make.calls == 0  # cannot watch it: not cached
    added = cache.add(w)
    assert cache.get(w) is added and cache.get(w, create=False) is added and make.calls == 1
    assert cache.get(torch.randn(2, 2), create=False) is None and make.calls == 1
