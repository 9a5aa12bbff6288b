"""Cancel, backpressure and dead letters, from the producer's side, on a real Redis.

No worker runs: each test plays the worker's side by writing job records, stream entries,
leases and the dead-letter list in the layout of ``hermes_worker.contract.store``, and takes
messages off the queue lists itself."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from test_cli_jobs import cli, cli_here, one_error_line
from test_client import HI, Worker, queued_messages, running_job, task_args

from hermes_worker.contract import scripts
from hermes_worker.contract.jobs import ErrorInfo, JobResult, JobStatus
from hermes_worker.contract.store import ALIVE_TTL_S, Keys
from hermes_worker.settings import Settings
from producers.client import (
    AsyncHermesClient,
    HermesClient,
    JobAlreadyEnded,
    JobNotFound,
    NotInDeadLetters,
    QueueFull,
    requeue_done,
)
from producers.control import DepthGate, requeue_call

RESULT_TTL_S = 600  # far from ALIVE_TTL_S, so a test can tell which TTL a key got


@pytest.fixture
def settings(hermes_settings: Settings) -> Settings:
    return hermes_settings.model_copy(update={"result_ttl_s": RESULT_TTL_S})


@pytest.fixture
def client(settings: Settings) -> Iterator[HermesClient]:
    with HermesClient(settings) as client:
        yield client


def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


def record(r: redis.Redis, settings: Settings, job_id: str) -> dict[str, str]:
    raw: Any = r.hgetall(keys(settings).job(job_id))  # bytes replies
    return {k.decode(): v.decode() for k, v in raw.items()}


def event_types(r: redis.Redis, settings: Settings, job_id: str) -> list[tuple[int, str]]:
    entries: Any = r.xrange(keys(settings).events(job_id))
    return [(int(fields[b"seq"]), fields[b"type"].decode()) for _, fields in entries]


def subscribe(r: redis.Redis, settings: Settings) -> Any:
    """A pub/sub connection listening on the cancel channel (subscribed before returning)."""
    pubsub = r.pubsub()  # type: ignore[no-untyped-call]  # redis-py leaves pubsub() unannotated
    pubsub.subscribe(keys(settings).cancel_channel)
    confirmation = pubsub.get_message(timeout=2)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    return pubsub


def published(pubsub: Any, timeout: float) -> list[bytes]:
    """The messages published on the channel within ``timeout`` seconds."""
    messages = []
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None:
            messages.append(message["data"])
    return messages


# --- cancel --------------------------------------------------------------------------------


def retried_job(r: redis.Redis, settings: Settings, client: HermesClient) -> str:
    """A job whose first attempt failed with a retryable error: queued again, 2 events."""
    handle = client.submit({**HI, "id": "retried-1"})
    worker = Worker(r, settings, handle.id)
    worker.record(status="running", attempts=1, started_at=time.time())
    worker.emit("started", {"attempt": 1})
    worker.emit("error", {"type": "engine_error", "message": "engine died"})
    worker.record(status="queued")
    return handle.id


@pytest.mark.parametrize(("retried", "seq", "attempts"), [(False, 1, 0), (True, 3, 1)])
def test_cancelling_a_queued_job_ends_it_at_once(
    client: HermesClient,
    redis_client: redis.Redis,
    settings: Settings,
    retried: bool,
    seq: int,
    attempts: int,
) -> None:
    # Given a queued job (fresh, or queued again after a failed attempt), and a listener
    job_id = retried_job(redis_client, settings, client) if retried else client.submit(HI).id
    events_before = event_types(redis_client, settings, job_id)
    queued_at = float(record(redis_client, settings, job_id)["queued_at"])
    pubsub = subscribe(redis_client, settings)
    # When it is cancelled
    before = time.time()
    outcome = client.job(job_id).cancel()
    after = time.time()
    # Then it ended cancelled now, without bothering any worker
    assert outcome == "cancelled"
    stored = record(redis_client, settings, job_id)
    assert stored["status"] == "cancelled"
    assert before <= float(stored["finished_at"]) <= after
    assert stored["cancel_requested"] == stored["finished_at"]
    assert published(pubsub, 0.3) == []
    # And exactly one terminal event was added, numbered right after the last one
    assert event_types(redis_client, settings, job_id) == [*events_before, (seq, "cancelled")]
    events = list(client.job(job_id).stream(timeout=5))
    assert events[-1].data == {"reason": "cancelled before it started"}
    assert [e.terminal for e in events].count(True) == 1 + retried  # the failed attempt's error
    # And the result says so, with the record's attempts and times
    result = client.job(job_id).result(timeout=1)
    assert result == JobResult.model_validate_json(stored["result"])
    assert result.choices == ()
    assert result.error == ErrorInfo(type="cancelled", message="cancelled before it started")
    assert (result.job.status, result.job.attempts) == (JobStatus.CANCELLED, attempts)
    assert result.job.queued_at == queued_at
    assert result.job.finished_at == float(stored["finished_at"])
    # And both keys expire result_ttl_s from now (not the week a live job gets)
    for key in (keys(settings).job(job_id), keys(settings).events(job_id)):
        assert RESULT_TTL_S - 60 < redis_client.ttl(key) <= RESULT_TTL_S
    pubsub.close()


def test_cancelling_a_running_job_asks_its_worker(
    client: HermesClient, redis_client: redis.Redis, settings: Settings
) -> None:
    # Given a running job, and a worker listening on the cancel channel
    running_job(redis_client, settings)
    pubsub = subscribe(redis_client, settings)
    # When it is cancelled
    before = time.time()
    outcome = client.job("job-1").cancel()
    # Then the job id was published and the request recorded, for the worker to act on
    assert outcome == "cancelling"
    assert published(pubsub, 1.0) == [b"job-1"]
    stored = record(redis_client, settings, "job-1")
    assert float(stored["cancel_requested"]) >= before
    # And nothing ended yet: the worker writes the terminal event, with the partial output
    assert stored["status"] == "running"
    assert "result" not in stored and "finished_at" not in stored
    assert event_types(redis_client, settings, "job-1") == [(1, "started")]
    assert client.job("job-1").poll() is None
    assert redis_client.ttl(keys(settings).job("job-1")) == -1  # untouched (set by the worker)
    pubsub.close()


@pytest.mark.parametrize(
    "status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED]
)
def test_cancelling_an_ended_job_changes_nothing(
    client: HermesClient, redis_client: redis.Redis, settings: Settings, status: JobStatus
) -> None:
    # Given a job that has ended
    worker = running_job(redis_client, settings)
    error = None if status is JobStatus.SUCCEEDED else ErrorInfo(type="x", message="y")
    worker.finish(status, error)
    stored, events = (
        record(redis_client, settings, "job-1"),
        event_types(redis_client, settings, "job-1"),
    )
    pubsub = subscribe(redis_client, settings)
    # When it is cancelled, Then JobAlreadyEnded says how it ended
    with pytest.raises(JobAlreadyEnded, match="already ended") as caught:
        client.job("job-1").cancel()
    assert (caught.value.type, caught.value.status) == ("already_ended", status)
    # And nothing was written or published
    assert record(redis_client, settings, "job-1") == stored
    assert event_types(redis_client, settings, "job-1") == events
    assert published(pubsub, 0.3) == []
    pubsub.close()


def test_cancelling_an_unknown_job_is_not_found(
    client: HermesClient, redis_client: redis.Redis, settings: Settings
) -> None:
    # When an id nobody submitted is cancelled, Then JobNotFound, and no key appears
    with pytest.raises(JobNotFound, match="no-such-job"):
        client.job("no-such-job").cancel()
    assert list(redis_client.scan_iter(match=f"{settings.key_prefix}*")) == []


def test_the_async_client_cancels_like_the_blocking_one(
    settings: Settings, redis_client: redis.Redis
) -> None:
    running_job(redis_client, settings)
    pubsub = subscribe(redis_client, settings)

    async def scenario() -> None:
        async with AsyncHermesClient(settings) as client:
            # A queued job ends at once, with its terminal event and result
            queued = await client.submit({**HI, "id": "async-queued"})
            assert await queued.cancel() == "cancelled"
            assert [e.type async for e in queued.stream(timeout=5)] == ["cancelled"]
            result = await queued.result(timeout=1)
            assert result.error is not None and result.error.type == "cancelled"
            # A running one is asked to stop; an ended one and an unknown one raise
            assert await client.job("job-1").cancel() == "cancelling"
            with pytest.raises(JobAlreadyEnded):
                await queued.cancel()
            with pytest.raises(JobNotFound):
                await client.job("nope").cancel()

    asyncio.run(scenario())
    assert published(pubsub, 1.0) == [b"job-1"]
    assert record(redis_client, settings, "async-queued")["status"] == "cancelled"
    pubsub.close()


def test_cli_cancel_prints_the_outcome(settings: Settings, redis_client: redis.Redis) -> None:
    # Given a queued job and a running one
    with HermesClient(settings) as client:
        client.submit({**HI, "id": "queued-1"})
    running_job(redis_client, settings)
    # When each is cancelled, Then the outcome is printed and the status is 0
    queued = cli(settings, "cancel", "queued-1")
    assert (queued.returncode, queued.stdout) == (0, "cancelled\n"), queued.stderr
    running = cli_here(settings, "cancel", "job-1")
    assert (running.returncode, running.stdout) == (0, "cancelling\n"), running.stderr
    # And cancelling the ended one again, or an unknown id, is one error line and status 1
    again = cli_here(settings, "cancel", "queued-1")
    assert (again.returncode, again.stdout) == (1, "")
    assert one_error_line(again) == "Error: already_ended: job 'queued-1' already ended (cancelled)"
    unknown = cli_here(settings, "cancel", "no-such-job")
    assert unknown.returncode == 1
    assert one_error_line(unknown).startswith("Error: not_found: no job 'no-such-job'")


# --- backpressure --------------------------------------------------------------------------


def full_settings(settings: Settings, limit: int | None) -> Settings:
    return settings.model_copy(update={"max_queue_depth": limit})


def test_submit_refuses_once_every_priority_list_adds_up_to_the_limit(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a limit of 10 and one job waiting at each priority (ten lists)
    with HermesClient(full_settings(settings, 10)) as client:
        for priority in range(10):
            client.submit({**HI, "priority": priority})
        assert len({name for name, _ in queued_messages(redis_client, settings.queue_name)}) == 10
        # When one more is submitted, Then QueueFull gives the depth and the limit
        with pytest.raises(QueueFull, match="holds 10 waiting jobs, at its limit of 10") as caught:
            client.submit({**HI, "id": "one-too-many", "priority": 4})
        assert (caught.value.type, caught.value.retryable) == ("queue_full", True)
        # And nothing of it was recorded or queued
        assert not redis_client.exists(keys(settings).job("one-too-many"))
        assert len(queued_messages(redis_client, settings.queue_name)) == 10
        # And once a worker has taken a job off one list, the same submit goes through
        redis_client.rpop(f"{settings.queue_name}:9")
        handle = client.submit({**HI, "id": "one-too-many", "priority": 4})
        assert handle.created
        assert len(queued_messages(redis_client, settings.queue_name)) == 10


def test_a_known_id_is_answered_even_when_the_queue_is_full(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a full queue holding a job with a client id
    with HermesClient(full_settings(settings, 1)) as client:
        client.submit({**HI, "id": "known-1"})
        # When a producer retries that submit, Then it gets its job back, nothing queued
        again = client.submit({**HI, "id": "known-1"})
        assert (again.id, again.created) == ("known-1", False)
        with pytest.raises(QueueFull):
            client.submit(HI)
    assert len(queued_messages(redis_client, settings.queue_name)) == 1


def test_no_limit_means_unlimited(settings: Settings, redis_client: redis.Redis) -> None:
    # Given a queue already holding many messages
    redis_client.lpush(settings.queue_name, *[b"{}"] * 50)
    # When the limit is off, Then submit still queues; with a limit it refuses
    with HermesClient(full_settings(settings, None)) as client:
        assert client.submit(HI).created
    with HermesClient(full_settings(settings, 50)) as client, pytest.raises(QueueFull):
        client.submit(HI)


def test_the_async_client_refuses_a_full_queue_too(
    settings: Settings, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        async with AsyncHermesClient(full_settings(settings, 2)) as client:
            await client.submit({**HI, "priority": 0})
            await client.submit({**HI, "priority": 7})
            with pytest.raises(QueueFull, match="holds 2 waiting jobs"):
                await client.submit({**HI, "id": "refused"})
            redis_client.delete(settings.queue_name)  # a worker took the priority-0 job
            assert (await client.submit({**HI, "id": "refused"})).created

    asyncio.run(scenario())
    assert len(queued_messages(redis_client, settings.queue_name)) == 2


def test_cli_submit_on_a_full_queue_is_one_line(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a queue holding one job and a limit of one
    with HermesClient(settings) as client:
        client.submit(HI)
    body = json.dumps({**HI, "id": "cli-refused"})
    # When the CLI submits another, Then one error line, status 1, and nothing queued
    done = cli(settings, "submit", "-", stdin=body, env={"HERMES_MAX_QUEUE_DEPTH": "1"})
    assert (done.returncode, done.stdout) == (1, "")
    expected = f"Error: queue_full: queue '{settings.queue_name}' holds 1 waiting jobs"
    assert one_error_line(done) == f"{expected}, at its limit of 1"
    assert not redis_client.exists(keys(settings).job("cli-refused"))
    assert len(queued_messages(redis_client, settings.queue_name)) == 1


# --- dead letters --------------------------------------------------------------------------


def dead_job(
    r: redis.Redis, settings: Settings, job_id: str, *, priority: int = 5, attempts: int = 4
) -> dict[str, Any]:
    """A job that ran out of retries, left as a worker leaves it; returns its body."""
    with HermesClient(settings) as client:
        client.submit({**HI, "id": job_id, "priority": priority})
    for name, _ in queued_messages(r, settings.queue_name):  # the worker took the message
        r.delete(name)
    worker = Worker(r, settings, job_id)
    worker.record(status="running", attempts=attempts, started_at=time.time())
    worker.emit("started", {"attempt": attempts})
    worker.finish(JobStatus.FAILED, ErrorInfo(type="engine_error", message="engine died"))
    worker.record(attempts=attempts, cancel_requested=time.time())
    r.expire(keys(settings).job(job_id), RESULT_TTL_S)
    r.expire(keys(settings).events(job_id), RESULT_TTL_S)
    r.lpush(keys(settings).dead_letters, job_id)
    body: dict[str, Any] = json.loads(record(r, settings, job_id)["body"])
    return body


def test_dead_letters_lists_each_job_once_newest_first(
    client: HermesClient, redis_client: redis.Redis, settings: Settings
) -> None:
    # Given two dead jobs (the first pushed twice) and an id whose record has expired
    dead_job(redis_client, settings, "dead-1")
    dead_job(redis_client, settings, "dead-2", attempts=2)
    redis_client.lpush(keys(settings).dead_letters, "dead-1", "gone-1")
    # When the dead letters are listed
    letters = [letter.to_json() for letter in client.dead_letters()]
    # Then each id comes once, newest first, with its status, attempts and error
    assert [letter["id"] for letter in letters] == ["gone-1", "dead-1", "dead-2"]
    gone, dead_1, dead_2 = letters
    assert gone == {
        "id": "gone-1",
        "status": None,
        "attempts": 0,
        "error": None,
        "finished_at": None,
    }
    assert dead_1["status"] == "failed" and dead_1["attempts"] == 4
    assert dead_1["error"] == {"type": "engine_error", "message": "engine died"}
    assert dead_1["finished_at"] == float(record(redis_client, settings, "dead-1")["finished_at"])
    assert dead_2["attempts"] == 2


def test_requeue_puts_a_dead_letter_back_as_a_fresh_job(
    client: HermesClient, redis_client: redis.Redis, settings: Settings
) -> None:
    # Given a dead job of priority 2
    body = dead_job(redis_client, settings, "dead-1", priority=2)
    # When it is requeued
    handle = client.requeue("dead-1")
    # Then its record is queued and fresh: no attempts, result, end or cancel request
    assert (handle.id, handle.created) == ("dead-1", True)
    stored = record(redis_client, settings, "dead-1")
    assert (stored["status"], stored["attempts"]) == ("queued", "0")
    assert not {"result", "finished_at", "cancel_requested"} & stored.keys()
    assert json.loads(stored["body"]) == body
    assert handle.poll() is None
    # And its keys live as long as a live job's
    for key in (keys(settings).job("dead-1"), keys(settings).events("dead-1")):
        assert ALIVE_TTL_S - 60 < redis_client.ttl(key) <= ALIVE_TTL_S
    # And one message carries the stored body on the priority-2 list
    [(name, message)] = queued_messages(redis_client, settings.queue_name)
    assert name == f"{settings.queue_name}:2"
    assert message["headers"]["id"] == "dead-1"
    assert task_args(message) == [body]
    # And it left the dead letters, so a second requeue is refused
    assert client.dead_letters() == []
    with pytest.raises(NotInDeadLetters, match="dead-1") as caught:
        client.requeue("dead-1")
    assert caught.value.type == "not_in_dlq"
    assert len(queued_messages(redis_client, settings.queue_name)) == 1


def test_requeue_refuses_what_is_not_a_dead_letter(
    client: HermesClient, redis_client: redis.Redis, settings: Settings
) -> None:
    # Given a running job (not dead) and a dead letter whose record has expired
    running_job(redis_client, settings)
    redis_client.lpush(keys(settings).dead_letters, "gone-1")
    # When either is requeued, Then it is refused and nothing changes
    with pytest.raises(NotInDeadLetters):
        client.requeue("job-1")
    assert record(redis_client, settings, "job-1")["status"] == "running"
    with pytest.raises(JobNotFound, match="gone-1"):
        client.requeue("gone-1")
    # And the id whose record has gone is stale: it leaves the dead letters
    assert redis_client.lrange(keys(settings).dead_letters, 0, -1) == []
    assert queued_messages(redis_client, settings.queue_name) == []


def test_requeue_never_resets_a_job_that_runs_again(
    client: HermesClient, redis_client: redis.Redis, settings: Settings
) -> None:
    # Given a dead letter that was requeued and now runs under a worker's live lease, while
    # its id is still on the dead letters (it had been listed twice)
    dead_job(redis_client, settings, "dead-1")
    redis_client.lpush(keys(settings).dead_letters, "dead-1")
    client.requeue("dead-1")
    Worker(redis_client, settings, "dead-1").record(status="running", attempts=1)
    redis_client.set(keys(settings).lease("dead-1"), "live-token")
    redis_client.lpush(keys(settings).dead_letters, "dead-1")
    for name, _ in queued_messages(redis_client, settings.queue_name):  # a worker took it
        redis_client.delete(name)
    # When it is requeued again
    with pytest.raises(NotInDeadLetters, match="running") as caught:
        client.requeue("dead-1")
    # Then the running job is untouched: still running, its attempt and lease kept, nothing
    # queued; and its stale id has left the dead letters
    assert caught.value.type == "not_in_dlq"
    stored = record(redis_client, settings, "dead-1")
    assert (stored["status"], stored["attempts"]) == ("running", "1")
    assert redis_client.get(keys(settings).lease("dead-1")) == b"live-token"
    assert queued_messages(redis_client, settings.queue_name) == []
    assert redis_client.lrange(keys(settings).dead_letters, 0, -1) == []


def test_requeue_refuses_a_failed_job_whose_lease_is_still_held(
    client: HermesClient, redis_client: redis.Redis, settings: Settings
) -> None:
    # Given a dead job whose last attempt still holds the lease (it has written its end
    # and not yet let go)
    dead_job(redis_client, settings, "dead-1")
    redis_client.set(keys(settings).lease("dead-1"), "live-token")
    before = record(redis_client, settings, "dead-1")
    # When it is requeued, Then it is refused and nothing changes
    with pytest.raises(NotInDeadLetters, match="held by a worker"):
        client.requeue("dead-1")
    assert record(redis_client, settings, "dead-1") == before
    assert redis_client.get(keys(settings).lease("dead-1")) == b"live-token"
    assert redis_client.lrange(keys(settings).dead_letters, 0, -1) == [b"dead-1"]
    assert queued_messages(redis_client, settings.queue_name) == []


def test_a_requeue_that_cannot_queue_changes_nothing_so_it_can_be_run_again(
    client: HermesClient, settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a dead job of priority 0, and a queue list Redis cannot push to (a key of
    # another type holds the plain queue's name)
    dead_job(redis_client, settings, "dead-1", priority=0)
    before = record(redis_client, settings, "dead-1")
    redis_client.set(settings.queue_name, "not a list")
    # When it is requeued, the error reaches the caller
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        client.requeue("dead-1")
    # Then it is still a dead letter, its record untouched
    assert redis_client.lrange(keys(settings).dead_letters, 0, -1) == [b"dead-1"]
    assert record(redis_client, settings, "dead-1") == before
    # And once the queue is mended, requeue runs again and queues it once
    redis_client.delete(settings.queue_name)
    client.requeue("dead-1")
    assert len(queued_messages(redis_client, settings.queue_name)) == 1
    assert record(redis_client, settings, "dead-1")["status"] == "queued"


def test_a_requeue_queues_the_body_that_is_stored_when_it_runs(
    client: HermesClient, settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a dead job whose message was built from a body that is no longer stored
    old_body = dead_job(redis_client, settings, "dead-1")
    new_body = {**old_body, "max_tokens": 7}
    stale_keys, stale_args = requeue_call(
        keys(settings), "dead-1", json.dumps(old_body), client.celery, settings.queue_name
    )
    redis_client.hset(keys(settings).job("dead-1"), "body", json.dumps(new_body))
    # When the stale requeue runs, Then it changes nothing and asks to read the body again
    reply = client.redis.eval(scripts.REQUEUE, len(stale_keys), *stale_keys, *stale_args)
    assert requeue_done("dead-1", reply) is False
    assert queued_messages(redis_client, settings.queue_name) == []
    assert redis_client.lrange(keys(settings).dead_letters, 0, -1) == [b"dead-1"]
    # And requeue itself reads it, and queues the stored body
    client.requeue("dead-1")
    [(_, message)] = queued_messages(redis_client, settings.queue_name)
    assert task_args(message) == [new_body]


def test_purge_deletes_every_dead_letter_and_nothing_else(
    client: HermesClient, redis_client: redis.Redis, settings: Settings
) -> None:
    # Given two dead jobs, an expired dead letter, and a live job
    dead_job(redis_client, settings, "dead-1")
    dead_job(redis_client, settings, "dead-2")
    redis_client.lpush(keys(settings).dead_letters, "gone-1", "dead-2")
    running_job(redis_client, settings)
    # When the dead letters are purged
    purged = client.purge_dead_letters()
    # Then each was counted once, and its record, events, lease and the list are gone
    assert purged == 3
    for job_id in ("dead-1", "dead-2"):
        for key in (keys(settings).job(job_id), keys(settings).events(job_id)):
            assert not redis_client.exists(key)
        assert not redis_client.exists(keys(settings).lease(job_id))
    assert not redis_client.exists(keys(settings).dead_letters)
    # And the live job is untouched; purging again finds nothing
    assert record(redis_client, settings, "job-1")["status"] == "running"
    assert client.purge_dead_letters() == 0


def test_the_async_client_handles_dead_letters_too(
    settings: Settings, redis_client: redis.Redis
) -> None:
    dead_job(redis_client, settings, "dead-1", priority=0)
    dead_job(redis_client, settings, "dead-2")

    async def scenario() -> None:
        async with AsyncHermesClient(settings) as client:
            listed = await client.dead_letters()
            assert [(d.id, d.status) for d in listed] == [
                ("dead-2", JobStatus.FAILED),
                ("dead-1", JobStatus.FAILED),
            ]
            handle = await client.requeue("dead-1")
            assert (await handle.status()).status is JobStatus.QUEUED
            with pytest.raises(NotInDeadLetters):
                await client.requeue("dead-1")
            assert await client.purge_dead_letters() == 1

    asyncio.run(scenario())
    [(name, _)] = queued_messages(redis_client, settings.queue_name)
    assert name == settings.queue_name  # priority 0: the plain list
    assert not redis_client.exists(keys(settings).job("dead-2"))
    assert record(redis_client, settings, "dead-1")["status"] == "queued"


def test_cli_dlq_lists_requeues_and_purges(settings: Settings, redis_client: redis.Redis) -> None:
    # Given two dead jobs
    dead_job(redis_client, settings, "dead-1", priority=3)
    dead_job(redis_client, settings, "dead-2")
    # When they are listed, Then one JSON line each, newest first
    listed = cli(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(line["id"], line["status"], line["attempts"]) for line in lines] == [
        ("dead-2", "failed", 4),
        ("dead-1", "failed", 4),
    ]
    assert lines[0]["error"] == {"type": "engine_error", "message": "engine died"}
    # When one is requeued, Then its id is printed and one message is queued
    requeued = cli_here(settings, "dlq", "requeue", "dead-1")
    assert (requeued.returncode, requeued.stdout) == (0, "dead-1\n"), requeued.stderr
    [(name, _)] = queued_messages(redis_client, settings.queue_name)
    assert name == f"{settings.queue_name}:3"
    # And requeueing it again is one error line with status 1
    again = cli_here(settings, "dlq", "requeue", "dead-1")
    assert (again.returncode, again.stdout) == (1, "")
    assert one_error_line(again) == "Error: not_in_dlq: job 'dead-1' is not in the dead letters"
    # When the rest is purged, Then the count is printed and the list is empty
    purged = cli_here(settings, "dlq", "purge")
    assert (purged.returncode, purged.stdout) == (0, "1\n"), purged.stderr
    assert not redis_client.exists(keys(settings).job("dead-2"))
    empty = cli_here(settings, "dlq", "list")
    assert (empty.returncode, empty.stdout) == (0, "")
    assert record(redis_client, settings, "dead-1")["status"] == "queued"


def test_the_depth_gate_reads_near_the_limit_and_now_and_then_far_below_it() -> None:
    gate = DepthGate(100, refresh_s=5.0)
    assert gate.must_read(0.0)  # nothing known yet
    gate.read(10, now=0.0)
    # Far below the limit: the client's own submits are counted, no read for 5 s
    for _ in range(30):
        assert not gate.must_read(1.0)
        gate.submitted()
    assert gate.must_read(5.0)  # stale: this submit reads ...
    assert not gate.must_read(5.0)  # ... and one racing with it does not read again
    # Near the limit (half or more): every submit reads
    gate.read(50, now=6.0)
    assert gate.must_read(6.0)
    assert not DepthGate(None).must_read(0.0)  # no limit, no reads
