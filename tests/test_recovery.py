"""No job stranded, lost or run twice: real worker processes (scripted engine) on real Redis.

Each test starts its own ``hermes-worker run --engine scripted`` processes on a deployment of
its own, with a lease of 4 s (a heartbeat every 1.3 s), and then does to them what happens
to workers in production: kill -9, SIGSTOP past the lease, a message that crashes every
worker it reaches, a forged message, a dead engine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from lifecycle_fixtures import STORY, job
from worker_fixtures import (
    WorkerProcess,
    clean_redis,
    patient_redis,
    scripted_args,
    start_worker,
    stop_worker,
    unique_settings,
    wait_ready,
)

from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.contract.queue import job_message, make_celery
from hermes_worker.contract.store import Keys, StreamEvent, decode_event
from hermes_worker.testing.scripted_engine import EXIT_CRASHED
from hermes_worker.worker.runtime import EXIT_ENGINE_DEAD
from producers.client import HermesClient

LEASE_TTL_S = 4.0
TERMINAL = ("done", "error", "cancelled")


class Fleet:
    """Scripted worker processes on one deployment of their own, named w1, w2, ..."""

    def __init__(self, model: Path, logs: Path, **env: str) -> None:
        self.settings = unique_settings()
        self.model, self.logs = model, logs
        self.env = {
            "HERMES_LEASE_TTL_S": str(LEASE_TTL_S),
            "HERMES_VISIBILITY_TIMEOUT_S": "3600",  # compose.yaml's: recovery must not wait for it
            "HERMES_FAULT_INJECTION": "true",
            "HERMES_STREAM_FLUSH_MS": "20",
            **env,
        }
        self.workers: dict[str, WorkerProcess] = {}
        self.redis = patient_redis(self.settings.redis_url)
        self.keys = Keys(self.settings.key_prefix)
        self.client = HermesClient(self.settings, redis=self.redis)

    def start(self, count: int = 1) -> list[str]:
        """Start ``count`` more workers and wait until each takes jobs; their names."""
        names = [f"w{len(self.workers) + i + 1}" for i in range(count)]
        for name in names:
            self.workers[name] = start_worker(
                self.settings,
                self.model,
                self.logs / f"{name}.log",
                cli_args=scripted_args(0),
                HERMES_WORKER_NAME=name,
                **self.env,
            )
        for name in names:
            wait_ready(self.workers[name], timeout=120)
        return names

    def events(self, job_id: str) -> list[StreamEvent]:
        return [decode_event(i, f) for i, f in self.redis.xrange(self.keys.events(job_id))]

    def record(self, job_id: str) -> dict[str, str]:
        raw: Any = self.redis.hgetall(self.keys.job(job_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def running_on(self, job_id: str, timeout: float = 30.0) -> str:
        """The worker that streams the job's output now."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.type == "content" for e in self.events(job_id)):
                return self.record(job_id)["worker"]
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never streamed output")

    def close(self) -> None:
        for worker in self.workers.values():
            stop_worker(worker, grace=10)
        self.client.close()
        clean_redis(self.settings)


@pytest.fixture
def fleet_factory(test_model_dir: Path, tmp_path: Path) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(**env: str) -> Fleet:
        fleets.append(Fleet(test_model_dir, tmp_path, **env))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.close()


def assert_one_end(events: list[StreamEvent], terminal: str = "done") -> None:
    """One terminal event, the last one, and ``seq`` 1, 2, 3 ... without a gap or repeat."""
    assert [e.type for e in events if e.type in TERMINAL] == [terminal], [e.type for e in events]
    assert events[-1].type == terminal
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def text_of_last_attempt(events: list[StreamEvent]) -> str:
    last = max((i for i, e in enumerate(events) if e.type == "restarted"), default=-1)
    return "".join(e.data["text"] for e in events[last + 1 :] if e.type == "content")


# --- point 1: recovery in seconds, whatever the visibility timeout -----------------------------


def test_a_killed_workers_job_finishes_on_another_within_two_lease_ttls(
    fleet_factory: Any,
) -> None:
    # Given two workers with compose's visibility timeout (an hour) and a 4 s lease
    fleet: Fleet = fleet_factory()
    fleet.start(2)
    # And a job that streams and then hangs on its first attempt
    handle = fleet.client.submit(job({"text": STORY, "stall_after": 3, "attempts": 1}))
    victim = fleet.running_on(handle.id)
    # When its worker is killed with SIGKILL
    os.killpg(fleet.workers[victim].pid, signal.SIGKILL)
    killed_at = time.time()
    # Then the other worker finishes it, within two lease TTLs of the kill, as attempt 2
    result = handle.result(timeout=60)
    assert result.job.status is JobStatus.SUCCEEDED
    assert result.job.worker != victim and result.job.attempts == 2
    assert result.job.finished_at is not None
    assert result.job.finished_at - killed_at < 2 * LEASE_TTL_S
    events = fleet.events(handle.id)
    assert_one_end(events)
    assert text_of_last_attempt(events) == STORY
    # And the dead worker left nothing behind: no message of it is still recorded
    assert fleet.redis.scard(fleet.keys.deliveries(victim)) == 0


def test_a_dead_engine_hands_its_jobs_back_at_once(fleet_factory: Any) -> None:
    # Given jobs running on a first worker, and a second worker, paused (SIGSTOP) long
    # enough that it asks for no message, so that the next job goes to the first one too
    fleet: Fleet = fleet_factory()
    [first] = fleet.start(1)
    stalled = [
        fleet.client.submit(job({"text": STORY, "stall_after": 2, "attempts": 1})) for _ in range(3)
    ]
    for handle in stalled:
        fleet.running_on(handle.id)
    [second] = fleet.start(1)
    os.kill(fleet.workers[second].pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # its last BRPOP (1 s) has timed out
        # When a job's script kills the first worker's engine
        killer = fleet.client.submit(job({"text": STORY, "die_after": 1, "attempts": 1}))
        code = fleet.workers[first].process.wait(60)
        died_at = time.time()
    finally:
        os.kill(fleet.workers[second].pid, signal.SIGCONT)
    # Then the worker exits for a restart, and every job ends once on the other worker,
    # well within the lease TTL: the dead worker handed them back itself
    assert code == EXIT_ENGINE_DEAD, fleet.workers[first].log()[-3000:]
    finished = []
    for handle in [*stalled, killer]:
        result = handle.result(timeout=60)
        assert result.job.status is JobStatus.SUCCEEDED
        assert result.job.worker == second and result.job.attempts == 2
        assert_one_end(fleet.events(handle.id))
        finished.append(result.job.finished_at or 0)
    assert max(finished) - died_at < LEASE_TTL_S


# --- point 2: fenced ends ------------------------------------------------------------------------


@pytest.mark.long(12)
def test_a_worker_paused_past_its_lease_writes_nothing_when_it_wakes(fleet_factory: Any) -> None:
    # Given two workers whose messages come back after 4 s (the visibility timeout) as well
    fleet: Fleet = fleet_factory(HERMES_VISIBILITY_TIMEOUT_S="4")
    fleet.start(2)
    # And a job of 60 tokens at 15 a second (4 s)
    script = {"text": " ".join(f"w{i}" for i in range(60)), "tokens_per_s": 15}
    handle = fleet.client.submit(job(script))
    paused = fleet.running_on(handle.id)
    # When its worker is stopped (SIGSTOP) past the lease and the visibility timeout
    os.kill(fleet.workers[paused].pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while fleet.record(handle.id).get("worker") == paused:
            assert time.monotonic() < deadline, "no other worker took the job over"
            time.sleep(0.05)
        time.sleep(1.0)  # the other worker streams its own attempt
    finally:
        # And woken while the other worker is still generating
        os.kill(fleet.workers[paused].pid, signal.SIGCONT)
    result = handle.result(timeout=60)
    time.sleep(2 * LEASE_TTL_S / 3)  # what the woken worker still had to say has been said
    # Then the job has one end, its seq has no gap or repeat, and the result is the one of
    # the worker that held the lease
    events = fleet.events(handle.id)
    assert_one_end(events)
    assert result.job.status is JobStatus.SUCCEEDED
    assert result.job.worker != paused and result.job.attempts == 2
    assert text_of_last_attempt(events) == script["text"]
    assert fleet.record(handle.id)["worker"] == result.job.worker
    # And the woken worker knew it had lost the job, and serves others
    assert "lease lost" in fleet.workers[paused].log()
    assert fleet.workers[paused].process.poll() is None


# --- point 3: poison messages end ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        job({"text": STORY}, metadata={"hermes_fault": "exit_in_validation"}),
        job({"text": STORY, "exit_after": 2}),
    ],
    ids=["exit-while-validating", "exit-while-generating"],
)
@pytest.mark.long
def test_a_message_that_kills_every_worker_ends_as_poison(
    fleet_factory: Any, body: dict[str, Any]
) -> None:
    # Given workers that allow 2 deliveries that never come back
    fleet: Fleet = fleet_factory(HERMES_MAX_DELIVERIES="2")
    first, second = fleet.start(2)
    # When a job crashes each worker that takes it
    handle = fleet.client.submit(body)
    for name in (first, second):
        code = fleet.workers[name].process.wait(60)
        assert code == EXIT_CRASHED, fleet.workers[name].log()[-3000:]
    # Then a third worker does not run it: it fails as poison, into the dead letters
    [third] = fleet.start(1)
    result = handle.result(timeout=60)
    assert result.job.status is JobStatus.FAILED
    assert result.error is not None and result.error.type == "poison"
    assert [letter.id for letter in fleet.client.dead_letters()] == [handle.id]
    assert_one_end(fleet.events(handle.id), "error")
    # And that worker lives on and serves the next job
    assert fleet.client.submit(job({"text": STORY})).result(timeout=30).job.worker == third
    assert fleet.workers[third].process.poll() is None


# --- point 6: only the job's own body runs ------------------------------------------------------


def test_a_forged_message_for_another_jobs_id_is_refused(fleet_factory: Any) -> None:
    # Given a worker and a job of 20 tokens at 20 a second
    fleet: Fleet = fleet_factory()
    [worker] = fleet.start(1)
    real = {"text": " ".join(f"real{i}" for i in range(20)), "tokens_per_s": 20}
    handle = fleet.client.submit(job(real))
    fleet.running_on(handle.id)
    # When someone with queue access pushes a message carrying that job's id and their body
    forged_body = {**job({"text": "FORGED OUTPUT"}), "id": handle.id}
    app = make_celery(fleet.settings)
    queue, message = job_message(app, forged_body, handle.id, 5, fleet.settings.queue_name)
    fleet.redis.lpush(queue, message)
    # Then the job runs its own body only, once
    result = handle.result(timeout=30)
    deadline = time.monotonic() + 10
    while "dropped a message" not in fleet.workers[worker].log():
        assert time.monotonic() < deadline, "the forged message was not refused"
        time.sleep(0.05)
    assert result.choices[0].message.content == real["text"]
    assert result.job.attempts == 1
    events = fleet.events(handle.id)
    assert_one_end(events)
    assert not any("FORGED" in json.dumps(e.data) for e in events)
    assert json.loads(fleet.record(handle.id)["body"])["metadata"] == job(real)["metadata"]


def test_a_body_a_foreign_producer_wrote_differently_still_runs(fleet_factory: Any) -> None:
    # Given a job recorded by a producer that formats JSON its own way (spaces, key order)
    fleet: Fleet = fleet_factory()
    fleet.start(1)
    body = {**job({"text": STORY}), "id": "foreign-1"}
    stored = json.dumps(dict(reversed(list(body.items()))), indent=1)
    fleet.redis.hset(
        fleet.keys.job("foreign-1"),
        mapping={"status": "queued", "attempts": "0", "queued_at": time.time(), "body": stored},
    )
    queue, message = job_message(
        make_celery(fleet.settings), body, "foreign-1", 5, fleet.settings.queue_name
    )
    fleet.redis.lpush(queue, message)
    # When it is delivered, Then it is the job's own body, and it runs
    result = JobResult.model_validate_json(
        _wait_for_result(fleet.redis, fleet.keys, "foreign-1", timeout=30)
    )
    assert result.job.status is JobStatus.SUCCEEDED
    assert result.choices[0].message.content == STORY


def _wait_for_result(client: redis.Redis, keys: Keys, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = client.hget(keys.job(job_id), "result")
        if raw:
            return raw.decode()
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ended")
