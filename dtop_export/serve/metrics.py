"""The service's Prometheus metrics (:class:`Metrics`), in a registry of the ingress's own; prometheus_client is
imported inside the functions."""

from collections import OrderedDict

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dtop_serve_requests", "Requests by route and HTTP status", ["route", "status"], registry=r
        )
        self.latency = Histogram("dtop_serve_request_seconds", "Request latency by route", ["route"], registry=r)
        self.queue = Histogram("dtop_serve_queue_seconds", "Time a tensor waited for its forward pass", registry=r)
        self.batch = Histogram("dtop_serve_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("dtop_serve_images", "Images embedded", registry=r)
        self.inflight = Gauge("dtop_serve_inflight", "Requests inside the service (uploaded)", registry=r)
        self.uploads = Gauge("dtop_serve_uploads", "Request bodies being received", registry=r)
        self.ready = Gauge("dtop_serve_ready", "1 when a warm replica answered the last readiness check", registry=r)
        self._seen: OrderedDict[str, None] = OrderedDict()  # forward passes already counted (one per batch)

    def forward_pass(self, batch: str, size: int) -> None:
        if batch in self._seen:
            return
        self._seen[batch] = None
        if len(self._seen) > 4096:
            self._seen.popitem(last=False)
        self.batch.observe(size)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
