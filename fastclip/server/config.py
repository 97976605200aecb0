"""Settings of the embedding service: batching, queue bounds, request limits, auth, URL allow-list."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


@dataclass(frozen=True)
class ServerConfig:
    """Every knob of ``create_app``; the ``fastclip serve`` flags map one to one onto these fields.

    Batching: up to ``max_batch`` items of one modality (text or image) are encoded together; the
    batcher waits at most ``max_wait_ms`` after the first queued item for more to arrive
    (``max_batch=1`` turns dynamic batching off).
    Protection: at most ``max_queue`` items wait per modality (more -> 429 with ``Retry-After``);
    a request holds at most ``max_items`` items and ``max_body_bytes`` of body; an image item at most
    ``max_image_bytes`` encoded bytes and ``max_image_pixels`` pixels (checked from the header, before
    decoding), and both sides at least ``min_image_side`` pixels; a text at most ``max_text_chars``.
    ``api_key``: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
    ``allow_url_hosts``: hosts (``name`` or ``name:port``; ``*.example.com`` matches sub-domains) from
    which ``http(s)`` image URLs may be fetched; empty (the default) disables URL inputs.
    """

    model_name: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_items: int = 256
    max_labels: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 8
    max_text_chars: int = 20_000
    api_key: str | None = None
    allow_url_hosts: tuple[str, ...] = field(default_factory=tuple)
    url_timeout_s: float = 10.0
    retry_after_s: int = 1

    def __post_init__(self):
        positive = ("max_batch", "max_queue", "max_items", "max_labels", "max_body_bytes", "max_image_bytes",
                    "max_image_pixels", "min_image_side", "max_text_chars", "url_timeout_s", "retry_after_s")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ServerConfig.{name} must be a positive number, got {value!r}")
        if self.max_wait_ms < 0:
            raise ValueError(f"ServerConfig.max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if self.max_items > self.max_queue:
            raise ValueError(f"ServerConfig.max_items ({self.max_items}) must not exceed max_queue "
                             f"({self.max_queue}): such a request could never be queued")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("ServerConfig.api_key must be None or a non-empty string")
        object.__setattr__(self, "allow_url_hosts", tuple(h.strip().lower() for h in self.allow_url_hosts if h.strip()))

    def updated(self, **changes) -> ServerConfig:
        """A copy with some fields changed; unknown names raise TypeError naming them."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown ServerConfig field(s): {', '.join(unknown)}")
        return replace(self, **changes)
