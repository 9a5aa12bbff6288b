"""A worker's vitals: what it says about itself in Redis, for ``hermes-worker stats``.

Layout (beside the job keys of :mod:`hermes_worker.contract.store`, under the same prefix):

* ``{prefix}worker:{name}`` — a hash written by the worker's heartbeat (every third of the
  lease TTL) that expires after three missed beats, so a dead worker disappears on its own;
  a worker that shuts down cleanly deletes it. Fields: see :meth:`Vitals.fields`.
* ``{prefix}workers`` — a sorted set of worker names scored by their last heartbeat, so a
  reader finds the workers without a SCAN over every job key. Liveness is the hash: a name
  whose hash has expired is a dead worker (the heartbeats prune such names after an hour).

The job counts are kept in the worker's memory, from the results it writes
(``JobContext.observers``), and reach Redis only with the heartbeat: no command per job.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.typing import EncodableT, FieldT

from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.contract.store import as_text
from hermes_worker.inference.engine_api import EngineLike
from hermes_worker.settings import Settings

WINDOWS = {"1m": 60, "5m": 300, "15m": 900}
INDEX_PRUNE_S = 3600  # names without a heartbeat for this long leave the workers index


def worker_name(settings: Settings, pid: int | None = None) -> str:
    """A worker's name: the configured one, else ``host:pid`` (this process's by default;
    a health check beside a worker that is its container's PID 1 asks for ``pid=1``)."""
    return settings.worker_name or f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


@dataclass(frozen=True)
class EngineLoad:
    """Requests the engine holds: ``running`` have produced tokens, ``waiting`` not yet."""

    running: int
    waiting: int


def engine_load(engine: EngineLike) -> EngineLoad:
    """Running and waiting requests, counted in the frontend's request table.

    vLLM's own scheduler counts reach the frontend only with stat logging on, which costs
    work on every engine step; its output processor already tracks every request and
    whether it is still in prefill (no token yet: queued in the scheduler or prefilling),
    so that is read instead (vLLM 0.32 internals; a preempted request counts as running).
    If those internals change, or the engine is not vLLM's, every unfinished request counts
    as running.
    """
    llm: Any = getattr(
        engine, "_llm", None
    )  # vLLM's AsyncLLM (hermes_worker.inference.engine.Engine)
    try:
        states = list(llm.output_processor.request_states.values())
    except (AttributeError, RuntimeError):
        return EngineLoad(running=engine.num_unfinished(), waiting=0)
    waiting = sum(1 for state in states if getattr(state, "is_prefilling", False))
    return EngineLoad(running=len(states) - waiting, waiting=waiting)


class RecentResults:
    """Jobs finished (any end), failed and tokens generated, in one-second buckets over 15 minutes.

    Memory and the cost of a read are bounded by the seconds in the window (900), not by
    the number of jobs. Used from the runtime loop only (observer and heartbeat).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, finished, failed, tokens]
        self.horizon_s = max(WINDOWS.values())

    def add(self, *, failed: bool, tokens: int) -> None:
        second = int(self._clock())
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0, 0])
            self._trim(second)
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += int(failed)
        bucket[3] += tokens

    def window(self, seconds: int) -> tuple[int, int, int]:
        """(finished, failed, tokens) over the last ``seconds`` seconds."""
        now = int(self._clock())
        self._trim(now)
        finished = failed = tokens = 0
        for second, done, bad, generated in reversed(self._buckets):
            if second <= now - seconds:
                break
            finished, failed, tokens = finished + done, failed + bad, tokens + generated
        return finished, failed, tokens

    def _trim(self, now: int) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.horizon_s:
            self._buckets.popleft()


class Vitals:
    """One worker's vitals, gathered in memory and published by its heartbeat."""

    def __init__(self, worker: str, model: str, queue: str, *, interval_s: float) -> None:
        self.worker, self.model, self.queue = worker, model, queue
        self.interval_s = interval_s
        self.started_at = time.time()  # this host's clock (Prometheus' start time)
        self._started = time.monotonic()  # the uptime: a duration on this host
        self.recent = RecentResults()
        self.finished_total = 0
        self.failed_total = 0
        # Redis failures by where they happened (heartbeat, cancel_listener); the stream
        # writer keeps its own count.
        self.redis_errors: Counter[str] = Counter()
        self.metrics_port: int | None = None

    def observe(self, result: JobResult) -> None:
        """A ``JobContext`` observer: count every result this worker writes."""
        failed = result.job.status is JobStatus.FAILED
        tokens = result.usage.completion_tokens if result.usage is not None else 0
        self.recent.add(failed=failed, tokens=tokens)
        self.finished_total += 1
        self.failed_total += int(failed)

    def fields(
        self, now: float, *, running: int, unfinished: int, load: EngineLoad
    ) -> dict[FieldT, EncodableT]:
        """The vitals hash: identity, load, and jobs finished (any status) / failed per window.
        ``now`` is Redis's (contract/clock.py): readers on other hosts compare the heartbeat
        with Redis's now; ``started_at`` is ``now`` less the uptime this host measured."""
        uptime_s = time.monotonic() - self._started
        fields: dict[FieldT, EncodableT] = {
            "model": self.model,
            "queue": self.queue,
            "started_at": now - uptime_s,
            "heartbeat_at": now,
            "uptime_s": round(uptime_s, 3),
            "heartbeat_interval_s": self.interval_s,
            "running": running,
            "engine_unfinished": unfinished,
            "engine_running": load.running,
            "engine_waiting": load.waiting,
            "finished_total": self.finished_total,
            "failed_total": self.failed_total,
            "metrics_port": "" if self.metrics_port is None else self.metrics_port,
        }
        for label, seconds in WINDOWS.items():
            finished, failed, tokens = self.recent.window(seconds)
            fields[f"finished_{label}"] = finished
            fields[f"failed_{label}"] = failed
            fields[f"tokens_{label}"] = tokens
        return fields


@dataclass(frozen=True)
class WorkerVitals:
    """A live worker as a reader sees it (one vitals hash)."""

    name: str
    model: str
    queue: str
    started_at: float | None
    heartbeat_at: float | None
    running: int
    engine_running: int
    engine_waiting: int
    finished: dict[str, int]  # by window (1m, 5m, 15m): jobs ended, any status
    failed: dict[str, int]  # by window: of those, the failed ones
    tokens: dict[str, int]  # by window: completion tokens generated
    finished_total: int  # since the worker started
    failed_total: int
    metrics_port: int | None

    @classmethod
    def from_hash(cls, name: str, raw: Mapping[bytes | str, bytes | str]) -> WorkerVitals:
        plain = {as_text(k): as_text(v) for k, v in raw.items()}

        def number(field: str) -> int:
            return int(float(plain.get(field) or 0))

        def moment(field: str) -> float | None:
            return float(plain[field]) if plain.get(field) else None

        return cls(
            name=name,
            model=plain.get("model", ""),
            queue=plain.get("queue", ""),
            started_at=moment("started_at"),
            heartbeat_at=moment("heartbeat_at"),
            running=number("running"),
            engine_running=number("engine_running"),
            engine_waiting=number("engine_waiting"),
            finished={label: number(f"finished_{label}") for label in WINDOWS},
            failed={label: number(f"failed_{label}") for label in WINDOWS},
            tokens={label: number(f"tokens_{label}") for label in WINDOWS},
            finished_total=number("finished_total"),
            failed_total=number("failed_total"),
            metrics_port=number("metrics_port") if plain.get("metrics_port") else None,
        )

    @property
    def uptime_s(self) -> float | None:
        """Seconds from start to the last heartbeat (both on Redis's clock)."""
        if self.started_at is None or self.heartbeat_at is None:
            return None
        return self.heartbeat_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "queue": self.queue,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at,
            "uptime_s": self.uptime_s,
            "running": self.running,
            "engine": {"running": self.engine_running, "waiting": self.engine_waiting},
            "finished": self.finished,
            "failed": self.failed,
            "tokens": self.tokens,
            "finished_total": self.finished_total,
            "failed_total": self.failed_total,
            "metrics_port": self.metrics_port,
        }
