"""Background duties of a worker's runtime loop: leases, cancel requests, engine health.

* :func:`heartbeat` renews the lease of every running job (so no other worker takes it),
  stops any job whose lease was lost or that has a cancel request, and publishes the
  worker's own vitals under ``{prefix}worker:{name}`` (model, uptime, running jobs, engine
  load, jobs finished / failed lately; layout in :mod:`hermes_worker.worker.vitals`) for
  operators and tests. The hash expires after three missed beats; a clean stop deletes it.
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
from hermes_worker.worker.vitals import INDEX_PRUNE_S, Vitals, engine_load

log = structlog.stdlib.get_logger(__name__)


async def publish_vitals(ctx: JobContext, vitals: Vitals, ttl_s: float) -> None:
    now = time.time()
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
    """A clean stop: leave the live workers at once, not after the hash expires."""
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.delete(ctx.keys.worker(ctx.worker))
    pipe.zrem(ctx.keys.workers, ctx.worker)
    await pipe.execute()


async def heartbeat(ctx: JobContext, interval_s: float, vitals: Vitals) -> None:
    try:
        while True:
            try:
                lost, cancelled = await ctx.leases.renew(dict(ctx.held))
                for job_id in lost:
                    log.warning("job %s: lease lost; another worker owns it now", job_id)
                    _stop(ctx, job_id, "lease_lost")
                for job_id in cancelled:
                    _stop(ctx, job_id, "cancel")
                await publish_vitals(ctx, vitals, ttl_s=interval_s * 3)
            except RedisError as exc:  # Redis away: leases live on for their TTL; try again
                vitals.redis_errors["heartbeat"] += 1
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(interval_s)
    finally:
        # Bounded: a shutdown must not hang on a Redis that does not answer.
        with contextlib.suppress(RedisError, TimeoutError):
            async with asyncio.timeout(2.0):
                await withdraw_vitals(ctx)


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
