"""Background duties of a worker's runtime loop: leases, cancel requests, engine health.

* :func:`heartbeat` renews the lease of every running job in one call (so no other worker
  takes it), stops any job whose lease was lost, or cannot be proven for longer than the
  lease TTL less a beat (Redis unreachable: another worker may own the job by then;
  :func:`watch_leases`), or
  that has a cancel request, and publishes the worker's own vitals under
  ``{prefix}worker:{name}`` (model, uptime, running jobs, engine load, jobs finished /
  failed lately; layout in :mod:`hermes_worker.worker.vitals`) for operators and tests. The
  hash expires after three missed beats; a clean stop deletes it. Each beat also sweeps for
  dead workers whose messages wait to be put back on the queue (``worker/reaper.py``).
* :func:`listen_for_cancels` reacts to cancel requests at once (pub/sub); the heartbeat's
  check covers a message missed while Redis reconnected.
* :func:`watch_engine` exits the process as soon as the engine dies, idle or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

import structlog
from redis.exceptions import RedisError

from hermes_worker.inference.engine_api import EngineLike
from hermes_worker.worker.execution import JobContext
from hermes_worker.worker.reaper import Reaper
from hermes_worker.worker.vitals import INDEX_PRUNE_S, Vitals, engine_load

log = structlog.stdlib.get_logger(__name__)


async def publish_vitals(ctx: JobContext, vitals: Vitals, ttl_s: float) -> None:
    """Write the vitals hash and the index's score on Redis's clock, measuring this worker's
    offset from it again (one ``TIME``): readers on any host compare them with Redis's now."""
    now = await ctx.clock.sync(ctx.redis)
    fields = vitals.fields(
        now,
        running=len(ctx.controls),
        unfinished=ctx.engine.num_unfinished(),
        load=engine_load(ctx.engine),
    )
    index = ctx.keys.workers
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.hset(ctx.keys.worker(ctx.worker), mapping=fields)
    pipe.expire(ctx.keys.worker(ctx.worker), max(1, math.ceil(ttl_s)))
    pipe.zadd(index, {ctx.worker: now})
    pipe.zremrangebyscore(index, "-inf", now - INDEX_PRUNE_S)
    pipe.expire(index, INDEX_PRUNE_S)
    await pipe.execute()


async def withdraw_vitals(ctx: JobContext) -> None:
    """A clean stop: leave the live workers at once, not after the hash expires. The name
    stays in the index while messages of this worker are still recorded (a restore that
    failed at shutdown): the reaper finds them there."""
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.delete(ctx.keys.worker(ctx.worker))
    pipe.scard(ctx.keys.deliveries(ctx.worker))
    _, held = await pipe.execute()
    if not held:
        await ctx.redis.zrem(ctx.keys.workers, ctx.worker)


async def heartbeat(
    ctx: JobContext, interval_s: float, vitals: Vitals, reaper: Reaper | None = None
) -> None:
    try:
        while True:
            try:
                sent, held = time.monotonic(), dict(ctx.held)
                lost, cancelled = await ctx.leases.renew(held)
                for job_id in held.keys() - lost:
                    if job_id in ctx.proven:
                        ctx.proven[job_id] = sent
                for job_id in lost:
                    if job_id in ctx.ending:  # its end was written: that drops the lease
                        continue
                    log.warning("job %s: lease lost; another worker owns it now", job_id)
                    ctx.lease_lost(job_id)
                for job_id in cancelled:
                    _stop(ctx, job_id, "cancel")
                await publish_vitals(ctx, vitals, ttl_s=interval_s * 3)
                if reaper is not None:
                    await reaper.sweep()
            except RedisError as exc:  # Redis away: leases live on for their TTL; try again
                vitals.redis_errors["heartbeat"] += 1
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(interval_s)
    finally:
        # Bounded: a shutdown must not hang on a Redis that does not answer.
        with contextlib.suppress(RedisError, TimeoutError):
            async with asyncio.timeout(2.0):
                await withdraw_vitals(ctx)


async def watch_leases(ctx: JobContext, beat_s: float) -> None:
    """Stop every job whose lease was last proven (claimed or renewed) longer ago than the
    lease TTL less a beat: by the time it could expire, this worker has stopped writing for
    it. Apart from the heartbeat, whose renewal may itself hang on a Redis that does not
    answer; it looks four times a beat."""
    limit_s = ctx.leases.ttl_ms / 1000 - beat_s
    while True:
        now = time.monotonic()
        for job_id, proven in list(ctx.proven.items()):
            if now - proven > limit_s and job_id in ctx.controls:
                log.warning(
                    "job %s: lease not renewed for %.1f s; stopping it (it may run elsewhere)",
                    job_id,
                    now - proven,
                )
                ctx.lease_lost(job_id)
        await asyncio.sleep(beat_s / 4)


def _stop(ctx: JobContext, job_id: str, reason: str) -> None:
    control = ctx.controls.get(job_id)
    if control is not None:
        control.stop(reason)  # type: ignore[arg-type]  # reason is a StopReason literal


async def listen_for_cancels(ctx: JobContext, vitals: Vitals) -> None:
    while True:
        try:
            async with ctx.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(ctx.keys.cancel_channel)
                async for message in pubsub.listen():
                    job_id = message["data"]
                    _stop(ctx, job_id.decode() if isinstance(job_id, bytes) else job_id, "cancel")
        except RedisError as exc:
            vitals.redis_errors["cancel_listener"] += 1
            log.warning("cancel listener lost Redis (%s); resubscribing", exc)
            await asyncio.sleep(1.0)


async def watch_engine(engine: EngineLike, on_death: Callable[[], None]) -> None:
    """Call ``on_death`` as soon as the engine dies: jobs would only fail here, while a
    restarted worker (or another one) can run them."""
    while not engine.dead:
        await asyncio.sleep(0.5)
    on_death()
