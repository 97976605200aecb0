"""A pixel budget bounding how many decoded pixels are in flight across the decode threads of a model.

Decoding an image costs memory in proportion to its pixel count (Pillow stores an RGB image as 4 bytes a
pixel; mode conversions and the resize add temporaries of the same order), whatever its encoded size: a
flat-colour PNG of 60 M pixels is a few hundred kilobytes on disk and 240 MB decoded. Without a bound, every
decode thread of ``Preprocess.batch`` (and the prefetch of the next batch in ``embed_images``) may hold such an
image at the same time. A ``PixelBudget`` shared by all of them makes the decoded pixels in flight at most
``max_pixels`` -- except one image larger than the whole budget, which waits until nothing else is held and
then runs alone.

Usage (``fastclip.data.images.load_image`` does this with the pixel count read from the image header, before
decoding, and holds it through decode + conversion + resize)::

    budget = PixelBudget(64 * 2**20)
    with budget.hold(width * height):
        small = resize(decode(item))

Waiters are served in arrival order (a large image is not starved by a stream of small ones). Holds must not
be nested in one thread: an inner hold could wait for the outer one to be released.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

# 64 Mi pixels in flight: about 256 MiB of decoded RGB (4 bytes a pixel in Pillow), a few times that with
# conversion and resize temporaries -- e.g. five 12-megapixel photos decoding at once.
DEFAULT_INFLIGHT_PIXELS = 64 * 2**20

__all__ = ["PixelBudget", "DecodeLimits", "DEFAULT_INFLIGHT_PIXELS"]


class PixelBudget:
    """Thread-safe bound on the pixels held at once (``threading.Condition``), FIFO among waiters.

    Args:
        max_pixels: the budget; ``hold(n)`` waits until ``held + n <= max_pixels``, or, for ``n`` larger than
            the budget, until nothing is held (that item then runs alone). Must be >= 1.

    ``held``: pixels held now; ``peak``: the most held at once since creation or ``reset_peak()``;
    ``waiting``: threads waiting to hold.
    """

    def __init__(self, max_pixels: int = DEFAULT_INFLIGHT_PIXELS):
        if int(max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels!r}")
        self.max_pixels = int(max_pixels)
        self._cond = threading.Condition()
        self._held = 0
        self._holders = 0
        self._peak = 0
        self._queue: deque[object] = deque()  # one token per waiting thread, in arrival order

    def __repr__(self) -> str:
        return f"PixelBudget(max_pixels={self.max_pixels}, held={self._held}, peak={self._peak})"

    def __reduce__(self):  # a copy (copy.deepcopy, pickle) is a fresh, empty budget of the same size
        return (PixelBudget, (self.max_pixels,))

    @property
    def held(self) -> int:
        with self._cond:
            return self._held

    @property
    def peak(self) -> int:
        with self._cond:
            return self._peak

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def reset_peak(self) -> None:
        """Set ``peak`` to what is held now."""
        with self._cond:
            self._peak = self._held

    def _fits(self, n: int) -> bool:
        return self._holders == 0 or self._held + n <= self.max_pixels

    def acquire(self, n_pixels: int) -> None:
        """Block until ``n_pixels`` fit (see the class doc), then hold them; pair with ``release``."""
        n = int(n_pixels)
        if n < 0:
            raise ValueError(f"n_pixels must be >= 0, got {n_pixels!r}")
        with self._cond:
            token = object()
            self._queue.append(token)
            try:
                while self._queue[0] is not token or not self._fits(n):
                    self._cond.wait()
            finally:
                self._queue.remove(token)  # the head on success; anywhere if the wait was interrupted
                self._cond.notify_all()  # the next in line may fit as well
            self._held += n
            self._holders += 1
            self._peak = max(self._peak, self._held)

    def release(self, n_pixels: int) -> None:
        """Give back ``n_pixels`` taken by ``acquire``."""
        with self._cond:
            self._held -= int(n_pixels)
            self._holders -= 1
            self._cond.notify_all()

    @contextmanager
    def hold(self, n_pixels: int) -> Iterator[None]:
        """Context manager: ``acquire(n_pixels)`` on entry, ``release`` on exit (also on an exception)."""
        self.acquire(n_pixels)
        try:
            yield
        finally:
            self.release(n_pixels)


class DecodeLimits:
    """The decode settings a preprocess shares across its threads (Preprocess, NaflexPreprocess): ``budget``, a
    PixelBudget of ``max_inflight_pixels`` (None: unbounded), and ``max_image_pixels``, the header limit."""

    budget: PixelBudget | None
    max_image_pixels: int

    def _set_decode_limits(self, max_inflight_pixels: int | None, max_image_pixels: int) -> None:
        self.budget = None if max_inflight_pixels is None else PixelBudget(max_inflight_pixels)
        self.max_image_pixels = int(max_image_pixels)

    def _pixel_limit(self, max_image_pixels: int | None) -> int:
        """A call's ``max_image_pixels``, or this preprocess's when None."""
        return self.max_image_pixels if max_image_pixels is None else int(max_image_pixels)
