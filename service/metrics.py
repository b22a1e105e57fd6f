"""Prometheus metrics of the service (prometheus-client), exposed at GET /metrics.

Each app gets its own ``CollectorRegistry`` so that several apps in one process (tests) do not
collide. With ``--workers N`` every worker process has its own registry: a scrape sees one worker.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: route label of requests that matched no route (keeps the label set bounded)
UNMATCHED_ROUTE = "unmatched"


class ServiceMetrics:
    """The service's metrics, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dino_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "dino_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("dino_batch_size", "images per onnxruntime call", buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram(
            "dino_queue_wait_seconds", "time an image waited in the batching queue", buckets=FAST_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "dino_inference_seconds",
            "duration of one onnxruntime call (a whole batch)",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "dino_preprocess_seconds", "decode + transform time of one image", buckets=FAST_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("dino_queue_depth", "images waiting for inference", registry=r)
        self.images = Counter("dino_images", "images received, by outcome", ["outcome"], registry=r)
        self.gallery_size = Gauge(
            "dino_gallery_size", "images in the gallery (Milvus: as last counted by this process)", registry=r
        )
        self.gallery_available = Gauge(
            "dino_gallery_available", "1 while the gallery can be used, 0 while its backend is unreachable", registry=r
        )
        self.model_info = Gauge(
            "dino_model_info",
            "the served model (value 1): its name, identity (model.json's sha256), execution provider, "
            "the file served and its precision",
            ["name", "sha256", "provider", "file", "precision"],
            registry=r,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_latency.labels(route, method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware counting every HTTP request by route template and status.

    The route template (``/index/{image_id}``), not the raw path, is the label: ids would make the
    label set unbounded. It is outermost, so 401/413 answers of inner layers are counted too.
    """

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            self.metrics.observe_request(
                template, scope.get("method", ""), status["code"], time.perf_counter() - started
            )
