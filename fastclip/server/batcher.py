"""Dynamic micro-batching: concurrent requests' items of one modality are coalesced into encoder calls.

Each ``MicroBatcher`` owns a bounded queue of ``(item, future)`` pairs and a worker coroutine. The
worker takes the first waiting item, waits up to ``max_wait_ms`` for more (or until ``max_batch``
items are waiting), then runs ``encode(items) -> (n, E) float32`` in the shared single-thread encoder
executor, off the event loop, and gives every future its own row. ``submit`` returns the rows of one
request in the order of its items, so results never cross requests.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

log = logging.getLogger("fastclip.server")


class QueueFull(Exception):
    """The queue cannot take the request's items now (answered with 429 and Retry-After)."""


class ShuttingDown(Exception):
    """The batcher is draining for shutdown and takes no new items (answered with 503)."""


class MicroBatcher:
    """Coalesces ``submit`` calls into batched ``encode`` calls for one modality.

    Args:
        name: modality label used in metrics ("text" / "image").
        encode: ``encode(items: list) -> np.ndarray (len(items), E)``, called in ``executor``.
        executor: where ``encode`` runs; a single-thread executor serialises encoder calls.
        max_batch: most items per encoder call (1 = no batching).
        max_wait_ms: longest wait after the first queued item for a batch to fill.
        max_queue: most items waiting at once; ``submit`` raises QueueFull beyond it.
        metrics: a ``Metrics`` (batch-size histogram, queue-depth gauge, item counter) or None.
    """

    def __init__(self, name: str, encode: Callable[[list], np.ndarray], executor: Executor, *, max_batch: int,
                 max_wait_ms: float, max_queue: int, metrics=None):
        self.name, self.encode, self.executor = name, encode, executor
        self.max_batch, self.max_wait, self.max_queue = int(max_batch), max_wait_ms / 1000.0, int(max_queue)
        self.metrics = metrics
        self._queue: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker on the running event loop (idempotent)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"fastclip-batcher-{self.name}")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Stop taking items, encode everything already queued, then stop the worker."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task

    # ------------------------------------------------------------------ producer side
    async def submit(self, items: Sequence) -> np.ndarray:
        """Encode ``items`` (batched with other requests' items) -> (len(items), E), in order."""
        if self._closing:
            raise ShuttingDown(f"the {self.name} encoder is shutting down")
        self.check_room(len(items))
        self.start()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futures, strict=True))
        self._depth()
        self._wake.set()
        try:
            rows = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:  # e.g. the client went away: let the worker skip our remaining items
                f.cancel()
            raise
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def check_room(self, n: int) -> None:
        """Raise QueueFull unless ``n`` more items fit in the queue now."""
        if n and len(self._queue) + n > self.max_queue:
            raise QueueFull(f"the {self.name} queue is full ({len(self._queue)} of {self.max_queue} items waiting)")

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))

    # ------------------------------------------------------------------ worker side
    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        """Wait for items, then for a batch to fill (max_batch) or the wait to run out (max_wait)."""
        loop = asyncio.get_running_loop()
        while not self._queue:
            if self._closing:
                return []
            self._wake.clear()
            await self._wake.wait()
        deadline = loop.time() + self.max_wait
        while len(self._queue) < self.max_batch and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self._queue and len(batch) < self.max_batch:
            item, fut = self._queue.popleft()
            if not fut.done():  # skip items whose request was cancelled
                batch.append((item, fut))
        self._depth()
        return batch

    async def _encode(self, items: list) -> np.ndarray:
        out = await asyncio.get_running_loop().run_in_executor(self.executor, self.encode, items)
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(items):
            raise RuntimeError(f"{self.name} encoder returned shape {out.shape} for {len(items)} items")
        return out

    async def _run_batch(self, batch: list[tuple[Any, asyncio.Future]], retry: bool = False) -> None:
        items = [item for item, _ in batch]
        if self.metrics is not None and not retry:
            self.metrics.batch_size.labels(self.name).observe(len(items))
            self.metrics.items.labels(self.name).inc(len(items))
        try:
            rows = await self._encode(items)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("%s encoder failed", self.name)
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            for one in batch:  # isolate the failing item, so other requests still get their rows
                await self._run_batch([one], retry=True)
            return
        for (_, fut), row in zip(batch, rows, strict=True):  # _encode checked the count
            if not fut.done():
                fut.set_result(row)

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                if self._closing and not self._queue:
                    return
                continue
            await self._run_batch(batch)
