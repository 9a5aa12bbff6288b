"""A dead worker's jobs back on their queue in seconds, whatever the visibility timeout.

kombu's Redis transport keeps each delivered message in its ``unacked`` hash until it is
acknowledged; if its worker dies, only the visibility sweep puts it back, once it is older
than the visibility timeout (an hour in compose.yaml, so that no long job is delivered
twice). Meanwhile the dead worker's jobs wait.

So each worker also records the delivery tags it holds, in
``{prefix}worker:{name}:deliveries`` (``worker/transport.py``, in the same round trip as
kombu's own record), and every worker's heartbeat runs :meth:`Reaper.sweep`: a worker whose
last heartbeat is older than the lease TTL and whose vitals hash has expired is dead, and
each of its messages goes back to the head of its queue under a new delivery tag. Each move
is one script (``contract.scripts.RESTORE``) that acts only while the message's unacked
entry is still the one read, so any number of workers can sweep at once and a message moves
once; a late acknowledgement of the old tag (a worker that was only paused) removes nothing.
A dead worker leaves the workers index once nothing of it is left to restore.

The job itself is untouched: its lease expires on its own within the same TTL, and the next
delivery claims it as the next attempt. A worker whose engine died hands its own messages
back the same way before it exits (:meth:`Reaper.restore`), without waiting to be found.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import structlog
from redis.asyncio import Redis

from hermes_worker.contract import scripts
from hermes_worker.contract.clock import redis_time
from hermes_worker.contract.queue import (
    PRIORITY_STEPS,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    queue_list,
)
from hermes_worker.contract.store import Keys, as_text

log = structlog.stdlib.get_logger(__name__)


def requeued_message(entry: bytes | str) -> tuple[str, str]:
    """The queue list and the message to push for one ``unacked`` entry (``[message,
    exchange, routing key]``): the same message under a new delivery tag, marked redelivered
    as kombu marks the ones it restores. The routing key names the queue (the anonymous
    exchange; Celery's default exchange is named after its queue too)."""
    message, _exchange, routing_key = json.loads(as_text(entry))
    properties = message["properties"]
    properties["delivery_tag"] = str(uuid.uuid4())
    properties.get("delivery_info", {})["redelivered"] = True
    if isinstance(message.get("headers"), dict):
        message["headers"]["redelivered"] = True
    try:
        priority = int(properties.get("priority", 0))
    except (TypeError, ValueError):
        priority = 0
    step = min(max(priority, PRIORITY_STEPS[0]), PRIORITY_STEPS[-1])
    # kombu's own encoding (json.dumps' default separators): the consumer reads the
    # delivery tag off the start of the message (scripts.TAKE_MORE).
    return queue_list(routing_key, step), json.dumps(message)


class Reaper:
    """Finds dead workers and puts their messages back on the queue."""

    def __init__(self, redis: Redis, keys: Keys, worker: str, dead_after_s: float) -> None:
        self._redis, self._keys, self._worker = redis, keys, worker
        self.dead_after_s = dead_after_s
        self._restore = redis.register_script(scripts.RESTORE)
        self._forget = redis.register_script(scripts.FORGET_WORKER)
        self.restored = 0  # messages this worker put back (metrics, tests)

    async def sweep(self) -> int:
        """Restore the messages of every dead worker; how many went back. The heartbeats'
        scores are on Redis's clock (``heartbeat.publish_vitals``), and so is the now they
        are compared with: a worker whose clock is off neither looks dead nor finds others so."""
        keys = self._keys
        now = redis_time(await self._redis.time())
        stale = await self._redis.zrangebyscore(keys.workers, "-inf", now - self.dead_after_s)
        count = 0
        for raw in stale:
            name = as_text(raw)  # type: ignore[arg-type]  # no scores asked: names only
            if name == self._worker or await self._redis.exists(keys.worker(name)):
                continue  # itself, or alive (a heartbeat late by less than its hash's TTL)
            count += await self.restore(name)
            forget_keys = [keys.workers, keys.worker(name), keys.deliveries(name)]
            await self._forget(keys=forget_keys, args=[name])
        return count

    async def restore(self, name: str) -> int:
        """Put back every message worker ``name`` holds (it is dead, or it is this worker
        handing its own back); how many went back."""
        owned = self._keys.deliveries(name)
        tags = [as_text(tag) for tag in await self._redis.smembers(owned)]
        if not tags:
            return 0
        entries = await self._redis.hmget(UNACKED_KEY, tags)
        count = 0
        for tag, entry in zip(tags, entries, strict=True):
            if entry is None:  # acknowledged, or restored by someone else: nothing to move
                await self._redis.srem(owned, tag)
                continue
            try:
                list_key, message = requeued_message(entry)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.error("left an unreadable unacked message %s to the sweep: %s", tag, exc)
                await self._redis.srem(owned, tag)
                continue
            keys: list[Any] = [UNACKED_KEY, UNACKED_INDEX_KEY, owned, list_key]
            count += int(await self._restore(keys=keys, args=[tag, entry, message]))
        if count:
            log.warning("put %d message(s) of worker %s back on the queue", count, name)
        self.restored += count
        return count
