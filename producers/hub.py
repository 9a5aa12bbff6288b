"""One blocking XREAD for the event streams of every job an asyncio client is reading, and
for the ends of every job it waits on.

A consumer that follows many jobs at once would otherwise hold one blocking ``XREAD`` per
job: one command, one wake-up and one connection per job for every batch of events the
worker flushes. The hub reads all followed streams in a single ``XREAD BLOCK`` and hands
each job's entries to that job's queue, so a flush that touches 32 jobs costs one command.

A result waiter needs less: only the job's end. Every script that ends a job appends its id
to the job's ends stream in the same call: the stream of the client that submitted it,
``{prefix}ends:{owner}`` (``Keys.ends_for``, named in the job's record, field ``ends``), or
the deployment's shared ``{prefix}ends`` for a job without that field (another producer's).
So an end wakes only the processes that await that job, not every waiting process of the
fleet. The hub reads the ends streams its waiters need (:meth:`StreamHub.watch_end`: its
own client's, and those of jobs other clients submitted), in the same XREAD, while anyone
waits on them, waking the waiters of each id it reads. A wait so costs a constant number of
commands whatever the tokens generated. :class:`EndWatcher` is the same for the blocking
client: one thread, one connection, one XREAD for all its waiting threads and their streams.

A stream followed while the hub is blocked would wait for that read to end. To take it in at
once, the hub also reads a small wake stream of its own (``{prefix}hub:{id}``); following a
new job (or waiting on an ends stream the read in flight does not read) appends to it, which
ends the blocked read. That key holds at most one entry and expires an hour after its last
use. The :class:`EndWatcher` keeps one too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hermes_worker.contract.store import Keys, StreamEvent, as_text, decode_event

log = logging.getLogger(__name__)

WAKE_TTL_S = 3600
# A stream followed by notice is also read when nothing has named it for this long: a
# notice is dropped when Redis refuses it, and a worker older than notices sends none.
NOTICE_SWEEP_S = 1.0


class WakeStream:
    """A reader's own stream (``{prefix}hub:{id}``), read in every XREAD it makes: an entry
    added ends the read in flight, so that a stream it does not read yet joins the next one.
    One entry at most (MAXLEN 1), and an expiry renewed at most every half WAKE_TTL_S: a
    reader that dies leaves nothing behind for long. The caller sends what :meth:`queue`
    put on its pipeline (blocking or asyncio), then notes it with :meth:`sent`.

    One wake-up per read is enough: the read it ends is followed by one for every stream
    added meanwhile. A burst of new streams (128 requests at once at a gateway) then costs
    one XADD and one more XREAD, not one of each per stream (the XREADs, each over the
    streams added so far, grew with the square of the burst)."""

    def __init__(self, prefix: str) -> None:
        self.key = f"{prefix}hub:{uuid.uuid4().hex}"
        self.cursor = "0-0"
        self._expires_at = 0.0  # 0: never written
        self._pending = False  # a wake-up was sent since the read in flight began

    def reading(self) -> None:
        """A read begins, over every stream wanted now: a new stream needs a new wake-up."""
        self._pending = False

    def claim(self) -> bool:
        """Whether this caller is to send the wake-up: none is on its way yet."""
        if self._pending:
            return False
        self._pending = True
        return True

    def failed(self) -> None:
        """The wake-up did not go out: the next caller tries again."""
        self._pending = False

    @property
    def written(self) -> bool:
        return self._expires_at > 0

    def queue(self, pipe: Any) -> float:
        """Put the wake-up (and the expiry, when due) on ``pipe``; returns the expiry to
        pass to :meth:`sent` once the pipeline went through."""
        pipe.xadd(self.key, {"w": 1}, maxlen=1, approximate=False)
        now = time.monotonic()
        if now < self._expires_at - WAKE_TTL_S / 2:
            return self._expires_at
        pipe.expire(self.key, WAKE_TTL_S)
        return now + WAKE_TTL_S

    def sent(self, expires_at: float) -> None:
        self._expires_at = expires_at

    def read(self, entries: list[tuple[Any, Any]]) -> None:
        """The XREAD returned ``entries`` of this stream: read on after them."""
        self.cursor = as_text(entries[-1][0])


class Subscription:
    """The entries of one stream, in order, from the hub; ``get`` waits for the next batch.
    ``notices``: the notice stream that names job ``job_id`` when its stream is written (the
    hub then takes the events a notice carries, or reads the stream after it, rather than
    blocking on it); None: the hub blocks on the stream itself."""

    def __init__(
        self, key: str, cursor: str, *, notices: str | None = None, job_id: str = ""
    ) -> None:
        self.key = key
        self.cursor = cursor  # the hub reads after this id
        # The seq of the entry at ``cursor`` (0: the stream was read empty from its start;
        # None: not known yet): events a notice carries are taken when they follow it.
        self.last_seq: int | None = None
        self.notices = notices
        self.job_id = job_id
        self._batches: asyncio.Queue[list[StreamEvent] | BaseException] = asyncio.Queue()

    def put(self, item: list[StreamEvent] | BaseException) -> None:
        self._batches.put_nowait(item)

    def advance(self, events: list[StreamEvent]) -> None:
        """Hand over ``events``, read after :attr:`cursor` and in order."""
        if events:
            self.cursor, self.last_seq = events[-1].id, events[-1].seq
            self.put(events)

    def take(self, carried: list[CarriedEvent]) -> bool:
        """Take the events a notice carried for this job, when they are the stream's next
        ones: their seqs follow :attr:`last_seq` without a gap (a job's events are written
        in seq order, each seq once, by one writer at a time). Events it has already are
        skipped. False: they do not follow, or none were carried; its stream is to be read."""
        if not carried or self.last_seq is None:
            return False
        fresh = [item for item in carried if item[1] > self.last_seq]
        for expected, item in enumerate(fresh, start=self.last_seq + 1):
            if item[1] != expected:
                return False
        self.advance([carried_event(item) for item in fresh])
        return True

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
    the ends stream ``key`` (or its read failed: ``broken``, and the waiter watches again)."""

    def __init__(self, job_id: str, key: str) -> None:
        self.job_id = job_id
        self.key = key
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


class EndEvent(threading.Event):
    """The blocking client's waiter on one job's end: set when the :class:`EndWatcher` read
    that job's id on the ends stream ``key``, or when its read failed."""

    def __init__(self, job_id: str, key: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.key = key


class RecordReads:
    """Reads of job records (HMGET) asked for in the same turn of an asyncio loop, sent
    together in one pipeline: one round trip for them all. A client's result waiters wake
    together (the hub reads many ends at once; their periodic checks fall on a common grid,
    see ``producers.client.on_check_grid``), and each round trip costs Redis more than the
    small reads in it. A read that Redis refuses fails alone; a connection that fails fails
    every read sent with it, as it would have failed each of them."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queued: list[tuple[str, tuple[str, ...], asyncio.Future[list[Any]]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.pipelines = 0  # round trips made (for tests and benchmarks)

    async def hmget(self, key: str, *fields: str) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._send)
        self._queued.append((key, fields, future))
        return await future

    def _send(self) -> None:
        queued, self._queued = self._queued, []
        task = asyncio.ensure_future(self._read(queued))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _read(
        self, queued: list[tuple[str, tuple[str, ...], asyncio.Future[list[Any]]]]
    ) -> None:
        wanted = [item for item in queued if not item[2].done()]  # a waiter gone meanwhile
        if not wanted:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key, fields, _ in wanted:
                pipe.hmget(key, *fields)
            self.pipelines += 1
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:  # the client is closing
            for _, _, future in wanted:
                future.cancel()
            raise
        except Exception as exc:
            for _, _, future in wanted:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), reply in zip(wanted, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def aclose(self) -> None:
        for task in list(self._sending):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._sending, return_exceptions=True)


def newest_id(entries: Any) -> str:
    """The id of the entry an ``XREVRANGE ... COUNT 1`` returned, or the start of a stream."""
    if not entries or entries[0][0] is None:
        return "0-0"
    return as_text(entries[0][0])


def lagging(entries: list[tuple[Any, Any]], count: int) -> bool:
    """Whether a read of an ends stream came back full: the reader is behind, and may be
    so far behind that what it had to read next was trimmed (the stream keeps about
    ENDS_MAXLEN entries). That stream's waiters then check their records rather than wait
    for an entry that may be gone. A reader that keeps up gets every end as it is written."""
    return len(entries) >= count


def written_ids(entries: list[tuple[Any, Any]]) -> list[str]:
    """The job ids of notice stream entries (field ``ids``, space-separated)."""
    ids = []
    for _, fields in entries:
        named = fields.get(b"ids", fields.get("ids"))
        if named is not None:
            ids += as_text(named).split()
    return ids


# An event a notice carried (Keys.notices, NOTICE_CARRY_BYTES): its entry id in the job's
# stream, seq, type and data JSON, as (id, seq, type, data).
CarriedEvent = tuple[str, int, str, Any]


def carried_events(entries: list[tuple[Any, Any]]) -> dict[str, list[CarriedEvent]]:
    """The events notice stream entries carry, by job id, in the order written (a field
    each, named '<job id> <entry id> <seq> <type>', valued the data JSON: see
    ``contract.scripts.WRITE``). Their data is decoded only when taken (:func:`carried_event`)."""
    out: dict[str, list[CarriedEvent]] = {}
    for _, fields in entries:
        for name, value in fields.items():
            parts = as_text(name).split(" ")
            if len(parts) == 4 and parts[2].isdigit():
                job_id, entry_id, seq, type_ = parts
                out.setdefault(job_id, []).append((entry_id, int(seq), type_, value))
    return out


def carried_event(item: CarriedEvent) -> StreamEvent:
    entry_id, seq, type_, data = item
    return decode_event(entry_id, {"seq": str(seq), "type": type_, "data": data})


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


Waiter = TypeVar("Waiter")

# How many job ids a reader remembers of each ends stream it reads (ReadSince).
READ_MEMORY = 4096


class ReadSince:
    """The job ids a reader read on one ends stream since it began reading it without a
    break (its cursor set, no failed read, no read that came back full): the last
    READ_MEMORY of them, and a count of all. A job submitted by this client while that
    stream was read (:meth:`mark` taken before the submit was sent) ends with an entry
    written after the mark, so that entry is either among the ids read since, or not read
    yet, and then a waiter registered now is woken by it: that waiter needs no first look
    at the record (:meth:`unread`)."""

    def __init__(self) -> None:
        self.count = 0
        self._ids: deque[str] = deque()
        self._known: dict[str, int] = {}  # id -> how many times in _ids

    def add(self, ids: list[str]) -> None:
        for job_id in ids:
            self.count += 1
            self._ids.append(job_id)
            self._known[job_id] = self._known.get(job_id, 0) + 1
            if len(self._ids) > READ_MEMORY:
                old = self._ids.popleft()
                left = self._known[old] - 1
                if left:
                    self._known[old] = left
                else:
                    del self._known[old]

    def mark(self) -> int:
        return self.count

    def unread(self, mark: int, job_id: str) -> bool:
        """Whether no entry for ``job_id`` was read since ``mark`` (False when the ids read
        since are more than it remembers)."""
        return self.count - mark <= READ_MEMORY and job_id not in self._known


# Where a reader's reading of one stream stood (StreamHub.end_mark, notice_mark,
# EndWatcher.mark): the ReadSince of that stream then, and its count.
ReadMark = tuple[ReadSince, int]


class EndStreams(Generic[Waiter]):
    """The ends streams one reader reads for its waiters: for each stream that has a waiter,
    the entry id to read after and the waiters of each job id. The hub's and the
    :class:`EndWatcher`'s bookkeeping (their callers serialize the calls).

    A stream gets its cursor from its first waiter (the stream's last id then: what ended
    before is in the job's record, which the waiter checks after watching) and loses it with
    its last waiter, so only streams someone waits on are read. ``ids_of``: the job ids an
    entry names (:func:`end_ids` for ends streams, :func:`written_ids` for notice streams)."""

    def __init__(self, ids_of: Callable[[list[tuple[Any, Any]]], list[str]] = end_ids) -> None:
        self._ids_of = ids_of
        self.cursors: dict[str, str] = {}  # what the next read asks for: key -> after this id
        self._waits: dict[str, dict[str, list[Waiter]]] = {}  # key -> job id -> waiters
        # For each stream read, the ids read since its cursor was set (see mark, unread).
        self._read_since: dict[str, ReadSince] = {}

    def __bool__(self) -> bool:
        return bool(self._waits)

    def waiting(self) -> int:
        """How many waiters are registered, on every stream."""
        return sum(len(ws) for jobs in self._waits.values() for ws in jobs.values())

    def needs_cursor(self, key: str) -> bool:
        """Whether a waiter on ``key`` must bring its cursor (no one reads it now)."""
        return key not in self.cursors

    def add(self, key: str, job_id: str, waiter: Waiter, cursor: str | None) -> None:
        """Register ``waiter`` for ``job_id``'s end on ``key``; ``cursor``: the stream's
        last id, needed when :meth:`needs_cursor` (else ignored)."""
        if key not in self.cursors:
            if cursor is None:
                raise ValueError(f"a first waiter on {key!r} brings the stream's cursor")
            self.cursors[key] = cursor
            self._read_since[key] = ReadSince()
        self._waits.setdefault(key, {}).setdefault(job_id, []).append(waiter)

    def remove(self, key: str, job_id: str, waiter: Waiter) -> None:
        jobs = self._waits.get(key, {})
        waits = jobs.get(job_id, [])
        with contextlib.suppress(ValueError):
            waits.remove(waiter)
        if not waits:
            jobs.pop(job_id, None)
        if not jobs:
            self._waits.pop(key, None)
            self.cursors.pop(key, None)
            self._read_since.pop(key, None)

    def broken(self) -> list[Waiter]:
        """A read failed: every cursor goes (the waiters watch again, taking fresh ones, and
        check their records), and every waiter is returned, to be woken."""
        self.cursors.clear()
        self._read_since.clear()
        return [w for jobs in self._waits.values() for ws in jobs.values() for w in ws]

    def dispatch(self, key: str, entries: list[tuple[Any, Any]], count: int) -> list[Waiter]:
        """The waiters to wake for the entries a read of ``key`` returned: those of the job
        ids read, or all of that stream's when the read came back full (:func:`lagging`)."""
        if not entries:
            return []
        cursor = self.cursors.get(key)
        last = as_text(entries[-1][0])
        # No cursor: no one waits on it now (a waiter that comes takes a fresh cursor). A
        # read made before the last waiter left and a new one came may end before the new
        # cursor: keep the later one.
        if cursor is not None and entry_order(last) > entry_order(cursor):
            self.cursors[key] = last
        jobs = self._waits.get(key, {})
        if lagging(entries, count):  # every waiter of this stream checks its record
            if key in self._read_since:  # entries may have been trimmed unread: a new count
                self._read_since[key] = ReadSince()
            return [w for ws in jobs.values() for w in ws]
        ids = self._ids_of(entries)
        if cursor is not None and key in self._read_since:
            self._read_since[key].add(ids)
        return [w for job_id in ids for w in jobs.get(job_id, [])]

    def mark(self, key: str) -> ReadMark | None:
        """Where the reading of ``key`` stands now (None: it is not read now); taken before
        a submit, for :meth:`unread`."""
        since = self._read_since.get(key)
        return None if since is None else (since, since.mark())

    def unread(self, key: str, mark: ReadMark | None, job_id: str) -> bool:
        """Whether ``key`` has been read without a break since ``mark`` and no entry read
        since named ``job_id``: an entry for it is still to be read."""
        if mark is None:
            return False
        since, count = mark
        return self._read_since.get(key) is since and since.unread(count, job_id)


class StreamHub:
    """Reads every followed stream with one ``XREAD BLOCK`` loop (one per asyncio client).

    A stream followed with a notice stream (its job's client's, ``Keys.notices``) is not
    blocked on: the hub blocks on the notice stream, which each worker flush names the jobs
    it wrote in, and then reads, without blocking, only the streams named. A blocking read
    pays for every key it names (looked up, blocked on, looked up again when woken), so a
    client following 64 jobs otherwise paid for 64 keys on every wake-up; now for a few.
    A flush's notice carries the events it announces too: a follower whose events those
    follow takes them from it (:meth:`Subscription.take`), and its stream is not read at
    all, so a wake-up is one XREAD, not two (about a third fewer XREADs a job in
    benchmarks/fleet.py). ``interval_s`` (``HERMES_CLIENT_READ_INTERVAL_MS``; 0 by default)
    starts blocking reads at least that far apart: a client whose jobs run on many workers
    is named by each one's flush, and takes their notices several at a time instead of
    waking for each (benchmarks/notice_storm.py)."""

    def __init__(
        self, redis: Redis, prefix: str, *, block_s: float, count: int, interval_s: float = 0.0
    ) -> None:
        self._redis = redis
        self.interval_s = interval_s  # blocking reads at least this far apart (s)
        # When the next blocking read may start (see _run: the pace of a busy client).
        self._paced_until = 0.0
        self._shared_ends = Keys(prefix).ends
        self._ends: EndStreams[EndWait] = EndStreams()
        self._notices: EndStreams[Subscription] = EndStreams(written_ids)
        self._ends_lock = asyncio.Lock()
        # The ends and notice streams the blocking XREAD in flight reads.
        self._reading_ends: frozenset[str] = frozenset()
        self.reads = 0  # XREADs sent (for tests and benchmarks)
        self._wake = WakeStream(prefix)
        self._block_ms = max(1, int(block_s * 1000))
        self._count = count
        self._subs: dict[str, list[Subscription]] = {}
        # What a read asks for: each followed key after its oldest follower's cursor. Kept
        # up to date as followers come, go and advance, not rebuilt for every XREAD.
        self._cursors: dict[str, str] = {}
        # The keys the blocking XREAD names: those with a follower that has no notices.
        self._blocking: dict[str, str] = {}
        self._due: set[str] = set()  # followed by notice, to be read without blocking
        self._read_at: dict[str, float] = {}  # followed by notice: when last read
        self._sweep_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._reading = False  # a blocking XREAD is in flight with the streams wanted then

    async def follow(
        self,
        key: str,
        cursor: str,
        *,
        notices: str | None = None,
        job_id: str = "",
        since: ReadMark | None = None,
    ) -> Subscription:
        """Start reading ``key`` after entry id ``cursor``. ``notices``: the notice stream
        that names ``job_id`` whenever ``key`` is written (``Keys.notices`` of the ends
        stream the job's record names); the hub then reads ``key`` once now and after each
        notice that does not carry its next events, instead of blocking on it. ``since``:
        :meth:`notice_mark` of ``notices`` taken before the job was submitted; when no
        notice has named the job since, its stream is still empty, and is not read now."""
        sub = Subscription(key, cursor, notices=notices if job_id else None, job_id=job_id)
        empty = False
        if sub.notices is not None:
            async with self._ends_lock:
                notice_cursor = None
                if self._notices.needs_cursor(sub.notices):
                    notice_cursor = newest_id(await self._redis.xrevrange(sub.notices, count=1))
                self._notices.add(sub.notices, job_id, sub, notice_cursor)
                # Every write of its stream names it in a notice read after the mark: none
                # read yet, so any is still to come, and this follower gets it.
                empty = cursor == "0-0" and self._notices.unread(sub.notices, since, job_id)
        self._subs.setdefault(key, []).append(sub)
        self._update_cursor(key)
        if empty:
            sub.last_seq = 0
            self._read_at[key] = time.monotonic()
        elif sub.notices is not None:
            # What it holds already: no notice will name it. Read here, not by waking the
            # blocked read (a notice after the cursor taken above is read by the hub).
            await self._read_now(key)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="hermes-stream-hub")
        elif self._reading and (
            sub.notices is None or sub.notices not in self._reading_ends or self._due
        ):
            # A full Redis refuses the XADD: the follower then joins the next read, within
            # one blocking read's time, instead of failing.
            await self._wake_reader()
        return sub

    async def watch_end(self, job_id: str, key: str | None = None) -> EndWait:
        """Wake the returned waiter when ``job_id``'s end is read on the ends stream ``key``
        (the job's: see ``Keys.end_stream``; None: the deployment's shared one). Every end
        written there after this returns is read; the caller checks the job's record after
        it, for an end written before."""
        key = key or self._shared_ends
        wait = EndWait(job_id, key)
        async with self._ends_lock:
            cursor = None
            if self._ends.needs_cursor(key):
                cursor = newest_id(await self._redis.xrevrange(key, count=1))
            self._ends.add(key, job_id, wait, cursor)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="hermes-stream-hub")
        elif self._reading and key not in self._reading_ends:
            await self._wake_reader()
        return wait

    def unwatch_end(self, wait: EndWait) -> None:
        self._ends.remove(wait.key, wait.job_id, wait)

    def end_mark(self, key: str) -> ReadMark | None:
        """Taken before a submit whose job ends on ``key``: where the hub's reading of that
        stream stands (None: it does not read it now). See :meth:`end_unread`."""
        return self._ends.mark(key)

    def notice_mark(self, key: str) -> ReadMark | None:
        """The same for the notice stream ``key`` (see :meth:`follow`'s ``since``)."""
        return self._notices.mark(key)

    def end_unread(self, key: str, mark: ReadMark | None, job_id: str) -> bool:
        """Whether ``job_id``'s end cannot have been read and passed by before a waiter
        registered now (after :meth:`watch_end`): the hub has read ``key`` without a break
        since ``mark`` and read no entry for that job since. Its end is then still to be
        read, and wakes the waiter: no first look at the record is needed."""
        return self._ends.unread(key, mark, job_id)

    @property
    def end_waits(self) -> int:
        """How many waiters wait on an end now (for tests and benchmarks)."""
        return self._ends.waiting()

    def unfollow(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key, [])
        with contextlib.suppress(ValueError):
            subs.remove(sub)
        if sub.notices is not None:
            self._notices.remove(sub.notices, sub.job_id, sub)
        if not subs:
            self._subs.pop(sub.key, None)
            self._read_at.pop(sub.key, None)
            self._due.discard(sub.key)
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
        if self._wake.written:
            with contextlib.suppress(Exception):
                await self._redis.delete(self._wake.key)

    async def _wake_reader(self) -> None:
        """End the read in flight, unless a wake-up is on its way to it already; one that
        Redis refuses is dropped (the new stream joins the next read, within block_s)."""
        if not self._wake.claim():
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                expires_at = self._wake.queue(pipe)
                await pipe.execute()
        except RedisError:
            self._wake.failed()
            return
        self._wake.sent(expires_at)

    async def _read_now(self, key: str) -> None:
        """Read a stream followed by notice at once, without blocking; one that Redis
        refuses is left to the hub's loop."""
        try:
            self.reads += 1
            reply = await self._redis.xread({key: self._cursors[key]}, count=self._count)
        except RedisError:
            self._due.add(key)
            return
        self._read_at[key] = time.monotonic()
        self._dispatch(entries_by_stream(reply), read=(key,))

    def _sweep(self, now: float) -> None:
        """Every NOTICE_SWEEP_S, the streams followed by notice that no read has named for
        that long are due: a dropped notice, or none sent, delays a stream, never stalls it."""
        if now < self._sweep_at:
            return
        self._sweep_at = now + NOTICE_SWEEP_S
        stale = now - NOTICE_SWEEP_S
        for key in self._subs:
            if key not in self._blocking and self._read_at.get(key, 0.0) <= stale:
                self._due.add(key)

    async def _run(self) -> None:
        while (self._subs or self._ends) and not self._closed:
            now = time.monotonic()
            if not self._due and now < self._paced_until:
                # Blocking reads start at least interval_s apart: a client woken by notices
                # faster than that (its jobs spread over many workers, each flush a notice)
                # gathers them for one read, where each would otherwise cost Redis a wake-up
                # of its own. A read that blocked that long already goes again at once.
                await asyncio.sleep(self._paced_until - now)
                continue
            noticed = len(self._subs) > len(self._blocking)
            if noticed:
                self._sweep(now)
            block_ms: int | None = None
            if self._due:
                due, self._due = self._due, set()
                streams: dict[Any, Any] = {k: self._cursors[k] for k in due if k in self._cursors}
                if not streams:
                    continue
            else:
                streams = {
                    **self._blocking,
                    self._wake.key: self._wake.cursor,
                    **self._ends.cursors,
                    **self._notices.cursors,
                }
                block_ms = self._block_ms
                if noticed:  # back in time for the next sweep
                    block_ms = max(1, min(block_ms, int((self._sweep_at - now) * 1000) + 1))
                self._reading = True
                self._reading_ends = frozenset(self._ends.cursors) | frozenset(
                    self._notices.cursors
                )
                self._wake.reading()
                self._paced_until = now + self.interval_s
            try:
                self.reads += 1
                reply = await self._redis.xread(streams, count=self._count, block=block_ms)
            except RedisTimeoutError:  # a starved link: nothing read; try again
                if block_ms is None:
                    self._due.update(streams)
                continue
            except Exception as exc:  # every follower hears of it; the next follow restarts
                for subs in self._subs.values():
                    for sub in subs:
                        sub.put(exc)
                # End waiters watch again (fresh cursors) and check their records.
                for wait in self._ends.broken():
                    wait.wake(broken=True)
                self._notices.broken()  # its followers follow again, with fresh cursors
                return
            finally:
                self._reading, self._reading_ends = False, frozenset()
            if block_ms is None:
                read_at = time.monotonic()
                for key in streams:
                    self._read_at[key] = read_at
            self._dispatch(entries_by_stream(reply), read=streams if block_ms is None else ())

    def _update_cursor(self, key: str) -> None:
        # Followers of one key may be at different ids; read from the oldest.
        subs = self._subs.get(key)
        if subs:
            cursor = min((sub.cursor for sub in subs), key=entry_order)
            self._cursors[key] = cursor
            if any(sub.notices is None for sub in subs):
                self._blocking[key] = cursor
            else:
                self._blocking.pop(key, None)
        else:
            self._cursors.pop(key, None)
            self._blocking.pop(key, None)

    def _dispatch(self, by_key: dict[str, list[tuple[Any, Any]]], read: Any = ()) -> None:
        """Hand what a read returned to its waiters and followers. ``read``: the followed
        streams it read without blocking (one it found empty from the start is known to be
        empty: its first events can come by notice)."""
        for key in read:
            if key not in by_key:
                for sub in self._subs.get(key, []):
                    if sub.last_seq is None and sub.cursor == "0-0":
                        sub.last_seq = 0
        for key, entries in by_key.items():
            if key == self._wake.key:
                self._wake.read(entries)
                continue
            if key not in self._subs:  # an ends or notice stream (or one no longer followed)
                for wait in self._ends.dispatch(key, entries, self._count):
                    wait.wake()
                self._noticed(self._notices.dispatch(key, entries, self._count), entries)
                continue
            events = [decode_event(entry_id, fields) for entry_id, fields in entries]
            for sub in self._subs.get(key, []):
                sub.advance([e for e in events if entry_order(e.id) > entry_order(sub.cursor)])
            self._update_cursor(key)
            if len(entries) >= self._count and key not in self._blocking:
                self._due.add(key)  # a read that came back full: the rest, at once

    def _noticed(self, named: list[Subscription], entries: list[tuple[Any, Any]]) -> None:
        """The followers a notice read named: each takes the events the notices carried
        for its job (:meth:`Subscription.take`), else its stream is read."""
        if not named:
            return
        carried = carried_events(entries)
        taken: set[str] = set()
        for sub in named:
            if sub.key not in self._subs:
                continue
            if sub.take(carried.get(sub.job_id, [])):
                taken.add(sub.key)
            else:
                self._due.add(sub.key)
        now = time.monotonic()
        for key in taken:
            self._update_cursor(key)
            if key not in self._due:
                self._read_at[key] = now


class EndWatcher:
    """The blocking client's reader of ends streams: one thread with one connection reads,
    in one XREAD, every ends stream that a thread waiting on a job's end needs (its
    client's own, another client's for a job that client submitted, the shared one), while
    anyone waits.

    :meth:`watch` registers a waiter (an :class:`EndEvent`, set when the job's id is read)
    before the caller checks the job's record, so an end is either in the record then or
    read after. A waiter on a stream the read in flight does not read appends to the
    watcher's wake stream (``{prefix}hub:{id}``, as the hub's), which ends that read. The
    thread stops when no one waits; a read that fails sets every waiter's event and drops
    the cursors (they check their records, and watch on)."""

    def __init__(self, redis: SyncRedis, prefix: str, *, block_s: float, count: int) -> None:
        self._redis = redis
        self._shared = Keys(prefix).ends
        self._block_ms = max(1, int(block_s * 1000))
        self._count = count
        self._lock = threading.Lock()
        self._ends: EndStreams[EndEvent] = EndStreams()
        # The ends streams the read in flight reads; None between two reads.
        self._reading: frozenset[str] | None = None
        self._wake = WakeStream(prefix)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.reads = 0  # XREADs sent (for tests and benchmarks)

    def watch(self, job_id: str, key: str | None = None) -> EndEvent:
        """Set the returned event when ``job_id``'s end is read on the ends stream ``key``
        (None: the deployment's shared one)."""
        key = key or self._shared
        woken = EndEvent(job_id, key)
        with self._lock:
            cursor = None
            if self._ends.needs_cursor(key):
                cursor = newest_id(self._redis.xrevrange(key, count=1))
            self._ends.add(key, job_id, woken, cursor)
            wake = False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hermes-end-watcher", daemon=True
                )
                self._thread.start()
            else:
                wake = self._reading is not None and key not in self._reading
                wake = wake and self._wake.claim()
        if wake:
            self._wake_reader()
        return woken

    def unwatch(self, woken: EndEvent) -> None:
        with self._lock:
            self._ends.remove(woken.key, woken.job_id, woken)

    def mark(self, key: str) -> ReadMark | None:
        """See :meth:`StreamHub.end_mark`."""
        with self._lock:
            return self._ends.mark(key)

    def unread(self, key: str, mark: ReadMark | None, job_id: str) -> bool:
        """See :meth:`StreamHub.end_unread` (after :meth:`watch`)."""
        with self._lock:
            return self._ends.unread(key, mark, job_id)

    @property
    def waiting(self) -> int:
        """How many waiters wait on an end now (for tests and benchmarks)."""
        with self._lock:
            return self._ends.waiting()

    def close(self) -> None:
        """Stop reading. Not joined: the thread ends after its read in flight (at most one
        blocking read's time), or at once when the client's pool is closed under it."""
        self._closed = True
        if self._wake.written:
            with contextlib.suppress(Exception):
                self._redis.delete(self._wake.key)

    def _wake_reader(self) -> None:
        """Send the wake-up this caller claimed; one that Redis refuses (a full Redis) is
        dropped: the new stream joins the next read, within block_s."""
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                expires_at = self._wake.queue(pipe)
                pipe.execute()
        except RedisError:
            with self._lock:
                self._wake.failed()
            return
        with self._lock:
            self._wake.sent(expires_at)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._ends.cursors or self._closed:
                    self._thread = None
                    return
                streams: dict[Any, Any] = {**self._ends.cursors, self._wake.key: self._wake.cursor}
                self._reading = frozenset(self._ends.cursors)
                self._wake.reading()
            try:
                self.reads += 1
                reply = self._redis.xread(streams, count=self._count, block=self._block_ms)
            except RedisTimeoutError:
                with self._lock:
                    self._reading = None
                continue
            except Exception as exc:  # every waiter checks its record instead
                log.debug("end watcher: read failed: %s", exc)
                with self._lock:
                    waits = self._ends.broken()
                    self._thread, self._reading = None, None
                for woken in waits:
                    woken.set()
                return
            ended: list[EndEvent] = []
            with self._lock:
                self._reading = None
                for key, entries in entries_by_stream(reply).items():
                    if key == self._wake.key:
                        self._wake.read(entries)
                    else:
                        ended += self._ends.dispatch(key, entries, self._count)
            for event in ended:
                event.set()


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<n>``) as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
