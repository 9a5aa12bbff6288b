"""The per-process runtime: one asyncio loop in its own thread, owning the engine.

Celery's thread pool runs many tasks at once; each task hands its job to one of a few
prepare threads, which validates, renders and tokenizes it and starts its attempt on this
loop (``run_coroutine_threadsafe``); the task's thread blocks on the attempt's future. All
jobs therefore share one ``AsyncLLM``, which batches them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import structlog
from redis.exceptions import RedisError

from hermes_worker.contract.jobs import JobStatus, parse_job, usable_job_id
from hermes_worker.contract.store import Keys, as_text, async_client, body_digest, body_json
from hermes_worker.errors import (
    EngineError,
    ForgedMessage,
    HermesError,
    InvalidRequest,
    PoisonMessage,
    StoreUnavailable,
)
from hermes_worker.inference.engine_api import start_engine
from hermes_worker.inference.sampling import plan_generation, prompt_suffix
from hermes_worker.inference.template import PromptRenderer
from hermes_worker.settings import Settings
from hermes_worker.testing.scripted_engine import EXIT_CRASHED
from hermes_worker.worker.execution import (
    JobContext,
    OutputPace,
    PreparedJob,
    dead_letter,
    reject,
    run_attempt,
)
from hermes_worker.worker.heartbeat import (
    heartbeat,
    listen_for_cancels,
    watch_engine,
    watch_leases,
    withdraw_vitals,
)
from hermes_worker.worker.leases import Leases
from hermes_worker.worker.metrics import WorkerMetrics, start_metrics
from hermes_worker.worker.reaper import Reaper
from hermes_worker.worker.stream import StreamWriter
from hermes_worker.worker.tasks import cancel_and_wait
from hermes_worker.worker.transport import Transport, stop_taking
from hermes_worker.worker.vitals import Vitals, worker_name

log = structlog.stdlib.get_logger(__name__)
T = TypeVar("T")
EXIT_ENGINE_DEAD = 70  # EX_SOFTWARE: a supervisor restarts the worker


class Runtime:
    """Engine + Redis + stream writer on a private loop; build once per worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.worker = worker_name(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hermes-runtime")
        self._thread.daemon = True
        self._ctx: JobContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics: WorkerMetrics | None = None
        self._renderer: PromptRenderer | None = None
        self._reaper: Reaper | None = None
        self._dying: asyncio.Future[None] | None = None
        # Validation, rendering and tokenizing run on a fixed few threads, not in the Celery
        # thread of each job (128 by default): each thread that tokenizes keeps native caches
        # of its own, so memory grew with the threads. One thread alone was too slow to start
        # a burst of jobs while the loop held the GIL (docs/benchmarks.md).
        self._preparer = ThreadPoolExecutor(
            settings.prepare_threads, thread_name_prefix="hermes-prepare"
        )

    # -- lifecycle (called from the worker's main thread) --------------------------------------

    def start(self, timeout: float = 900.0) -> None:
        """Start the loop thread and build the engine on it; returns when it is ready."""
        self._thread.start()
        self._call(self._startup(), timeout)
        # Our own tokenizer for rendering: vLLM's lives on the loop and must not be shared.
        self._renderer = PromptRenderer.from_pretrained(str(self.settings.model))
        log.info("runtime ready: worker=%s max_model_len=%s", self.worker, self.max_model_len)

    def stop(self, timeout: float = 60.0) -> None:
        """Flush pending writes, shut the engine down, stop the loop."""
        if not self._thread.is_alive():
            return
        try:
            self._call(self._shutdown(), timeout)
        finally:
            self._preparer.shutdown(wait=False)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    @property
    def max_model_len(self) -> int:
        return self._context.engine.max_model_len

    @property
    def _context(self) -> JobContext:
        if self._ctx is None:
            raise RuntimeError("the runtime is not started")
        return self._ctx

    async def _startup(self) -> None:
        settings = self.settings
        engine = start_engine(settings)
        redis = async_client(settings.redis_url)
        writer = StreamWriter(
            redis,
            self.keys,
            flush_s=settings.stream_flush_ms / 1000,
            ttl_s=settings.result_ttl_s,
            min_tokens=settings.stream_min_tokens,
            max_flush_s=settings.stream_max_flush_ms / 1000,
        )
        writer.start()
        self._ctx = JobContext(
            engine,
            redis,
            writer,
            Leases(redis, self.keys, settings.lease_ttl_s),
            self.keys,
            worker=self.worker,
            model=settings.model or "unknown",
            max_generation_s=settings.max_generation_s,
            fault_injection=settings.fault_injection,
            pace=OutputPace.from_settings(settings),
        )
        beat_s = settings.lease_ttl_s / 3
        vitals = Vitals(self.worker, self._ctx.model, settings.queue_name, interval_s=beat_s)
        self._ctx.observers.append(vitals.observe)
        # Served once the engine runs, so that none of its processes inherits the socket.
        if settings.metrics_port is not None:
            self._metrics = start_metrics(self._ctx, vitals, settings.metrics_port)
        self._reaper = Reaper(redis, self.keys, self.worker, dead_after_s=settings.lease_ttl_s)
        self._tasks = [
            asyncio.create_task(watch_engine(engine, self._on_engine_death)),
            asyncio.create_task(heartbeat(self._ctx, beat_s, vitals, self._reaper)),
            asyncio.create_task(watch_leases(self._ctx, beat_s)),
            asyncio.create_task(listen_for_cancels(self._ctx, vitals)),
        ]

    async def _shutdown(self) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        await cancel_and_wait(self._tasks)  # a deliberate shutdown is not a dead engine
        await ctx.writer.stop()
        await ctx.redis.aclose()
        if self._metrics is not None:
            self._metrics.close()
        ctx.engine.shutdown()

    # -- engine death ---------------------------------------------------------------------------

    def die(self) -> None:
        """The engine died: hand every job back, then exit. From a job's thread."""
        self._call(self._die())

    def _on_engine_death(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._die()))

    async def _die(self) -> None:
        if self._dying is None:  # on the loop: the first one hands back and exits
            log.critical("the engine died; handing every job back")
            self._dying = asyncio.ensure_future(self._hand_back_all())
        await self._dying
        _exit_engine_dead()

    async def _hand_back_all(self) -> None:
        """Every job this worker holds goes back to the queue now, not when its lease and
        this worker's heartbeat have expired: leases released (status ``queued``), messages
        put back on the queue under new delivery tags (so nothing this process still does
        can acknowledge them), vitals withdrawn. Bounded: a Redis that does not answer
        leaves them to the other workers' reapers."""
        ctx = self._context
        ctx.shutting_down = True
        stop_taking(self.keys.deliveries(self.worker))
        try:
            # A BRPOP already sent may still bring a message: it is recorded before we look.
            await asyncio.sleep(Transport.brpop_timeout + 0.2)
            async with asyncio.timeout(5.0):
                for job_id, token in list(ctx.held.items()):
                    ctx.drop_lease(job_id)
                    await ctx.leases.release(job_id, token, requeue=True)
                if self._reaper is not None:
                    await self._reaper.restore(self.worker)
                await withdraw_vitals(ctx)
        except (RedisError, TimeoutError) as exc:
            log.error("could not hand every job back (%s); the reapers will", exc)

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop taking jobs; after ``grace_s`` abort what still runs and hand it back.
        Thread-safe (called from Celery's signal handler)."""
        self._loop.call_soon_threadsafe(self._begin_shutdown, grace_s)

    def _begin_shutdown(self, grace_s: float) -> None:
        ctx = self._context
        ctx.shutting_down = True  # copies waiting on another worker's lease give up now
        log.info(
            "shutting down: %d running job(s) get %.0f s to finish", len(ctx.controls), grace_s
        )

        def abort_the_rest() -> None:
            for control in list(ctx.controls.values()):
                control.stop("shutdown")

        self._loop.call_later(grace_s, abort_the_rest)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._start(coro).result(timeout)

    def _start(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- jobs (called from Celery's worker threads) ---------------------------------------------

    def run_job(self, body: Any, task_id: str) -> JobStatus | None:
        """Run one delivered job to its end; its terminal status, or None when it must go
        back to the queue (the worker is shutting down, or lost the job's lease).

        The delivery is counted first, before the body is even validated, and must carry
        the body the job's record holds: a job whose deliveries keep killing their worker
        fails as poison, and a forged message raises :class:`ForgedMessage` (it is dropped;
        the real job is left as it is)."""
        job_id = job_id_for(body, task_id)
        try:
            ended = self._call(self._count_delivery(body, job_id))
        except RedisError as exc:
            raise StoreUnavailable(f"Redis failed as the job was delivered: {exc}") from exc
        if ended is not None:
            return ended
        started, rejected = self._preparer.submit(self._prepare_and_start, body, job_id).result()
        if rejected is not None:
            log.info("job %s rejected: %s: %s", job_id, rejected.type, rejected.message)
        try:
            status = started.result()
        except EngineError:
            if self._context.engine.dead:
                self.die()
            raise
        except RedisError as exc:
            raise StoreUnavailable(f"Redis failed while the job ran: {exc}") from exc
        if status is None:  # handed back: this delivery did not crash anything
            self.uncount_delivery(job_id)
        return status

    async def _count_delivery(self, body: Any, job_id: str) -> JobStatus | None:
        """Count this delivery; the status to answer at once (the job has ended, or is
        poison now), else None: run it."""
        ctx = self._context
        limit = self.settings.max_deliveries
        try:
            delivered = body_json(body)
        except (TypeError, ValueError):
            delivered = json.dumps(body, ensure_ascii=False, default=str)
        outcome, detail = await ctx.leases.count_delivery(job_id, body_digest(delivered), limit)
        if outcome == "mismatch":
            stored = await ctx.redis.hget(self.keys.job(job_id), "body")
            if stored is None or not _same_body(stored, body):
                raise ForgedMessage(
                    f"a message for job {job_id} carries a body that is not the job's own"
                )
            # The same body, written differently by a foreign producer: counted under its digest.
            digest = body_digest(as_text(stored))
            outcome, detail = await ctx.leases.count_delivery(job_id, digest, limit)
        if outcome == "ended":
            return JobStatus(detail)
        if outcome == "poison":
            error = PoisonMessage(
                f"delivered {int(detail) - 1} times and each delivery ended its worker "
                f"before the job ended (HERMES_MAX_DELIVERIES={limit})"
            )
            log.error("job %s: %s; dead-lettered", job_id, error.message)
            return await self._poisoned(job_id, error)
        return None

    async def _poisoned(self, job_id: str, error: PoisonMessage) -> JobStatus | None:
        """Fail a poison job into the dead letters. The worker its last delivery killed may
        still hold its lease: wait for that to expire, as a claim would."""
        ctx = self._context
        while not ctx.shutting_down:
            outcome = await dead_letter(ctx, job_id, error)
            if outcome == "dead":
                return JobStatus.FAILED
            if outcome != "leased":  # it has ended meanwhile
                return JobStatus(outcome)
            await asyncio.sleep(ctx.leases.ttl_ms / 3000)
        return None

    def uncount_delivery(self, job_id: str) -> None:
        """This delivery ended without ending its job (a retry, a hand-back): it does not
        count towards poison."""
        try:
            self._call(self._context.leases.uncount_delivery(job_id), timeout=10.0)
        except (RedisError, TimeoutError) as exc:
            log.warning("job %s: delivery count not taken back: %s", job_id, exc)

    def _prepare_and_start(
        self, body: Any, job_id: str
    ) -> tuple[Future[JobStatus | None], HermesError | None]:
        """In a prepare thread: prepare the job and start its attempt on the loop (or its
        rejection, with the error). The prepare thread hands the job to the loop itself,
        so no other thread has to wake up between the two before the claim."""
        try:
            prepared = self.prepare(body, job_id)
        except HermesError as exc:
            return self._start(reject(self._context, job_id, exc)), exc
        return self._start(run_attempt(self._context, prepared)), None

    def dead_letter(self, job_id: str, error: HermesError) -> None:
        """A job out of retries: fail it for good and list it in the dead letters."""
        self._call(dead_letter(self._context, job_id, error))

    def prepare(self, body: Any, job_id: str) -> PreparedJob:
        """Validate, render and tokenize in the calling thread (``run_job``: a prepare
        thread), keeping that work off the loop."""
        if self.settings.fault_injection:
            _crash_on_request(body)
        _check_size(body, self.settings.max_body_bytes)
        if isinstance(body, dict) and "id" not in body:
            body = {**body, "id": job_id}
        job = parse_job(body)
        renderer = self._renderer
        assert renderer is not None, "start() first"
        ids = renderer.render(job, prompt_suffix(job)).token_ids
        plan = plan_generation(job, len(ids), self.max_model_len)
        return PreparedJob(job_id=job_id, job=job, token_ids=ids, plan=plan)


def _exit_engine_dead() -> None:
    # Not sys.exit: the job threads must not ack anything. A supervisor restarts us.
    log.critical("exiting %d so a supervisor restarts this worker", EXIT_ENGINE_DEAD)
    logging.shutdown()
    os._exit(EXIT_ENGINE_DEAD)


def _crash_on_request(body: Any) -> None:
    """Tests only (``HERMES_FAULT_INJECTION``): metadata ``hermes_fault`` =
    ``exit_in_validation`` ends the worker process at once, before the body is validated: a
    message that crashes every worker it reaches."""
    metadata = body.get("metadata") if isinstance(body, dict) else None
    if isinstance(metadata, dict) and metadata.get("hermes_fault") == "exit_in_validation":
        log.critical("fault injection: exiting while validating a job")
        logging.shutdown()
        os._exit(EXIT_CRASHED)


def _same_body(stored: bytes | str, delivered: Any) -> bool:
    try:
        return bool(json.loads(stored) == delivered)
    except ValueError:
        return False


def _check_size(body: Any, limit: int) -> None:
    # Producers check too, but a foreign one may not: the worker enforces the same limit.
    size = len(json.dumps(body, ensure_ascii=False, default=str).encode("utf-8", "replace"))
    if size > limit:
        raise InvalidRequest(f"body is {size} bytes, over the {limit}-byte limit")


def job_id_for(body: Any, task_id: str) -> str:
    """The job id: the body's own when it is a usable id, else the Celery task id."""
    candidate = body.get("id") if isinstance(body, dict) else None
    if isinstance(candidate, str) and usable_job_id(candidate):
        return candidate
    return task_id
