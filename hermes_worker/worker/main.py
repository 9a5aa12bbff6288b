"""The Celery worker: a thin ``hermes.chat`` task in front of the runtime.

One worker process = one Celery consumer with the threads pool + one :class:`Runtime`
(one engine). The task only hands the body to the runtime; validation, rendering,
generation and every status write happen there. The engine is built before the consumer
starts taking jobs and closed after it stops.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import structlog
from celery import Celery
from celery.exceptions import Reject
from celery.signals import setup_logging, worker_ready, worker_shutting_down
from pydantic import ValidationError
from redis.exceptions import RedisError

from hermes_worker.cli.doctor import check_at_start
from hermes_worker.cli.options import given, settings_options
from hermes_worker.contract.queue import TASK_NAME, make_celery
from hermes_worker.errors import (
    ConfigurationError,
    ForgedMessage,
    ModelLoadError,
    RetryableError,
)
from hermes_worker.inference.kv_cache import size_kv_cache
from hermes_worker.settings import Settings
from hermes_worker.worker.logs import configure_logging, job_context
from hermes_worker.worker.runtime import Runtime, job_id_for
from hermes_worker.worker.vitals import worker_name

log = structlog.stdlib.get_logger(__name__)


def create_app(settings: Settings, runtime: Runtime) -> Celery:
    """The Celery app with the ``hermes.chat`` task bound to ``runtime``."""
    app = make_celery(settings, deliveries_key=runtime.keys.deliveries(runtime.worker))

    # *args: a foreign producer may send any shape; the runtime answers it with a clear error.
    @app.task(name=TASK_NAME, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def chat(task: Any, *args: Any, **kwargs: Any) -> str:
        body: Any = args[0] if len(args) == 1 and not kwargs else {"args": args, **kwargs}
        with job_context(job_id=job_id_for(body, task.request.id)):
            try:
                status = runtime.run_job(body, task.request.id)
            except RetryableError as exc:
                return _retry_or_dead_letter(task, runtime, body, exc)
            except ForgedMessage as exc:  # dropped; the job it names is left as it is
                log.error("dropped a message: %s", exc.message)
                raise Reject(exc.message, requeue=False) from exc
        if status is None:  # shutting down: straight back to the queue for another worker
            raise Reject("worker shutting down", requeue=True)
        return status.value

    return app


def _retry_or_dead_letter(task: Any, runtime: Runtime, body: Any, error: RetryableError) -> str:
    """Send the job again after a backoff, or, out of retries, fail it into the dead
    letters. This delivery is acknowledged only once one of them is written: while Redis
    refuses the write (full under noeviction, or away) it is made again
    (:func:`_while_redis_refuses`), as a job's end is; Celery alone would acknowledge the
    delivery all the same, deleting the message with the job's record left queued or
    running for ever."""
    retries = int(task.request.retries or 0)
    job_id = job_id_for(body, task.request.id)
    patience_s = runtime.settings.visibility_timeout_s
    if retries < runtime.settings.max_retries:
        log.warning("job %s: %s; retry %d", task.request.id, error.message, retries + 1)
        runtime.uncount_delivery(job_id)  # a retry is not a delivery that crashed

        def send_retry() -> None:
            # Celery sends the job again (same id) after the backoff and raises Retry, on
            # which it acks this delivery; a retry it could not send raises Reject.
            raise task.retry(exc=error, countdown=min(2**retries, 30), max_retries=None)

        _while_redis_refuses(job_id, "its retry", send_retry, patience_s)
    log.error("job %s: out of retries (%s); dead-lettered", job_id, error.message)
    _while_redis_refuses(
        job_id, "its failure", lambda: runtime.dead_letter(job_id, error), patience_s
    )
    return "failed"


REFUSED_PAUSE_S = 1.0  # between two tries of a write Redis refused


def _while_redis_refuses(
    job_id: str, what: str, write: Callable[[], object], patience_s: float
) -> None:
    """Make ``write`` (a retry, a dead letter), again every REFUSED_PAUSE_S while Redis
    refuses it or is away, holding this delivery unacknowledged meanwhile. Past
    ``patience_s`` the delivery is rejected with requeue (:func:`_keep`): the visibility
    sweep would hand the message out again by then anyway."""
    give_up = time.monotonic() + patience_s
    tries = 0
    while True:
        try:
            write()
            return
        except (Reject, RedisError) as exc:  # Reject: Celery could not send a retry
            reason = exc.reason if isinstance(exc, Reject) else exc
            if time.monotonic() >= give_up:
                raise _keep(job_id, f"{what} could not be written ({reason})") from exc
            if tries == 0:
                log.warning(
                    "job %s: Redis refused %s (%s); trying again every %g s",
                    job_id, what, reason, REFUSED_PAUSE_S,
                )  # fmt: skip
            tries += 1
            time.sleep(REFUSED_PAUSE_S)


def _keep(job_id: str, why: str) -> Reject:
    """What the task raises for a delivery that must not be acknowledged: kombu puts the
    message back on the queue, or, when Redis refuses that too, leaves it unacknowledged
    for the visibility sweep. A copy whose job has ended meanwhile finds it ended."""
    log.error("job %s: %s; its message is kept for another delivery", job_id, why)
    return Reject(why, requeue=True)


def run_worker(settings: Settings, loglevel: str = "INFO", log_format: str | None = None) -> int:
    """Size the KV cache, build the engine, consume jobs until told to stop, close the
    engine; exit status. ConfigurationError, before anything starts, when the KV cache
    cannot fit in this machine's memory, or (UnsafeRedis, HERMES_REDIS_CHECK=refuse) when
    Redis would lose jobs."""
    # Before the engine starts: its processes inherit the logging set up here.
    configure_logging(loglevel, log_format, worker=worker_name(settings))
    # Before the model loads: a Redis that would lose jobs is reported (or refused) at once.
    check_at_start(settings)
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
    "scripted_engine_tokens_per_s",
    "redis_check",
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
