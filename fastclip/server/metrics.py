"""Prometheus metrics of one app, in its own CollectorRegistry (several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The service's metrics (all names start with ``fastclip_``):

    - ``requests_total{endpoint, status}``: finished HTTP requests;
    - ``errors_total{kind}``: error answers by kind (``invalid_request``, ``auth``, ``queue_full``,
      ``too_large``, ``not_found``, ``unavailable``, ``internal``);
    - ``request_latency_seconds{endpoint}``: time from request to response (histogram);
    - ``batch_size{modality}``: items per encoder call (histogram; > 1 means requests were coalesced);
    - ``queue_depth{modality}``: items waiting for the encoder;
    - ``items_total{modality}``: items encoded; ``inflight_requests``: requests being handled.
    """

    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fastclip_requests", "HTTP requests handled", ["endpoint", "status"], registry=r)
        self.errors = Counter("fastclip_errors", "Error responses by kind", ["kind"], registry=r)
        self.latency = Histogram("fastclip_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("fastclip_batch_size", "Items per encoder call", ["modality"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("fastclip_queue_depth", "Items waiting for the encoder", ["modality"], registry=r)
        self.items = Counter("fastclip_items", "Items encoded", ["modality"], registry=r)
        self.inflight = Gauge("fastclip_inflight_requests", "Requests being handled", registry=r)
        for modality in ("text", "image"):
            self.queue_depth.labels(modality).set(0)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
