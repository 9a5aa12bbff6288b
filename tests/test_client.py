"""The producer client on a real Redis. No worker runs: each test plays the worker's side by
writing job records and stream entries in the layout of ``hermes_worker.contract.store``."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from hermes_worker.contract.jobs import (
    Choice,
    ErrorInfo,
    FinishReason,
    JobInfo,
    JobResult,
    JobStatus,
    ResponseMessage,
    Usage,
    parse_job,
)
from hermes_worker.contract.queue import TASK_NAME, delete_deployment_keys, send_job
from hermes_worker.contract.store import ALIVE_TTL_S, EventType, Keys, encode_event
from hermes_worker.errors import InvalidRequest
from hermes_worker.settings import Settings
from producers.client import (
    BLOCK_CHUNK_S,
    READ_COUNT,
    AsyncHermesClient,
    HermesClient,
    JobNotFound,
    events_from_xread,
    prepare_submission,
)

HI = {"messages": [{"role": "user", "content": "Hi"}]}


# --- the worker's side, played by the tests ----------------------------------------------


class Worker:
    """Writes what a worker would write for one job, in the store layout."""

    def __init__(self, r: redis.Redis, settings: Settings, job_id: str) -> None:
        self.r, self.job_id, self.seq = r, job_id, 0
        self.job_key = Keys(settings.key_prefix).job(job_id)
        self.events_key = Keys(settings.key_prefix).events(job_id)
        self.keys = Keys(settings.key_prefix)

    def record(self, **fields: str | float) -> None:
        mapping: dict[Any, Any] = fields  # redis-py's mapping type is invariant
        self.r.hset(self.job_key, mapping=mapping)

    def emit(self, type_: EventType, data: Any = None) -> str:
        self.seq += 1
        entry: dict[Any, Any] = encode_event(self.seq, type_, data)
        entry_id = self.r.xadd(self.events_key, entry)
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    def finish(
        self,
        status: JobStatus = JobStatus.SUCCEEDED,
        error: ErrorInfo | None = None,
        message: ResponseMessage | None = None,
    ) -> JobResult:
        """Store the result and the terminal event, and note the end on the job's ends
        stream (the one its record names, else the shared one), in one transaction, as the
        worker does."""
        now = time.time()
        info = JobInfo(id=self.job_id, status=status, attempts=1, finished_at=now)
        if message is None:
            message = ResponseMessage(content="Hello!" if error is None else None)
        finish: FinishReason = "error" if error else "tool_calls" if message.tool_calls else "stop"
        result = JobResult(
            id=self.job_id,
            created=int(now),
            model="hermes-4",
            choices=(Choice(message=message, finish_reason=finish),),
            usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
            job=info,
            error=error,
        )
        terminal: EventType = "done" if error is None else "error"
        self.seq += 1
        record: dict[Any, Any] = {
            "status": status.value,
            "finished_at": now,
            "result": result.model_dump_json(),
        }
        event: dict[Any, Any] = encode_event(self.seq, terminal, {"finish_reason": "stop"})
        ends_key = self.keys.end_stream(self.r.hget(self.job_key, "ends"))
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.job_key, mapping=record)
            pipe.xadd(self.events_key, event)
            pipe.xadd(ends_key, {"id": self.job_id})
            pipe.execute()
        return result


def running_job(r: redis.Redis, settings: Settings, job_id: str = "job-1") -> Worker:
    """A job that a worker has started: record ``running`` and a ``started`` event."""
    worker = Worker(r, settings, job_id)
    worker.record(status="running", attempts=1, queued_at=time.time() - 1, started_at=time.time())
    worker.emit("started", {"attempt": 1})
    return worker


_helpers: list[threading.Thread] = []


@pytest.fixture(autouse=True)
def _join_helpers(redis_client: redis.Redis) -> Iterator[None]:
    """A test's :func:`later` threads end before its Redis client closes (a reader can
    return on the terminal event while the helper still writes what follows it)."""
    yield
    while _helpers:
        _helpers.pop().join(10)


def later(seconds: float, action: Callable[[], object]) -> threading.Thread:
    """Run ``action`` in a thread after ``seconds``: a worker writing while the client waits."""

    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run, daemon=True)
    _helpers.append(thread)
    thread.start()
    return thread


def queued_messages(r: redis.Redis, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """Every Celery message on the queue's lists (kombu keeps one list per priority step)."""
    found = []
    for name in [queue, *(f"{queue}:{step}" for step in range(1, 10))]:
        found += [(name, json.loads(raw)) for raw in r.lrange(name, 0, -1)]
    return found


def task_args(message: dict[str, Any]) -> list[Any]:
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return list(args)


@pytest.fixture
def client(hermes_settings: Settings) -> Iterator[HermesClient]:
    with HermesClient(hermes_settings) as client:
        yield client


# --- submit ------------------------------------------------------------------------------


@pytest.mark.parametrize(("priority", "list_suffix"), [(0, ""), (3, ":3"), (5, ":5"), (9, ":9")])
def test_submit_records_the_job_and_queues_one_message(
    client: HermesClient,
    redis_client: redis.Redis,
    hermes_settings: Settings,
    priority: int,
    list_suffix: str,
) -> None:
    # Given a job without an id
    job = {**HI, "priority": priority, "max_tokens": 64}
    # When it is submitted
    before = time.time()
    handle = client.submit(job)
    after = time.time()
    # Then it got a fresh id and a queued record holding the body as sent
    assert handle.created
    assert len(handle.id) == 32 and int(handle.id, 16) >= 0
    record = redis_client.hgetall(Keys(hermes_settings.key_prefix).job(handle.id))
    assert record[b"status"] == b"queued"
    assert record[b"attempts"] == b"0"
    assert before <= float(record[b"queued_at"]) <= after
    body = json.loads(record[b"body"])
    assert body == {**job, "id": handle.id}
    assert parse_job(body).id == handle.id
    ttl = redis_client.ttl(Keys(hermes_settings.key_prefix).job(handle.id))
    assert ALIVE_TTL_S - 60 < ttl <= ALIVE_TTL_S
    # And exactly one Celery message, in the list kombu uses for that priority
    [(list_name, message)] = queued_messages(redis_client, hermes_settings.queue_name)
    assert list_name == hermes_settings.queue_name + list_suffix
    assert message["headers"]["task"] == TASK_NAME
    assert message["headers"]["id"] == handle.id
    assert message["properties"]["priority"] == priority
    assert task_args(message) == [body]


def test_a_chat_job_keeps_its_own_id(client: HermesClient, redis_client: redis.Redis) -> None:
    # Given a parsed ChatJob with a client-chosen id
    job = parse_job({**HI, "id": "order-42:summary"})
    # When it is submitted
    handle = client.submit(job)
    # Then that id is the job id and the Celery task id
    assert handle.id == "order-42:summary"
    [(_, message)] = queued_messages(redis_client, client.settings.queue_name)
    assert message["headers"]["id"] == "order-42:summary"


def test_an_id_submitted_twice_is_queued_once(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a job submitted with a client id
    first = client.submit({**HI, "id": "dup-1"})
    # When the same id is submitted again (a producer retrying), even with another body
    second = client.submit({"messages": [{"role": "user", "content": "other"}], "id": "dup-1"})
    # Then there is one record (the first body) and one message, and both handles agree
    assert (first.id, first.created) == ("dup-1", True)
    assert (second.id, second.created) == ("dup-1", False)
    record = redis_client.hgetall(Keys(hermes_settings.key_prefix).job("dup-1"))
    assert json.loads(record[b"body"])["messages"][0]["content"] == "Hi"
    assert len(queued_messages(redis_client, hermes_settings.queue_name)) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"messages": []}, "messages"),
        ({**HI, "temprature": 1.0}, "temprature"),
        (b"{not json", "JSON"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages.0"),
        # the id of a record that would sit at job-1's lease (held for ever) or stream
        ({**HI, "id": "job-1:lease"}, "':lease'"),
        ({**HI, "id": "job-1:events"}, "':events'"),
    ],
)
def test_an_invalid_body_raises_and_writes_nothing(
    client: HermesClient,
    redis_client: redis.Redis,
    hermes_settings: Settings,
    body: Any,
    expected: str,
) -> None:
    # When an invalid body is submitted
    with pytest.raises(InvalidRequest, match=expected):
        client.submit(body)
    # Then nothing was recorded or queued
    assert list(redis_client.scan_iter(match=f"{hermes_settings.key_prefix}*")) == []
    assert queued_messages(redis_client, hermes_settings.queue_name) == []


@pytest.mark.parametrize("as_text", [True, False])
def test_an_oversized_body_is_rejected(
    hermes_settings: Settings, redis_client: redis.Redis, as_text: bool
) -> None:
    # Given a client that accepts bodies of at most 200 bytes
    small = hermes_settings.model_copy(update={"max_body_bytes": 200})
    job = {"messages": [{"role": "user", "content": "x" * 300}]}
    # When a larger body is submitted (as JSON text or as a mapping)
    with HermesClient(small) as client, pytest.raises(InvalidRequest, match="over the 200-byte"):
        client.submit(json.dumps(job) if as_text else job)
    # Then nothing was queued
    assert queued_messages(redis_client, hermes_settings.queue_name) == []


def test_a_submit_that_cannot_queue_leaves_no_record_so_a_retry_queues_the_job(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a queue list that Redis cannot push to (a key of another type holds its name)
    queue = hermes_settings.queue_name
    redis_client.set(queue, "not a list")
    # When a job is submitted, the error reaches the caller
    with HermesClient(hermes_settings) as client:
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            client.submit({**HI, "id": "retry-me"})
        # Then no record is left behind, so submitting again (queue mended) queues the job
        assert not redis_client.exists(Keys(hermes_settings.key_prefix).job("retry-me"))
        redis_client.delete(queue)
        assert client.submit({**HI, "id": "retry-me"}).created
    assert len(queued_messages(redis_client, queue)) == 1


def test_a_submitted_message_is_the_one_celery_would_send(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given one job body (priority 3: a list of its own), queued by submit on one queue and by
    # Celery's own send_task on another
    body = {**HI, "id": "same-job", "priority": 3}
    with HermesClient(hermes_settings) as client:
        client.submit(body)
        sent = client.celery
    other = f"{hermes_settings.queue_name}-celery"
    sub = prepare_submission(body, hermes_settings.max_body_bytes)
    send_job(sent, sub.body, "same-job", 3, other)
    [(ours_list, ours)] = queued_messages(redis_client, hermes_settings.queue_name)
    [(celery_list, celery)] = queued_messages(redis_client, other)
    redis_client.delete(*redis_client.keys(f"*{other}*"))
    # Then both sit on the priority-3 list, and the messages differ only in what differs
    # between any two sends: the queue they were routed to, the delivery tag, the app's reply_to
    assert (ours_list, celery_list) == (f"{hermes_settings.queue_name}:3", f"{other}:3")
    assert task_args(ours) == task_args(celery) == [sub.body]
    for message, queue in ((ours, hermes_settings.queue_name), (celery, other)):
        properties = message["properties"]
        assert properties.pop("delivery_info") == {"exchange": "", "routing_key": queue}
        assert len(properties.pop("delivery_tag")) == 36
        properties.pop("reply_to")
    assert ours == celery


# --- status --------------------------------------------------------------------------------


def test_status_reads_the_record(client: HermesClient) -> None:
    # Given a submitted job
    handle = client.submit(HI)
    # When its status is read
    info = handle.status()
    # Then it is queued, not yet tried
    assert (info.id, info.status, info.attempts) == (handle.id, JobStatus.QUEUED, 0)
    assert info.queued_at is not None and info.started_at is None


def test_an_unknown_id_is_job_not_found(client: HermesClient) -> None:
    # Given an id nobody submitted, When its status or result is asked for now
    handle = client.job("no-such-job")
    # Then JobNotFound, with the "not_found" type
    with pytest.raises(JobNotFound, match="no-such-job") as caught:
        handle.status()
    assert caught.value.type == "not_found"
    with pytest.raises(JobNotFound):
        handle.poll()


def test_waiting_on_an_id_without_a_record_waits_for_it(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a job sent by a plain Celery client: no record until a worker takes it
    handle = client.job("foreign-1")
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.3)
    with pytest.raises(TimeoutError):
        list(handle.stream(timeout=0.3))

    def worker_takes_it() -> None:
        worker = Worker(redis_client, hermes_settings, "foreign-1")
        worker.record(status="running", attempts=1, queued_at=time.time())
        worker.emit("started", {"attempt": 1})
        worker.finish()

    # When a worker takes and runs it while the producer waits
    later(0.5, worker_takes_it)
    start = time.monotonic()
    result = handle.result(timeout=10)
    # Then the wait ends with the result, woken by the events, not by a re-check
    assert result.job.status is JobStatus.SUCCEEDED
    assert time.monotonic() - start < BLOCK_CHUNK_S
    assert [e.type for e in handle.stream(timeout=5)] == ["started", "done"]


# --- stream --------------------------------------------------------------------------------


def finished_job(r: redis.Redis, settings: Settings) -> tuple[Worker, list[str]]:
    """A job that ran to the end, plus one stray entry after its terminal event."""
    worker = running_job(r, settings)
    worker.emit("reasoning", {"text": "Think."})
    worker.emit("content", {"text": "Hel"})
    worker.emit("content", {"text": "lo!"})
    worker.emit("usage", {"completion_tokens": 4})
    worker.finish()
    worker.emit("content", {"text": "never read"})
    return worker, ["started", "reasoning", "content", "content", "usage", "done"]


def test_stream_yields_events_in_order_and_stops_at_the_terminal_one(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a finished job
    _, types = finished_job(redis_client, hermes_settings)
    # When its stream is read from the start
    events = list(client.job("job-1").stream(timeout=5))
    # Then every event comes once, in order, ending with the terminal one
    assert [e.type for e in events] == types
    assert [e.seq for e in events] == list(range(1, len(types) + 1))
    assert events[2].data == {"text": "Hel"}
    assert events[-1].terminal and not any(e.terminal for e in events[:-1])


def test_stream_resumes_right_after_the_given_id(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a reader that saw the first three events
    _, types = finished_job(redis_client, hermes_settings)
    seen = list(client.job("job-1").stream(timeout=5))[:3]
    # When it resumes from the last id it saw
    rest = list(client.job("job-1").stream(seen[-1].id, timeout=5))
    # Then it gets exactly the events after that one
    assert [e.type for e in rest] == types[3:]
    assert rest[0].seq == seen[-1].seq + 1


def test_stream_after_the_terminal_event_ends_at_once(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a reader that already saw the terminal event of a finished job
    finished_job(redis_client, hermes_settings)
    done = list(client.job("job-1").stream(timeout=5))[-1]
    # When it resumes after it, Then the stream is over (the record says the job ended)
    start = time.monotonic()
    assert [e.type for e in client.job("job-1").stream(done.id, timeout=30)] == ["content"]
    assert time.monotonic() - start < BLOCK_CHUNK_S + 1


class RacingRedis(redis.Redis):
    """Runs ``on_empty_read`` once, right after a blocking XREAD came back empty."""

    on_empty_read: Callable[[], object] | None = None

    def xread(self, *args: Any, **kwargs: Any) -> Any:  # a spy on the reads
        reply = super().xread(*args, **kwargs)
        if not reply and kwargs.get("block") and self.on_empty_read is not None:
            action, self.on_empty_read = self.on_empty_read, None
            action()
        return reply


def test_stream_does_not_miss_an_end_between_a_read_and_the_check(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a reader past the started event, and a job that ends just after its read
    # came back empty (before the reader looks at the record)
    worker = running_job(redis_client, hermes_settings)
    racing = RacingRedis.from_url(hermes_settings.redis_url, socket_timeout=0.4)
    assert isinstance(racing, RacingRedis)
    racing.on_empty_read = worker.finish
    client = HermesClient(hermes_settings, redis=racing)
    started = next(iter(client.job("job-1").stream(timeout=5)))
    # When it follows the stream, Then it still gets the terminal event
    assert [e.type for e in client.job("job-1").stream(started.id, timeout=5)] == ["done"]
    racing.close()


def test_stream_waits_for_events_written_later(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a running job whose worker writes its output half a second from now
    worker = running_job(redis_client, hermes_settings)

    def generate() -> None:
        worker.emit("content", {"text": "late"})
        worker.finish()

    later(0.5, generate)
    # When a reader follows the stream
    start = time.monotonic()
    events = list(client.job("job-1").stream(timeout=10))
    # Then it blocked until the events came, and woke up for them
    assert [e.type for e in events] == ["started", "content", "done"]
    assert 0.4 < time.monotonic() - start < BLOCK_CHUNK_S


def test_stream_goes_on_past_an_attempt_that_the_job_outlives(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a first attempt that ended in a retryable error, the job queued again
    worker = running_job(redis_client, hermes_settings)
    worker.emit("error", {"type": "engine_error", "message": "engine died"})
    worker.record(status="queued")

    def second_attempt() -> None:
        worker.record(status="running", attempts=2)
        worker.emit("restarted", {"attempt": 2})
        worker.emit("content", {"text": "Hi"})
        worker.finish()

    later(0.3, second_attempt)
    # When a reader follows the stream, Then it reads on to the end of the last attempt
    events = list(client.job("job-1").stream(timeout=10))
    assert [e.type for e in events] == ["started", "error", "restarted", "content", "done"]


def test_a_reader_that_comes_after_a_retried_job_ended_reads_every_attempt(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a job whose first attempt failed and whose second succeeded, followed by more
    # stray entries than one page of the backwards search holds
    worker = running_job(redis_client, hermes_settings)
    worker.emit("error", {"type": "engine_error", "message": "engine died"})
    worker.emit("restarted", {"attempt": 2})
    worker.emit("content", {"text": "Hi"})
    worker.finish()
    for _ in range(READ_COUNT + 10):
        worker.emit("content", {"text": "stray"})
    # When a reader reads it from the start, Then it reads past the first attempt's end,
    # up to the job's own end, and no further
    types = [e.type for e in client.job("job-1").stream(timeout=5)]
    assert types == ["started", "error", "restarted", "content", "done"]


def test_stream_times_out(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a running job that writes nothing more
    running_job(redis_client, hermes_settings)
    seen = []
    start = time.monotonic()
    # When a reader follows it with a timeout, Then it gets what exists, then TimeoutError
    with pytest.raises(TimeoutError, match="job-1"):
        for event in client.job("job-1").stream(timeout=0.5):
            seen.append(event.type)
    assert seen == ["started"]
    assert 0.45 < time.monotonic() - start < 2


# --- result --------------------------------------------------------------------------------


class CountingRedis(redis.Redis):
    """A Redis client that counts the commands it sends."""

    commands = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        # redis-py leaves execute_command unannotated
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


class Stalls:
    """Which reads time out, as they do when redis-server is starved of CPU for longer than
    the socket timeout (seen in CI): ``plan`` maps a command to the occurrences of it (1 for
    the first) that raise redis-py's TimeoutError instead of being sent."""

    def __init__(self, plan: dict[str, set[int]], wait_s: float = 0.0) -> None:
        self.plan = plan
        self.wait_s = wait_s  # how long a stalled read waits before it times out (sync)
        self.seen: Counter[str] = Counter()
        self.stalled: Counter[str] = Counter()

    def check(self, command: object) -> None:
        name = str(command).upper()
        if name not in self.plan:
            return
        self.seen[name] += 1
        if self.seen[name] in self.plan[name]:
            self.stalled[name] += 1
            time.sleep(self.wait_s)
            raise redis.exceptions.TimeoutError("Timeout reading from socket")


# The status reads of a stream's wait (HGET), and the checks of the record in a result's
# wait after its first (HMGET status result).
WAIT_LOOP_STALLS = {"HGET": {1, 2}, "HMGET": {2, 3}}
# The first read of every other kind a wait makes: the status read that decides whether a
# terminal event ends the stream (HGET), the backwards search for the job's last terminal
# event and then the ends stream's cursor a result's wait starts from (XREVRANGE), and a
# result's first check of the record (HMGET).
FIRST_READ_STALLS = {"HGET": {1}, "HMGET": {1}, "XREVRANGE": {1, 3}}


class StallingRedis(redis.Redis):
    stalls: Stalls

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.stalls.check(args[0])
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


class AsyncStallingRedis(AsyncRedis):
    stalls: Stalls

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.stalls.check(args[0])
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        """A pipeline that times out, whole, when a read it holds is to stall."""
        pipe = super().pipeline(transaction, shard_hint)
        send = pipe.execute

        async def execute(raise_on_error: bool = True) -> Any:
            for args, _ in pipe.command_stack:
                self.stalls.check(args[0])
            return await send(raise_on_error)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe


# A short socket timeout: a client's XREAD waits are half of it (block_chunk_s).
STALLING_SOCKET_TIMEOUT_S = 0.4


def stalling_client(settings: Settings, stalls: Stalls) -> tuple[HermesClient, StallingRedis]:
    """A client whose Redis times out on the reads ``stalls`` picks (close the second)."""
    stalling = StallingRedis.from_url(settings.redis_url, socket_timeout=STALLING_SOCKET_TIMEOUT_S)
    assert isinstance(stalling, StallingRedis)
    stalling.stalls = stalls
    return HermesClient(settings, redis=stalling), stalling


def read_then_wait(
    client: HermesClient, r: redis.Redis, settings: Settings
) -> tuple[list[str], JobResult]:
    """Read job-1's stream to its end, then wait for the result of job-2, which a worker
    starts now and ends a second later."""
    seen = [e.type for e in client.job("job-1").stream(timeout=20)]
    second = running_job(r, settings, "job-2")
    later(1.0, second.finish)
    return seen, client.job("job-2").result(timeout=20)


def read_then_wait_async(
    settings: Settings, r: redis.Redis, stalls: Stalls
) -> tuple[list[str], JobResult]:
    """:func:`read_then_wait` through an asyncio client whose Redis times out as told."""

    async def scenario() -> tuple[list[str], JobResult]:
        stalling = AsyncStallingRedis.from_url(
            settings.redis_url, socket_timeout=STALLING_SOCKET_TIMEOUT_S
        )
        stalling.stalls = stalls
        async with AsyncHermesClient(settings, redis=stalling) as client:
            seen = [e.type async for e in client.job("job-1").stream(timeout=20)]
            second = running_job(r, settings, "job-2")
            later(1.0, second.finish)
            result = await client.job("job-2").result(timeout=20)
        await stalling.aclose()
        return seen, result

    return asyncio.run(scenario())


def test_a_wait_outlives_record_reads_that_time_out(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a running job that ends a second from now, and reads of its record that time out
    first = running_job(redis_client, hermes_settings)
    later(1.0, lambda: (first.emit("content", {"text": "Hi"}), first.finish()))
    client, stalling = stalling_client(hermes_settings, Stalls(WAIT_LOOP_STALLS))
    # When the producer follows the stream, then waits for the result of another job
    seen, result = read_then_wait(client, redis_client, hermes_settings)
    # Then the timed-out reads were waited out, within the caller's deadline
    assert seen == ["started", "content", "done"]
    assert result.job.status is JobStatus.SUCCEEDED
    assert stalling.stalls.stalled == {"HGET": 2, "HMGET": 2}
    stalling.close()


def test_the_async_client_outlives_record_reads_that_time_out(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a running job that ends a second from now, and reads of its record that time out
    first = running_job(redis_client, hermes_settings)
    later(1.0, lambda: (first.emit("content", {"text": "Hi"}), first.finish()))
    stalls = Stalls(WAIT_LOOP_STALLS)
    # When the producer follows the stream, then waits for the result of another job
    seen, result = read_then_wait_async(hermes_settings, redis_client, stalls)
    # Then the timed-out reads were waited out, within the caller's deadline
    assert seen == ["started", "content", "done"]
    assert result.job.status is JobStatus.SUCCEEDED
    assert stalls.stalled == {"HGET": 2, "HMGET": 2}


def retried_job(r: redis.Redis, settings: Settings) -> None:
    """job-1, ended: its first attempt failed, its second succeeded."""
    worker = running_job(r, settings)
    worker.emit("error", {"type": "engine_error", "message": "engine died"})
    worker.emit("restarted", {"attempt": 2})
    worker.emit("content", {"text": "Hi"})
    worker.finish()


def test_every_read_a_wait_makes_outlives_a_timeout(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a retried job that has ended, and a client whose first read of every kind a
    # wait makes times out
    retried_job(redis_client, hermes_settings)
    client, stalling = stalling_client(hermes_settings, Stalls(FIRST_READ_STALLS))
    # When the producer reads the retried job's stream, then waits for a job that ends a
    # second from now
    seen, result = read_then_wait(client, redis_client, hermes_settings)
    # Then each timed-out read was made again: the stream went on past the failed
    # attempt's end, and the wait for the result lasted until the job ended
    assert seen == ["started", "error", "restarted", "content", "done"]
    assert result.job.status is JobStatus.SUCCEEDED
    assert stalling.stalls.stalled == {"HGET": 1, "HMGET": 1, "XREVRANGE": 2}
    stalling.close()


def test_the_async_client_makes_every_read_of_a_wait_again_after_a_timeout(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a retried job that has ended, and an asyncio client whose first read of every
    # kind a wait makes times out
    retried_job(redis_client, hermes_settings)
    stalls = Stalls(FIRST_READ_STALLS)
    # When the producer reads the retried job's stream, then waits for another
    seen, result = read_then_wait_async(hermes_settings, redis_client, stalls)
    # Then each timed-out read was made again
    assert seen == ["started", "error", "restarted", "content", "done"]
    assert result.job.status is JobStatus.SUCCEEDED
    assert stalls.stalled == {"HGET": 1, "HMGET": 1, "XREVRANGE": 2}


def test_a_stream_whose_reads_time_out_as_the_job_ends_still_reads_its_end(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a job that has ended, and a client whose first two XREADs time out: the wait for
    # events, then the read of what the job wrote last once its record shows it ended
    worker = running_job(redis_client, hermes_settings)
    worker.emit("content", {"text": "Hi"})
    worker.finish()
    client, stalling = stalling_client(hermes_settings, Stalls({"XREAD": {1, 2}}))
    # When the producer reads its stream, Then it gets every event, up to the end
    seen = [e.type for e in client.job("job-1").stream(timeout=20)]
    assert seen == ["started", "content", "done"]
    assert stalling.stalls.stalled == {"XREAD": 2}
    stalling.close()


def test_a_wait_whose_reads_keep_timing_out_ends_at_the_callers_deadline(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a running job whose record cannot be read: every read of it times out
    running_job(redis_client, hermes_settings)
    stalls = Stalls({"HMGET": set(range(1, 1000))}, wait_s=0.2)
    client, stalling = stalling_client(hermes_settings, stalls)
    start = time.monotonic()
    # When the producer waits for its result with a timeout, Then it gets TimeoutError
    # for the job once that time is spent, not redis-py's error and not a wait forever,
    # having tried the read again after each timeout
    with pytest.raises(TimeoutError, match="job-1"):
        client.job("job-1").result(timeout=2.0)
    assert 1.95 < time.monotonic() - start < 5
    # (about 8 tries of 0.25 s each: a timeout, then the pause before the next)
    assert 2 <= stalling.stalls.stalled["HMGET"] <= 10
    stalling.close()


def test_result_blocks_until_the_terminal_event_then_reads_the_result(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a running job that ends a second from now, and a client counting its commands
    worker = running_job(redis_client, hermes_settings)
    counting = CountingRedis.from_url(hermes_settings.redis_url)
    assert isinstance(counting, CountingRedis)
    client = HermesClient(hermes_settings, redis=counting)
    holder: list[JobResult] = []
    finisher = later(1.0, lambda: holder.append(worker.finish()))
    # When the producer waits for the result
    start = time.monotonic()
    result = client.job("job-1").result(timeout=20)
    elapsed = time.monotonic() - start
    # Then it gets the stored result as soon as the terminal event lands, without polling
    # (the reader can return before the writing thread has kept what it wrote: seen failing)
    finisher.join(10)
    assert result == holder[0]
    assert result.choices[0].message.content == "Hello!"
    assert 0.9 < elapsed < BLOCK_CHUNK_S
    assert counting.commands <= 6
    counting.close()


def test_result_of_an_ended_job_comes_at_once(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a job that failed
    worker = running_job(redis_client, hermes_settings)
    stored = worker.finish(JobStatus.FAILED, ErrorInfo(type="engine_error", message="boom"))
    # When its result is asked for, Then the stored result comes back, error included
    handle = client.job("job-1")
    assert handle.poll() == stored
    result = handle.result(timeout=0)
    assert result.job.status is JobStatus.FAILED
    assert result.error == ErrorInfo(type="engine_error", message="boom")


def test_result_times_out(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a running job
    running_job(redis_client, hermes_settings)
    handle = client.job("job-1")
    # When the producer waits half a second, Then TimeoutError, and poll() says not yet
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="job-1"):
        handle.result(timeout=0.5)
    assert 0.45 < time.monotonic() - start < 2
    assert handle.poll() is None


def test_a_job_ended_without_a_result_still_answers(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given a job marked expired by someone other than a worker (no result stored)
    worker = running_job(redis_client, hermes_settings)
    worker.record(status="expired", finished_at=time.time())
    # When its result is awaited, Then a result says so instead of waiting forever
    result = client.job("job-1").result(timeout=1)
    assert result.job.status is JobStatus.EXPIRED
    assert result.error is not None and result.error.type == "expired"


def test_events_from_xread_reads_both_reply_shapes() -> None:
    fields = encode_event(1, "content", {"text": "a"})
    resp2 = [[b"k", [(b"1-0", fields)]]]
    resp3 = {b"k": [[(b"1-0", fields)]]}
    assert events_from_xread(resp2) == events_from_xread(resp3)
    assert events_from_xread(resp2)[0].data == {"text": "a"}
    assert events_from_xread([]) == events_from_xread({}) == []


# --- asyncio client ------------------------------------------------------------------------


def test_the_async_client_submits_streams_and_waits(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        async with AsyncHermesClient(hermes_settings) as client:
            # Given a submitted job, and the same id submitted again
            handle = await client.submit({**HI, "id": "async-1", "priority": 2})
            again = await client.submit({**HI, "id": "async-1"})
            assert (handle.created, again.created, again.id) == (True, False, "async-1")
            assert (await handle.status()).status is JobStatus.QUEUED
            # When a worker runs it while the producer follows the stream
            worker = Worker(redis_client, hermes_settings, "async-1")

            def run_job() -> None:
                worker.record(status="running", attempts=1, started_at=time.time())
                worker.emit("started", {"attempt": 1})
                worker.emit("content", {"text": "Hi"})
                worker.finish()

            later(0.3, run_job)
            events = [event async for event in handle.stream(timeout=10)]
            # Then it sees the events up to the terminal one, and the stored result
            assert [e.type for e in events] == ["started", "content", "done"]
            resumed = [e.type async for e in handle.stream(events[0].id, timeout=10)]
            assert resumed == ["content", "done"]
            result = await handle.result(timeout=5)
            assert result.choices[0].message.content == "Hello!"

    asyncio.run(scenario())
    # And exactly one message went to the priority-2 list
    [(name, message)] = queued_messages(redis_client, hermes_settings.queue_name)
    assert name == f"{hermes_settings.queue_name}:2"
    assert message["headers"]["id"] == "async-1"


def test_the_async_client_raises_like_the_blocking_one(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        redis_async = AsyncRedis.from_url(hermes_settings.redis_url)
        client = AsyncHermesClient(hermes_settings, redis=redis_async)
        with pytest.raises(InvalidRequest):
            await client.submit({"messages": []})
        with pytest.raises(JobNotFound):
            await client.job("nope").status()
        with pytest.raises(JobNotFound):
            await client.job("nope").poll()
        running_job(redis_client, hermes_settings)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.job("job-1").result(timeout=0.4)
        with pytest.raises(TimeoutError):
            [e async for e in client.job("job-1").stream(timeout=0.4)]
        assert 0.75 < time.monotonic() - start < 3
        assert await client.job("job-1").poll() is None
        await client.aclose()
        await redis_async.aclose()  # passed in: the client leaves it open

    asyncio.run(scenario())
    assert queued_messages(redis_client, hermes_settings.queue_name) == []


def test_waits_stay_under_a_short_socket_timeout(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a client passed in with a 1 s socket timeout, and a job that stays quiet
    short = redis.Redis.from_url(hermes_settings.redis_url, socket_timeout=1)
    running_job(redis_client, hermes_settings)
    # When the producer waits longer than that, Then only our own TimeoutError ends it
    client = HermesClient(hermes_settings, redis=short)
    with pytest.raises(TimeoutError, match="did not end within"):
        client.job("job-1").result(timeout=2.5)
    short.close()


# --- the examples, run against a worker played by a thread ----------------------------------


def load_example(name: str) -> Any:
    path = Path(__file__).parent.parent / "producers" / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def play_worker(
    settings: Settings, jobs: int, answer: Callable[[Worker, dict[str, Any]], object]
) -> tuple[threading.Thread, list[dict[str, Any]]]:
    """A thread that takes ``jobs`` messages off the queue and answers each with ``answer``."""
    bodies: list[dict[str, Any]] = []
    queue = settings.queue_name
    lists = [queue, *(f"{queue}:{step}" for step in range(1, 10))]

    def run() -> None:
        r = redis.Redis.from_url(settings.redis_url)
        while len(bodies) < jobs:
            popped = r.brpop(lists, timeout=2)
            if popped is None:
                break
            [body] = task_args(json.loads(popped[1]))
            bodies.append(body)
            worker = Worker(r, settings, body["id"])
            worker.record(status="running", attempts=1, started_at=time.time())
            worker.emit("started", {"attempt": 1})
            answer(worker, body)
        r.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, bodies


@pytest.fixture
def hermes_env(hermes_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Point Settings() (what the examples build) at the test's namespace."""
    monkeypatch.setenv("HERMES_REDIS_URL", hermes_settings.redis_url)
    monkeypatch.setenv("HERMES_KEY_PREFIX", hermes_settings.key_prefix)
    monkeypatch.setenv("HERMES_QUEUE_NAME", hermes_settings.queue_name)
    return hermes_settings


def test_chat_stream_prints_deltas_then_usage(
    hermes_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("chat_stream")
    assert parse_job(example.chat_job("Hi")).thinking

    def answer(worker: Worker, body: dict[str, Any]) -> None:
        worker.emit("reasoning", {"text": "Think"})
        worker.emit("reasoning", {"text": "ing."})
        worker.emit("content", {"text": "Hello!"})
        worker.finish()

    thread, bodies = play_worker(hermes_env, 1, answer)
    assert example.main("Hi") == 0
    thread.join(5)
    out = capsys.readouterr().out
    assert "[reasoning]\nThinking.\n[content]\nHello!\n" in out
    assert "usage: 5 prompt + 2 completion tokens" in out
    assert bodies[0]["messages"] == [{"role": "user", "content": "Hi"}]


def test_tool_loop_runs_the_tool_and_sends_the_result_back(hermes_env: Settings) -> None:
    example = load_example("tool_loop")
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }

    def answer(worker: Worker, body: dict[str, Any]) -> None:
        asks_tool = len(body["messages"]) == 1
        worker.finish(
            message=ResponseMessage.model_validate(
                {"content": None, "reasoning_content": "Need weather.", "tool_calls": [call]}
                if asks_tool
                else {"content": "Take an umbrella."}
            )
        )

    thread, bodies = play_worker(hermes_env, 2, answer)
    with HermesClient() as client:
        result = example.tool_loop(client, "Umbrella in Paris?")
    thread.join(5)
    # The answer ends the loop; the second job carried the call and the tool's result
    assert result.choices[0].message.content == "Take an umbrella."
    assert len(bodies) == 2
    second = parse_job(bodies[1])
    assistant, tool = bodies[1]["messages"][1:]
    assert assistant["tool_calls"] == [call]
    assert assistant["reasoning_content"] == "Need weather."
    assert tool == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": json.dumps({"sky": "rain", "celsius": 14}),
    }
    assert second.tools is not None and second.tools[0].function.name == "get_weather"


def test_tool_loop_stops_after_max_rounds(hermes_env: Settings) -> None:
    example = load_example("tool_loop")
    call = {"id": "c", "function": {"name": "get_weather", "arguments": '{"city": "Mars"}'}}

    def always_calls(worker: Worker, body: dict[str, Any]) -> None:
        worker.finish(message=ResponseMessage.model_validate({"tool_calls": [call]}))

    thread, bodies = play_worker(hermes_env, 2, always_calls)
    with HermesClient() as client:
        result = example.tool_loop(client, "Weather on Mars?", max_rounds=2)
    thread.join(5)
    assert len(bodies) == 2 and result.choices[0].message.tool_calls
    assert json.loads(bodies[1]["messages"][-1]["content"]) == {
        "error": "no weather known for 'Mars'"
    }


def test_more_concurrent_commands_than_connections_wait_instead_of_failing(
    hermes_settings: Settings,
) -> None:
    # redis-py's default pool raises "Too many connections" past 100 commands in flight
    async def scenario() -> list[bool]:
        async with AsyncHermesClient(hermes_settings) as client:
            handles = await asyncio.gather(
                *(
                    client.submit({"messages": [{"role": "user", "content": f"hi {i}"}]})
                    for i in range(150)
                )
            )
            return [h.created for h in handles]

    assert asyncio.run(scenario()) == [True] * 150

    def submit(i: int) -> bool:
        return client.submit({"messages": [{"role": "user", "content": f"ho {i}"}]}).created

    with HermesClient(hermes_settings) as client, ThreadPoolExecutor(120) as pool:
        assert all(pool.map(submit, range(120)))


def test_deleting_a_deployments_keys_leaves_every_other_key(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a job submitted at priority 3, a dead letter, and another deployment's keys
    prefix, queue = hermes_settings.key_prefix, hermes_settings.queue_name
    with HermesClient(hermes_settings) as client:
        client.submit({**HI, "id": "mine", "priority": 3})
        client.submit({**HI, "id": "mine-too"})  # default priority: the queue's own list
    redis_client.lpush(Keys(prefix).dead_letters, "gone")
    redis_client.sadd(f"_kombu.binding.{queue}", "binding")
    others = [f"other-{prefix}job:x", f"other-{queue}", f"_kombu.binding.other-{queue}"]
    for key in others:
        redis_client.set(key, "1")
    try:
        # When this deployment's keys are deleted
        deleted = delete_deployment_keys(redis_client, prefix, queue)
        # Then its records, dead letters, queue lists and binding are gone, nothing else
        assert deleted == 6
        assert list(redis_client.scan_iter(match=f"{prefix}*")) == []
        assert list(redis_client.scan_iter(match=f"{queue}*")) == []
        assert not redis_client.exists(f"_kombu.binding.{queue}")
        assert redis_client.exists(*others) == len(others)
    finally:
        redis_client.delete(*others)
