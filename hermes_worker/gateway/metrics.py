"""The gateway's Prometheus metrics (``GET /metrics``), one registry per app.

* ``hermes_gateway_requests_total{route, method, status, tenant}``: requests answered.
  ``route`` is the route's template (``/v1/jobs/{job_id}``), never the raw path, so the
  series stay few; a request the gateway did not route counts under ``unmatched``; 499: the
  client left before its answer. ``tenant``: the API key's tenant (``anonymous`` without
  auth, ``-`` for a request no key admitted); tenants are the operator's, so few.
* ``hermes_gateway_request_duration_seconds{route, method}``: from the request's arrival to
  its answer's last byte (for a stream: until the stream ended).
* ``hermes_gateway_open_streams{route, model, tenant}``: SSE streams open now; ``model`` is
  the route's name (or ``default``), never a free-form client value.
* ``hermes_gateway_jobs_total{model, mode, created, tenant}``: chat requests that reached the queue,
  by mode (``wait``, ``stream``, ``background``) and whether they made a job (``false``: an
  idempotent retry joined one).
* ``hermes_gateway_disconnect_cancels_total{model}``: jobs cancelled because their client
  went away.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds: a plain answer takes milliseconds, a waited-for completion or a stream minutes.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
    600, 1800,
)  # fmt: skip
UNMATCHED = "unmatched"
CLIENT_GONE = 499  # nginx's "client closed request"
# Where a handler notes the request's tenant in its ASGI scope, for the request counter.
TENANT_SCOPE_KEY = "hermes.tenant"
NO_TENANT = "-"


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = Counter(
            "hermes_gateway_requests",
            "HTTP requests answered, by route template, method, status and tenant.",
            ["route", "method", "status", "tenant"],
            registry=registry,
        )
        self.duration = Histogram(
            "hermes_gateway_request_duration_seconds",
            "From a request's arrival to its answer's last byte (a stream: until it ended).",
            ["route", "method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.open_streams = Gauge(
            "hermes_gateway_open_streams",
            "Server-Sent Event streams open now, by route, model route and tenant.",
            ["route", "model", "tenant"],
            registry=registry,
        )
        self.jobs = Counter(
            "hermes_gateway_jobs",
            "Chat requests that reached the queue, by model route, mode and whether they "
            "made a new job, and tenant.",
            ["model", "mode", "created", "tenant"],
            registry=registry,
        )
        self.disconnect_cancels = Counter(
            "hermes_gateway_disconnect_cancels",
            "Jobs cancelled because their client went away.",
            ["model"],
            registry=registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float, tenant: str) -> None:
        self.requests.labels(route, method, str(status), tenant).inc()
        self.duration.labels(route, method).observe(seconds)


class MetricsMiddleware:
    """Counts and times every HTTP request (a plain ASGI middleware: it leaves the request's
    ``receive`` alone, so a handler still hears its client leave)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless an answer starts

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            tenant = scope.get(TENANT_SCOPE_KEY, NO_TENANT)
            seconds = time.perf_counter() - start
            self.metrics.observe(route, scope["method"], status, seconds, tenant)
