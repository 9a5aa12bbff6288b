"""Prometheus metrics of one worker, served over HTTP (``run --metrics-port N``).

Job metrics come from the results the worker writes (a ``JobContext`` observer), so they
cost no Redis command; engine load and Redis error counts are read when scraped. Each
worker serves its own registry: Prometheus adds the ``instance`` label, and sums or rates
across workers are PromQL's job (``sum(rate(hermes_generated_tokens_total[1m]))`` is the
fleet's tokens per second).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.worker.execution import JobContext
from hermes_worker.worker.vitals import Vitals, engine_load

# Seconds; wide on purpose: a queue wait can be an hour, a 405B prefill several seconds.
QUEUE_WAIT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 3600)


class WorkerMetrics:
    """The metrics of one worker: register :meth:`observe` as a result observer."""

    def __init__(self, ctx: JobContext, vitals: Vitals) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.jobs = Counter(
            "hermes_jobs",
            "Jobs this worker ended, by final status.",
            ["status"],
            registry=registry,
        )
        for status in JobStatus:
            if status.is_terminal:  # every series exists from the start, at 0
                self.jobs.labels(status.value)
        self.errors = Counter(
            "hermes_job_errors",
            "Jobs that did not succeed, by error type (invalid_request_error, timeout, ...).",
            ["type"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "hermes_queue_wait_seconds",
            "From queued to the start of the job's last attempt.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "hermes_time_to_first_token_seconds",
            "From the attempt's start to its first generated token (queue wait excluded).",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.generation = Histogram(
            "hermes_generation_seconds",
            "From the attempt's start to its end, for jobs the engine ran (prefill + decode).",
            buckets=GENERATION_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "hermes_generated_tokens",
            "Completion tokens generated (partial output of failed jobs included).",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "hermes_prompt_tokens", "Prompt tokens of the jobs the engine ran.", registry=registry
        )
        registry.register(_LiveCollector(ctx, vitals))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._server: Any = None

    def observe(self, result: JobResult) -> None:
        """A ``JobContext`` observer: account for one result (runs on the runtime loop)."""
        info = result.job
        self.jobs.labels(info.status.value).inc()
        if result.error is not None:
            self.errors.labels(result.error.type).inc()
        if info.queue_wait_s is not None:
            self.queue_wait.observe(info.queue_wait_s)
        if info.time_to_first_token_s is not None:
            self.ttft.observe(info.time_to_first_token_s)
        if result.usage is not None:  # the engine ran it (not rejected, expired or skipped)
            if info.generation_s is not None:
                self.generation.observe(info.generation_s)
            self.generated_tokens.inc(result.usage.completion_tokens)
            self.prompt_tokens.inc(result.usage.prompt_tokens)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` from a daemon thread; returns the port (``0`` picks a free one)."""
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _LiveCollector:
    """Values read at scrape time: engine load, jobs in progress, Redis errors."""

    def __init__(self, ctx: JobContext, vitals: Vitals) -> None:
        self._ctx, self._vitals = ctx, vitals

    def collect(self) -> Iterator[Metric]:
        ctx, vitals = self._ctx, self._vitals
        info = GaugeMetricFamily(
            "hermes_worker_info",
            "The worker's name and model (value 1).",
            labels=["worker", "model"],
        )
        info.add_metric([vitals.worker, vitals.model], 1)
        yield info
        yield GaugeMetricFamily(
            "hermes_worker_start_time_seconds",
            "When the worker started (unix seconds).",
            value=vitals.started_at,
        )
        load = engine_load(ctx.engine)
        yield GaugeMetricFamily(
            "hermes_engine_running_requests",
            "Requests in the engine that have produced tokens.",
            value=load.running,
        )
        yield GaugeMetricFamily(
            "hermes_engine_waiting_requests",
            "Requests in the engine without a token yet (queued in its scheduler or in prefill).",
            value=load.waiting,
        )
        yield GaugeMetricFamily(
            "hermes_jobs_in_progress",
            "Job attempts this worker holds a lease for.",
            value=len(ctx.held),
        )
        errors = CounterMetricFamily(
            "hermes_redis_errors_total",
            "Redis operations of the worker that failed (each is retried).",
            labels=["source"],
        )
        for source in ("heartbeat", "cancel_listener"):
            errors.add_metric([source], vitals.redis_errors[source])
        errors.add_metric(["stream_writer"], getattr(ctx.writer, "failed_flushes", 0))
        yield errors
        yield CounterMetricFamily(
            "hermes_engine_output_reads_total",
            "Reads of the engine's output by generating jobs, one delta each: generated tokens "
            "over reads is the tokens each read carries, more of them when output pacing "
            "(HERMES_OUTPUT_PACE_MS) lets the engine's steps merge.",
            value=ctx.output_reads,
        )
        yield GaugeMetricFamily(
            "hermes_engine_stream_interval",
            "Tokens the engine gathers before it hands a job its output, as set for the last "
            "job started: about a beat's worth while output is paced, else 1 (every step).",
            value=ctx.stream_interval,
        )
        sent = getattr(ctx.writer, "commands_sent", None)
        if sent is not None:
            yield CounterMetricFamily(
                "hermes_stream_redis_commands_total",
                "Redis commands the stream writer sent (events, records, expiries).",
                value=sent,
            )


def start_metrics(ctx: JobContext, vitals: Vitals, port: int) -> WorkerMetrics:
    """Count every result ``ctx`` writes and serve the metrics on ``port``."""
    metrics = WorkerMetrics(ctx, vitals)
    ctx.observers.append(metrics.observe)
    vitals.metrics_port = metrics.serve(port)
    return metrics
