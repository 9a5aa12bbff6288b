"""Where jobs live in Redis: key names, the job record, and the event stream format.

Shared by the worker (writer) and producers (readers), so both sides agree on one layout:

* ``{prefix}job:{id}`` — a hash, the job record: ``status``, ``attempts``, ``worker``,
  ``queued_at``, ``started_at``, ``first_token_at``, ``finished_at`` (unix seconds),
  ``body`` (the job as submitted), ``result`` (the final ``JobResult`` JSON, once ended),
  ``requeued`` (set when a dead letter was put back: its stream already has events),
  ``digest`` (SHA-1 of ``body``: a delivered message must carry that body),
  ``deliveries`` (deliveries that have not come back: past a limit the job is poison),
  ``cancel_requested``, ``problems``, ``tenant`` (the gateway tenant that submitted it),
  ``ends`` (the ends stream of the client that submitted it, ``{prefix}ends:{owner}``: where
  the job's end goes; absent for other producers' jobs, whose ends go to ``{prefix}ends``).
* ``{prefix}job:{id}:lease`` — present while an attempt runs: the owner's token, kept
  alive by heartbeat. A redelivered copy that finds it waits; one that finds it gone (the
  worker died) runs the job again as the next attempt.
* ``{prefix}cancel`` — pub/sub channel; a cancel sets ``cancel_requested`` in the record
  and publishes the job id, so the worker running it aborts the engine request.
* ``{prefix}dlq`` — a list of job ids that ran out of retries (or were poison).
* ``{prefix}worker:{name}`` and ``{prefix}workers`` — a worker's vitals and the index of
  workers (``worker/vitals.py``); ``{prefix}worker:{name}:deliveries`` — the Celery
  messages it holds, restored to the queue when it dies (``worker/reaper.py``).
* ``{prefix}ends:{owner}`` and ``{prefix}ends`` — Redis Streams of job ends: each script
  that ends a job (the worker's last write, a cancel of a queued job, a dead letter) appends
  ``id`` = the job id in the same call, to the stream its record's ``ends`` field names (the
  submitting client's own, ``Keys.ends_for``), else to the deployment's shared one; trimmed
  to about ``ENDS_MAXLEN`` entries, a client's own expiring ``ENDS_TTL_S`` after its last
  end. A result waiter reads the stream of its job (one blocking XREAD per client for all
  its waiters and their streams) instead of its job's event stream, so it wakes once per
  job, whatever the tokens, and only for the jobs it awaits.
* ``{prefix}ends:{owner}:written`` — a client's notice stream (``Keys.notices``): each
  flush of a worker adds one entry, ``ids`` = the space-separated ids of that client's jobs
  whose event streams it wrote, after those writes and in the same call, and the events
  themselves (``NOTICE_CARRY_BYTES``). The client's hub blocks on it instead of on every
  stream it follows, and takes the events from it (or reads the streams named).
* ``{prefix}job:{id}:events`` — a Redis Stream. Each entry has ``seq`` (strictly
  increasing per job), ``type`` and ``data`` (JSON). Readers resume from the last entry id
  they saw. ``done``, ``error`` and ``cancelled`` are terminal: exactly one per attempt.

Every key of a job expires: a long safety TTL while it is alive, ``result_ttl_s`` after it
ends. Celery only carries the job; results never go through Celery's result backend.
Every Lua script that writes these keys is in ``scripts.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from redis import BlockingConnectionPool as SyncBlockingPool
from redis import Redis as SyncRedis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.commands.core import AsyncScript
from redis.commands.core import Script as SyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import MasterNotFoundError
from redis.sentinel import Sentinel as SyncSentinel
from redis.sentinel import SentinelConnectionPool as SyncSentinelPool
from redis.sentinel import SentinelManagedConnection as SyncSentinelConnection

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
# About this many job ends stay in an ends stream, ``{prefix}ends`` or a client's own
# (XADD MAXLEN ~): a reader that falls further behind than that misses the oldest, and finds
# those jobs' ends by its periodic check of their records instead (producers/client.py,
# END_CHECK_S). At ~100 bytes an entry, about 1 MB per stream at most (a client's holds only
# the ends of the jobs it submitted in the last ENDS_TTL_S).
ENDS_MAXLEN = 10_000
# A client's own ends stream (``Keys.ends_for``) expires this long after the last end written
# to it, so that the stream of a process gone for good goes too.
ENDS_TTL_S = 24 * 3600
# A client's notice stream is its ends stream's name with this after it (Keys.notices).
NOTICES_SUFFIX = ":written"
# About this many entries stay in a notice stream (XADD MAXLEN ~): one a worker's flush, with
# the events it carries (a few KB at most). A hub that falls further behind misses the
# oldest, and reads the streams it follows once a second besides (producers/hub.py).
NOTICES_MAXLEN = 2_000
# A worker's notice carries the events it announces (scripts.WRITE), a field each, named
# '<job id> <entry id> <seq> <type>' (no part holds a space), the event's data JSON as the
# value; a job whose events in one write hold more data than NOTICE_CARRY_BYTES is named
# without them (its reader reads its stream), as are those past NOTICE_CARRY_FIELDS fields
# in one entry.
NOTICE_CARRY_BYTES = 4096
NOTICE_CARRY_FIELDS = 2000


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

    def ends_for(self, owner: str) -> str:
        """A client's own stream of job ends (field ``id``): the jobs it submits name it in
        their record's ``ends`` field, and their ends go there instead of :attr:`ends`."""
        return f"{self.prefix}ends:{owner}"

    def notices(self, ends: str) -> str:
        """The notice stream beside the client's ends stream ``ends``: each flush of a
        worker names there (field ``ids``) the jobs of that client whose events streams it
        wrote, so the client's hub blocks on it rather than on every stream it follows.
        Trimmed and expiring like the ends stream."""
        return f"{ends}{NOTICES_SUFFIX}"

    def end_stream(self, named: bytes | str | None) -> str:
        """The ends stream a job's end goes to, from its record's ``ends`` field: the stream
        named there when it is a client's own (:meth:`ends_for`), else :attr:`ends` (a
        record without the field: another producer's job; the scripts check the same)."""
        if named is not None:
            key = as_text(named)
            if key.startswith(f"{self.ends}:") and len(key) > len(self.ends) + 1:
                return key
        return self.ends

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
SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379  # a sentinel's port when the URL gives none
# A sentinel that does not answer within this is skipped for the next one (redis-py asks
# them in turn for the master's address).
SENTINEL_TIMEOUT_S = 5.0
# Our pools ask the sentinels who is master at most this often (see _SyncBlockingSentinelPool).
MASTER_CHECK_S = 1.0


@dataclass(frozen=True)
class SentinelURL:
    """A Redis master found through Sentinel, as ``HERMES_REDIS_URL`` names it::

        sentinel://[[user]:password@]host:port[,host:port...][/db]?master=NAME

    ``host:port`` are the sentinels (port 26379 when left out), ``master`` (or kombu's
    ``master_name``) the name they monitor it under (``sentinel monitor NAME ...``), the
    user and password the master's
    (as in a ``redis://`` URL). A ``sentinel_password`` (and ``sentinel_username``) query
    parameter is for sentinels that require one. kombu writes the same thing as
    ``sentinel://h1:p1/db;sentinel://h2:p2`` plus the transport option ``master_name``:
    :meth:`kombu_url` gives that form, so one setting serves the broker and our clients.
    TLS to a sentinel-managed master is not supported (use ``rediss://`` without Sentinel)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    userinfo: str = ""  # "user:password" as written in the URL (percent-encoded)
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelURL | None:
        """The URL's parts; None for a URL of another scheme, ValueError for a bad one."""
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            return None
        userinfo, _, hosts = parts.netloc.rpartition("@")
        sentinels = tuple(_host_port(host) for host in hosts.split(",") if host)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        master = query.get("master") or query.get("master_name")
        if not sentinels or not master:
            raise ValueError(
                f"a sentinel URL names its sentinels and ?master=NAME: {_redacted(url)}"
            )
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"a sentinel URL's path is a database number: {_redacted(url)}")
        return cls(
            sentinels,
            master,
            int(path or 0),
            userinfo,
            query.get("sentinel_username"),
            query.get("sentinel_password"),
        )

    def master_kwargs(self) -> dict[str, Any]:
        """redis-py's connection arguments for the master: database and credentials."""
        user, _, password = self.userinfo.partition(":")
        kwargs: dict[str, Any] = {"db": self.db}
        if user:
            kwargs["username"] = unquote(user)
        if password:
            kwargs["password"] = unquote(password)
        return kwargs

    def sentinel_kwargs(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """redis-py's connection arguments for the sentinels: the socket options of
        ``options`` (as redis-py's own default), SENTINEL_TIMEOUT_S where they set no
        timeout, and the sentinels' credentials."""
        kwargs: dict[str, Any] = {
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        }
        kwargs.update((k, v) for k, v in options.items() if k.startswith("socket_"))
        if self.sentinel_username:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def kombu_url(self) -> str:
        """kombu's form of this URL (its ``SentinelChannel``): one ``sentinel://`` URL per
        sentinel joined by ``;``, the first carrying the credentials and the database."""
        auth = f"{self.userinfo}@" if self.userinfo else ""
        hosts = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels]
        first, *rest = hosts
        urls = [f"{SENTINEL_SCHEME}://{auth}{first}/{self.db}"]
        return ";".join(urls + [f"{SENTINEL_SCHEME}://{host}" for host in rest])


def _host_port(text: str) -> tuple[str, int]:
    """``host[:port]`` (``[v6]:port`` too) as a sentinel's address."""
    parts = urlsplit(f"//{text}")
    if not parts.hostname:
        raise ValueError(f"not a host[:port]: {text!r}")
    return parts.hostname, parts.port or SENTINEL_PORT


def _redacted(url: str) -> str:
    """``url`` without the password of its user part."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}").geturl()


class NotReplicated(RedisTimeoutError):
    """A write reached the master, but fewer replicas than asked for (WAIT) confirmed it in
    time: a failover now could lose it. Written all the same; idempotent calls (a submit
    with its id) can be made again."""


def call_replicated(
    client: SyncRedis, script: SyncScript, keys: list[str], args: list[str],
    replicas: int, timeout_ms: int,
) -> Any:  # fmt: skip
    """``script(keys, args)``, and with ``replicas``, ``WAIT replicas timeout_ms`` after it
    on the same connection (one round trip, a pipeline): :class:`NotReplicated` when fewer
    replicas acknowledged it. A script the server lacks (a new master after a failover) is
    loaded first, by redis-py's pipeline."""
    if not replicas:
        return script(keys=keys, args=args)
    with client.pipeline(transaction=False) as pipe:
        script(keys=keys, args=args, client=pipe)
        pipe.wait(replicas, timeout_ms)
        reply, acknowledged = pipe.execute()
    return _replicated(reply, int(acknowledged), replicas, timeout_ms)


async def call_replicated_async(
    client: AsyncRedis, script: AsyncScript, keys: list[str], args: list[str],
    replicas: int, timeout_ms: int,
) -> Any:  # fmt: skip
    """The asyncio twin of :func:`call_replicated`."""
    if not replicas:
        return await script(keys=keys, args=args)
    async with client.pipeline(transaction=False) as pipe:
        await script(keys=keys, args=args, client=pipe)
        pipe.wait(replicas, timeout_ms)
        reply, acknowledged = await pipe.execute()
    return _replicated(reply, int(acknowledged), replicas, timeout_ms)


def _replicated(reply: Any, acknowledged: int, replicas: int, timeout_ms: int) -> Any:
    if acknowledged < replicas:
        raise NotReplicated(
            f"{acknowledged} of {replicas} replicas confirmed the write within {timeout_ms} ms "
            "(HERMES_REDIS_WAIT_REPLICAS): written on the master, may be lost by a failover"
        )
    return reply


# Errors of a server that takes no writes now: a master short of the replicas its
# min-replicas-to-write asks for, a replica cut off from its master. (READONLY, from a
# server that is a replica now, redis-py's Sentinel connection already takes for a lost
# connection.)
WRITES_REFUSED = ("NOREPLICAS", "MASTERDOWN")


class SentinelConnection(SyncSentinelConnection):
    """redis-py's connection to a Sentinel-managed master, which takes a master's refusal
    of writes for a lost connection: closed, and the next one asks the sentinels again.

    A master the sentinels have just replaced, or a new one whose replicas have not joined
    yet, refuses writes when it runs with ``min-replicas-to-write`` (docs/reliability.md,
    "Failover"); as a ResponseError that refusal ends a call for good (a worker's Celery
    consumer stopped consuming), as a ConnectionError every layer waits and tries again.
    Nothing was written: a script is refused at its first write, a transaction whole."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not str(exc).startswith(WRITES_REFUSED):
                raise
            self.disconnect()  # type: ignore[no-untyped-call]
            raise RedisConnectionError(f"the master refuses writes: {exc}") from exc


class AsyncSentinelConnection(AsyncSentinelManagedConnection):
    """The asyncio twin of :class:`SentinelConnection`."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not str(exc).startswith(WRITES_REFUSED):
                raise
            await self.disconnect()
            raise RedisConnectionError(f"the master refuses writes: {exc}") from exc


class _SyncBlockingSentinelPool(SyncSentinelPool, SyncBlockingPool):
    """redis-py's Sentinel pool (connections made to whichever server the sentinels name
    master now) with the blocking pool's wait for a free connection, and one more check.

    redis-py asks the sentinels only when it opens a connection, and an open connection to
    a master that was failed over while it still runs (a switch-over, a master frozen then
    back) keeps working: writes go on landing there, acknowledged, until the sentinels
    demote it (they look at it every 10 s) and its data is replaced by the new master's.
    Measured (tests/test_sentinel.py): a producer lost every submit of those seconds. So
    the pool asks the sentinels at most every MASTER_CHECK_S as connections are taken: on a
    change the idle connections are closed, and those in use are closed as they come back.
    """

    _checked_at = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_S:
            self._checked_at = now
            with contextlib.suppress(MasterNotFoundError):  # the connection will say
                self.get_master_address()  # type: ignore[no-untyped-call]
        return super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]


class _AsyncBlockingSentinelPool(AsyncSentinelPool, AsyncBlockingPool):
    """The asyncio twin of :class:`_SyncBlockingSentinelPool`."""

    _checked_at = 0.0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_S:
            self._checked_at = now
            with contextlib.suppress(MasterNotFoundError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def release(self, connection: Any) -> None:
        # redis-py's asyncio pool keeps a connection to the old master that comes back.
        master = self.master_address
        if master is not None and (connection.host, connection.port) != master:
            await connection.disconnect()
        await super().release(connection)


@dataclass(frozen=True)
class _Flavour:
    """The redis-py classes of one kind of client (blocking or asyncio)."""

    client: Any
    pool: Any
    sentinel: Any  # As Any: redis-py types Sentinel in some releases (8.2), not others (8.1).
    sentinel_pool: Any
    sentinel_connection: Any


_SYNC = _Flavour(
    SyncRedis, SyncBlockingPool, SyncSentinel, _SyncBlockingSentinelPool, SentinelConnection
)
_ASYNC = _Flavour(
    AsyncRedis,
    AsyncBlockingPool,
    AsyncSentinel,
    _AsyncBlockingSentinelPool,
    AsyncSentinelConnection,
)


def _client(flavour: _Flavour, url: str, max_connections: int, options: dict[str, Any]) -> Any:
    sentinel = SentinelURL.parse(url)
    if sentinel is None:
        pool = flavour.pool.from_url(
            url, max_connections=max_connections, timeout=POOL_WAIT_S, **options
        )
        return flavour.client.from_pool(pool)
    manager = flavour.sentinel(
        list(sentinel.sentinels),
        sentinel_kwargs=sentinel.sentinel_kwargs(options),
        **sentinel.master_kwargs(),
        **options,
    )
    return manager.master_for(
        sentinel.master,
        redis_class=flavour.client,
        connection_pool_class=flavour.sentinel_pool,
        connection_class=flavour.sentinel_connection,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
    )


def sync_client(url: str, max_connections: int = MAX_CONNECTIONS, **options: Any) -> SyncRedis:
    """The one way our code connects to Redis: a blocking client whose pool makes callers
    wait for a connection, never fail. ``url``: ``redis://``, ``rediss://``, ``unix://`` (as
    redis-py reads them) or ``sentinel://`` (:class:`SentinelURL`): then every connection
    asks the sentinels for the master's address, and after a failover the pool's idle
    connections are dropped and new ones go to the new master. ``options``: redis-py's
    connection arguments (``socket_timeout``, ``retry``, ...)."""
    client: SyncRedis = _client(_SYNC, url, max_connections, options)
    return client


def async_client(url: str, max_connections: int = MAX_CONNECTIONS, **options: Any) -> AsyncRedis:
    """The asyncio twin of :func:`sync_client`."""
    client: AsyncRedis = _client(_ASYNC, url, max_connections, options)
    return client
