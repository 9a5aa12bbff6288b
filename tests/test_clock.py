"""Every time that crosses hosts is on Redis's clock (docs/reliability.md, "Clocks").

A producer or a worker whose wall clock is a minute off is played by handing the modules of
that side a ``time`` whose ``time()`` is off (:class:`SkewedTime`), per thread: the test's
own thread is the producer, each worker's runtime loop thread a worker, so a producer and
two workers can be off in different ways in one process. Everything else is real: Redis,
the scripts, the worker's runtime on the scripted engine (as in tests/test_lifecycle.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import pytest
import redis
from lifecycle_fixtures import STORY, Harness, job

import producers.client
from hermes_worker.cli.health import check
from hermes_worker.contract.clock import RedisClock, redis_time
from hermes_worker.contract.jobs import JobStatus
from hermes_worker.contract.queue import UNACKED_KEY, queue_list
from hermes_worker.errors import JobAlreadyEnded
from hermes_worker.worker import execution, heartbeat, leases, reaper, vitals
from hermes_worker.worker.runtime import Runtime
from producers.client import JobHandle

SKEW_S = 60.0
# The modules of a producer and of a worker that could read a wall clock.
WALL_CLOCK_MODULES: tuple[ModuleType, ...] = (
    producers.client, execution, heartbeat, leases, reaper, vitals,
)  # fmt: skip


class SkewedTime:
    """The ``time`` module as hosts whose wall clocks are off see it: ``time()`` is off by
    the calling thread's skew (``default_s`` for a thread not named); the rest is the real
    module (monotonic clocks are not off: they only measure durations)."""

    def __init__(self) -> None:
        self.skews: dict[int, float] = {}
        self.default_s = 0.0

    def time(self) -> float:
        return time.time() + self.skews.get(threading.get_ident(), self.default_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def skewed(monkeypatch: pytest.MonkeyPatch) -> SkewedTime:
    clocks = SkewedTime()
    for module in WALL_CLOCK_MODULES:
        if hasattr(module, "time"):
            monkeypatch.setattr(module, "time", clocks)
    return clocks


def redis_now(client: redis.Redis) -> float:
    return redis_time(client.time())


def skew_worker(clocks: SkewedTime, runtime: Runtime, skew_s: float) -> None:
    """Make ``runtime``'s loop thread (where its attempts and heartbeat run) ``skew_s`` off."""

    async def ident() -> int:
        return threading.get_ident()

    clocks.skews[runtime._call(ident())] = skew_s


def cancel_all(handles: Sequence[JobHandle]) -> None:
    """End jobs a failed test left generating, so that their worker threads end too."""
    for handle in handles:
        with contextlib.suppress(JobAlreadyEnded):
            handle.cancel()


# --- a producer whose clock is off -------------------------------------------------------


@pytest.mark.parametrize("skew_s", [SKEW_S, -SKEW_S], ids=["ahead", "behind"])
def test_a_skewed_producers_job_is_timed_on_redis_clock(
    harness: Harness, skewed: SkewedTime, skew_s: float
) -> None:
    # Given a worker, and a producer whose clock is a minute off
    runtime = harness.start()
    skewed.default_s = skew_s
    assert abs(producers.client.time.time() - redis_now(harness.redis) - skew_s) < 1
    # When it submits a job
    before = redis_now(harness.redis)
    handle = harness.client.submit(job({"text": STORY}))
    after = redis_now(harness.redis)
    # Then the job was queued at Redis's now
    queued_at = float(harness.record(handle.id)["queued_at"])
    assert before <= queued_at <= after
    # And when it runs, it started at Redis's now, and its other times are Redis's too
    before = redis_now(harness.redis)
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    after = redis_now(harness.redis)
    info = handle.result(timeout=1).job
    assert info.started_at is not None and before <= info.started_at <= after
    assert info.first_token_at is not None and info.finished_at is not None
    assert before - 1 <= info.first_token_at <= info.finished_at <= after + 1
    # And the timings between them are neither negative nor a minute
    assert info.queue_wait_s is not None and 0 <= info.queue_wait_s < 5
    assert info.time_to_first_token_s is not None and 0 <= info.time_to_first_token_s < 1
    assert info.generation_s is not None and 0 <= info.generation_s < 5
    # And the record holds the times the result holds
    record = harness.record(handle.id)
    assert float(record["started_at"]) == info.started_at
    assert float(record["finished_at"]) == info.finished_at


@pytest.mark.parametrize("skew_s", [SKEW_S, -SKEW_S], ids=["ahead", "behind"])
def test_a_queued_job_cancelled_by_a_skewed_producer_ends_at_redis_now(
    harness: Harness, skewed: SkewedTime, skew_s: float
) -> None:
    # Given a queued job of a producer whose clock is a minute off
    skewed.default_s = skew_s
    handle = harness.client.submit(job({"text": STORY}))
    # When the producer cancels it
    before = redis_now(harness.redis)
    assert handle.cancel() == "cancelled"
    after = redis_now(harness.redis)
    # Then it ended at Redis's now, in its record and its result
    info = handle.result(timeout=1).job
    assert info.finished_at is not None and before <= info.finished_at <= after
    record = harness.record(handle.id)
    assert before <= float(record["finished_at"]) <= after
    assert before <= float(record["cancel_requested"]) <= after


def test_timeout_s_counts_on_redis_clock_whatever_the_producers(
    harness: Harness, skewed: SkewedTime
) -> None:
    # Given jobs with timeout_s=5, one from a producer a minute ahead, one from a producer a
    # minute behind, that generate until they are stopped
    runtime = harness.start()
    handles = []
    for skew_s in (SKEW_S, -SKEW_S):
        skewed.default_s = skew_s
        body = job({"text": STORY, "stall_after": 3}, timeout_s=5.0)
        handles.append(harness.client.submit(body))
    skewed.default_s = 0.0
    try:
        # When they run
        tasks = [harness.deliver(runtime, handle.id) for handle in handles]
        # Then each started (it was not expired at once) and stopped at its deadline, 5 s
        # after it was queued on Redis's clock (not 65 s: the wait gives up long before)
        for handle, task in zip(handles, tasks, strict=True):
            assert task.result(timeout=15) is JobStatus.FAILED
            result = handle.result(timeout=1)
            assert result.error is not None and result.error.type == "timeout", result.error
            assert "started" in harness.types(handle.id)
            info = result.job
            assert info.queued_at is not None and info.finished_at is not None
            assert 4.9 <= info.finished_at - info.queued_at < 6.5
            assert result.usage is not None and result.usage.completion_tokens == 3
    finally:
        cancel_all(handles)


# --- a worker whose clock is off -----------------------------------------------------------


def test_workers_whose_clocks_are_off_keep_deadlines_leases_and_heartbeats_on_redis_clock(
    harness: Harness, skewed: SkewedTime
) -> None:
    # Given two workers, w1 a minute behind and w2 a minute ahead, and a message w1 holds
    # (as its Celery consumer records it: the reaper would put it back if w1 looked dead)
    w1, w2 = harness.start(), harness.start()
    skew_worker(skewed, w1, -SKEW_S)
    skew_worker(skewed, w2, SKEW_S)
    tag = f"clock-test-{uuid.uuid4().hex}"
    queue = harness.settings.queue_name
    message = {"properties": {"delivery_tag": tag, "delivery_info": {}}, "headers": {}}
    harness.redis.hset(UNACKED_KEY, tag, json.dumps([message, "", queue]))
    harness.redis.sadd(harness.keys.deliveries("w1"), tag)
    handles: list[JobHandle] = []
    try:
        # When each runs a job with timeout_s=4 that generates until it is stopped
        handles += [
            harness.client.submit(job({"text": STORY, "stall_after": 3}, timeout_s=4.0))
            for _ in (w1, w2)
        ]
        tasks = [harness.deliver(w, h.id) for w, h in zip((w1, w2), handles, strict=True)]
        # Then while they run (over three lease TTLs), each keeps its lease: one attempt,
        # no restart, the lease its own
        time.sleep(3 * harness.settings.lease_ttl_s + 0.1)
        for name, handle in zip(("w1", "w2"), handles, strict=True):
            lease = harness.redis.get(harness.keys.lease(handle.id))
            assert lease is not None and lease.decode().startswith(f"{name}:")
            assert harness.record(handle.id)["attempts"] == "1"
            assert "restarted" not in harness.types(handle.id)
        # And each heartbeat is on Redis's clock: fresh to a health check on any host
        now = redis_now(harness.redis)
        for name in ("w1", "w2"):
            raw: Any = harness.redis.hgetall(harness.keys.worker(name))
            beat = {k.decode(): v.decode() for k, v in raw.items()}
            assert abs(float(beat["heartbeat_at"]) - now) < 1
            assert check(beat, now, harness.settings.lease_ttl_s) is None
            score = harness.redis.zscore(harness.keys.workers, name)
            assert score is not None and abs(score - now) < 1
        # And w2's sweeps did not take w1 for dead: its message was not put back
        assert harness.redis.hexists(UNACKED_KEY, tag)
        queued = [json.loads(m) for m in harness.redis.lrange(queue_list(queue, 0), 0, -1)]
        assert {m["headers"].get("id") for m in queued} <= {h.id for h in handles}
        # And each job stopped at its deadline, 4 s after it was queued on Redis's clock:
        # neither expired at once (w2) nor given a minute more (w1)
        for handle, task in zip(handles, tasks, strict=True):
            assert task.result(timeout=10) is JobStatus.FAILED
            result = handle.result(timeout=1)
            assert result.error is not None and result.error.type == "timeout", result.error
            info = result.job
            assert info.queued_at is not None and info.started_at is not None
            assert info.finished_at is not None
            assert 3.9 <= info.finished_at - info.queued_at < 5.5
            assert 0 <= info.started_at - info.queued_at < 1
    finally:
        harness.redis.hdel(UNACKED_KEY, tag)
        cancel_all(handles)


# --- the clock itself ----------------------------------------------------------------------


def test_the_clock_keeps_the_tightest_recent_measurement() -> None:
    ticks = [100.0]
    clock = RedisClock(monotonic=lambda: ticks[0], wall=lambda: 5.0)
    # Before a measurement, it is this host's wall clock
    assert not clock.measured and clock.now() == 5.0
    # A measurement over a 0.2 s round trip: Redis's now was read at its middle
    clock.observe(1000.0, sent=99.8, received=100.0)
    assert clock.now() == pytest.approx(1000.1)
    # A looser one soon after is not taken; a tighter one is
    clock.observe(2000.0, sent=99.0, received=100.0)
    assert clock.now() == pytest.approx(1000.1)
    clock.observe(1000.05, sent=99.95, received=100.0)
    assert clock.now() == pytest.approx(1000.075)
    # The clock moves with the monotonic clock, and a stale measurement gives way
    ticks[0] = 200.0
    assert clock.now() == pytest.approx(1100.075)
    clock.observe(1200.0, sent=199.0, received=200.0)
    assert clock.now() == pytest.approx(1200.5)
    assert clock.offset_s == pytest.approx(1195.5)


def test_the_clock_measures_redis_time(redis_client: redis.Redis) -> None:
    clock = RedisClock()
    now = clock.sync_blocking(redis_client)
    assert clock.measured and abs(now - redis_now(redis_client)) < 1
    assert abs(clock.now() - redis_now(redis_client)) < 1
