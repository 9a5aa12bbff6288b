"""One blocking XREAD for the event streams of every job an asyncio client is reading, and
for the ends of every job it waits on.

A consumer that follows many jobs at once would otherwise hold one blocking ``XREAD`` per
job: one command, one wake-up and one connection per job for every batch of events the
worker flushes. The hub reads all followed streams in a single ``XREAD BLOCK`` and hands
each job's entries to that job's queue, so a flush that touches 32 jobs costs one command.

A result waiter needs less: only the job's end. Every script that ends a job appends its id
to the deployment's ends stream (``{prefix}ends``, ``Keys.ends``) in the same call, and the
hub reads that one stream, in the same XREAD, while anyone waits on an end
(:meth:`StreamHub.watch_end`), waking the waiters of each id it reads. A wait so costs a
constant number of commands whatever the tokens generated. :class:`EndWatcher` is the same
for the blocking client: one thread, one connection, for all its waiting threads.

A stream followed while the hub is blocked would wait for that read to end. To take it in at
once, the hub also reads a small wake stream of its own (``{prefix}hub:{id}``); following a
new job appends to it, which ends the blocked read. That key holds at most one entry and
expires an hour after its last use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hermes_worker.contract.store import Keys, StreamEvent, as_text, decode_event

log = logging.getLogger(__name__)

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


class EndWait:
    """One waiter on one job's end: :meth:`wait` returns when the hub read that job's id on
    the ends stream (or its read failed: ``broken``, and the waiter watches again)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.broken = False
        self._woken = asyncio.Event()

    def wake(self, *, broken: bool = False) -> None:
        self.broken = self.broken or broken
        self._woken.set()

    async def wait(self, timeout_s: float) -> bool:
        """Whether it was woken within ``timeout_s``; the wake-up is consumed."""
        try:
            await asyncio.wait_for(self._woken.wait(), timeout_s)
        except TimeoutError:
            return False
        self._woken.clear()
        return True


def newest_id(entries: Any) -> str:
    """The id of the entry an ``XREVRANGE ... COUNT 1`` returned, or the start of a stream."""
    if not entries or entries[0][0] is None:
        return "0-0"
    return as_text(entries[0][0])


def lagging(entries: list[tuple[Any, Any]], count: int) -> bool:
    """Whether a read of the ends stream came back full: the reader is behind, and may be
    so far behind that what it had to read next was trimmed (the stream keeps about
    ENDS_MAXLEN entries). Its waiters then check their records rather than wait for an
    entry that may be gone. A reader that keeps up gets every end as it is written."""
    return len(entries) >= count


def end_ids(entries: list[tuple[Any, Any]]) -> list[str]:
    """The job ids of ends stream entries (field ``id``)."""
    ids = []
    for _, fields in entries:
        job_id = fields.get(b"id", fields.get("id"))
        if job_id is not None:
            ids.append(as_text(job_id))
    return ids


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
        self._ends_key = Keys(prefix).ends
        # Read after this id while anyone waits on an end; None while no one does (a new
        # first waiter takes the stream's last id then: what ended before is in the record).
        self._ends_cursor: str | None = None
        self._ends: dict[str, list[EndWait]] = {}
        self._ends_lock = asyncio.Lock()
        self._reading_ends = False  # the XREAD in flight reads the ends stream
        self.reads = 0  # XREADs sent (for tests and benchmarks)
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

    async def watch_end(self, job_id: str) -> EndWait:
        """Wake the returned waiter when ``job_id``'s end is read. Every end written after
        this returns is read; the caller checks the job's record after it, for an end
        written before."""
        wait = EndWait(job_id)
        async with self._ends_lock:
            if self._ends_cursor is None:
                self._ends_cursor = newest_id(await self._redis.xrevrange(self._ends_key, count=1))
            self._ends.setdefault(job_id, []).append(wait)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="hermes-stream-hub")
        elif self._reading and not self._reading_ends:
            with contextlib.suppress(RedisError):
                await self._wake()
        return wait

    def unwatch_end(self, wait: EndWait) -> None:
        waits = self._ends.get(wait.job_id, [])
        with contextlib.suppress(ValueError):
            waits.remove(wait)
        if not waits:
            self._ends.pop(wait.job_id, None)
        if not self._ends:
            self._ends_cursor = None

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
        while (self._subs or self._ends) and not self._closed:
            streams: dict[Any, Any] = {**self._cursors, self._wake_key: self._wake_cursor}
            if self._ends_cursor is not None:
                streams[self._ends_key] = self._ends_cursor
            self._reading, self._reading_ends = True, self._ends_cursor is not None
            try:
                self.reads += 1
                reply = await self._redis.xread(streams, count=self._count, block=self._block_ms)
            except RedisTimeoutError:  # a starved link: nothing read; try again
                continue
            except Exception as exc:  # every follower hears of it; the next follow restarts
                for subs in self._subs.values():
                    for sub in subs:
                        sub.put(exc)
                # End waiters watch again (a fresh cursor) and check their records.
                self._ends_cursor = None
                for waits in self._ends.values():
                    for wait in waits:
                        wait.wake(broken=True)
                return
            finally:
                self._reading = self._reading_ends = False
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
            if key == self._ends_key:
                self._dispatch_ends(entries)
                continue
            events = [decode_event(entry_id, fields) for entry_id, fields in entries]
            for sub in self._subs.get(key, []):
                fresh = [e for e in events if entry_order(e.id) > entry_order(sub.cursor)]
                if fresh:
                    sub.cursor = fresh[-1].id
                    sub.put(fresh)
            self._update_cursor(key)

    def _dispatch_ends(self, entries: list[tuple[Any, Any]]) -> None:
        last = as_text(entries[-1][0])
        # None: no one waits now (a waiter that comes takes a fresh cursor). A read made
        # before the last waiter left and a new one came may end before the new cursor:
        # keep the later one.
        if self._ends_cursor is not None and entry_order(last) > entry_order(self._ends_cursor):
            self._ends_cursor = last
        if lagging(entries, self._count):  # every waiter checks its record
            for waits in self._ends.values():
                for wait in waits:
                    wait.wake()
            return
        for job_id in end_ids(entries):
            for wait in self._ends.get(job_id, []):
                wait.wake()


class EndWatcher:
    """The blocking client's reader of the ends stream: one thread with one connection
    reads it for every thread waiting on a job's end, while anyone does.

    :meth:`watch` registers a waiter (a :class:`threading.Event`, set when the job's id is
    read) before the caller checks the job's record, so an end is either in the record
    then or read after. The thread stops when no one waits; a read that fails sets every
    waiter's event and drops the cursor (they check their records, and watch on)."""

    def __init__(self, redis: SyncRedis, ends_key: str, *, block_s: float, count: int) -> None:
        self._redis = redis
        self._key = ends_key
        self._block_ms = max(1, int(block_s * 1000))
        self._count = count
        self._lock = threading.Lock()
        self._waits: dict[str, list[threading.Event]] = {}
        self._cursor: str | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.reads = 0  # XREADs sent (for tests and benchmarks)

    def watch(self, job_id: str) -> threading.Event:
        woken = threading.Event()
        with self._lock:
            if self._cursor is None:
                self._cursor = newest_id(self._redis.xrevrange(self._key, count=1))
            self._waits.setdefault(job_id, []).append(woken)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hermes-end-watcher", daemon=True
                )
                self._thread.start()
        return woken

    def unwatch(self, job_id: str, woken: threading.Event) -> None:
        with self._lock:
            waits = self._waits.get(job_id, [])
            with contextlib.suppress(ValueError):
                waits.remove(woken)
            if not waits:
                self._waits.pop(job_id, None)

    def close(self) -> None:
        """Stop reading. Not joined: the thread ends after its read in flight (at most one
        blocking read's time), or at once when the client's pool is closed under it."""
        self._closed = True

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._waits or self._closed or self._cursor is None:
                    self._thread, self._cursor = None, None
                    return
                cursor = self._cursor
            try:
                self.reads += 1
                reply = self._redis.xread(
                    {self._key: cursor}, count=self._count, block=self._block_ms
                )
            except RedisTimeoutError:
                continue
            except Exception as exc:  # every waiter checks its record instead
                log.debug("end watcher: read failed: %s", exc)
                with self._lock:
                    waits = [w for ws in self._waits.values() for w in ws]
                    self._thread, self._cursor = None, None
                for woken in waits:
                    woken.set()
                return
            entries = entries_by_stream(reply).get(self._key, [])
            if not entries:
                continue
            with self._lock:
                last = as_text(entries[-1][0])
                if self._cursor is not None and entry_order(last) > entry_order(self._cursor):
                    self._cursor = last
                if lagging(entries, self._count):  # every waiter checks its record
                    ended = [w for ws in self._waits.values() for w in ws]
                else:
                    ids = end_ids(entries)
                    ended = [w for job_id in ids for w in self._waits.get(job_id, [])]
            for event in ended:
                event.set()


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<n>``) as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
