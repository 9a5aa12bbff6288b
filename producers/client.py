"""The client a producer service uses: submit jobs, read their event streams, wait for results.

:class:`HermesClient` is the blocking client, :class:`AsyncHermesClient` the asyncio one; both
speak the layout in :mod:`hermes_worker.contract.store` and take the Redis URL, key prefix and queue
name from :class:`~hermes_worker.settings.Settings` (``HERMES_*`` env vars)::

    client = HermesClient()
    handle = client.submit({"messages": [{"role": "user", "content": "Hi"}]})
    for event in handle.stream():
        print(event.type, event.data)
    print(handle.result().choices[0].message.content)

A job is validated here, before anything is queued, so a bad body fails at the producer.
Submitting is idempotent on the job id: one Lua call creates the record and queues the
job's Celery message (:func:`~hermes_worker.contract.queue.job_message`: what Celery's ``send_task``
would push, built here, so both land or neither, in one round trip); a second submit of
an id that already has a record sends nothing and returns a handle to that job.
Reading a stream blocks on the job's event stream (XREAD BLOCK). Waiting for a result
(``result()``) blocks on the job's ends stream instead, which the worker appends the job's
id to in the same Lua call that stores the result: each client has its own
(``Keys.ends_for``), named in the record of every job it submits, so an end wakes only the
client that submitted the job and those awaiting it; a job another producer submitted
without one ends on the deployment's shared ``{prefix}ends``. One reader per client for all
its waiters and their streams (a thread for :class:`HermesClient`, the hub for
:class:`AsyncHermesClient`), one wake-up per job whatever its length, and a check of the
record every END_CHECK_S in case a notification was missed.

Submitting refuses (:class:`QueueFull`) while ``max_queue_depth`` jobs already wait in the
queue. ``handle.cancel()`` ends a queued job at once and asks a running one's worker to stop.
Jobs that ran out of retries are listed by ``dead_letters()`` and can be put back on the
queue (``requeue``: like a submit, one Lua call resets the record and queues the message)
or deleted (``purge_dead_letters``); see :mod:`producers.control`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import uuid4

from celery import Celery
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hermes_worker.contract import scripts
from hermes_worker.contract.clock import redis_time
from hermes_worker.contract.jobs import ChatJob, ErrorInfo, JobInfo, JobResult, JobStatus, parse_job
from hermes_worker.contract.queue import job_message, make_celery
from hermes_worker.contract.store import (
    ALIVE_TTL_S,
    TERMINAL_EVENTS,
    Keys,
    StreamEvent,
    as_text,
    async_client,
    body_digest,
    body_json,
    call_replicated,
    call_replicated_async,
    decode_event,
    job_info_from_record,
    result_from_record,
    sync_client,
)
from hermes_worker.errors import (
    InvalidRequest,
    JobAlreadyEnded,
    JobLost,
    JobNotFound,
    NotInDeadLetters,
    QueueFull,
)
from hermes_worker.settings import Settings
from producers.control import (
    DeadLetter,
    DepthGate,
    cancel_args,
    dead_letter,
    job_keys,
    queue_lists,
    requeue_call,
    script_reply,
    unique_ids,
)
from producers.hub import (
    EndEvent,
    EndWait,
    EndWatcher,
    ReadMark,
    RecordReads,
    StreamHub,
    Subscription,
    entry_order,
)

if TYPE_CHECKING:
    from producers.batches import AsyncBatches, Batches

__all__ = [
    "AsyncHermesClient",
    "AsyncJobHandle",
    "DeadLetter",
    "HermesClient",
    "JobAlreadyEnded",
    "JobHandle",
    "JobLost",
    "JobNotFound",
    "JobSource",
    "NotInDeadLetters",
    "QueueFull",
]

JobSource = ChatJob | Mapping[str, Any] | str | bytes
# The longest single XREAD BLOCK: between two, the job record is checked again, so a job
# that ended or vanished without a new event is still noticed. It must stay below the
# client's socket timeout (redis-py 8 defaults to 5 s), or a quiet wait would read as a
# dead connection; see block_chunk_s().
BLOCK_CHUNK_S = 2.0
READ_COUNT = 256  # stream entries per XREAD
# A result waiter checks its job's record (one HMGET) END_CHECK_S after it began waiting,
# then at intervals growing by END_CHECK_GROWTH up to END_CHECK_MAX_S, besides waking on
# the ends stream: that finds an end whose notification was missed (a worker older than
# the ends stream, a record ended by hand; a notification trimmed away while the reader
# lagged, which the reader also catches: see producers.hub) and a record that vanished
# (JobLost) within one blocking read's time, as a stream reader finds it. A job of a minute
# is checked 5 times (2, 6, 14, 30 and 60 s in; every 2 s it would be 30).
END_CHECK_S = BLOCK_CHUNK_S
END_CHECK_GROWTH = 2.0
END_CHECK_MAX_S = 30.0
# The asyncio client's waiters check at the first multiple of END_CHECK_GRID_S (on the
# monotonic clock) after their next check is due, up to that much later: those due in
# the same step check together, their reads in one pipeline (producers.hub.RecordReads).
END_CHECK_GRID_S = 1.0

# --- pure helpers shared by both clients -------------------------------------------------


# A requeue reads the job's body, then sends it back with the message built from it; the
# script refuses when the body changed in between (the record expired and the id was
# submitted again), and it is read again.
REQUEUE_TRIES = 3


def _body_kept_changing(job_id: str) -> RuntimeError:
    return RuntimeError(f"job {job_id!r}: its body changed at every requeue try")


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id!r} (never submitted, or expired)")


def _lost(job_id: str) -> JobLost:
    return JobLost(
        f"job {job_id!r} is lost: its record vanished from Redis (restarted without "
        "persistence, evicted, or expired), and it will not end where it can be seen; submit "
        "it again with the same id (one id, one execution)"
    )


@dataclass
class RecordWatch:
    """What a waiting handle knows of its job's record. An id never seen with a record is
    waited for (a job sent by a plain Celery client has none until a worker takes it); a
    record seen once and then gone will not come back: Redis lost it, and the wait ends
    with :class:`JobLost` instead of lasting until the caller's timeout, or for ever."""

    job_id: str
    seen: bool = False

    def saw(self, present: bool) -> None:
        """A read of the record while waiting found it (``present``) or not."""
        if present:
            self.seen = True
        elif self.seen:
            raise _lost(self.job_id)


@dataclass(frozen=True)
class Submission:
    """A validated job, ready to be recorded and queued."""

    job_id: str
    body: dict[str, Any]
    body_json: str
    priority: int

    def submit_call(
        self,
        keys: Keys,
        app: Celery,
        queue: str,
        tenant: str | None = None,
        ends: str | None = None,
    ) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of :data:`scripts.SUBMIT` (``tenant``: who submits, through the
        gateway; ``ends``: the submitting client's own ends stream, ``Keys.ends_for``, where
        the job's end will go; both recorded in the job's record). The script stamps
        ``queued_at`` on Redis's clock; this host's now goes along unrecorded (the script's
        ARGV as they were)."""
        queue_key, message = job_message(app, self.body, self.job_id, self.priority, queue)
        digest = body_digest(self.body_json)
        args = [repr(time.time()), self.body_json, str(ALIVE_TTL_S), message, digest]
        if tenant or ends:
            args.append(tenant or "")
        if ends:
            args.append(ends)
        return [keys.job(self.job_id), queue_key], args


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise InvalidRequest(f"body is {size} bytes, over the {limit}-byte limit")


def prepare_submission(job: JobSource, max_body_bytes: int) -> Submission:
    """Validate a job (raising :class:`InvalidRequest`) and give it its final id and body."""
    if isinstance(job, str | bytes):
        _check_size(len(job.encode() if isinstance(job, str) else job), max_body_bytes)
    # A ChatJob is validated again: model_construct() or model_copy() can build invalid ones.
    parsed = parse_job(job.to_wire() if isinstance(job, ChatJob) else job)
    job_id = parsed.id or uuid4().hex
    body = {**parsed.to_wire(), "id": job_id}
    stored = body_json(body)
    _check_size(len(stored.encode()), max_body_bytes)
    return Submission(job_id, body, stored, parsed.priority)


def check_depth(replies: list[Any], limit: int, queue: str) -> int:
    """Raise :class:`QueueFull` from the replies of EXISTS(record) + one LLEN per queue list;
    returns the depth.

    A known id is let through: submitting it queues nothing, so a producer retrying a
    submit that did get through is told about its job, not about the queue."""
    exists, *lengths = replies
    depth = sum(int(length) for length in lengths)
    if not exists and depth >= limit:
        raise QueueFull(f"queue {queue!r} holds {depth} waiting jobs, at its limit of {limit}")
    return depth


def is_after(entry_id: str, cursor: str) -> bool:
    """Whether stream entry ``entry_id`` comes after ``cursor``."""
    return entry_order(entry_id) > entry_order(cursor)


def cancel_outcome(job_id: str, reply: Any) -> str:
    """``cancelled`` or ``cancelling`` from :data:`scripts.CANCEL`'s reply; else raise."""
    outcome, status = script_reply(reply)
    if outcome == "not_found":
        raise _not_found(job_id)
    if outcome == "ended":
        raise JobAlreadyEnded(job_id, status)
    return outcome


def requeue_done(job_id: str, reply: Any) -> bool:
    """Whether :data:`scripts.REQUEUE` requeued the job (False: its body changed since it was
    read; read it again); raise what the reply says is wrong."""
    outcome, detail = script_reply(reply)
    if outcome == "not_in_dlq":
        raise NotInDeadLetters(f"job {job_id!r} is not in the dead letters")
    if outcome == "not_found":
        raise _not_found(job_id)
    if outcome == "not_failed":
        raise NotInDeadLetters(
            f"job {job_id!r} is {detail}, not a failed dead letter: its id was stale and has "
            "left the dead letters"
        )
    if outcome == "leased":
        raise NotInDeadLetters(f"job {job_id!r} is held by a worker; it was not requeued")
    return outcome == "requeued"


def block_chunk_s(client: Redis | AsyncRedis) -> float:
    """The longest XREAD BLOCK for this client: BLOCK_CHUNK_S, or less if its sockets time
    out sooner (a client passed in may have been configured so)."""
    socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    if isinstance(socket_timeout, int | float) and socket_timeout > 0:
        return min(BLOCK_CHUNK_S, socket_timeout / 2)
    return BLOCK_CHUNK_S


# A Redis out of reach while a producer waits (restarting, loading its data, failing over)
# is waited out for this long at most, whatever the caller's timeout; then the wait raises
# the ConnectionError, so that a Redis gone for good never holds a producer for ever.
RECONNECT_S = 30.0
RECONNECT_PAUSE_S = 0.2  # between two tries to reach it


class Deadline:
    """Splits an optional overall timeout into XREAD BLOCK waits of at most ``chunk_s``, and
    keeps track of a Redis out of reach during the wait (:meth:`redis_away`)."""

    def __init__(self, timeout: float | None, what: str, chunk_s: float = BLOCK_CHUNK_S) -> None:
        self._timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout
        self._what = what
        self._chunk_ms = max(1, int(chunk_s * 1000))
        self._away_since: float | None = None

    def redis_away(self, error: RedisConnectionError) -> float:
        """A read made while waiting could not reach Redis: the pause before making it
        again. Raises ``error`` once Redis has been away for RECONNECT_S, TimeoutError once
        the caller's time is spent."""
        if isinstance(error, AuthenticationError | AuthorizationError):
            raise error  # reached, and refused: waiting will not change that
        now = time.monotonic()
        if self._away_since is None:
            self._away_since = now
        elif now - self._away_since > RECONNECT_S:
            raise error
        return min(RECONNECT_PAUSE_S, self.block_ms() / 1000)

    def redis_back(self) -> None:
        """A read made while waiting reached Redis."""
        self._away_since = None

    def block_ms(self) -> int:
        """Milliseconds to block next (never 0, which means forever); TimeoutError when spent."""
        if self._end is None:
            return self._chunk_ms
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{self._what} did not end within {self._timeout:g} s")
        return max(1, min(self._chunk_ms, math.ceil(left * 1000)))


T = TypeVar("T")
RETRY_PAUSE_S = 0.05  # after a read made while waiting timed out, before it is made again


def read_while_waiting(deadline: Deadline, read: Callable[[], T]) -> T:
    """Make a read that a wait depends on (the job record, the stream's last entries), and
    make it again when it times out, until the caller's deadline.

    A read that times out says nothing about the job: redis-server was starved of CPU for
    longer than the socket timeout (seen on a 2-core box running an engine), or the link is
    slow. So it counts as "not known yet", as an XREAD that times out does, and the wait
    goes on. A Redis out of reach (a restart) is waited out the same way for up to
    RECONNECT_S (see :meth:`Deadline.redis_away`); what the job's record then says (it may
    be gone: JobLost) is for the caller. Only reads made while waiting come here: a submit,
    a cancel and a plain status() raise at once, since their caller waits for nothing.
    """
    while True:
        try:
            value = read()
        except RedisTimeoutError:
            # TimeoutError once the caller's time is spent; else a short pause, so that a
            # client whose timeouts come at once (a double, a zero socket timeout) cannot spin.
            time.sleep(min(RETRY_PAUSE_S, deadline.block_ms() / 1000))
            continue
        except RedisConnectionError as exc:
            time.sleep(deadline.redis_away(exc))
            continue
        deadline.redis_back()
        return value


async def read_while_waiting_async(deadline: Deadline, read: Callable[[], Awaitable[T]]) -> T:
    """The asyncio twin of :func:`read_while_waiting`."""
    while True:
        try:
            value = await read()
        except RedisTimeoutError:
            await asyncio.sleep(min(RETRY_PAUSE_S, deadline.block_ms() / 1000))
            continue
        except RedisConnectionError as exc:
            await asyncio.sleep(deadline.redis_away(exc))
            continue
        deadline.redis_back()
        return value


def events_from_xread(reply: Any) -> list[StreamEvent]:
    """The entries of the one stream an XREAD asked for, decoded (RESP2 or RESP3 replies)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):  # RESP3: {key: [[entry, ...]]}
        entries = next(iter(reply.values()))
        if entries and isinstance(entries[0], list):
            entries = entries[0]
    else:  # RESP2: [[key, [entry, ...]]]
        entries = reply[0][1]
    return [decode_event(entry_id, fields) for entry_id, fields in entries]


def last_entry_id(entries: Any) -> str:
    """The id of the newest entry an XREVRANGE ... COUNT 1 returned, or the stream's start."""
    if not entries or entries[0][0] is None:
        return "0-0"
    return as_text(entries[0][0])


def status_from(raw: bytes | str | None) -> JobStatus | None:
    """The ``status`` field of a job record, or None when there is no record."""
    if raw is None:
        return None
    return JobStatus(as_text(raw))


def newest_terminal_id(entries: Any) -> str | None:
    """The id of the newest terminal event in an XREVRANGE page (newest first), or None."""
    for entry_id, fields in entries:
        if as_text(fields.get(b"type", fields.get("type", b""))) in TERMINAL_EVENTS:
            return as_text(entry_id)
    return None


def older_than(entries: Any) -> str:
    """The XREVRANGE bound for the next page: just before the oldest entry of this one."""
    return f"({as_text(entries[-1][0])}"


def stream_is_over(status: JobStatus | None, *, after_terminal: bool) -> bool:
    """Whether a reader has seen the job's last event, given the record's status now.

    After a terminal event the stream ends unless the record says the job lives on (an
    attempt that ended in a retryable error is followed by ``restarted``). After a wait
    with no event it ends once the record shows the job ended, which only happens when
    the reader resumed after the terminal event. Without a record the reader waits: a job
    sent by a plain Celery client has none until a worker takes it.
    """
    if status is None:
        return after_terminal
    return status.is_terminal


def end_checks() -> Iterator[float]:
    """The waits between a result waiter's checks of its record (see END_CHECK_S); a
    wake-up from the ends stream does not reset them."""
    wait_s = END_CHECK_S
    while True:
        yield wait_s
        wait_s = min(wait_s * END_CHECK_GROWTH, END_CHECK_MAX_S)


def on_check_grid(wait_s: float, now: float | None = None) -> float:
    """``wait_s`` stretched to the next step of END_CHECK_GRID_S after it."""
    now = time.monotonic() if now is None else now
    due = now + wait_s
    return due - due % END_CHECK_GRID_S + END_CHECK_GRID_S - now


def ended_from_fields(status: Any, raw_result: Any) -> JobResult | bool:
    """From a record's ``status`` and ``result`` (HMGET): the stored result; else whether
    the job has ended all the same (True: read the whole record, :func:`finished_result`)."""
    if raw_result:
        return JobResult.model_validate_json(raw_result)
    return status is not None and JobStatus(as_text(status)).is_terminal


def finished_result(job_id: str, record: Mapping[bytes | str, bytes | str]) -> JobResult | None:
    """The job's final result, or None while it has not ended (or has no record yet)."""
    if not record:
        return None
    result = result_from_record(record)
    if result is not None:
        return result
    info = job_info_from_record(job_id, record)
    if not info.status.is_terminal:
        return None
    # The worker stores the result with the final status; this covers a record ended by
    # someone else (an operator, a reaper), so a waiter still gets an answer.
    return JobResult(
        id=job_id,
        created=int(info.finished_at or time.time()),
        model="",
        job=info,
        error=ErrorInfo(type=info.status.value, message="the job ended without a stored result"),
    )


# --- blocking client ---------------------------------------------------------------------


class HermesClient:
    """Submits jobs and reads them back, blocking (safe to share between threads)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis: Redis | None = None,
        celery: Celery | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.keys = Keys(self.settings.key_prefix)
        self._owns = (redis is None, celery is None)
        self.redis = redis if redis is not None else sync_client(self.settings.redis_url)
        # Built here, not on first use, so threads sharing the client share one app.
        self.celery = celery if celery is not None else make_celery(self.settings)
        self._submit = self.redis.register_script(scripts.SUBMIT)
        # A submit's wait for replicas (HERMES_REDIS_WAIT_REPLICAS; 0: none).
        self._wait = (self.settings.redis_wait_replicas, self.settings.redis_wait_timeout_ms)
        self._cancel = self.redis.register_script(scripts.CANCEL)
        self._requeue = self.redis.register_script(scripts.REQUEUE)
        self._queue_lists = queue_lists(self.settings)
        self._gate = DepthGate(self.settings.max_queue_depth)
        # This client's own ends stream: the jobs it submits end there (their record names
        # it), so their ends wake this client only.
        self.ends_key = self.keys.ends_for(uuid4().hex)
        # Every result() wait of this client, in any thread, wakes through one reader.
        self.ends = EndWatcher(
            self.redis,
            self.settings.key_prefix,
            block_s=block_chunk_s(self.redis),
            count=READ_COUNT,
        )

    def submit(self, job: JobSource) -> JobHandle:
        """Validate, record and queue a job; a known id is not queued again.

        Raises :class:`InvalidRequest` for a bad body and :class:`QueueFull` when
        ``max_queue_depth`` jobs already wait; either way nothing is recorded or queued.
        """
        sub = prepare_submission(job, self.settings.max_body_bytes)
        self._check_depth(self.keys.job(sub.job_id))
        keys, args = sub.submit_call(
            self.keys, self.celery, self.settings.queue_name, ends=self.ends_key
        )
        mark = self.ends.mark(self.ends_key)  # before the job can end
        created = bool(call_replicated(self.redis, self._submit, keys, args, *self._wait))
        handle = JobHandle(self, sub.job_id, created=created)
        if created:
            self._gate.submitted()
            handle._submitted(self.ends_key, mark)
        return handle

    def job(self, job_id: str) -> JobHandle:
        """A handle to a job submitted earlier (by anyone)."""
        return JobHandle(self, job_id, created=False)

    @functools.cached_property
    def batches(self) -> Batches:
        """This deployment's batches: OpenAI Batch API files on the queue
        (:class:`producers.batches.Batches`; docs/batches.md)."""
        from producers.batches import Batches

        return Batches(self)

    def dead_letters(self) -> list[DeadLetter]:
        """The jobs that ran out of retries, newest first."""
        ids = unique_ids(self.redis.lrange(self.keys.dead_letters, 0, -1))
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            records = pipe.execute()
        return [dead_letter(job_id, record) for job_id, record in zip(ids, records, strict=True)]

    def requeue(self, job_id: str) -> JobHandle:
        """Put a dead letter back on the queue as a fresh job (attempts 0), same body.

        Raises :class:`NotInDeadLetters` for an id not in the list and :class:`JobNotFound`
        for one whose record has expired (``purge_dead_letters`` clears those).
        """
        for _ in range(REQUEUE_TRIES):
            stored = self.redis.hget(self.keys.job(job_id), "body")
            keys, args = requeue_call(
                self.keys, job_id, stored, self.celery, self.settings.queue_name
            )
            if requeue_done(job_id, self._requeue(keys=keys, args=args)):
                return JobHandle(self, job_id, created=True)
        raise _body_kept_changing(job_id)

    def purge_dead_letters(self) -> int:
        """Delete every dead letter's keys and take it off the list; returns how many."""
        ids = unique_ids(self.redis.lrange(self.keys.dead_letters, 0, -1))
        if ids:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(*job_keys(self.keys, ids))
                # LREM, not DEL: an id a worker pushes meanwhile stays for the next look.
                for job_id in ids:
                    pipe.lrem(self.keys.dead_letters, 0, job_id)
                pipe.execute()
        return len(ids)

    def _check_depth(self, key: str) -> None:
        limit, now = self.settings.max_queue_depth, time.monotonic()
        if limit is None or not self._gate.must_read(now):
            return
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            for name in self._queue_lists:
                pipe.llen(name)
            replies = pipe.execute()
        self._gate.read(check_depth(replies, limit, self.settings.queue_name), now)

    def close(self) -> None:
        """Release the connections this client opened itself."""
        self.ends.close()
        owns_redis, owns_celery = self._owns
        if owns_redis:
            self.redis.close()
        if owns_celery:
            self.celery.close()

    def __enter__(self) -> HermesClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class JobHandle:
    """One job: its status, its event stream and its result."""

    def __init__(self, client: HermesClient, job_id: str, *, created: bool) -> None:
        self.id = job_id
        self.created = created  # False when the id was already known (nothing was queued)
        self._client = client
        self._redis = client.redis
        self._keys = client.keys
        self._chunk_s = block_chunk_s(client.redis)
        # A handle from submit (or requeue) has seen its record: it was just written.
        self._watch = RecordWatch(job_id, seen=created)
        # The ends stream the job's end goes to, as its record last read says.
        self._end_stream = client.keys.ends
        # Just queued by this client's submit, nothing read through it since: a result
        # wait watches before its first read of the record (which could not find an end).
        self._fresh = False
        # Where the reading of the ends stream stood before the submit (EndWatcher.mark):
        # a wait on a job whose end no read has passed since needs no first record read.
        self._end_mark: ReadMark | None = None

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, created={self.created})"

    def _submitted(self, ends: str, mark: ReadMark | None = None) -> None:
        """This client's submit just recorded the job, naming ``ends``; ``mark``: the
        reading of ``ends`` before it was sent."""
        self._end_stream, self._fresh, self._end_mark = ends, True, mark

    def status(self) -> JobInfo:
        """The job record now; :class:`JobNotFound` if there is none."""
        record = self._redis.hgetall(self._keys.job(self.id))
        if not record:
            raise _not_found(self.id)
        return job_info_from_record(self.id, record)

    def stream(self, after: str = "0-0", *, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Yield the job's events after entry id ``after``, up to and including the terminal one.

        Pass the ``id`` of the last event seen to resume right after it. Raises
        ``TimeoutError`` if ``timeout`` seconds pass first. An id without a record is
        waited for (a job from a plain Celery client gets one when a worker takes it), so
        give a timeout, or check :meth:`status` first, when the id may be wrong. A job
        whose record was seen (by this handle, or by the submit that made it) and is gone
        raises :class:`JobLost`: Redis lost it.
        """
        deadline = Deadline(timeout, f"job {self.id}", self._chunk_s)
        cursor = after
        self._fresh = False
        while True:
            events = self._read(cursor, deadline)
            if not events and self._ended_meanwhile(deadline):
                # It may have ended just after the read: what it wrote last, read now.
                events = read_while_waiting(deadline, functools.partial(self._xread, cursor))
                if not events:
                    return
            for event in events:
                yield event
                cursor = event.id
                if event.terminal and self._ends_at(event, deadline):
                    return

    def poll(self) -> JobResult | None:
        """The result if the job has ended, else None; never waits. JobNotFound without a record."""
        record = self._redis.hgetall(self._keys.job(self.id))
        if not record:
            raise _not_found(self.id)
        return finished_result(self.id, record)

    def cancel(self) -> str:
        """Cancel the job: ``"cancelled"`` if it had not started (it ends now and never
        runs), ``"cancelling"`` if it runs (its worker stops it and ends it, keeping the
        output so far). :class:`JobNotFound` without a record, :class:`JobAlreadyEnded`
        once it has ended."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._keys.job(self.id))
        pipe.time()  # its end is stamped on Redis's clock, not this host's
        record, now = pipe.execute()
        if not record:
            raise _not_found(self.id)
        client, now = self._client, redis_time(now)
        args = cancel_args(
            self.id, record, now, client.settings.result_ttl_s, self._keys.cancel_channel
        )
        keys = [self._keys.job(self.id), self._keys.events(self.id), self._keys.ends]
        reply = client._cancel(keys=keys, args=args)
        return cancel_outcome(self.id, reply)

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait until the job has ended and return its result; ``TimeoutError`` on timeout.

        Like :meth:`stream`, an id without a record yet is waited for, and a record seen
        and then gone raises :class:`JobLost`. The wait costs a few commands whatever the
        job's length: it wakes when the client's one reader of ends streams reads this
        job's id on the stream its record names (this client's own for a job it submitted;
        :class:`~producers.hub.EndWatcher`), and checks the record every END_CHECK_S
        besides.
        """
        deadline = Deadline(timeout, f"job {self.id}", END_CHECK_MAX_S)
        if not self._fresh:
            found = read_while_waiting(deadline, self._check_end)
            if found is not None:  # the usual case after reading the stream: one command
                return found
        fresh, self._fresh = self._fresh, False
        ends = self._client.ends
        # Watched before the record is read again: an end after that read wakes us.
        woken = self._watch_end(deadline)
        # Its end not read since before its submit, on a stream read without a break since:
        # that end is still to come, and wakes us (see AsyncJobHandle.result).
        unread = fresh and ends.unread(woken.key, self._end_mark, self.id)
        self._end_mark = None
        checks = end_checks()
        try:
            while True:
                if not unread:
                    found = read_while_waiting(deadline, self._check_end)
                    if found is not None:
                        return found
                unread = False
                if woken.key != self._end_stream:
                    # The record names another stream than the one watched (it was made,
                    # or made again, meanwhile): watch that one, then read the record again.
                    ends.unwatch(woken)
                    woken = self._watch_end(deadline)
                    continue
                if woken.wait(min(next(checks), deadline.block_ms() / 1000)):
                    # Watched afresh: a reader whose read failed woke everyone and stopped.
                    # The new watch comes first: a stream read on keeps its cursor.
                    again = self._watch_end(deadline)
                    ends.unwatch(woken)
                    woken = again
        finally:
            ends.unwatch(woken)

    def _watch_end(self, deadline: Deadline) -> EndEvent:
        watch = functools.partial(self._client.ends.watch, self.id, self._end_stream)
        return read_while_waiting(deadline, watch)

    def _check_end(self) -> JobResult | None:
        """The result if the job has ended (one HMGET; the whole record only for an end
        without a stored result), else None; JobLost for a record seen and gone. Notes the
        ends stream the record names (the same HMGET)."""
        key = self._keys.job(self.id)
        status, raw, named = self._redis.hmget(key, "status", "result", "ends")
        self._watch.saw(status is not None)
        self._end_stream = self._keys.end_stream(named)
        ended = ended_from_fields(status, raw)
        if isinstance(ended, JobResult):
            return ended
        return finished_result(self.id, self._redis.hgetall(key)) if ended else None

    def _status(self) -> JobStatus | None:
        return status_from(self._redis.hget(self._keys.job(self.id), "status"))

    def _ended_meanwhile(self, deadline: Deadline) -> bool:
        """After a wait that brought no event: whether the record shows the job ended
        (:class:`JobLost` when it was seen and is gone)."""
        status = read_while_waiting(deadline, self._status)
        self._watch.saw(status is not None)
        return stream_is_over(status, after_terminal=False)

    def _ends_at(self, event: StreamEvent, deadline: Deadline) -> bool:
        """Whether this terminal event is the job's last: the job is over and no later
        attempt (or cancel) ended after it. A reader that starts after a retried job
        ended must read on past the failed attempt's terminal event. ``done`` always is:
        a job that succeeded never runs again (only failed jobs can be requeued)."""
        if event.type == "done":
            return True
        terminal_id = event.id
        status = read_while_waiting(deadline, self._status)
        if not stream_is_over(status, after_terminal=True):
            return False
        if status is None:
            return True
        newest = read_while_waiting(deadline, self._newest_terminal_id)
        return newest is None or newest == terminal_id

    def _newest_terminal_id(self) -> str | None:
        upper = "+"
        while page := self._redis.xrevrange(self._keys.events(self.id), upper, count=READ_COUNT):
            found = newest_terminal_id(page)
            if found is not None:
                return found
            upper = older_than(page)
        return None

    def _xread(self, cursor: str, block_ms: int | None = None) -> list[StreamEvent]:
        key = self._keys.events(self.id)
        return events_from_xread(self._redis.xread({key: cursor}, count=READ_COUNT, block=block_ms))

    def _read(self, cursor: str, deadline: Deadline) -> list[StreamEvent]:
        """A wait for events: one that times out (a starved or slow link) or cannot reach
        Redis (a restart) read nothing yet, and the caller's own deadline decides when to
        give up (see :meth:`Deadline.redis_away`)."""
        try:
            events = self._xread(cursor, deadline.block_ms())
        except RedisTimeoutError:
            return []
        except RedisConnectionError as exc:
            time.sleep(deadline.redis_away(exc))
            return []
        deadline.redis_back()
        if events:  # a worker wrote them under the job's record
            self._watch.seen = True
        return events

    def _last_event_id(self) -> str:
        last = self._redis.xrevrange(self._keys.events(self.id), count=1)
        return last_entry_id(last)


# --- asyncio client ----------------------------------------------------------------------


class AsyncHermesClient:
    """The asyncio twin of :class:`HermesClient`: the same Redis calls, awaited."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis: AsyncRedis | None = None,
        celery: Celery | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.keys = Keys(self.settings.key_prefix)
        self._owns = (redis is None, celery is None)
        self.redis = redis if redis is not None else async_client(self.settings.redis_url)
        # Built here, not on first use, so threads sharing the client share one app.
        self.celery = celery if celery is not None else make_celery(self.settings)
        self._submit = self.redis.register_script(scripts.SUBMIT)
        # A submit's wait for replicas (HERMES_REDIS_WAIT_REPLICAS; 0: none).
        self._wait = (self.settings.redis_wait_replicas, self.settings.redis_wait_timeout_ms)
        self._cancel = self.redis.register_script(scripts.CANCEL)
        self._requeue = self.redis.register_script(scripts.REQUEUE)
        self._queue_lists = queue_lists(self.settings)
        self._gate = DepthGate(self.settings.max_queue_depth)
        # This client's own ends stream (see HermesClient).
        self.ends_key = self.keys.ends_for(uuid4().hex)
        # Its result waiters' reads of their records, each turn of the loop in one pipeline.
        self.records = RecordReads(self.redis)
        # Every stream this client reads goes through one XREAD loop.
        self.hub = StreamHub(
            self.redis,
            self.settings.key_prefix,
            block_s=block_chunk_s(self.redis),
            count=READ_COUNT,
            interval_s=self.settings.client_read_interval_ms / 1000,
        )

    async def submit(self, job: JobSource, *, tenant: str | None = None) -> AsyncJobHandle:
        """Validate, record and queue a job; a known id is not queued again (see
        :meth:`HermesClient.submit` for the errors). ``tenant``: the gateway's caller, kept
        in the job's record."""
        sub = prepare_submission(job, self.settings.max_body_bytes)
        await self._check_depth(self.keys.job(sub.job_id))
        keys, args = sub.submit_call(
            self.keys, self.celery, self.settings.queue_name, tenant, self.ends_key
        )
        # Where the hub's reads stand before the job can end, or be written.
        mark = self.hub.end_mark(self.ends_key)
        notice_mark = self.hub.notice_mark(self.keys.notices(self.ends_key))
        created = bool(
            await call_replicated_async(self.redis, self._submit, keys, args, *self._wait)
        )
        handle = AsyncJobHandle(self, sub.job_id, created=created)
        if created:
            self._gate.submitted()
            handle._submitted(self.ends_key, mark, notice_mark)
        return handle

    def job(self, job_id: str) -> AsyncJobHandle:
        """A handle to a job submitted earlier (by anyone)."""
        return AsyncJobHandle(self, job_id, created=False)

    @functools.cached_property
    def batches(self) -> AsyncBatches:
        """This deployment's batches, awaited (:class:`producers.batches.AsyncBatches`)."""
        from producers.batches import AsyncBatches

        return AsyncBatches(self)

    async def dead_letters(self) -> list[DeadLetter]:
        """The jobs that ran out of retries, newest first."""
        ids = unique_ids(await self.redis.lrange(self.keys.dead_letters, 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            records = await pipe.execute()
        return [dead_letter(job_id, record) for job_id, record in zip(ids, records, strict=True)]

    async def requeue(self, job_id: str) -> AsyncJobHandle:
        """Put a dead letter back on the queue (see :meth:`HermesClient.requeue`)."""
        for _ in range(REQUEUE_TRIES):
            stored = await self.redis.hget(self.keys.job(job_id), "body")
            keys, args = requeue_call(
                self.keys, job_id, stored, self.celery, self.settings.queue_name
            )
            if requeue_done(job_id, await self._requeue(keys=keys, args=args)):
                return AsyncJobHandle(self, job_id, created=True)
        raise _body_kept_changing(job_id)

    async def purge_dead_letters(self) -> int:
        """Delete every dead letter's keys and take it off the list; returns how many."""
        ids = unique_ids(await self.redis.lrange(self.keys.dead_letters, 0, -1))
        if ids:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(*job_keys(self.keys, ids))
                for job_id in ids:
                    pipe.lrem(self.keys.dead_letters, 0, job_id)
                await pipe.execute()
        return len(ids)

    async def _check_depth(self, key: str) -> None:
        limit, now = self.settings.max_queue_depth, time.monotonic()
        if limit is None or not self._gate.must_read(now):
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            for name in self._queue_lists:
                pipe.llen(name)
            replies = await pipe.execute()
        self._gate.read(check_depth(replies, limit, self.settings.queue_name), now)

    async def aclose(self) -> None:
        """Release the connections this client opened itself."""
        await self.hub.aclose()
        await self.records.aclose()
        if "batches" in self.__dict__:  # its blocking client, made on first use
            self.__dict__["batches"].close()
        owns_redis, owns_celery = self._owns
        if owns_redis:
            await self.redis.aclose()
        if owns_celery:
            self.celery.close()

    async def __aenter__(self) -> AsyncHermesClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncJobHandle:
    """One job, read with asyncio: the same methods as :class:`JobHandle`, awaited."""

    def __init__(self, client: AsyncHermesClient, job_id: str, *, created: bool) -> None:
        self.id = job_id
        self.created = created
        self._client = client
        self._redis = client.redis
        self._keys = client.keys
        self._chunk_s = block_chunk_s(client.redis)
        self._watch = RecordWatch(job_id, seen=created)  # see JobHandle
        self._end_stream = client.keys.ends  # see JobHandle
        self._fresh = False  # see JobHandle
        # Where the hub's reading of the ends stream stood before the submit (StreamHub.end_mark),
        # and of the notice stream (StreamHub.notice_mark).
        self._end_mark: ReadMark | None = None
        self._notice_mark: ReadMark | None = None

    def __repr__(self) -> str:
        return f"AsyncJobHandle(id={self.id!r}, created={self.created})"

    def _submitted(
        self, ends: str, mark: ReadMark | None = None, notice_mark: ReadMark | None = None
    ) -> None:
        """This client's submit just recorded the job, naming ``ends``; ``mark`` and
        ``notice_mark``: the hub's reading of ``ends`` and of its notice stream before it
        was sent."""
        self._end_stream, self._fresh, self._end_mark = ends, True, mark
        self._notice_mark = notice_mark

    async def status(self) -> JobInfo:
        """The job record now; :class:`JobNotFound` if there is none."""
        record = await self._redis.hgetall(self._keys.job(self.id))
        if not record:
            raise _not_found(self.id)
        return job_info_from_record(self.id, record)

    async def stream(
        self, after: str = "0-0", *, timeout: float | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Yield the job's events after ``after`` up to the terminal one (see JobHandle)."""
        deadline = Deadline(timeout, f"job {self.id}", self._chunk_s)
        cursor = after
        self._fresh = False
        since, self._notice_mark = self._notice_mark, None  # a first follow only
        hub = self._client.hub
        key = self._keys.events(self.id)
        notices = await self._notices(deadline)
        sub = await self._follow(key, after, deadline, notices, since)
        try:
            while True:
                try:
                    events = await sub.get(deadline.block_ms() / 1000)
                except RedisConnectionError as exc:
                    # The hub's read failed (Redis restarting) and its loop ended: follow
                    # again, which starts it again, once Redis may be back.
                    await asyncio.sleep(deadline.redis_away(exc))
                    hub.unfollow(sub)
                    sub = await self._follow(key, cursor, deadline, notices)
                    continue
                if events:
                    self._watch.seen = True
                if not events and await self._ended_meanwhile(deadline):
                    # It may have ended just now: what it wrote last, read now.
                    now = functools.partial(self._xread, cursor)
                    events = await read_while_waiting_async(deadline, now)
                    if not events:
                        return
                for event in events:
                    if not is_after(event.id, cursor):  # read directly and from the hub
                        continue
                    yield event
                    cursor = event.id
                    if event.terminal and await self._ends_at(event, deadline):
                        return
        finally:
            hub.unfollow(sub)

    async def _follow(
        self,
        key: str,
        cursor: str,
        deadline: Deadline,
        notices: str | None,
        since: ReadMark | None = None,
    ) -> Subscription:
        """The hub's subscription to ``key``, waiting out a Redis out of reach. ``since``:
        the notice stream's mark from this handle's submit (StreamHub.follow)."""
        while True:
            try:
                return await self._client.hub.follow(
                    key, cursor, notices=notices, job_id=self.id, since=since
                )
            except RedisConnectionError as exc:
                await asyncio.sleep(deadline.redis_away(exc))

    async def _notices(self, deadline: Deadline) -> str | None:
        """The notice stream that names this job when its stream is written: beside the
        client's ends stream its record names (None: it names none; the hub then blocks on
        the job's stream). A handle from this client's submit knows it already."""
        if self._end_stream == self._keys.ends:
            key = self._keys.job(self.id)
            named = await read_while_waiting_async(
                deadline, functools.partial(self._redis.hget, key, "ends")
            )
            self._end_stream = self._keys.end_stream(named)
        if self._end_stream == self._keys.ends:
            return None
        return self._keys.notices(self._end_stream)

    async def poll(self) -> JobResult | None:
        """The result if the job has ended, else None; never waits. JobNotFound without a record."""
        record = await self._redis.hgetall(self._keys.job(self.id))
        if not record:
            raise _not_found(self.id)
        return finished_result(self.id, record)

    async def cancel(self) -> str:
        """Cancel the job: ``"cancelled"`` or ``"cancelling"`` (see :meth:`JobHandle.cancel`)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._keys.job(self.id))
        pipe.time()  # its end is stamped on Redis's clock, not this host's
        record, now = await pipe.execute()
        if not record:
            raise _not_found(self.id)
        client, now = self._client, redis_time(now)
        args = cancel_args(
            self.id, record, now, client.settings.result_ttl_s, self._keys.cancel_channel
        )
        keys = [self._keys.job(self.id), self._keys.events(self.id), self._keys.ends]
        return cancel_outcome(self.id, await client._cancel(keys=keys, args=args))

    async def result(self, timeout: float | None = None) -> JobResult:
        """Wait until the job has ended and return its result; ``TimeoutError`` on timeout,
        :class:`JobLost` when its record was seen and is gone (see JobHandle). It wakes when
        the client's hub reads this job's id on the ends stream its record names (one XREAD
        for every waiter and stream), and checks the record every END_CHECK_S besides."""
        deadline = Deadline(timeout, f"job {self.id}", END_CHECK_MAX_S)
        if not self._fresh:
            found = await read_while_waiting_async(deadline, self._check_end)
            if found is not None:  # the usual case after reading the stream: one command
                return found
        fresh, self._fresh = self._fresh, False
        hub = self._client.hub
        # Watched before the record is read again: an end after that read wakes us.
        wait = await self._watch_end(deadline)
        # A job just submitted, whose ends stream the hub has read without a break since
        # before the submit, and no end of it read: its end is still to come, and wakes us.
        unread = fresh and hub.end_unread(wait.key, self._end_mark, self.id)
        self._end_mark = None
        checks = end_checks()
        try:
            while True:
                if not unread:
                    found = await read_while_waiting_async(deadline, self._check_end)
                    if found is not None:
                        return found
                unread = False
                if wait.key != self._end_stream:  # see JobHandle.result
                    hub.unwatch_end(wait)
                    wait = await self._watch_end(deadline)
                    continue
                timeout_s = min(on_check_grid(next(checks)), deadline.block_ms() / 1000)
                if await wait.wait(timeout_s) and wait.broken:
                    # The hub's read failed and it stopped: watch again, which restarts it.
                    hub.unwatch_end(wait)
                    wait = await self._watch_end(deadline)
        finally:
            hub.unwatch_end(wait)

    async def _watch_end(self, deadline: Deadline) -> EndWait:
        hub = self._client.hub
        watch = functools.partial(hub.watch_end, self.id, self._end_stream)
        return await read_while_waiting_async(deadline, watch)

    async def _check_end(self) -> JobResult | None:
        """See :meth:`JobHandle._check_end`."""
        key = self._keys.job(self.id)
        status, raw, named = await self._client.records.hmget(key, "status", "result", "ends")
        self._watch.saw(status is not None)
        self._end_stream = self._keys.end_stream(named)
        ended = ended_from_fields(status, raw)
        if isinstance(ended, JobResult):
            return ended
        return finished_result(self.id, await self._redis.hgetall(key)) if ended else None

    async def _status(self) -> JobStatus | None:
        return status_from(await self._redis.hget(self._keys.job(self.id), "status"))

    async def _ended_meanwhile(self, deadline: Deadline) -> bool:
        """See :meth:`JobHandle._ended_meanwhile`."""
        status = await read_while_waiting_async(deadline, self._status)
        self._watch.saw(status is not None)
        return stream_is_over(status, after_terminal=False)

    async def _ends_at(self, event: StreamEvent, deadline: Deadline) -> bool:
        """Whether this terminal event is the job's last (see :meth:`JobHandle._ends_at`)."""
        if event.type == "done":
            return True
        terminal_id = event.id
        status = await read_while_waiting_async(deadline, self._status)
        if not stream_is_over(status, after_terminal=True):
            return False
        if status is None:
            return True
        newest = await read_while_waiting_async(deadline, self._newest_terminal_id)
        return newest is None or newest == terminal_id

    async def _newest_terminal_id(self) -> str | None:
        key, upper = self._keys.events(self.id), "+"
        while page := await self._redis.xrevrange(key, upper, count=READ_COUNT):
            found = newest_terminal_id(page)
            if found is not None:
                return found
            upper = older_than(page)
        return None

    async def _xread(self, cursor: str, block_ms: int | None = None) -> list[StreamEvent]:
        key = self._keys.events(self.id)
        reply = await self._redis.xread({key: cursor}, count=READ_COUNT, block=block_ms)
        return events_from_xread(reply)

    async def _read(self, cursor: str, deadline: Deadline) -> list[StreamEvent]:
        """See :meth:`JobHandle._read`."""
        try:
            events = await self._xread(cursor, deadline.block_ms())
        except RedisTimeoutError:
            return []
        except RedisConnectionError as exc:
            await asyncio.sleep(deadline.redis_away(exc))
            return []
        deadline.redis_back()
        if events:
            self._watch.seen = True
        return events

    async def _last_event_id(self) -> str:
        last = await self._redis.xrevrange(self._keys.events(self.id), count=1)
        return last_entry_id(last)
