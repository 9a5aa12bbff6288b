"""One blocking XREAD for the event streams of every job an asyncio client is reading.

A consumer that follows many jobs at once would otherwise hold one blocking ``XREAD`` per
job: one command, one wake-up and one connection per job for every batch of events the
worker flushes. The hub reads all followed streams in a single ``XREAD BLOCK`` and hands
each job's entries to that job's queue, so a flush that touches 32 jobs costs one command.

A stream followed while the hub is blocked would wait for that read to end. To take it in at
once, the hub also reads a small wake stream of its own (``{prefix}hub:{id}``); following a
new job appends to it, which ends the blocked read. That key holds at most one entry and
expires an hour after its last use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hermes_worker.contract.store import StreamEvent, as_text, decode_event

WAKE_TTL_S = 3600


class Subscription:
    """The entries of one stream, in order, from the hub; ``get`` waits for the next batch."""

    def __init__(self, key: str, cursor: str) -> None:
        self.key = key
        self.cursor = cursor  # the hub reads after this id
        self._batches: asyncio.Queue[list[StreamEvent] | BaseException] = asyncio.Queue()

    def put(self, item: list[StreamEvent] | BaseException) -> None:
        self._batches.put_nowait(item)

    async def get(self, timeout_s: float) -> list[StreamEvent]:
        """The next batch of events; [] when ``timeout_s`` passes first."""
        try:
            item = await asyncio.wait_for(self._batches.get(), timeout_s)
        except TimeoutError:
            return []
        if isinstance(item, BaseException):
            raise item
        return item


def entries_by_stream(reply: Any) -> dict[str, list[tuple[Any, Any]]]:
    """An XREAD reply over many streams as {key: [(id, fields), ...]} (RESP2 or RESP3)."""
    if not reply:
        return {}
    if isinstance(reply, Mapping):  # RESP3: {key: [[entry, ...]]} or {key: [entry, ...]}
        out = {}
        for key, entries in reply.items():
            if (
                entries
                and isinstance(entries[0], list)
                and entries[0]
                and isinstance(entries[0][0], list | tuple)
            ):
                entries = entries[0]
            out[as_text(key)] = list(entries)
        return out
    return {as_text(key): list(entries) for key, entries in reply}


class StreamHub:
    """Reads every followed stream with one ``XREAD BLOCK`` loop (one per asyncio client)."""

    def __init__(self, redis: Redis, prefix: str, *, block_s: float, count: int) -> None:
        self._redis = redis
        self._wake_key = f"{prefix}hub:{uuid.uuid4().hex}"
        self._wake_cursor = "0-0"
        self._wake_expires_at = 0.0
        self._block_ms = max(1, int(block_s * 1000))
        self._count = count
        self._subs: dict[str, list[Subscription]] = {}
        # What the next XREAD asks for: each followed key after its oldest follower's cursor.
        # Kept up to date as followers come, go and advance, not rebuilt for every XREAD.
        self._cursors: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._reading = False  # an XREAD is in flight with the streams followed then

    async def follow(self, key: str, cursor: str) -> Subscription:
        """Start reading ``key`` after entry id ``cursor``."""
        sub = Subscription(key, cursor)
        self._subs.setdefault(key, []).append(sub)
        self._update_cursor(key)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="hermes-stream-hub")
        elif self._reading:
            # A full Redis refuses the XADD: the follower then joins the next read, within
            # one blocking read's time, instead of failing.
            with contextlib.suppress(RedisError):
                await self._wake()
        return sub

    def unfollow(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key, [])
        with contextlib.suppress(ValueError):
            subs.remove(sub)
        if not subs:
            self._subs.pop(sub.key, None)
        self._update_cursor(sub.key)

    async def aclose(self) -> None:
        # The flag as well as the cancel: when a cancel lands just as the blocking read's
        # timeout fires, Python 3.11's asyncio.timeout can turn it into a TimeoutError, which
        # the loop takes for a starved link and retries; it then sees the flag and ends.
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._wake_expires_at:
            with contextlib.suppress(Exception):
                await self._redis.delete(self._wake_key)

    async def _wake(self) -> None:
        now = time.monotonic()
        if now >= self._wake_expires_at - WAKE_TTL_S / 2:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": 1}, maxlen=1, approximate=False)
                pipe.expire(self._wake_key, WAKE_TTL_S)
                await pipe.execute()
            self._wake_expires_at = now + WAKE_TTL_S
        else:
            await self._redis.xadd(self._wake_key, {"w": 1}, maxlen=1, approximate=False)

    async def _run(self) -> None:
        while self._subs and not self._closed:
            streams: dict[Any, Any] = {**self._cursors, self._wake_key: self._wake_cursor}
            self._reading = True
            try:
                reply = await self._redis.xread(streams, count=self._count, block=self._block_ms)
            except RedisTimeoutError:  # a starved link: nothing read; try again
                continue
            except Exception as exc:  # every follower hears of it; the next follow restarts
                for subs in self._subs.values():
                    for sub in subs:
                        sub.put(exc)
                return
            finally:
                self._reading = False
            self._dispatch(entries_by_stream(reply))

    def _update_cursor(self, key: str) -> None:
        # Followers of one key may be at different ids; read from the oldest.
        subs = self._subs.get(key)
        if subs:
            self._cursors[key] = min((sub.cursor for sub in subs), key=entry_order)
        else:
            self._cursors.pop(key, None)

    def _dispatch(self, by_key: dict[str, list[tuple[Any, Any]]]) -> None:
        for key, entries in by_key.items():
            if key == self._wake_key:
                self._wake_cursor = as_text(entries[-1][0])
                continue
            events = [decode_event(entry_id, fields) for entry_id, fields in entries]
            for sub in self._subs.get(key, []):
                fresh = [e for e in events if entry_order(e.id) > entry_order(sub.cursor)]
                if fresh:
                    sub.cursor = fresh[-1].id
                    sub.put(fresh)
            self._update_cursor(key)


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<n>``) as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
