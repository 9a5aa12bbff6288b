"""``hermes-worker doctor``, and the same checks when a worker starts: will this Redis keep
the jobs?

Redis is the queue, the in-flight ledger (kombu's ``unacked`` hash) and the job store at
once, so a Redis that drops data drops jobs silently: a queued message, an unacknowledged
one or a job record that vanishes leaves nothing behind to say the job existed. The checks:

* **version**: 6.2 at least (exclusive stream ranges, ``LPOS``, ACL channel rules); 7.0 is
  the version the tests run, and the first with ``ACL DRYRUN``.
* **maxmemory-policy**: only ``noeviction`` is safe. Every other policy evicts keys once
  ``maxmemory`` is reached, and the ``volatile-*`` ones evict exactly the job records (they
  carry a TTL). Under ``noeviction`` a full Redis refuses writes instead (submits fail, a
  running job waits to write its end), and **memory** warns when it is close.
* **persistence**: an append-only file, else a restart loses every job since the last RDB
  snapshot (all of them without one).
* **acl ROLE**: the commands, keys and channels a worker, a producer, an admin or the gateway needs
  (``deploy/redis/users.acl``, docs/security.md), checked for a Redis user with ``ACL DRYRUN``.
* **clock**: Redis ``TIME`` against this host's clock. Job times, timeouts, leases and
  heartbeats are on Redis's clock; what still compares hosts' clocks is an absolute
  ``deadline`` a producer gives and kombu's visibility sweep, so each host should be close
  to Redis's.

Each check ends ``ok``, ``warn``, ``fail`` (this would lose or break jobs) or ``unknown``
(the connected user may not ask, or this Redis cannot say), with one line saying why.

A worker runs the same checks at start (``HERMES_REDIS_CHECK``: ``warn``, the default, logs
what it finds; ``refuse`` exits before loading the model when a check fails; ``off``). As a
named Redis user other than ``default``, it sends only commands the worker's ACL grants
(``HELLO``, ``TIME``), so that Redis never logs a refusal in ``ACL LOG``; the rest says
``unknown`` and is for ``hermes-worker doctor`` run as the admin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import click
import structlog
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.retry import Retry

from hermes_worker.cli.errors import one_line_errors
from hermes_worker.contract.queue import PRIORITY_STEPS, queue_list
from hermes_worker.contract.store import Keys, as_text, sync_client
from hermes_worker.errors import UnsafeRedis
from hermes_worker.settings import Settings

log = structlog.stdlib.get_logger(__name__)

Level = Literal["ok", "warn", "fail", "unknown"]
Role = Literal["worker", "producer", "admin", "gateway"]
ROLES: tuple[Role, ...] = ("worker", "producer", "admin", "gateway")

MIN_VERSION = (6, 2)  # XREVRANGE with exclusive ids, LPOS, ACL channel rules
TESTED_VERSION = (7, 0)  # the tests' Redis, and the first with ACL DRYRUN
MAX_SKEW_S = 1.0
MEMORY_WARN_SHARE = 0.8
TIMEOUT_S = 5.0
EXIT_LOSES_JOBS = 1
# A sha that no script has: EVALSHA's keys are what ACL DRYRUN checks.
PROBE_SHA = "0" * 40
PROBE_JOB = "doctor-probe"
PROBE_WORKER = "doctor-probe"


# --- what each role needs ----------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """One command (with keys or channels like the real ones) a role sends; ``optional``
    ones cost a feature when refused, not jobs."""

    args: tuple[str, ...]
    why: str
    optional: bool = False

    @property
    def command(self) -> str:
        """The command as ACL rules name it: ``xadd``, ``script|load``."""
        return command_name(self.args)

    def __str__(self) -> str:
        return " ".join(self.args)


CONTAINER_COMMANDS = frozenset({"acl", "client", "config", "script", "object", "xinfo"})


def command_name(args: Sequence[str]) -> str:
    name = args[0].lower()
    if name in CONTAINER_COMMANDS and len(args) > 1:
        return f"{name}|{args[1].lower()}"
    return name


def role_needs(role: Role, settings: Settings) -> list[Need]:
    """What a worker, a producer or an admin sends to Redis, as ACL DRYRUN arguments on the
    deployment's own keys (``settings``: prefix, queue, database). ``tests/test_doctor.py``
    holds the worker's and the producer's command lists against ``deploy/redis/users.acl``."""
    keys, queue = Keys(settings.key_prefix), settings.queue_name
    job, events, lease = keys.job(PROBE_JOB), keys.events(PROBE_JOB), keys.lease(PROBE_JOB)
    own_ends = keys.ends_for(PROBE_JOB)  # a client's own ends stream, named in its jobs' records
    lists = [queue_list(queue, step) for step in PRIORITY_STEPS]
    binding = f"_kombu.binding.{queue}"
    db = _database(settings.redis_url)
    common = [
        Need(("HELLO",), "connect"),
        Need(("PING",), "connect"),
        Need(("SELECT", db), "connect"),
        Need(("MULTI",), "transactions"),
        Need(("EXEC",), "transactions"),
        Need(("SCRIPT", "LOAD", "return 1"), "Lua scripts"),
        Need(("SCRIPT", "EXISTS", PROBE_SHA), "Lua scripts"),
    ]
    if role == "worker":
        vitals = keys.worker(PROBE_WORKER)
        held = f"{vitals}:deliveries"
        return [
            *common,
            Need(
                ("EVALSHA", PROBE_SHA, "4", lease, job, events, keys.ends),
                "claim, renew, release, stream writes and job ends",
            ),
            Need(("WATCH", "unacked"), "kombu restores unacknowledged messages"),
            Need(("UNWATCH",), "kombu restores unacknowledged messages"),
            Need(("TIME",), "clock check at start"),
            Need(("BRPOP", *lists, "1"), "take jobs"),
            Need(("RPOP", queue), "take a burst of jobs in one call", optional=True),
            Need(("LPUSH", queue, "m"), "retries, hand-backs"),
            Need(("RPUSH", queue, "m"), "kombu restores"),
            Need(("LPUSH", keys.dead_letters, PROBE_JOB), "dead letters"),
            Need(("LLEN", queue), "queue depth"),
            Need(("DEL", lease), "release a lease"),
            Need(("EXISTS", job), "job records"),
            Need(("EXPIRE", job, "60"), "job keys expire"),
            Need(("PEXPIRE", lease, "1000"), "renew a lease"),
            Need(("PTTL", lease), "wait on a lease"),
            Need(("GET", lease), "leases"),
            Need(("SET", lease, "t", "NX", "PX", "1000"), "leases"),
            Need(("SET", "unacked_mutex", "t", "NX", "EX", "10"), "kombu's sweep mutex"),
            Need(("HGET", job, "status"), "job records"),
            Need(("HMGET", job, "status"), "job records"),
            Need(("HSET", job, "status", "x"), "job records"),
            Need(("HSETNX", job, "status", "x"), "job records"),
            Need(("HDEL", job, "status"), "job records"),
            Need(("HEXISTS", job, "cancel_requested"), "cancel requests"),
            Need(("HGETALL", job), "job records"),
            Need(("HINCRBY", job, "n", "1"), "counters"),
            Need(("HSET", "unacked", "t", "m"), "kombu's unacknowledged messages"),
            Need(("HDEL", "unacked", "t"), "kombu's acks"),
            Need(("HSET", vitals, "f", "v"), "vitals"),
            Need(("SADD", binding, "b"), "kombu's queue binding"),
            Need(("SREM", binding, "b"), "kombu's queue binding"),
            Need(("SMEMBERS", binding), "kombu's queue binding"),
            Need(("SADD", held, "t"), "the messages a worker holds, for the reaper"),
            Need(("SCARD", held), "the reaper"),
            Need(("TTL", job), "delivery counts"),
            Need(("ZADD", "unacked_index", "1", "t"), "kombu's unacknowledged messages"),
            Need(("ZREM", "unacked_index", "t"), "kombu's acks"),
            Need(("ZRANGEBYSCORE", "unacked_index", "0", "1"), "kombu's visibility sweep"),
            Need(("ZRANGE", keys.workers, "0", "-1"), "the workers index"),
            Need(("ZREMRANGEBYSCORE", keys.workers, "0", "1"), "the workers index"),
            Need(("XADD", events, "*", "seq", "1"), "stream events"),
            Need(("XREVRANGE", events, "+", "-", "COUNT", "1"), "stream events"),
            Need(("XADD", own_ends, "*", "id", PROBE_JOB), "job ends, to the submitter's stream"),
            Need(("EXPIRE", own_ends, "60"), "job ends, to the submitter's stream"),
            Need(("SUBSCRIBE", keys.cancel_channel), "cancel requests"),
            Need(("UNSUBSCRIBE", keys.cancel_channel), "cancel requests"),
            Need(("PSUBSCRIBE", f"/{db}.celery.pidbox"), "Celery remote control", optional=True),
            Need(("PUNSUBSCRIBE", f"/{db}.celery.pidbox"), "Celery remote control", optional=True),
        ]
    hub = f"{settings.key_prefix}hub:{PROBE_JOB}"
    producer = [
        *common,
        Need(("EVALSHA", PROBE_SHA, "3", job, events, keys.ends), "submit, cancel, requeue"),
        Need(("LPUSH", queue, "m"), "submit"),
        *(Need(("LLEN", name), "backpressure") for name in lists),
        Need(("LRANGE", keys.dead_letters, "0", "-1"), "dead letters"),
        Need(("LREM", keys.dead_letters, "0", PROBE_JOB), "dead letters"),
        Need(("LPOS", keys.dead_letters, PROBE_JOB), "requeue"),
        Need(("DEL", job, events, lease), "purge dead letters"),
        Need(("EXISTS", job), "submit"),
        Need(("EXPIRE", job, "60"), "job keys expire"),
        Need(("HGET", job, "status"), "status"),
        Need(("HMGET", job, "status", "body"), "requeue"),
        Need(("HSET", job, "status", "x"), "submit, cancel"),
        Need(("TIME",), "queued_at and cancels on Redis's clock"),
        Need(("HDEL", job, "status"), "requeue"),
        Need(("HGETALL", job), "status, result"),
        Need(("SADD", binding, "b"), "kombu's queue binding"),
        Need(("XADD", events, "*", "seq", "1"), "cancel"),
        Need(("XREAD", "COUNT", "1", "STREAMS", events, "0-0"), "stream, result"),
        Need(("XREVRANGE", events, "+", "-", "COUNT", "1"), "stream, result"),
        Need(("XREAD", "COUNT", "1", "STREAMS", keys.ends, "0-0"), "result: the ends stream"),
        Need(("XREVRANGE", keys.ends, "+", "-", "COUNT", "1"), "result: the ends stream"),
        Need(("XREAD", "COUNT", "1", "STREAMS", own_ends, "0-0"), "result: a client's ends"),
        Need(("XREVRANGE", own_ends, "+", "-", "COUNT", "1"), "result: a client's ends"),
        Need(("XADD", own_ends, "*", "id", PROBE_JOB), "cancel: a client's ends"),
        Need(("EXPIRE", own_ends, "60"), "cancel: a client's ends"),
        Need(("XADD", hub, "*", "w", "1"), "the asyncio client's wake stream"),
        Need(("EXPIRE", hub, "60"), "the asyncio client's wake stream"),
        Need(("PUBLISH", keys.cancel_channel, PROBE_JOB), "cancel"),
        *_batch_needs(keys, lists),
    ]
    if role == "producer":
        return producer
    if role == "gateway":
        return [*producer, *_gateway_needs(settings)]
    return [  # admin: what a producer does, the admin CLI and this doctor
        *producer,
        Need(("SCAN", "0", "MATCH", f"{settings.key_prefix}job:*", "COUNT", "10"), "jobs"),
        Need(("HMGET", job, "status"), "jobs"),
        Need(("ZRANGE", keys.workers, "0", "-1"), "workers, stats"),
        Need(("HGETALL", keys.worker(PROBE_WORKER)), "workers, stats"),
        Need(("LRANGE", queue, "0", "-1"), "purge"),
        Need(("DEL", queue), "purge"),
        Need(("INFO", "memory"), "doctor"),
        Need(("CONFIG", "GET", "maxmemory-policy"), "doctor"),
        Need(("ACL", "WHOAMI"), "doctor"),
        Need(("ACL", "DRYRUN", "default", "PING"), "doctor"),
        Need(("TIME",), "doctor"),
    ]


def _batch_needs(keys: Keys, lists: list[str]) -> list[Need]:
    """What running batches sends (hermes-worker batch, client.batches, the gateway)."""
    batch, runner = keys.batch(PROBE_JOB), keys.batch_runner(PROBE_JOB)
    return [
        Need(("HSET", batch, "status", "x"), "batches"),
        Need(("HGETALL", batch), "batches"),
        Need(("HINCRBY", batch, "completed", "1"), "batches: counts"),
        Need(("ZADD", keys.batches, "1", PROBE_JOB), "batches"),
        Need(("ZRANGE", keys.batches, "0", "-1"), "batches: the runner"),
        Need(("ZREVRANGE", keys.batches, "0", "-1"), "batches: list"),
        Need(("ZREM", keys.batches, PROBE_JOB), "batches: list"),
        Need(("EVALSHA", PROBE_SHA, "1", batch), "batches: status"),
        Need(("EVALSHA", PROBE_SHA, "1", runner), "batches: the runner's lease"),
        Need(("GET", runner), "batches: the runner's lease"),
        Need(("SET", runner, "t", "PX", "1000"), "batches: the runner's lease"),
        *(Need(("LRANGE", name, "0", "-1"), "batches: a lost message") for name in lists),
    ]


def _gateway_needs(settings: Settings) -> list[Need]:
    """What the gateway sends beyond a producer's: the workers' vitals, API keys and the
    tenants' quotas (``gateway/tenants.py``)."""
    from hermes_worker.gateway.tenants import GatewayKeys

    keys, gateway = Keys(settings.key_prefix), GatewayKeys(settings.gateway_key_prefix)
    job, api_key = keys.job(PROBE_JOB), gateway.api_key("0" * 64)
    waiting, tenant = gateway.waiting(PROBE_JOB), gateway.tenant(PROBE_JOB)
    return [
        Need(("ZRANGE", keys.workers, "0", "-1"), "models: the live workers"),
        Need(("HMGET", keys.worker(PROBE_WORKER), "model", "queue"), "models: the live workers"),
        Need(("HMGET", api_key, "tenant", "id"), "API keys"),
        Need(("EVALSHA", PROBE_SHA, "3", gateway.bucket(PROBE_JOB), tenant, api_key), "rpm"),
        Need(("EVALSHA", PROBE_SHA, "2", waiting, job), "jobs waiting"),
        Need(("TIME",), "quotas on Redis's clock"),
        Need(("HSET", api_key, "last_used", "1"), "API keys"),
        Need(("ZSCORE", waiting, job), "jobs waiting"),
        Need(("ZCARD", waiting), "jobs waiting"),
        Need(("ZRANGE", waiting, "0", "-1", "WITHSCORES"), "jobs waiting"),
        Need(("ZADD", waiting, "1", job), "jobs waiting"),
        Need(("ZREM", waiting, job), "jobs waiting"),
        Need(("HVALS", gateway.key_index), "keys list"),
        Need(("HDEL", gateway.key_index, "k"), "keys revoke"),
        Need(("HGETALL", tenant), "keys quota"),
    ]


def role_commands(role: Role, settings: Settings | None = None) -> frozenset[str]:
    """The commands (ACL names) a role sends."""
    return frozenset(need.command for need in role_needs(role, settings or Settings()))


# --- findings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One check's outcome: ``fail`` would lose (or break) jobs."""

    check: str
    level: Level
    message: str
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "level": self.level, "message": self.message,
                "facts": dict(self.facts)}  # fmt: skip


@dataclass
class Report:
    redis: str  # the URL, password hidden
    user: str | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def loses_jobs(self) -> bool:
        return any(f.level == "fail" for f in self.findings)

    def of_level(self, level: Level) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    def to_json(self) -> dict[str, Any]:
        return {
            "redis": self.redis,
            "user": self.user,
            "loses_jobs": self.loses_jobs,
            "findings": [f.to_json() for f in self.findings],
        }

    def lines(self) -> list[str]:
        """The human report: one line per check, then the verdict."""
        width = max((len(f.check) for f in self.findings), default=0)
        user = f" as user {self.user}" if self.user else ""
        out = [f"Redis at {self.redis}{user}"]
        out += [f"  {MARKS[f.level]:<7} {f.check:<{width}}  {f.message}" for f in self.findings]
        fails, unknown = len(self.of_level("fail")), len(self.of_level("unknown"))
        if fails:
            out.append(f"{fails} problem(s) would lose or break jobs.")
        else:
            out.append("Nothing here would lose jobs.")
        if unknown:
            out.append(f"{unknown} check(s) could not tell: see why above.")
        return out


MARKS: Mapping[Level, str] = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "unknown": "?"}


def version_finding(version: str | None, why_unknown: str = "") -> Finding:
    if version is None:
        return Finding("version", "unknown", f"cannot tell the server version: {why_unknown}")
    parsed = parse_version(version)
    facts = {"version": version}
    if parsed < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        return Finding(
            "version", "fail",
            f"Redis {version}: hermes-worker needs {need} or later (exclusive stream ranges, "
            "LPOS, ACL channel rules)", facts,
        )  # fmt: skip
    if parsed < TESTED_VERSION:
        return Finding(
            "version", "warn",
            f"Redis {version}: the tests run 7.0, and before 7.0 there is no ACL DRYRUN to "
            "check the ACL with", facts,
        )  # fmt: skip
    return Finding("version", "ok", f"Redis {version}", facts)


def parse_version(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def policy_finding(policy: str | None, maxmemory: int | None, why_unknown: str = "") -> Finding:
    if policy is None:
        return Finding("maxmemory-policy", "unknown", f"cannot tell: {why_unknown}")
    facts = {"maxmemory_policy": policy, "maxmemory": maxmemory}
    if policy == "noeviction":
        return Finding(
            "maxmemory-policy", "ok", "noeviction: a full Redis refuses writes, keeps keys", facts
        )
    what = (
        "the job records, which carry a TTL"
        if policy.startswith("volatile")
        else "any key: queue lists, in-flight messages, job records"
    )
    if maxmemory == 0:
        return Finding(
            "maxmemory-policy", "warn",
            f"{policy}: nothing is evicted while maxmemory is 0 (no limit), but with a limit "
            f"Redis would evict {what}; set maxmemory-policy noeviction", facts,
        )  # fmt: skip
    return Finding(
        "maxmemory-policy", "fail",
        f"{policy}: when memory is full Redis evicts {what}, and each evicted key is a job "
        "lost without a trace; set maxmemory-policy noeviction", facts,
    )  # fmt: skip


def memory_finding(used: int | None, maxmemory: int | None, why_unknown: str = "") -> Finding:
    if used is None or maxmemory is None:
        return Finding("memory", "unknown", f"cannot tell: {why_unknown}")
    facts = {"used_memory": used, "maxmemory": maxmemory}
    if maxmemory == 0:
        return Finding(
            "memory",
            "ok",
            f"{_mib(used)} used, no maxmemory (the host's memory is the limit)",
            facts,
        )
    share = used / maxmemory
    message = f"{_mib(used)} used of {_mib(maxmemory)} ({share:.0%})"
    if share >= MEMORY_WARN_SHARE:
        return Finding(
            "memory", "warn",
            f"{message}: at the limit Redis refuses writes (submits fail with OOM, running "
            "jobs wait to write their ends); raise maxmemory or shorten HERMES_RESULT_TTL_S",
            facts,
        )  # fmt: skip
    return Finding("memory", "ok", message, facts)


def persistence_finding(
    aof: bool | None,
    save: str | None,
    *,
    fsync: str | None = None,
    aof_status: str | None = None,
    rdb_status: str | None = None,
    why_unknown: str = "",
) -> Finding:
    """``aof``: appendonly; ``save``: the RDB schedule ("" for none; None when it could not
    be read); the last write statuses from INFO persistence."""
    facts = {"appendonly": aof, "appendfsync": fsync, "save": save,
             "aof_last_write_status": aof_status, "rdb_last_bgsave_status": rdb_status}  # fmt: skip
    if aof is None:
        return Finding("persistence", "unknown", f"cannot tell: {why_unknown}", facts)
    failing = [
        f"{name} is {status}"
        for name, status in (("the last AOF write", aof_status), ("the last RDB save", rdb_status))
        if status not in (None, "ok")
    ]
    if failing:
        return Finding(
            "persistence", "warn",
            f"{', '.join(failing)}: Redis may be refusing writes and not keeping data; see "
            "its log", facts,
        )  # fmt: skip
    if aof:
        if fsync == "no":
            return Finding(
                "persistence", "warn",
                "append-only file with appendfsync no: a host crash loses what the OS had not "
                "written yet (about 30 s); everysec or always keep it to a second or nothing",
                facts,
            )  # fmt: skip
        how = f", appendfsync {fsync}" if fsync else ""
        return Finding("persistence", "ok", f"append-only file{how}", facts)
    if save is None:
        return Finding(
            "persistence", "warn",
            "no append-only file, and the RDB schedule could not be read: a restart loses at "
            "least every job since the last snapshot; set appendonly yes", facts,
        )  # fmt: skip
    if not save.strip():
        return Finding(
            "persistence", "fail",
            "none (appendonly no, save \"\"): a restart loses every job, queued, running and "
            "ended, and the producers waiting on them; set appendonly yes", facts,
        )  # fmt: skip
    return Finding(
        "persistence", "warn",
        f"RDB snapshots only (save {save!r}): a restart loses every job queued, started or "
        "ended since the last snapshot; set appendonly yes", facts,
    )  # fmt: skip


def clock_finding(skew_s: float | None, rtt_s: float = 0.0, why_unknown: str = "") -> Finding:
    """``skew_s``: Redis's clock minus this host's, measured over a round trip of ``rtt_s``."""
    if skew_s is None:
        return Finding("clock", "unknown", f"cannot tell: {why_unknown}")
    facts = {"skew_s": round(skew_s, 4), "rtt_s": round(rtt_s, 4)}
    if abs(skew_s) - rtt_s / 2 > MAX_SKEW_S:
        way = "ahead of" if skew_s > 0 else "behind"
        return Finding(
            "clock", "warn",
            f"Redis's clock is {abs(skew_s):.1f} s {way} this host's: an absolute deadline a "
            "producer gives and kombu's visibility sweep compare clocks of different hosts "
            "(job times and timeouts are on Redis's); keep every host on NTP", facts,
        )  # fmt: skip
    return Finding("clock", "ok", f"within {max(abs(skew_s), rtt_s / 2):.3f} s of Redis", facts)


def acl_finding(
    role: Role, user: str, denied: Sequence[tuple[Need, str]], checked: int, why_unknown: str = ""
) -> Finding:
    name = f"acl {role}"
    if why_unknown:
        return Finding(name, "unknown", f"cannot tell what user {user} may do: {why_unknown}")
    required = [(need, reason) for need, reason in denied if not need.optional]
    optional = [(need, reason) for need, reason in denied if need.optional]
    facts = {
        "user": user,
        "checked": checked,
        "denied": [
            {"command": str(n), "why": n.why, "optional": n.optional, "reason": r}
            for n, r in denied
        ],
    }
    if required:
        listed = "; ".join(f"{need} ({need.why}): {reason}" for need, reason in required)
        return Finding(name, "fail", f"user {user} cannot do what a {role} does: {listed}", facts)
    if optional:
        listed = "; ".join(f"{need.command} ({need.why})" for need, _ in optional)
        return Finding(name, "warn", f"user {user} may not run {listed}", facts)
    return Finding(name, "ok", f"user {user} may run the {checked} commands a {role} sends", facts)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# --- asking Redis ------------------------------------------------------------------------------


class CannotAsk(Exception):
    """A command this check could not (or would not) send; ``reason`` says why."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"{command}: {reason}")
        self.command = command
        self.reason = reason


class Probe:
    """Sends the checks' commands; with ``allowed``, only those commands (the others raise
    :class:`CannotAsk` unsent, so that a restricted user leaves no refusal in ACL LOG)."""

    def __init__(self, client: Redis, user: str | None, allowed: Collection[str] | None) -> None:
        self.client = client
        self.user = user
        self.allowed = allowed

    def call(self, *args: str) -> Any:
        name = command_name(args)
        if self.allowed is not None and name not in self.allowed:
            raise CannotAsk(
                name,
                f"not asked as user {self.user}, whose ACL has no {name} (run `hermes-worker "
                "doctor` as the admin user)",
            )
        try:
            return self.client.execute_command(*args)  # type: ignore[no-untyped-call]
        except NoPermissionError as exc:
            raise CannotAsk(name, f"user {self.user or 'default'} may not run {name}") from exc
        except ResponseError as exc:
            text = str(exc).lower()
            if "unknown command" in text or "unknown subcommand" in text:
                raise CannotAsk(name, f"this Redis does not know {name}") from exc
            raise


def diagnose(
    client: Redis,
    settings: Settings,
    roles: Sequence[tuple[Role, str | None]] = (("worker", None),),
    *,
    allowed: Collection[str] | None = None,
    clock: Callable[[], float] = time.time,
) -> Report:
    """Every check against the server ``client`` talks to. ``roles``: (role, Redis user)
    pairs for the ACL checks (None: the connected user). ``allowed``: send only these
    commands (see :class:`Probe`). Raises RedisError when Redis cannot be reached."""
    url_user = redis_user(settings.redis_url)
    probe = Probe(client, url_user or "default", allowed)
    connected = _whoami(probe) or url_user or "default"
    probe.user = connected
    report = Report(redact(settings.redis_url), connected)
    version = _version_finding(probe)
    report.findings.append(version)
    report.findings += _memory_findings(probe)
    report.findings.append(_persistence_finding(probe))
    has_dryrun = parse_version(str(version.facts.get("version", "0"))) >= TESTED_VERSION
    for role, user in roles:
        report.findings.append(
            _acl_finding(probe, settings, role, user or connected, version, has_dryrun)
        )
    report.findings.append(_clock_finding(probe, clock))
    return report


def _whoami(probe: Probe) -> str | None:
    try:
        return as_text(probe.call("ACL", "WHOAMI"))
    except CannotAsk:
        return None


def _version_finding(probe: Probe) -> Finding:
    try:
        hello = probe.call("HELLO")
        fields = _pairs(hello)
        return version_finding(as_text(fields[b"version"]))
    except CannotAsk as exc:
        first = exc.reason
    try:
        info = probe.call("INFO", "server")
        return version_finding(str(info["redis_version"]))
    except CannotAsk as exc:
        return version_finding(None, f"{first}; {exc.reason}")


def _pairs(reply: Any) -> dict[bytes, Any]:
    """HELLO's reply (a map under RESP3, a flat list under RESP2) with bytes keys."""
    items = (
        reply.items() if isinstance(reply, Mapping) else zip(reply[0::2], reply[1::2], strict=True)
    )
    return {k if isinstance(k, bytes) else str(k).encode(): v for k, v in items}


def _info(probe: Probe, section: str) -> tuple[dict[str, Any] | None, str]:
    try:
        return dict(probe.call("INFO", section)), ""
    except CannotAsk as exc:
        return None, exc.reason


def _config(probe: Probe, name: str) -> tuple[str | None, str]:
    try:
        reply = probe.call("CONFIG", "GET", name)
    except CannotAsk as exc:
        return None, exc.reason
    values = {as_text(k): as_text(v) for k, v in _pairs(reply).items()} if reply else {}
    return values.get(name), ""


def _memory_findings(probe: Probe) -> list[Finding]:
    info, why = _info(probe, "memory")
    if info is not None:
        limit_now = int(info.get("maxmemory", 0))
        used = int(info.get("used_memory", 0))
        return [
            policy_finding(str(info.get("maxmemory_policy")), limit_now),
            memory_finding(used, limit_now),
        ]
    policy, _ = _config(probe, "maxmemory-policy")
    limit, _ = _config(probe, "maxmemory")
    maxmemory = int(limit) if limit is not None else None
    reason = why if policy is None else ""
    return [
        policy_finding(policy, maxmemory, reason),
        memory_finding(None, None, why),
    ]


def _persistence_finding(probe: Probe) -> Finding:
    info, why_info = _info(probe, "persistence")
    aof_config, why_config = _config(probe, "appendonly")
    save, _ = _config(probe, "save")
    fsync, _ = _config(probe, "appendfsync")
    aof: bool | None
    if aof_config is not None:
        aof = aof_config == "yes"
    elif info is not None:
        aof = bool(int(info.get("aof_enabled", 0)))
    else:
        aof = None
    return persistence_finding(
        aof,
        save,
        fsync=fsync,
        aof_status=None if info is None else str(info.get("aof_last_write_status")),
        rdb_status=None if info is None else str(info.get("rdb_last_bgsave_status")),
        why_unknown=why_info or why_config,
    )


def _acl_finding(
    probe: Probe, settings: Settings, role: Role, user: str, version: Finding, has_dryrun: bool
) -> Finding:
    needs = role_needs(role, settings)
    if not has_dryrun and version.level != "unknown":
        return acl_finding(
            role, user, [], 0,
            "this Redis has no ACL DRYRUN (7.0 or later): compare its rules with "
            "docs/security.md by hand",
        )  # fmt: skip
    if probe.allowed is not None and "acl|dryrun" not in probe.allowed:
        return acl_finding(
            role, user, [], 0,
            f"not asked as user {probe.user} (ACL DRYRUN is for the admin: run "
            f"`hermes-worker doctor --role {role}={user}` as the admin user)",
        )  # fmt: skip
    pipe = probe.client.pipeline(transaction=False)
    for need in needs:
        pipe.execute_command("ACL", "DRYRUN", user, *need.args)  # type: ignore[no-untyped-call]
    replies = pipe.execute(raise_on_error=False)
    denied: list[tuple[Need, str]] = []
    for need, reply in zip(needs, replies, strict=True):
        if isinstance(reply, NoPermissionError):
            why = f"user {probe.user} may not run ACL DRYRUN"
            return acl_finding(role, user, [], 0, f"{why} (run doctor as the admin user)")
        if isinstance(reply, ResponseError):
            text = str(reply)
            if "not found" in text.lower():
                return Finding(f"acl {role}", "fail", f"there is no Redis user {user!r}")
            if "unknown subcommand" in text.lower():
                return acl_finding(role, user, [], 0, "this Redis has no ACL DRYRUN")
            denied.append((need, text))
        elif isinstance(reply, Exception):
            raise reply
        elif as_text(reply) != "OK":
            denied.append((need, as_text(reply)))
    return acl_finding(role, user, denied, len(needs))


def _clock_finding(probe: Probe, clock: Callable[[], float]) -> Finding:
    try:
        before = clock()
        seconds, micros = probe.call("TIME")
        after = clock()
    except CannotAsk as exc:
        return clock_finding(None, why_unknown=exc.reason)
    server = int(seconds) + int(micros) / 1e6
    return clock_finding(server - (before + after) / 2, after - before)


def redis_user(url: str) -> str | None:
    """The user name in a Redis URL (None: the default user)."""
    name = urlsplit(url).username
    return unquote(name) if name else None


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    hosts = parts.netloc.rpartition("@")[2]  # a sentinel URL's are a list: host:port,...
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def _database(url: str) -> str:
    path = urlsplit(url).path.strip("/")
    return path if path.isdigit() else "0"


def open_client(url: str, timeout_s: float = TIMEOUT_S) -> Redis:
    """A client for the checks: one try again at most (redis-py's default tries again for
    seconds, which would hold up a worker's start when Redis is away)."""
    return sync_client(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


# --- at worker start ----------------------------------------------------------------------------


def check_at_start(settings: Settings) -> Report | None:
    """The checks at worker start (``HERMES_REDIS_CHECK``), logged; :class:`UnsafeRedis`
    under ``refuse`` when one fails. A Redis out of reach is logged and left to the worker,
    which waits for it as it always has. Returns the report (None: off or out of reach)."""
    mode = settings.redis_check
    if mode == "off":
        return None
    user = redis_user(settings.redis_url)
    allowed = None if user in (None, "default") else role_commands("worker", settings)
    client = open_client(settings.redis_url)
    try:
        report = diagnose(client, settings, allowed=allowed)
    except RedisError as exc:
        log.warning("redis check skipped: %s: %s", type(exc).__name__, exc)
        return None
    finally:
        client.close()
    summary = "; ".join(f"{f.check} {f.level}" for f in report.findings)
    log.info("redis check (HERMES_REDIS_CHECK=%s): %s", mode, summary)
    for finding in report.findings:
        if finding.level == "fail" and mode == "refuse":
            log.error("redis check: %s: %s", finding.check, finding.message)
        elif finding.level == "fail":
            log.warning("redis check: %s: would lose jobs: %s", finding.check, finding.message)
        elif finding.level == "warn":
            log.warning("redis check: %s: %s", finding.check, finding.message)
    unknown = report.of_level("unknown")
    if unknown:  # usually one reason: a service user may not read the server's settings
        reasons = dict.fromkeys(f.message.partition(": ")[2] for f in unknown)
        checks = ", ".join(f.check for f in unknown)
        log.info("redis check: cannot tell %s: %s", checks, "; ".join(reasons))
    if mode == "refuse" and report.loses_jobs:
        problems = "; ".join(f"{f.check}: {f.message}" for f in report.of_level("fail"))
        raise UnsafeRedis(f"{problems} (HERMES_REDIS_CHECK=refuse; hermes-worker doctor says more)")
    return report


# --- the command ---------------------------------------------------------------------------------


def parse_role(value: str) -> tuple[Role, str | None]:
    role, _, user = value.partition("=")
    if role not in ROLES:
        raise click.BadParameter(f"{role!r}: a role is one of {', '.join(ROLES)}")
    return role, (user or None)


@click.command("doctor")
@click.option(
    "--role",
    "roles",
    multiple=True,
    metavar="ROLE[=USER]",
    help="Check that a Redis user may do what ROLE (worker, producer, admin, gateway) does; USER "
    "defaults to the connected one. Repeat for several (admin: --role worker=worker "
    "--role producer=producer). Default: worker.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=TIMEOUT_S,
    show_default=True,
    metavar="S",
    help="How long to wait for each of Redis's replies.",
)
@one_line_errors
def doctor(roles: tuple[str, ...], as_json: bool, timeout: float) -> None:
    """Will this Redis keep the jobs? Checks the server at HERMES_REDIS_URL: version,
    maxmemory-policy, persistence, the ACL of each role, clock skew. Exit status 1 when
    something would lose jobs."""
    settings = Settings()
    wanted = [parse_role(r) for r in roles] or [("worker", None)]
    client = open_client(settings.redis_url, timeout)
    try:
        report = diagnose(client, settings, wanted)
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    if report.loses_jobs:
        raise SystemExit(EXIT_LOSES_JOBS)
