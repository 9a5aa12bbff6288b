"""Writing job events and records to Redis without ever stalling the engine loop.

Jobs call :meth:`StreamWriter.emit` / :meth:`StreamWriter.record` synchronously from the
loop that drains the engine: nothing there awaits Redis. One flusher task writes what is
due for every job in a single pipeline. Consecutive text deltas of one kind join one
stream entry, and a job's pending text is written once it is ``flush_s`` old and holds at
least ``min_tokens`` tokens, or once it is ``max_flush_s`` old whatever it holds: so a
job's writes stay far below one per token, on a fast engine (many tokens per interval) and
a slow one alike. Urgent items (a job's first output, a tool call, its end) are written at
once, so coalescing costs no time to first token; a job's ``started`` event is sent
``soon``: with the next regular flush, so that it needs no pipeline of its own. Text that
would come due within a quarter of ``flush_s`` goes out with the text that is due: every
pipeline wakes the consumers' XREADs, so fewer, fuller pipelines cost everyone less.

Per job, operations reach Redis in the order they were made. A job's end
(:meth:`StreamWriter.close`) goes through the same queue and is awaited: the record
(status, result) is written before the terminal event in the same script call, which runs
whole and in order, so a reader that sees the terminal event always finds the result.

Every write is fenced by the attempt's lease: a flush writes the operations of all its jobs
with one script call (``contract.scripts.WRITE``) that checks, job by job, that the lease
still holds the attempt's token (one call per flush, not one per job: the call itself cost
Redis more than a job's few writes in it, and a busy worker flushes a hundred jobs at a
time). A worker that lost a job's lease (paused past it, cut off from Redis while another
worker took the job over) writes nothing more for it, not even its end: the job is then
stopped here (``on_fenced``) and its end, if it had come, reports that it was not written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import (
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from hermes_worker.contract import scripts
from hermes_worker.contract.clock import RedisClock
from hermes_worker.contract.store import Keys, decode_event, encode_event
from hermes_worker.worker.tasks import cancel_and_wait

log = structlog.stdlib.get_logger(__name__)

TEXT_EVENTS = frozenset({"reasoning", "content"})


@dataclass
class JobStream:
    """Emission state of one job attempt: the next ``seq`` and the ops not yet written."""

    job_id: str
    next_seq: int = 1
    token: str = ""  # the attempt's lease token: every write checks it
    notices: str = ""  # the notice stream its writes name it on ('' for none)
    ops: list[list[Any]] = field(default_factory=list)
    since: float | None = None  # when the oldest op not yet written was made (monotonic)
    tokens: int = 0  # tokens generated since the last write
    urgent: bool = False
    soon: bool = False  # holds an event that goes out with the next regular flush
    unsure: bool = False  # a write failed: some of its events may have landed all the same
    fenced: bool = False  # the lease no longer holds the token: nothing more is written

    def taken(self) -> list[list[Any]]:
        """Its pending ops, handed over to be written (or dropped): nothing is pending now."""
        ops, self.ops = self.ops, []
        self.since, self.tokens, self.urgent, self.soon = None, 0, False, False
        return ops


class StreamWriter:
    """The one writer of job events and records for a worker process (lives on its loop)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        flush_s: float,
        ttl_s: int,
        min_tokens: int = 0,
        max_flush_s: float | None = None,
    ) -> None:
        self._redis = redis
        self._write = redis.register_script(scripts.WRITE)
        # The script is sent by its digest alone (EVALSHA in the flush's pipeline): a Script
        # in a pipeline would ask SCRIPT EXISTS first, a round trip more on every flush. It
        # is loaded before the first flush, and again after Redis answered NOSCRIPT (a
        # restarted Redis, a new master after a failover), which runs nothing of it.
        self._load_script = True
        # Called with the id of a job whose write was fenced off (its lease is lost).
        self.on_fenced: Callable[[str], None] | None = None
        self._keys = keys
        self._flush_s = flush_s
        self._min_tokens = min_tokens
        self._max_flush_s = max(flush_s, max_flush_s if max_flush_s is not None else flush_s)
        # Text this close to due goes out with the text that is due: jobs that read the
        # engine a few ms apart share one pipeline instead of one each (every pipeline wakes
        # the consumers' XREADs). The flusher still wakes when the first is really due.
        self._slack_s = flush_s / 4
        # Text that reaches max_flush_s comes due on a common grid (see _grid), laid on
        # Redis's clock once ``clock`` is set (the JobContext's: every worker's grid then
        # falls on the same instants, whatever its host).
        self._grid_s = max(flush_s, self._max_flush_s / 5)
        self.clock: RedisClock | None = None
        self._ttl_s = ttl_s
        self._dirty: dict[str, JobStream] = {}
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.commands_sent = 0  # for metrics and tests
        self.failed_flushes = 0  # for metrics (hermes_redis_errors_total)
        self._failing = False
        # Redis refused the last flush for good: the next writes each job in a call of its
        # own, so that one job's refused writes do not hold up the others' (see _flush).
        self._apart = False

    @property
    def result_ttl_s(self) -> int:
        """How long an ended job's keys live."""
        return self._ttl_s

    # -- called by jobs (synchronous, never awaits Redis) ----------------------------------

    def emit(
        self, stream: JobStream, type_: str, data: Any, *, urgent: bool = False, soon: bool = False
    ) -> None:
        """Queue an event; text right after text of the same kind joins the same entry.
        (Count the tokens behind text with :meth:`generated`.) ``urgent``: written at once;
        ``soon``: with the next regular flush (within ``flush_s``), whatever the tokens."""
        if stream.fenced:
            return
        last = stream.ops[-1] if stream.ops else None
        if (
            type_ in TEXT_EVENTS
            and last
            and last[0] == "xadd"
            and last[1] == type_
            and last[2].get("choice") == data.get("choice")  # a job of several choices
        ):
            joined = {"text": last[2]["text"] + data["text"]}
            if "choice" in data:
                joined["choice"] = data["choice"]
            if "logprobs" in data:  # a job that asked for them: its content's tokens, in order
                joined["logprobs"] = [*last[2].get("logprobs", ()), *data["logprobs"]]
            last[2] = joined
        else:
            stream.ops.append(["xadd", type_, data])
        stream.soon = stream.soon or soon
        self._mark(stream, urgent)

    @staticmethod
    def generated(stream: JobStream, tokens: int) -> None:
        """Count tokens the engine produced for this job (they decide when text is due)."""
        stream.tokens += tokens

    def record(self, stream: JobStream, **fields: Any) -> None:
        """Queue fields for the job's record hash."""
        if stream.fenced:
            return
        stream.ops.append(["hset", {k: _field(v) for k, v in fields.items()}])
        self._mark(stream, urgent=False)

    async def close(self, stream: JobStream, fields: dict[str, Any], type_: str, data: Any) -> bool:
        """Write the final record, the terminal event and the expiry; return once written:
        True, or False when the lease was lost first and nothing of it was written."""
        if stream.fenced:
            return False
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        stream.ops.append(["hset", {k: _field(v) for k, v in fields.items()}])
        stream.ops.append(["xadd", type_, data])
        stream.ops.append(["end", done])
        self._mark(stream, urgent=True)
        return await done

    async def settle(self, stream: JobStream) -> None:
        """Return once everything this stream emitted so far is written (an attempt that
        stops without a terminal event: the next attempt numbers its events on from these).
        It goes through the flusher's queue, so a write already under way is done too."""
        if stream.fenced:
            return
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        stream.ops.append(["sync", done])
        self._mark(stream, urgent=True)
        await done

    def discard(self, stream: JobStream) -> None:
        """Drop what this stream has not written yet (its job belongs to another worker now)."""
        for op in stream.taken():
            if op[0] in ("end", "sync") and not op[1].done():
                op[1].set_result(False)
        stream.unsure = False
        self._dirty.pop(stream.job_id, None)

    # -- the flusher ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hermes-stream-writer")

    async def stop(self) -> None:
        """Write what is pending, then stop."""
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._dirty:
            await self._flush(force=True)

    def _mark(self, stream: JobStream, urgent: bool) -> None:
        if stream.since is None:
            stream.since = time.monotonic()
        self._dirty[stream.job_id] = stream
        self._wake.set()
        if urgent:
            stream.urgent = True
            self._urgent.set()

    def _due(self, stream: JobStream, now: float) -> bool:
        since = stream.since if stream.since is not None else now
        if stream.urgent or now - self._grid(since) + self._slack_s >= self._max_flush_s:
            return True
        age = now - since + self._slack_s
        return age >= self._flush_s and (stream.soon or stream.tokens >= self._min_tokens)

    def _grid(self, since: float) -> float:
        """``since`` rounded down to the grid (``max_flush_s`` / 5, at least ``flush_s``:
        100 ms by default): text that reaches its ``max_flush_s`` comes due on a common
        grid, up to a grid step early, never late. A busy worker hands its jobs' text over
        one job after another, over tens of ms; without the grid each came due a little
        after the one before, and the flusher woke for a handful of jobs at a time (256
        jobs at a GPU's pace, 7.8 tokens/s each: 26 writes a second, 19 of them for text
        due by age; with the grid 15, then ~10), each waking every consumer that follows
        one of them (benchmarks/fleet.py). The grid's steps are multiples of it on Redis's
        clock (``clock``): the workers of a fleet, each on its own host and monotonic
        clock, flush on the same steps, so a client that follows jobs on many of them
        wakes once a step for their text, not once per worker."""
        if self._grid_s <= 0:
            return since
        phase = self.clock.monotonic_offset_s % self._grid_s if self.clock is not None else 0.0
        return since - (since + phase) % self._grid_s

    def _next_due_s(self, now: float) -> float:
        """How long until the next pending job could be due (at most ``flush_s``: its
        token count may reach ``min_tokens`` meanwhile)."""
        wait = self._flush_s
        for stream in self._dirty.values():
            since = stream.since if stream.since is not None else now
            wait = min(wait, self._grid(since) + self._max_flush_s - now)
        return max(wait, 0.001)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await self._flush()
            # Coalesce until something is due, unless something urgent arrives.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._urgent.wait(), timeout=self._next_due_s(time.monotonic())
                )

    async def _flush(self, force: bool = False) -> None:
        """Write what is due, for every job, in one script call. A call that Redis refuses
        for a while (away, loading, read-only while failing over: see :func:`refused_for_good`)
        is made again on the next tick, its ops ahead of anything newer. One it refuses for
        good (an error inside the script, such as a key of another type where a job's
        events stream goes) would fail every time: the next flush writes each job in a call
        of its own, and a job whose own call is refused for good stops its attempt (as when
        its lease is lost), while the others go on. A script that failed part-way keeps
        what it wrote before: the events written are found and skipped (``_skip_landed``)."""
        self._wake.clear()
        self._urgent.clear()
        now = time.monotonic()
        batch = [s for s in self._dirty.values() if force or self._due(s, now)]
        for stream in batch:
            del self._dirty[stream.job_id]
        if self._dirty:
            self._wake.set()  # the rest stays pending: the loop comes back for it
        finished: list[tuple[JobStream, asyncio.Future[bool]]] = []
        taken: list[tuple[JobStream, list[list[Any]]]] = []
        calls: list[tuple[list[JobStream], list[str], list[Any]]] = []  # (streams, keys, args)
        apart = self._apart
        try:
            if self._load_script:
                await self._redis.script_load(scripts.WRITE)
                self._load_script = False
            await self._skip_landed([s for s in batch if s.unsure])
            batch = [s for s in batch if not s.fenced]
            for stream in batch:
                ops = stream.taken()
                taken.append((stream, ops))
                if not calls or apart:
                    calls.append(([], [self._keys.ends], [self._ttl_s]))
                written, keys, args = calls[-1]
                futures = self._add_ops(keys, args, stream, ops)
                finished.extend((stream, future) for future in futures)
                if len(keys) > 1 + 3 * len(written):
                    written.append(stream)
            calls = [call for call in calls if call[0]]
            replies: list[Any] = []
            if calls:
                # On a pipeline of its own: a lost reply is told apart from a refusal.
                pipe = self._redis.pipeline(transaction=False)
                for _, keys, args in calls:
                    pipe.evalsha(self._write.sha, len(keys), *keys, *args)
                replies = (await pipe.execute(raise_on_error=not apart))[-len(calls) :]
                self.commands_sent += len(calls)
        except RedisError as exc:
            self.failed_flushes += 1
            # Keep the ops, in order, ahead of anything newer, and try again on the next tick
            # (a failed read of what landed leaves every stream of the batch as it was).
            self._load_script = self._load_script or isinstance(exc, NoScriptError)
            if refused_for_good(exc):
                log.warning("a stream write refused for good; writing each job apart: %s", exc)
                self._apart = True
            elif not self._failing:  # once per outage, not once per tick
                log.warning("stream writes failing, retrying until Redis is back: %s", exc)
                self._failing = True
            self._requeue(taken or [(s, []) for s in batch if not s.fenced])
            await asyncio.sleep(self._flush_s)
            return
        if self._failing:
            log.warning("stream writes resumed")
            self._failing = False
        self._apart = False
        ops_of = {stream.job_id: ops for stream, ops in taken}
        again: set[str] = set()  # jobs whose ops go back to be written with the next flush
        for (written, _, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, RedisError):  # a call of one job's, written apart
                stream = written[0]
                if self._refused(stream, ops_of[stream.job_id], reply):
                    again.add(stream.job_id)
                continue
            for stream, flag in zip(written, reply, strict=True):
                if not int(flag):
                    self._fence(stream)
        for stream, future in finished:
            if not future.done() and stream.job_id not in again:
                future.set_result(not stream.fenced)

    def _refused(self, stream: JobStream, ops: list[list[Any]], error: RedisError) -> bool:
        """Redis refused the call that wrote only this stream: for good, its attempt stops
        (it goes back to the queue); for a while, it is tried again with the next flush
        (returns True)."""
        self.failed_flushes += 1
        if not refused_for_good(error):
            self._load_script = self._load_script or isinstance(error, NoScriptError)
            self._requeue([(stream, ops)])
            return True
        self._fence(stream, f"Redis refuses its stream writes for good ({error})")
        return False

    def _fence(self, stream: JobStream, why: str = "lease lost") -> None:
        """The lease no longer holds this attempt's token (or Redis refuses its writes for
        good): write nothing more for it."""
        log.warning("job %s: %s; its writes are refused", stream.job_id, why)
        stream.fenced = True
        self.discard(stream)
        if self.on_fenced is not None:
            self.on_fenced(stream.job_id)

    def _add_ops(
        self, keys: list[str], args: list[Any], stream: JobStream, ops: list[list[Any]]
    ) -> list[asyncio.Future[bool]]:
        """Add the stream's keys and these ops, under its token, to the script call's
        ``keys`` and ``args`` (nothing when no op writes); returns the futures to resolve
        once written."""
        own: list[Any] = []
        finished: list[asyncio.Future[bool]] = []
        for op in ops:
            if op[0] == "xadd":
                fields = encode_event(stream.next_seq, op[1], op[2])
                own += ["x", fields["seq"], fields["type"], fields["data"]]
                stream.next_seq += 1
            elif op[0] == "hset":
                own += ["h", len(op[1])]
                for name, value in op[1].items():
                    own += [name, value]
            elif op[0] == "sync":
                finished.append(op[1])
            else:  # end of the job: every key of a job expires after it ends
                own += ["e", stream.job_id]
                finished.append(op[1])
        if own:
            job_id = stream.job_id
            keys += [self._keys.lease(job_id), self._keys.job(job_id), self._keys.events(job_id)]
            args += [stream.token, stream.notices, len(own), *own]
        return finished

    def _requeue(self, taken: list[tuple[JobStream, list[list[Any]]]]) -> None:
        for stream, ops in taken:
            stream.next_seq -= sum(1 for op in ops if op[0] == "xadd")
            stream.ops = ops + stream.ops
            stream.since, stream.urgent = time.monotonic() - self._max_flush_s, True
            stream.unsure = stream.unsure or bool(ops)
            self._dirty[stream.job_id] = stream
        self._wake.set()

    async def _skip_landed(self, streams: list[JobStream]) -> None:
        """Before writing again what a failed write held, drop the events that reached Redis
        anyway (a reply that timed out, a connection lost after the commands went out):
        written twice, they would repeat a ``seq``. Events go out in ``seq`` order, so the
        stream's last ``seq`` says how many landed."""
        if not streams:
            return
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xrevrange(self._keys.events(stream.job_id), count=1)
        for stream, last in zip(streams, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(last, RedisError):
                if not refused_for_good(last):
                    raise last  # Redis away: every stream of the flush stays as it was
                self._fence(stream, f"Redis refuses to read its stream for good ({last})")
                continue
            landed = decode_event(*last[0]).seq - stream.next_seq + 1 if last else 0
            kept: list[list[Any]] = []
            for op in stream.ops:
                if op[0] == "xadd" and landed > 0:
                    landed -= 1
                    stream.next_seq += 1
                else:
                    kept.append(op)
            stream.ops, stream.unsure = kept, False


# Refusals that pass: Redis loading, read-only or short of replicas while failing over, out
# of memory, its script cache flushed, an ACL being fixed. A write refused so is tried
# again, as when Redis is away; any other refusal (an error inside the script) would not
# change by trying again. redis-py raises some as classes of their own, without the code.
PASSING_REFUSALS = frozenset(
    {"BUSY", "LOADING", "READONLY", "MASTERDOWN", "NOREPLICAS", "OOM", "NOSCRIPT", "TRYAGAIN",
     "CLUSTERDOWN", "MISCONF", "NOPERM", "EXECABORT"}
)  # fmt: skip
PASSING_CLASSES = (ReadOnlyError, OutOfMemoryError, NoScriptError, NoPermissionError)


def refused_for_good(exc: BaseException) -> bool:
    """Whether Redis answered with an error that trying again would not change (see
    PASSING_REFUSALS); a lost connection or a timeout is not a refusal."""
    if not isinstance(exc, ResponseError) or isinstance(exc, PASSING_CLASSES):
        return False
    text = str(exc).split("of pipeline caused error: ", 1)[-1]
    return bool(text) and text.split(maxsplit=1)[0] not in PASSING_REFUSALS


def _field(value: Any) -> str | int | float:
    if isinstance(value, (str, int, float)):
        return value
    return json.dumps(value, ensure_ascii=False)
