"""The micro-batcher alone (no HTTP): coalescing, per-request order, failure isolation, bounds, draining;
and the server settings' validation."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fastclip.server import ServerConfig
from fastclip.server.batcher import MicroBatcher, QueueFull, ShuttingDown


def _encode(calls):
    """Encoder recording each call's items; row of item x is [x, 2x]; item -1 makes the call fail."""
    def encode(items):
        calls.append(list(items))
        if -1 in items:
            raise ValueError("poisoned item")
        return np.array([[x, 2 * x] for x in items], dtype=np.float32)
    return encode


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_coalesces_and_keeps_each_request_in_order():
    calls = []

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher("t", _encode(calls), ex, max_batch=64, max_wait_ms=50, max_queue=1000)
            reqs = [list(range(10 * r, 10 * r + 1 + r % 4)) for r in range(20)]
            outs = await asyncio.gather(*(b.submit(x) for x in reqs))
            await b.close()
            return reqs, outs

    reqs, outs = _run(main())
    for items, out in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(out[:, 0], items)
    assert max(len(c) for c in calls) > 1 and sum(len(c) for c in calls) == sum(map(len, reqs))


def test_a_failing_item_only_fails_its_own_request():
    calls = []

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher("t", _encode(calls), ex, max_batch=8, max_wait_ms=50, max_queue=100)
            good, bad = await asyncio.gather(b.submit([1, 2]), b.submit([3, -1]), return_exceptions=True)
            await b.close()
            return good, bad

    good, bad = _run(main())
    np.testing.assert_array_equal(good[:, 0], [1, 2])
    assert isinstance(bad, ValueError)
    assert calls[0] == [1, 2, 3, -1]  # tried together first, then item by item


def test_queue_bound_and_drain_on_close():
    calls = []

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher("t", _encode(calls), ex, max_batch=2, max_wait_ms=1000, max_queue=3)
            first = asyncio.create_task(b.submit([1, 2, 3]))
            await asyncio.sleep(0)
            with pytest.raises(QueueFull):
                await b.submit([4])
            await b.close()  # does not wait max_wait_ms: drains at once
            with pytest.raises(ShuttingDown):
                await b.submit([5])
            return await first

    out = _run(main())
    np.testing.assert_array_equal(out[:, 0], [1, 2, 3])
    assert [len(c) for c in calls] == [2, 1]


def test_config_validation():
    with pytest.raises(ValueError, match="max_items"):
        ServerConfig(max_items=10, max_queue=5)
    with pytest.raises(ValueError, match="max_batch"):
        ServerConfig(max_batch=0)
    with pytest.raises(TypeError, match="nope"):
        ServerConfig().updated(nope=1)
    assert ServerConfig(allow_url_hosts=(" Example.COM ",)).allow_url_hosts == ("example.com",)
