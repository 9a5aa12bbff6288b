"""The Celery worker: a thin ``hermes.chat`` task in front of the runtime.

One worker process = one Celery consumer with the threads pool + one :class:`Runtime`
(one engine). The task only hands the body to the runtime; validation, rendering,
generation and every status write happen there. The engine is built before the consumer
starts taking jobs and closed after it stops.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import click
import structlog
from celery import Celery
from celery.exceptions import Reject
from celery.signals import setup_logging, worker_ready, worker_shutting_down
from pydantic import ValidationError

from hermes_worker.cli.options import given, settings_options
from hermes_worker.contract.queue import TASK_NAME, make_celery
from hermes_worker.errors import ConfigurationError, ModelLoadError, RetryableError
from hermes_worker.inference.kv_cache import size_kv_cache
from hermes_worker.settings import Settings
from hermes_worker.worker.logs import configure_logging, job_context
from hermes_worker.worker.runtime import Runtime, job_id_for
from hermes_worker.worker.vitals import worker_name

log = structlog.stdlib.get_logger(__name__)


def create_app(settings: Settings, runtime: Runtime) -> Celery:
    """The Celery app with the ``hermes.chat`` task bound to ``runtime``."""
    app = make_celery(settings)

    # *args: a foreign producer may send any shape; the runtime answers it with a clear error.
    @app.task(name=TASK_NAME, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def chat(task: Any, *args: Any, **kwargs: Any) -> str:
        body: Any = args[0] if len(args) == 1 and not kwargs else {"args": args, **kwargs}
        with job_context(job_id=job_id_for(body, task.request.id)):
            try:
                status = runtime.run_job(body, task.request.id)
            except RetryableError as exc:
                return _retry_or_dead_letter(task, runtime, body, exc)
        if status is None:  # shutting down: straight back to the queue for another worker
            raise Reject("worker shutting down", requeue=True)
        return status.value

    return app


def _retry_or_dead_letter(task: Any, runtime: Runtime, body: Any, error: RetryableError) -> str:
    retries = int(task.request.retries or 0)
    if retries < runtime.settings.max_retries:
        log.warning("job %s: %s; retry %d", task.request.id, error.message, retries + 1)
        # Celery sends the job again (same id) after the backoff, then acks this delivery.
        raise task.retry(exc=error, countdown=min(2**retries, 30), max_retries=None)
    job_id = job_id_for(body, task.request.id)
    log.error("job %s: out of retries (%s); dead-lettered", job_id, error.message)
    runtime.dead_letter(job_id, error)
    return "failed"


def run_worker(settings: Settings, loglevel: str = "INFO", log_format: str | None = None) -> int:
    """Size the KV cache, build the engine, consume jobs until told to stop, close the
    engine; exit status. ConfigurationError, before anything starts, when the KV cache
    cannot fit in this machine's memory."""
    # Before the engine starts: its processes inherit the logging set up here.
    configure_logging(loglevel, log_format, worker=worker_name(settings))
    settings = size_kv_cache(settings)
    runtime = Runtime(settings)
    setup_logging.connect(_keep_our_logging, weak=False)
    app = create_app(settings, runtime)
    runtime.start()

    def on_shutting_down(**_: Any) -> None:
        runtime.begin_shutdown(settings.shutdown_grace_s)

    worker_shutting_down.connect(on_shutting_down, weak=False)
    worker_ready.connect(_freeze_startup_heap, weak=False)
    try:
        worker = app.Worker(
            pool_cls="threads",
            concurrency=settings.concurrency,
            queues=[settings.queue_name],
            hostname=f"hermes@{runtime.worker}",
            loglevel=loglevel,
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            optimization="fair",
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        runtime.stop()


def _freeze_startup_heap(**_: Any) -> None:
    """Connected to Celery's ``worker_ready`` (engine, tokenizer and consumer all built):
    move every object alive now out of the garbage collector's reach, as vLLM's own server
    does after its start. A full collection would otherwise walk vLLM's, torch's and
    Celery's objects with every thread stopped, stalling every job's stream for a good part
    of a second (figures: docs/benchmarks.md, "Measurements behind design choices")."""
    gc.collect()
    gc.freeze()
    log.info("startup heap frozen: %d objects out of the collector's reach", gc.get_freeze_count())


def _keep_our_logging(**_: Any) -> None:
    """Connected to Celery's ``setup_logging``: Celery then leaves logging as it is."""


@click.command("run")
@settings_options(
    "model",
    "concurrency",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "quantization",
    "kv_cache_dtype",
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_memory",
    "gpu_memory_utilization",
    "enable_prefix_caching",
    "enforce_eager",
    "queue_name",
    "redis_url",
    "metrics_port",
    "engine",
    "scripted_tokens_per_s",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(["json", "console"]),
    default=None,
    help="Default: console in a terminal, json otherwise [HERMES_LOG_FORMAT].",
)
def run_command(loglevel: str, log_format: str | None, **flags: Any) -> None:
    """Run a worker: one engine, jobs from the queue until SIGTERM."""
    try:
        settings = Settings(**given(flags))
    except ValidationError as exc:
        problems = (f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise click.ClickException("invalid settings: " + "; ".join(problems)) from exc
    if not settings.model:
        raise click.UsageError("no model: pass --model DIR or set HERMES_MODEL")
    try:
        code = run_worker(settings, loglevel, log_format)
    except (ConfigurationError, ModelLoadError) as exc:  # an answer, not a traceback
        raise click.ClickException(f"{exc.type}: {exc.message}") from exc
    sys.exit(code)


if __name__ == "__main__":  # vLLM spawns processes: entry points need this guard
    sys.exit(run_worker(Settings()))
