"""Each job end goes only to the processes that await it: a client's jobs end on its own ends
stream (``{prefix}ends:{id}``, ``Keys.ends_for``, named in their records' ``ends`` field), a
job without that field (another producer's) on the deployment's shared ``{prefix}ends``; a
client awaiting a job another client submitted reads that client's stream. So an end wakes
the reader of the client that awaits it, not every waiting client of the fleet. Real Redis;
the worker is the in-process runtime of tests/lifecycle_fixtures.py (the ``harness``
fixture) on the scripted engine.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from lifecycle_fixtures import STORY, Harness, job, wait_until

import producers.client as client_module
from hermes_worker.contract import scripts
from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.contract.store import ENDS_TTL_S, Keys
from hermes_worker.settings import Settings
from producers.client import AsyncHermesClient, HermesClient, prepare_submission

# Longer than any test here: no reader's blocking read times out and no waiter's periodic
# check of its record comes within a test, so a read counted, or a wait that ends, is one
# that an end on a stream caused.
QUIET_S = 30.0
# A wait woken by its end ends within this (a periodic check would come at QUIET_S).
WOKEN_S = 5.0


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients made after it block QUIET_S a read and check their records after QUIET_S."""
    monkeypatch.setattr(client_module, "BLOCK_CHUNK_S", QUIET_S)
    monkeypatch.setattr(client_module, "END_CHECK_S", QUIET_S)


def story() -> dict[str, Any]:
    return job({"text": STORY})


def ids_on(r: redis.Redis, key: str) -> list[str]:
    """The job ids on an ends stream, oldest first."""
    return [fields[b"id"].decode() for _, fields in r.xrange(key)]


def run(harness: Harness, job_id: str) -> JobStatus | None:
    """Deliver the job's queued message to a runtime of the harness and run it to its end."""
    runtime = harness.runtimes[0] if harness.runtimes else harness.start()
    return harness.deliver(runtime, job_id).result(timeout=10)


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def waiting_thread(wait: Callable[[], JobResult], box: list[JobResult]) -> threading.Thread:
    thread = threading.Thread(target=lambda: box.append(wait()), daemon=True)
    thread.start()
    return thread


# --- a client's own stream ----------------------------------------------------------------------


def test_an_end_goes_to_its_submitters_stream_and_wakes_no_other_async_client(
    harness: Harness, quiet: None
) -> None:
    harness.start()
    settings, r, keys = harness.settings, harness.redis, harness.keys

    async def scenario() -> dict[str, Any]:
        async with AsyncHermesClient(settings) as a, AsyncHermesClient(settings) as b:
            # Given two clients, each awaiting a job of its own, their hubs blocked in a read
            mine, theirs = await a.submit(story()), await b.submit(story())
            waits = [asyncio.create_task(h.result(timeout=QUIET_S)) for h in (mine, theirs)]
            await until(lambda: a.hub.end_waits == 1 and b.hub.end_waits == 1)
            await asyncio.sleep(0.1)
            reads = a.hub.reads, b.hub.reads
            # When A's job runs to its end
            status = await asyncio.to_thread(run, harness, mine.id)
            first = await asyncio.wait_for(waits[0], WOKEN_S)
            woken = a.hub.reads - reads[0], b.hub.reads - reads[1]
            streams = {"a": ids_on(r, a.ends_key), "b": ids_on(r, b.ends_key)}
            # And then B's
            await asyncio.to_thread(run, harness, theirs.id)
            second = await asyncio.wait_for(waits[1], WOKEN_S)
            return {
                "status": status, "first": first, "second": second, "woken": woken,
                "streams": streams, "ends": (a.ends_key, b.ends_key),
                "named": [harness.record(h.id)["ends"] for h in (mine, theirs)],
            }  # fmt: skip

    seen = asyncio.run(scenario())
    # Then each job's record names its submitter's stream
    assert seen["named"] == list(seen["ends"])
    # And A's end went to A's stream only: A's hub read it, B's was not woken
    assert seen["status"] is JobStatus.SUCCEEDED
    assert seen["first"].job.status is JobStatus.SUCCEEDED
    assert seen["streams"] == {"a": [seen["first"].id], "b": []}
    assert seen["woken"][0] >= 1 and seen["woken"][1] == 0, seen["woken"]
    # And B's end then woke B, on its own stream; nothing went to the shared stream
    assert seen["second"].job.status is JobStatus.SUCCEEDED
    assert ids_on(r, seen["ends"][1]) == [seen["second"].id]
    assert r.exists(keys.ends) == 0


def test_an_end_wakes_no_other_blocking_clients_watcher(harness: Harness, quiet: None) -> None:
    harness.start()
    settings, r = harness.settings, harness.redis
    with HermesClient(settings) as a, HermesClient(settings) as b:
        # Given two blocking clients, each with a thread awaiting a job of its own
        mine, theirs = a.submit(story()), b.submit(story())
        got_mine: list[JobResult] = []
        got_theirs: list[JobResult] = []
        first = waiting_thread(lambda: mine.result(timeout=QUIET_S), got_mine)
        second = waiting_thread(lambda: theirs.result(timeout=QUIET_S), got_theirs)
        wait_until(lambda: a.ends.waiting == 1 and b.ends.waiting == 1)
        time.sleep(0.1)
        b_reads = b.ends.reads
        # When A's job runs to its end
        assert run(harness, mine.id) is JobStatus.SUCCEEDED
        first.join(WOKEN_S)
        b_woken = b.ends.reads - b_reads
        on_b = ids_on(r, b.ends_key)
        # And then B's
        assert run(harness, theirs.id) is JobStatus.SUCCEEDED
        second.join(WOKEN_S)
        on_a = ids_on(r, a.ends_key)
    # Then A's watcher read A's end at once (a check of the record would come at QUIET_S),
    # and B's was not woken by it
    assert got_mine and got_mine[0].job.status is JobStatus.SUCCEEDED
    assert on_a == [mine.id] and on_b == []
    assert b_woken == 0
    # And B's own end woke B
    assert got_theirs and got_theirs[0].job.status is JobStatus.SUCCEEDED
    assert ids_on(r, b.ends_key) == [theirs.id]


# --- a job another client submitted -------------------------------------------------------------


def test_an_async_client_awaits_a_job_another_client_submitted_on_that_clients_stream(
    harness: Harness, quiet: None
) -> None:
    harness.start()
    settings = harness.settings

    async def scenario() -> tuple[JobResult, float, int]:
        async with AsyncHermesClient(settings) as submitter, AsyncHermesClient(settings) as other:
            # Given a job one client submitted, and another client whose hub is blocked in a
            # read of its own stream (it awaits a job of its own)
            foreign = await submitter.submit(story())
            own = await other.submit(story())
            own_wait = asyncio.create_task(own.result(timeout=QUIET_S))
            await until(lambda: other.hub.end_waits == 1)
            await asyncio.sleep(0.1)
            # When the other client awaits the first one's job, and it runs
            wait = asyncio.create_task(other.job(foreign.id).result(timeout=QUIET_S))
            await until(lambda: other.hub.end_waits == 2)
            start = time.monotonic()
            await asyncio.to_thread(run, harness, foreign.id)
            result = await asyncio.wait_for(wait, QUIET_S)
            elapsed = time.monotonic() - start
            own_wait.cancel()
            return result, elapsed, len(ids_on(harness.redis, other.ends_key))

    result, elapsed, on_own = asyncio.run(scenario())
    # Then it got the result, woken at once on the submitter's stream (its hub's read in
    # flight was ended to take that stream in), not at a periodic check
    assert result.job.status is JobStatus.SUCCEEDED
    assert elapsed < WOKEN_S
    assert on_own == 0


def test_a_blocking_client_awaits_a_job_another_client_submitted_on_that_clients_stream(
    harness: Harness, quiet: None
) -> None:
    harness.start()
    settings = harness.settings
    with HermesClient(settings) as submitter, HermesClient(settings) as other:
        # Given a job one client submitted, and another client whose watcher is blocked in
        # a read of its own stream
        foreign = submitter.submit(story())
        own = other.submit(story())
        own_thread = waiting_thread(lambda: own.result(timeout=QUIET_S), [])
        wait_until(lambda: other.ends.waiting == 1)
        time.sleep(0.1)
        # When the other client awaits the first one's job (as the CLI's `result` does), and
        # it runs
        box: list[JobResult] = []
        thread = waiting_thread(lambda: other.job(foreign.id).result(timeout=QUIET_S), box)
        wait_until(lambda: other.ends.waiting == 2)
        start = time.monotonic()
        assert run(harness, foreign.id) is JobStatus.SUCCEEDED
        thread.join(QUIET_S)
        elapsed = time.monotonic() - start
        # (its own wait ends too, before the test's keys go)
        assert own.cancel() == "cancelled"
        own_thread.join(WOKEN_S)
    # Then it got the result, woken at once on the submitter's stream
    assert box and box[0].job.status is JobStatus.SUCCEEDED
    assert elapsed < WOKEN_S


# --- a job without the field: another producer's ---------------------------------------------


def submit_as_another_producer(harness: Harness, ends: str | None = None) -> str:
    """Record and queue a job with SUBMIT's own ARGV, as docs/wire-protocol.md shows a
    producer in another language doing it: without ``ends``, or naming ``ends``."""
    sub = prepare_submission(story(), harness.settings.max_body_bytes)
    keys, args = sub.submit_call(
        harness.keys, harness.client.celery, harness.settings.queue_name, ends=ends
    )
    assert len(args) == (7 if ends else 5)
    assert harness.redis.register_script(scripts.SUBMIT)(keys=keys, args=args) == 1
    return sub.job_id


def test_a_job_without_an_ends_field_ends_on_the_shared_stream_and_wakes_its_waiter(
    harness: Harness, quiet: None
) -> None:
    harness.start()
    settings, r, keys = harness.settings, harness.redis, harness.keys
    # Given a job another producer submitted, without naming an ends stream
    job_id = submit_as_another_producer(harness)
    with HermesClient(settings) as client:
        # And a client awaiting it, its watcher blocked in a read
        box: list[JobResult] = []
        thread = waiting_thread(lambda: client.job(job_id).result(timeout=QUIET_S), box)
        wait_until(lambda: client.ends.waiting == 1)
        time.sleep(0.1)
        # When it runs
        start = time.monotonic()
        assert run(harness, job_id) is JobStatus.SUCCEEDED
        thread.join(QUIET_S)
        elapsed = time.monotonic() - start
        own = client.ends_key
    # Then its end is on the shared stream, as before, and its waiter woke on it
    assert "ends" not in harness.record(job_id)
    assert ids_on(r, keys.ends) == [job_id]
    assert r.exists(own) == 0
    assert box and box[0].job.status is JobStatus.SUCCEEDED
    assert elapsed < WOKEN_S
    # And the shared stream does not expire
    assert r.ttl(keys.ends) == -1


def test_an_async_waiter_on_a_job_without_an_ends_field_wakes_on_the_shared_stream(
    harness: Harness, quiet: None
) -> None:
    harness.start()
    job_id = submit_as_another_producer(harness)

    async def scenario() -> tuple[JobResult, float]:
        async with AsyncHermesClient(harness.settings) as client:
            # Given a client awaiting another producer's job
            wait = asyncio.create_task(client.job(job_id).result(timeout=QUIET_S))
            await until(lambda: client.hub.end_waits == 1)
            await asyncio.sleep(0.1)
            # When it runs
            start = time.monotonic()
            await asyncio.to_thread(run, harness, job_id)
            return await asyncio.wait_for(wait, QUIET_S), time.monotonic() - start

    result, elapsed = asyncio.run(scenario())
    # Then its waiter woke on the shared stream's entry
    assert result.job.status is JobStatus.SUCCEEDED
    assert elapsed < WOKEN_S
    assert ids_on(harness.redis, harness.keys.ends) == [job_id]


def test_another_producers_own_ends_stream_is_written_when_its_record_names_one(
    harness: Harness, quiet: None
) -> None:
    harness.start()
    r, keys = harness.redis, harness.keys
    # Given a job another producer submitted, naming an ends stream of its own
    stream = keys.ends_for("a-go-producer")
    job_id = submit_as_another_producer(harness, ends=stream)
    # When it runs
    assert run(harness, job_id) is JobStatus.SUCCEEDED
    # Then its end is on that stream, not on the shared one
    assert ids_on(r, stream) == [job_id]
    assert r.exists(keys.ends) == 0


# --- every script that ends a job, and records naming other keys ---------------------------------


def test_a_cancel_and_a_dead_letter_end_on_the_submitters_stream(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    keys = Keys(hermes_settings.key_prefix)
    with HermesClient(hermes_settings) as client:
        # Given two queued jobs of a client
        cancelled, dead = client.submit(story()), client.submit(story())
        # When one is cancelled and the other fails for good (the worker's DEAD_LETTER)
        assert cancelled.cancel() == "cancelled"
        failed = {"id": dead.id, "created": 0, "model": "", "choices": [], "job": {"id": dead.id}}
        script_keys = [
            keys.job(dead.id), keys.events(dead.id), keys.lease(dead.id), keys.dead_letters,
            keys.ends,
        ]  # fmt: skip
        args = [repr(time.time()), 60, json.dumps(failed), json.dumps({"type": "x"}), dead.id]
        outcome = redis_client.register_script(scripts.DEAD_LETTER)(keys=script_keys, args=args)
        # Then both ends are on the client's stream, none on the shared one
        assert outcome[0] == b"dead"
        assert ids_on(redis_client, client.ends_key) == [cancelled.id, dead.id]
        assert redis_client.exists(keys.ends) == 0
        # And a wait on either ends at once, from the record
        assert cancelled.result(timeout=5).job.status is JobStatus.CANCELLED
        assert dead.status().status is JobStatus.FAILED


@pytest.mark.parametrize("named", ["another job's events", "not a stream", "another deployment"])
def test_an_ends_field_naming_no_ends_stream_of_the_deployment_ends_on_the_shared_one(
    harness: Harness, named: str
) -> None:
    r, keys = harness.redis, harness.keys
    other = harness.client.submit(story())
    target = {
        "another job's events": keys.events(other.id),
        "not a stream": keys.ends_for("a-string"),
        "another deployment": Keys("elsewhere:").ends_for("x"),
    }[named]
    if named == "not a stream":
        r.set(target, "left alone")
    before = r.dump(target)
    # Given a record whose ``ends`` names a key that is no ends stream of this deployment
    job_id = submit_as_another_producer(harness, ends=target)
    # When it ends (a cancel while queued)
    assert harness.client.job(job_id).cancel() == "cancelled"
    # Then its end went to the shared stream, and the named key is as it was
    assert ids_on(r, keys.ends) == [job_id]
    assert r.dump(target) == before
    # And a waiter finds it there too
    assert harness.client.job(job_id).result(timeout=5).job.status is JobStatus.CANCELLED


# --- expiry -------------------------------------------------------------------------------------


def test_a_clients_ends_stream_expires_a_day_after_its_last_end(harness: Harness) -> None:
    harness.start()
    r = harness.redis
    with HermesClient(harness.settings) as client:
        # Given a client whose first job has ended
        first = client.submit(story())
        assert run(harness, first.id) is JobStatus.SUCCEEDED
        ttl_after_first = int(r.ttl(client.ends_key))
        # And most of a day since (its stream about to expire)
        r.expire(client.ends_key, 60)
        # When its next job ends
        second = client.submit(story())
        assert run(harness, second.id) is JobStatus.SUCCEEDED
        ttl_after_second = int(r.ttl(client.ends_key))
        on_stream = ids_on(r, client.ends_key)
    # Then the stream expires ENDS_TTL_S after each end written to it
    assert ENDS_TTL_S - 60 < ttl_after_first <= ENDS_TTL_S
    assert ENDS_TTL_S - 60 < ttl_after_second <= ENDS_TTL_S
    assert on_stream == [first.id, second.id]
