"""Where jobs live in Redis: key names, the job record, and the event stream format.

Shared by the worker (writer) and producers (readers), so both sides agree on one layout:

* ``{prefix}job:{id}`` — a hash, the job record: ``status``, ``attempts``, ``worker``,
  ``queued_at``, ``started_at``, ``first_token_at``, ``finished_at`` (unix seconds),
  ``body`` (the job as submitted), ``result`` (the final ``JobResult`` JSON, once ended),
  ``requeued`` (set when a dead letter was put back: its stream already has events),
  ``digest`` (SHA-1 of ``body``: a delivered message must carry that body),
  ``deliveries`` (deliveries that have not come back: past a limit the job is poison),
  ``cancel_requested``, ``problems``, ``tenant`` (the gateway tenant that submitted it).
* ``{prefix}job:{id}:lease`` — present while an attempt runs: the owner's token, kept
  alive by heartbeat. A redelivered copy that finds it waits; one that finds it gone (the
  worker died) runs the job again as the next attempt.
* ``{prefix}cancel`` — pub/sub channel; a cancel sets ``cancel_requested`` in the record
  and publishes the job id, so the worker running it aborts the engine request.
* ``{prefix}dlq`` — a list of job ids that ran out of retries (or were poison).
* ``{prefix}worker:{name}`` and ``{prefix}workers`` — a worker's vitals and the index of
  workers (``worker/vitals.py``); ``{prefix}worker:{name}:deliveries`` — the Celery
  messages it holds, restored to the queue when it dies (``worker/reaper.py``).
* ``{prefix}ends`` — a Redis Stream of job ends: each script that ends a job (the
  worker's last write, a cancel of a queued job, a dead letter) appends ``id`` = the job id
  in the same call, trimmed to about ``ENDS_MAXLEN`` entries. A result waiter reads it (one
  blocking XREAD per client for all its waiters) instead of its job's event stream, so it
  wakes once per job, whatever the tokens.
* ``{prefix}job:{id}:events`` — a Redis Stream. Each entry has ``seq`` (strictly
  increasing per job), ``type`` and ``data`` (JSON). Readers resume from the last entry id
  they saw. ``done``, ``error`` and ``cancelled`` are terminal: exactly one per attempt.

Every key of a job expires: a long safety TTL while it is alive, ``result_ttl_s`` after it
ends. Celery only carries the job; results never go through Celery's result backend.
Every Lua script that writes these keys is in ``scripts.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from redis import BlockingConnectionPool as SyncBlockingPool
from redis import Redis as SyncRedis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio import Redis as AsyncRedis

from hermes_worker.contract.jobs import JobInfo, JobResult, JobStatus

EventType = Literal[
    "started",
    "reasoning",
    "content",
    "tool_call",
    "usage",
    "done",
    "error",
    "cancelled",
    "restarted",
]
TERMINAL_EVENTS: frozenset[str] = frozenset({"done", "error", "cancelled"})
# While a job is alive its keys still expire, in case every worker vanished for good.
ALIVE_TTL_S = 7 * 24 * 3600
TIME_FIELDS = ("queued_at", "started_at", "first_token_at", "finished_at")
# About this many job ends stay in ``{prefix}ends`` (XADD MAXLEN ~): a reader that falls
# further behind than that misses the oldest, and finds those jobs' ends by its periodic
# check of their records instead (producers/client.py, END_CHECK_S). At ~100 bytes an entry,
# about 1 MB per deployment.
ENDS_MAXLEN = 10_000


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (default ``hermes:``)."""

    prefix: str = "hermes:"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:events"

    def lease(self, job_id: str) -> str:
        """The running attempt's lease: its owner token, with a TTL renewed by heartbeat."""
        return f"{self.prefix}job:{job_id}:lease"

    @property
    def ends(self) -> str:
        """A stream of job ends (field ``id``), for result waiters; about ENDS_MAXLEN long."""
        return f"{self.prefix}ends"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: a cancel request publishes the job id here."""
        return f"{self.prefix}cancel"

    @property
    def dead_letters(self) -> str:
        """A list of job ids that ran out of retries (newest first)."""
        return f"{self.prefix}dlq"

    def worker(self, name: str) -> str:
        """A worker's vitals hash, written by its heartbeat (``vitals.py``)."""
        return f"{self.prefix}worker:{name}"

    def deliveries(self, name: str) -> str:
        """The delivery tags of the Celery messages a worker holds (a set): when the worker
        dies, a reaper puts these messages back on their queue (``worker/reaper.py``)."""
        return f"{self.prefix}worker:{name}:deliveries"

    @property
    def workers(self) -> str:
        """The sorted set of worker names, scored by last heartbeat (unix seconds)."""
        return f"{self.prefix}workers"

    def batch(self, batch_id: str) -> str:
        """A batch's record (a hash: hermes_worker/batch/store.py)."""
        return f"{self.prefix}batch:{batch_id}"

    def batch_runner(self, batch_id: str) -> str:
        """The lease of the process running a batch: its token, with a TTL."""
        return f"{self.prefix}batch:{batch_id}:runner"

    @property
    def batches(self) -> str:
        """The sorted set of batch ids, scored by creation time (unix seconds)."""
        return f"{self.prefix}batches"


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a job's event stream, as a reader sees it."""

    id: str  # the Redis stream entry id: pass it back to resume after this event
    seq: int
    type: str
    data: Any

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq, "type": self.type, "data": self.data}


def body_json(body: Any) -> str:
    """A job body as a record stores it: compact JSON, non-ASCII kept."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def body_digest(stored: str) -> str:
    """The ``digest`` of a record's ``body`` (as Lua's ``redis.sha1hex`` computes it)."""
    return hashlib.sha1(stored.encode("utf-8", "surrogatepass")).hexdigest()


def encode_event(seq: int, type_: EventType, data: Any) -> dict[str, str]:
    """The fields of a stream entry."""
    return {"seq": str(seq), "type": type_, "data": json.dumps(data, ensure_ascii=False)}


def as_text(value: bytes | str) -> str:
    """Redis replies arrive as bytes or str depending on the client; callers want str."""
    return value.decode() if isinstance(value, bytes) else value


def decode_event(entry_id: bytes | str, fields: Mapping[bytes | str, bytes | str]) -> StreamEvent:
    """A stream entry as read by XREAD / XRANGE (bytes or str, either works)."""
    plain = {as_text(k): as_text(v) for k, v in fields.items()}
    return StreamEvent(
        id=as_text(entry_id),
        seq=int(plain["seq"]),
        type=plain["type"],
        data=json.loads(plain.get("data", "null")),
    )


def job_info_from_record(job_id: str, record: Mapping[bytes | str, bytes | str]) -> JobInfo:
    """The ``job`` object from a job hash (HGETALL)."""
    plain = {as_text(k): as_text(v) for k, v in record.items()}
    times = {name: float(plain[name]) for name in TIME_FIELDS if plain.get(name)}
    return JobInfo(
        id=job_id,
        status=JobStatus(plain.get("status", JobStatus.QUEUED)),
        attempts=int(plain.get("attempts", 0)),
        worker=plain.get("worker") or None,
        problems=tuple(json.loads(plain.get("problems", "[]"))),
        **times,
    )


def result_from_record(record: Mapping[bytes | str, bytes | str]) -> JobResult | None:
    """The final result stored in a job hash, or None while the job has not ended."""
    raw = record.get("result", record.get(b"result"))
    return JobResult.model_validate_json(raw) if raw else None


# --- connections -------------------------------------------------------------------------

# redis-py's default pool raises "Too many connections" once 100 commands are in flight at
# once (a worker claiming 128 jobs, a producer submitting 128): ours waits for a free one.
MAX_CONNECTIONS = 64
POOL_WAIT_S = 30.0


def sync_client(url: str, max_connections: int = MAX_CONNECTIONS) -> SyncRedis:
    """A blocking client whose pool makes callers wait for a connection, never fail."""
    pool = SyncBlockingPool.from_url(url, max_connections=max_connections, timeout=POOL_WAIT_S)
    return SyncRedis.from_pool(pool)


def async_client(url: str, max_connections: int = MAX_CONNECTIONS) -> AsyncRedis:
    """The asyncio twin of :func:`sync_client`."""
    pool = AsyncBlockingPool.from_url(url, max_connections=max_connections, timeout=POOL_WAIT_S)
    return AsyncRedis.from_pool(pool)
