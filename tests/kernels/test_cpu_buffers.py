"""The reused output buffers of the CPU ops (fastclip/backends/cpu/buffers.py): a buffer comes back only once
nothing refers to its memory, never while a result, a view of one, a NumPy array or another thread holds it;
the free bytes kept stay under the limit; and the ops' results are never overwritten by later calls."""
from __future__ import annotations

import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("fastclip._C is built on Linux x86-64 only", allow_module_level=True)

from fastclip.backends.cpu import buffers  # noqa: E402
from fastclip.backends.dispatch import get_ops  # noqa: E402

BIG = (1024, 1024)  # 4 MiB of fp32: above MIN_BYTES


def test_small_requests_are_not_pooled():
    pool = buffers.BufferPool(64 << 20)
    t = pool.empty((16, 16))
    assert t.shape == (16, 16) and t.dtype == torch.float32
    assert pool.nbytes == 0


def test_buffer_returns_only_when_free():
    pool = buffers.BufferPool(64 << 20)
    a = pool.empty(BIG)
    ptr = a.data_ptr()
    held = pool.empty(BIG)
    assert held.data_ptr() != ptr  # a is alive
    del a
    b = pool.empty(BIG)
    assert b.data_ptr() == ptr  # a's memory, now free, comes back
    view = b[3:].t()
    del b
    assert pool.empty(BIG).data_ptr() not in (ptr, held.data_ptr())  # a view keeps it
    del view
    array = pool.empty(BIG).numpy()
    again = pool.empty(BIG)
    assert again.data_ptr() != array.ctypes.data  # a NumPy array keeps it
    del array, again, held


def test_dtypes_and_sizes():
    pool = buffers.BufferPool(64 << 20)
    a = pool.empty(BIG)
    ptr = a.data_ptr()
    del a
    b = pool.empty((2 * 1024 * 1024,), torch.int8)  # half the bytes: fits within 2x
    assert b.data_ptr() == ptr and b.dtype == torch.int8 and b.shape == (2 * 1024 * 1024,)
    del b
    c = pool.empty((64, 1024))  # 256 KiB -> plain allocation
    small = pool.empty((300, 1024))  # 1.2 MiB: a 4 MiB buffer is more than twice that
    assert small.data_ptr() != ptr and c.numel() == 64 * 1024


def test_free_bytes_stay_under_the_limit():
    pool = buffers.BufferPool(9 << 20)
    held = [pool.empty(BIG) for _ in range(4)]  # 16 MiB in use: kept, they are not free
    assert pool.nbytes == 16 << 20
    del held
    pool.empty((8,))  # a small request does not trim
    pool.empty(BIG)  # trims the free ones to the limit: at most 2 free 4 MiB buffers + the one handed out
    assert pool.nbytes <= (9 << 20) + (4 << 20)
    pool.clear()
    assert pool.nbytes == 0


def test_limit_zero_turns_reuse_off():
    pool = buffers.BufferPool(0)
    a = pool.empty(BIG)
    assert pool.nbytes == 0
    del a


def test_threads_never_share_a_buffer():
    pool = buffers.BufferPool(256 << 20)
    results: list[list[int]] = [[] for _ in range(4)]
    held: list[list[torch.Tensor]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def work(i: int):
        barrier.wait()
        for _ in range(20):
            t = pool.empty(BIG)
            t.fill_(i)
            held[i].append(t)
            results[i].append(t.data_ptr())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ptrs = [p for r in results for p in r]
    assert len(set(ptrs)) == len(ptrs)  # every tensor alive at once has its own memory
    for i in range(4):
        assert all(bool((t == i).all()) for t in held[i])


def test_buffer_first_used_in_inference_mode_serves_normal_tensors():
    pool = buffers.BufferPool(64 << 20)
    with torch.inference_mode():
        a = pool.empty(BIG)
    ptr = a.data_ptr()
    del a
    b = pool.empty(BIG)  # outside the mode
    assert b.data_ptr() == ptr and not b.is_inference()
    b.fill_(1.0)  # an inference tensor would refuse these outside the mode
    b.add_(1.0)
    assert float(b[0, 0]) == 2.0
    assert (b.requires_grad_() * 3).sum().grad_fn is not None


def test_bad_limit_warns_and_keeps_default():
    code = ("import warnings; warnings.simplefilter('error')\n"
            "try:\n import fastclip.backends.cpu.buffers\nexcept UserWarning as e: print('W', e)\n")
    env = {"FASTCLIP_BUFFER_POOL_MB": "lots", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "FASTCLIP_BUFFER_POOL_MB='lots'" in out


def test_op_results_are_never_overwritten():
    ops = get_ops("cpu")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(768, 512, generator=g) * 0.05
    b = torch.randn(768, generator=g)
    x1, x2 = torch.randn(2, 700, 512, generator=g).unbind(0)
    with torch.inference_mode():
        y1 = ops.linear(x1, w, b)
        keep = y1.clone()
        n1 = ops.layer_norm(y1, b, b, 1e-5)
        keep_n = n1.clone()
        for _ in range(3):  # later calls of every pooled op, same sizes
            ops.linear(x2, w, b)
            ops.layer_norm(y1 * 2, b, b, 1e-5)
            ops.bias_act(y1, b, "gelu")
    assert torch.equal(y1, keep) and torch.equal(n1, keep_n)
    assert n1.nbytes >= buffers.MIN_BYTES  # this result came from the pool
    assert np.isfinite(y1.numpy()).all()
