"""The stream writer on a real Redis: coalescing, order, seq, and the end of a job."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis
from conftest import TEST_REDIS_URL as REDIS_URL
from redis.asyncio import Redis as AsyncRedis

from hermes_worker.cli.services import LocalRedis
from hermes_worker.contract.clock import RedisClock
from hermes_worker.contract.store import Keys, decode_event
from hermes_worker.worker.stream import JobStream, StreamWriter, refused_for_good


def leased(keys: Keys, job_id: str) -> JobStream:
    """An attempt's stream whose lease is held (every write checks it)."""
    token = f"token-{job_id}"
    redis.Redis.from_url(REDIS_URL).set(keys.lease(job_id), token, ex=60)
    return JobStream(job_id, token=token)


def read_events(keys: Keys, job_id: str) -> list[tuple[int, str, object]]:
    client = redis.Redis.from_url(REDIS_URL)
    return [
        (e.seq, e.type, e.data)
        for e in (decode_event(i, f) for i, f in client.xrange(keys.events(job_id)))
    ]


async def produce(keys: Keys, deltas: int, flush_s: float) -> StreamWriter:
    redis_client = AsyncRedis.from_url(REDIS_URL)
    writer = StreamWriter(redis_client, keys, flush_s=flush_s, ttl_s=60)
    writer.start()
    stream = leased(keys, "j1")
    writer.emit(stream, "started", {"attempt": 1}, urgent=True)
    for i in range(deltas):
        writer.emit(stream, "content", {"text": f"t{i} "})
        await asyncio.sleep(0.001)  # tokens arrive over time, as from the engine
    await writer.close(stream, {"status": "succeeded", "result": "{}"}, "done", {})
    await writer.stop()
    await redis_client.aclose()
    return writer


def test_deltas_coalesce_into_few_entries_in_order(keys: Keys) -> None:
    # Given 200 text deltas emitted over time with a 20 ms flush interval
    writer = asyncio.run(produce(keys, deltas=200, flush_s=0.02))
    events = read_events(keys, "j1")
    # Then the text arrives whole and in order, in far fewer entries than deltas
    text = "".join(str(d["text"]) for _, t, d in events if t == "content")  # type: ignore[index]
    assert text == "".join(f"t{i} " for i in range(200))
    content_entries = sum(1 for _, t, _ in events if t == "content")
    assert content_entries < 50
    assert writer.commands_sent < 70
    # seq runs 1, 2, 3, ... with started first and done last
    assert [s for s, _, _ in events] == list(range(1, len(events) + 1))
    assert events[0][1] == "started" and events[-1][1] == "done"


def test_the_record_is_written_before_the_terminal_event_and_keys_expire(keys: Keys) -> None:
    asyncio.run(produce(keys, deltas=3, flush_s=0.01))
    client = redis.Redis.from_url(REDIS_URL)
    assert client.hget(keys.job("j1"), "status") == b"succeeded"
    assert 0 < client.ttl(keys.job("j1")) <= 60
    assert 0 < client.ttl(keys.events("j1")) <= 60


def test_without_coalescing_every_delta_would_be_an_entry(keys: Keys) -> None:
    # A zero-length interval still groups what arrived during a write, but no more:
    # the same run with a 50 ms interval writes several times fewer entries.
    fast = asyncio.run(produce(keys, deltas=100, flush_s=0.0))
    fast_entries = len(read_events(keys, "j1"))
    redis.Redis.from_url(REDIS_URL).delete(keys.events("j1"), keys.job("j1"))
    slow = asyncio.run(produce(keys, deltas=100, flush_s=0.05))
    slow_entries = len(read_events(keys, "j1"))
    assert slow_entries * 3 < fast_entries
    assert slow.commands_sent < fast.commands_sent


async def produce_tokens(
    keys: Keys, deltas: int, *, min_tokens: int, max_flush_s: float, pause_s: float
) -> float:
    """One token per delta; returns how long the emitting took (seconds)."""
    redis_client = AsyncRedis.from_url(REDIS_URL)
    writer = StreamWriter(
        redis_client, keys, flush_s=0.001, ttl_s=60, min_tokens=min_tokens, max_flush_s=max_flush_s
    )
    writer.start()
    stream = leased(keys, "j1")
    writer.emit(stream, "started", {"attempt": 1}, urgent=True)
    start = time.monotonic()
    for i in range(deltas):
        writer.emit(stream, "content", {"text": f"t{i} "})
        writer.generated(stream, 1)
        await asyncio.sleep(pause_s)
    took = time.monotonic() - start
    await writer.close(stream, {"status": "succeeded", "result": "{}"}, "done", {})
    await writer.stop()
    await redis_client.aclose()
    return took


def content_entries(keys: Keys) -> list[str]:
    return [str(d["text"]) for _, t, d in read_events(keys, "j1") if t == "content"]  # type: ignore[index]


def test_text_is_written_once_it_holds_min_tokens(keys: Keys) -> None:
    # Given 120 one-token deltas, a 1 ms interval, but writes that wait for 20 tokens
    asyncio.run(produce_tokens(keys, 120, min_tokens=20, max_flush_s=60, pause_s=0.001))
    entries = content_entries(keys)
    # Then the text is whole, and every entry holds at least 20 tokens but the first (it
    # went out with the urgent `started`) and the last (written at the job's end)
    assert "".join(entries) == "".join(f"t{i} " for i in range(120))
    assert all(entry.count(" ") >= 20 for entry in entries[1:-1]), entries
    assert len(entries) <= 120 // 20 + 2


def test_text_short_of_min_tokens_is_written_by_max_flush(keys: Keys) -> None:
    # Given deltas that never add up to min_tokens, and a 50 ms upper bound on the wait
    took = asyncio.run(produce_tokens(keys, 60, min_tokens=10_000, max_flush_s=0.05, pause_s=0.005))
    entries = content_entries(keys)
    # Then text was still written while the job ran, about once per 50 ms, not per delta
    assert "".join(entries) == "".join(f"t{i} " for i in range(60))
    assert 2 <= len(entries) <= took / 0.05 + 2


def test_settle_writes_pending_text_at_once_and_discard_drops_it(keys: Keys) -> None:
    async def scenario() -> tuple[list[tuple[int, str, object]], list[tuple[int, str, object]]]:
        redis_client = AsyncRedis.from_url(REDIS_URL)
        # A writer that would hold text back for 10 s
        writer = StreamWriter(redis_client, keys, flush_s=10, ttl_s=60, min_tokens=1000)
        writer.start()
        handed_back, lost = leased(keys, "back"), leased(keys, "lost")
        for stream in (handed_back, lost):
            writer.emit(stream, "started", {"attempt": 1}, urgent=True)
        await asyncio.sleep(0.05)
        for stream in (handed_back, lost):
            writer.emit(stream, "content", {"text": "partial"})
        # When one attempt is handed back (settled) and the other lost its lease (discarded)
        writer.discard(lost)
        await asyncio.wait_for(writer.settle(handed_back), timeout=2)
        settled = read_events(keys, "back")  # read before the writer stops
        await writer.stop()
        await redis_client.aclose()
        return settled, read_events(keys, "lost")

    settled, lost = asyncio.run(scenario())
    # Then the handed-back text was written by the time settle returned, in seq order...
    assert settled == [(1, "started", {"attempt": 1}), (2, "content", {"text": "partial"})]
    # ... and the lost attempt's pending text never reached Redis, even at stop
    assert lost == [(1, "started", {"attempt": 1})]


class WatchedPipelines:
    """A real client whose pipelines' ``execute`` goes through :meth:`run` (override it)."""

    def __init__(self, client: AsyncRedis) -> None:
        self._client = client

    def pipeline(self, transaction: bool = False) -> object:
        pipe = self._client.pipeline(transaction=transaction)
        execute = pipe.execute

        async def watched(raise_on_error: bool = True) -> list[object]:
            return await self.run(pipe, execute, raise_on_error)

        pipe.execute = watched  # type: ignore[method-assign]
        return pipe

    async def run(self, pipe: Any, execute: Any, raise_on_error: bool) -> list[object]:
        return list(await execute(raise_on_error))

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)


class LateReply(WatchedPipelines):
    """A real client whose first write of events runs on Redis but whose reply is lost (a
    read that timed out on a stalled machine): the writer cannot tell what landed."""

    def __init__(self, client: AsyncRedis) -> None:
        super().__init__(client)
        self.lost = 0

    async def run(self, pipe: Any, execute: Any, raise_on_error: bool) -> list[object]:
        writes_events = any(args[0] in ("EVALSHA", "EVAL") for args, _ in pipe.command_stack)
        replies = await execute(raise_on_error)
        if writes_events and not self.lost:
            self.lost += 1
            raise redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")
        return list(replies)


class CountedPipelines(WatchedPipelines):
    """A real client that counts the pipelines it sends."""

    def __init__(self, client: AsyncRedis) -> None:
        super().__init__(client)
        self.sent = 0

    async def run(self, pipe: Any, execute: Any, raise_on_error: bool) -> list[object]:
        self.sent += 1
        return await super().run(pipe, execute, raise_on_error)


def test_a_write_whose_reply_was_lost_is_not_written_twice(keys: Keys) -> None:
    async def scenario() -> int:
        client = LateReply(AsyncRedis.from_url(REDIS_URL))
        writer = StreamWriter(client, keys, flush_s=0.01, ttl_s=60)  # type: ignore[arg-type]
        writer.start()
        stream = leased(keys, "j1")
        writer.emit(stream, "started", {"attempt": 1}, urgent=True)
        writer.emit(stream, "content", {"text": "one "})
        await asyncio.sleep(0.05)  # the first write lands, its reply is lost; retried
        writer.emit(stream, "content", {"text": "two"})
        await writer.close(stream, {"status": "succeeded", "result": "{}"}, "done", {})
        await writer.stop()
        await client._client.aclose()
        return client.lost

    # Given a write of events whose reply never came back
    assert asyncio.run(scenario()) == 1
    # Then every event is in the stream once, seq 1, 2, 3... and the text whole
    events = read_events(keys, "j1")
    assert [s for s, _, _ in events] == list(range(1, len(events) + 1))
    assert [t for _, t, _ in events] == ["started", "content", "content", "done"]
    assert "".join(str(d["text"]) for _, t, d in events if t == "content") == "one two"  # type: ignore[index]


def test_an_event_sent_soon_rides_the_next_regular_flush_not_one_of_its_own(keys: Keys) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        redis_client = AsyncRedis.from_url(REDIS_URL)
        # A writer whose text waits for 1000 tokens or 10 s, flushing every 0.3 s otherwise
        writer = StreamWriter(redis_client, keys, flush_s=0.3, ttl_s=60, min_tokens=1000,
                              max_flush_s=10)  # fmt: skip
        writer.start()
        stream = leased(keys, "j1")
        # When a job's `started` is sent soon, and a second job's is sent urgently
        writer.emit(stream, "started", {"attempt": 1}, soon=True)
        urgent = leased(keys, "j2")
        writer.emit(urgent, "started", {"attempt": 1}, urgent=True)
        await asyncio.sleep(0.1)
        early = [len(read_events(keys, job)) for job in ("j1", "j2")]
        await asyncio.sleep(0.6)
        later = [len(read_events(keys, job)) for job in ("j1", "j2")]
        await writer.stop()
        await redis_client.aclose()
        return early, later

    early, later = asyncio.run(scenario())
    # Then the urgent one was written at once, the soon one not before the flush interval
    # but well before text would have been (10 s)
    assert early == [0, 1]
    assert later == [1, 1]


def test_jobs_due_a_few_ms_apart_share_one_pipeline(keys: Keys) -> None:
    async def scenario() -> int:
        client = CountedPipelines(AsyncRedis.from_url(REDIS_URL))
        writer = StreamWriter(client, keys, flush_s=0.2, ttl_s=60, min_tokens=1000,  # type: ignore[arg-type]
                              max_flush_s=0.4)  # fmt: skip
        writer.start()
        streams = [leased(keys, f"j{i}") for i in range(5)]
        # Given five jobs whose text starts 10 ms apart (due at max_flush_s, 10 ms apart),
        # within one step of the writer's grid (here flush_s: text due by age comes due on
        # it; jobs on either side of a step come due a step apart)
        await asyncio.sleep(0.2 - time.monotonic() % 0.2 + 0.005)
        for stream in streams:
            writer.emit(stream, "content", {"text": "x"})
            await asyncio.sleep(0.01)
        # When the first of them comes due
        await asyncio.sleep(0.6)
        await writer.stop()
        await client._client.aclose()
        return client.sent

    # Then all five went out together (40 ms apart at most is within a quarter of flush_s)
    assert asyncio.run(scenario()) == 1
    assert [len(read_events(keys, f"j{i}")) for i in range(5)] == [1] * 5


def test_workers_on_hosts_of_different_clocks_flush_on_the_same_steps_of_redis_clock(
    keys: Keys,
) -> None:
    # Given two workers' writers (a 100 ms grid) on hosts whose monotonic clocks differ, each
    # having measured Redis's clock (Redis's now: 1000.037 s and 500.081 s past theirs)
    writers = []
    for offset in (1000.037, 500.081):
        writer = StreamWriter(
            AsyncRedis.from_url(REDIS_URL), keys, flush_s=0.02, ttl_s=60, max_flush_s=0.5
        )
        writer.clock = RedisClock(monotonic=lambda: 0.0, wall=lambda: 0.0)
        writer.clock.observe(offset, 0.0, 0.0)
        writers.append((writer, offset))
    for redis_now in (2000.01, 2000.05, 2000.123, 2000.199):
        # When each holds text made at the same instant of Redis's clock
        steps = [writer._grid(redis_now - offset) + offset for writer, offset in writers]
        # Then its text comes due on the same step of Redis's clock, the one it was made in
        assert abs(steps[0] - steps[1]) < 1e-6, steps
        assert redis_now - 0.1 < steps[0] <= redis_now + 1e-6
        assert abs(steps[0] * 10 - round(steps[0] * 10)) < 1e-6
    # While a writer without a measurement of Redis's clock keeps to its own monotonic grid
    alone = StreamWriter(
        AsyncRedis.from_url(REDIS_URL), keys, flush_s=0.02, ttl_s=60, max_flush_s=0.5
    )
    assert abs(alone._grid(10.123) - 10.1) < 1e-6


def test_writes_of_an_attempt_that_lost_its_lease_are_refused(keys: Keys) -> None:
    async def scenario() -> tuple[bool, list[str], list[tuple[int, str, object]]]:
        redis_client = AsyncRedis.from_url(REDIS_URL)
        writer = StreamWriter(redis_client, keys, flush_s=0.01, ttl_s=60)
        fenced: list[str] = []
        writer.on_fenced = fenced.append
        writer.start()
        stream = leased(keys, "j1")
        writer.emit(stream, "started", {"attempt": 1}, urgent=True)
        writer.emit(stream, "content", {"text": "mine "})
        await asyncio.wait_for(writer.settle(stream), timeout=2)
        # When another worker takes the lease over (this one was paused past it)
        await redis_client.set(keys.lease("j1"), "token-of-another-worker")
        writer.emit(stream, "content", {"text": "stale"}, urgent=True)
        await asyncio.sleep(0.1)
        ended = await writer.close(stream, {"status": "succeeded", "result": "{}"}, "done", {})
        await writer.stop()
        await redis_client.aclose()
        return ended, fenced, read_events(keys, "j1")

    ended, fenced, events = asyncio.run(scenario())
    # Then nothing written after the takeover reached Redis: no text, no end, no record
    assert events == [(1, "started", {"attempt": 1}), (2, "content", {"text": "mine "})]
    assert ended is False
    assert fenced == ["j1"]
    assert redis.Redis.from_url(REDIS_URL).hget(keys.job("j1"), "status") is None


def test_a_job_redis_refuses_for_good_stops_alone_and_the_jobs_of_its_flushes_go_on(
    keys: Keys,
) -> None:
    async def scenario() -> tuple[list[str], bool, bool, int]:
        redis_client = AsyncRedis.from_url(REDIS_URL)
        writer = StreamWriter(redis_client, keys, flush_s=0.01, ttl_s=60)
        fenced: list[str] = []
        writer.on_fenced = fenced.append
        writer.start()
        # Given three attempts whose writes go out in the same flushes, the middle one with
        # a key of another type where its events stream goes: inside the script, its XADD
        # fails after the first job's were made
        first, bad, last = leased(keys, "j1"), leased(keys, "bad"), leased(keys, "j3")
        await redis_client.set(keys.events("bad"), "not a stream")
        for stream in (first, bad, last):
            writer.emit(stream, "started", {"attempt": 1})
            writer.emit(stream, "content", {"text": "one "})
        writer._urgent.set()
        # When they write on and end
        await asyncio.sleep(0.2)
        for stream in (first, bad, last):
            writer.emit(stream, "content", {"text": "two"}, urgent=True)
        ends = [
            writer.close(s, {"status": "succeeded", "result": "{}"}, "done", {})
            for s in (first, bad, last)
        ]
        good_end, bad_end, last_end = await asyncio.wait_for(asyncio.gather(*ends), 5)
        await writer.stop()
        await redis_client.aclose()
        return fenced, good_end and last_end, bad_end, writer.failed_flushes

    fenced, good_ended, bad_ended, failed = asyncio.run(scenario())
    # Then the other two streams hold each event once, in order, and their ends
    expected = [
        (1, "started", {"attempt": 1}),
        (2, "content", {"text": "one "}),
        (3, "content", {"text": "two"}),
        (4, "done", {}),
    ]
    assert read_events(keys, "j1") == expected
    assert read_events(keys, "j3") == expected
    assert good_ended
    # And the refused job stopped alone, its key untouched, its end not written
    assert fenced == ["bad"] and bad_ended is False
    client = redis.Redis.from_url(REDIS_URL)
    assert client.get(keys.events("bad")) == b"not a stream"
    assert client.hget(keys.job("bad"), "status") is None
    assert failed >= 1


def test_only_errors_that_no_retry_changes_are_refusals_for_good() -> None:
    exceptions = redis.exceptions
    script = "script: 98941c, on @user_script:27."
    pipeline = "Command # 1 (EVALSHA 98941c 4) of pipeline caused error: "
    # Redis refusing for a while, as redis-py raises it alone or in a pipeline: tried again
    for passing in (
        exceptions.ResponseError(f"NOREPLICAS Not enough good replicas to write. {script}"),
        exceptions.ResponseError(f"{pipeline}MASTERDOWN Link with MASTER is down"),
        exceptions.ReadOnlyError(f"{pipeline}You can't write against a read only replica."),
        exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        exceptions.NoScriptError("No matching script. Please use EVAL."),
        exceptions.NoPermissionError("this user has no permissions to run the 'evalsha' command"),
        exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        exceptions.ConnectionError("Connection closed by server."),
        exceptions.TimeoutError("Timeout reading from socket"),
    ):
        assert not refused_for_good(passing), passing
    # An error inside the script, which no retry changes: for good
    for lasting in (
        exceptions.ResponseError(
            f"WRONGTYPE Operation against a key holding the wrong kind of value {script}"
        ),
        exceptions.ResponseError(f"{pipeline}ERR user_script:12: attempt to compare nil"),
    ):
        assert refused_for_good(lasting), lasting


def test_the_flush_sends_its_script_by_digest_and_loads_it_again_after_noscript(
    tmp_path: Path,
) -> None:
    server = LocalRedis.start(tmp_path / "redis")
    keys = Keys("hermes-test:")

    async def scenario() -> tuple[int, int]:
        client = AsyncRedis.from_url(server.url)
        sync = redis.Redis.from_url(server.url)
        writer = StreamWriter(client, keys, flush_s=0.01, ttl_s=60)
        writer.start()
        token = "token-j1"
        await client.set(keys.lease("j1"), token, ex=60)
        stream = JobStream("j1", token=token)
        # Given a writer that has flushed a few times
        for text in ("one ", "two "):
            writer.emit(stream, "content", {"text": text}, urgent=True)
            await asyncio.wait_for(writer.settle(stream), 5)
        # When Redis forgets its scripts (a restart, a new master after a failover)
        await client.script_flush()
        writer.emit(stream, "content", {"text": "three"}, urgent=True)
        await asyncio.wait_for(writer.settle(stream), 5)
        ended = await writer.close(stream, {"status": "succeeded", "result": "{}"}, "done", {})
        assert ended
        await writer.stop()
        await client.aclose()
        stats = sync.info("commandstats")
        sync.close()
        exists = stats.get("cmdstat_script|exists", {}).get("calls", 0)
        loads = stats.get("cmdstat_script|load", {}).get("calls", 0)
        return exists, loads

    try:
        exists, loads = asyncio.run(scenario())
        events = [
            (e.seq, e.type, e.data)
            for e in (
                decode_event(i, f)
                for i, f in redis.Redis.from_url(server.url).xrange(keys.events("j1"))
            )
        ]
    finally:
        server.stop()
    # Then every event is written once, in order, the one refused with NOSCRIPT too
    assert events == [
        (1, "content", {"text": "one "}),
        (2, "content", {"text": "two "}),
        (3, "content", {"text": "three"}),
        (4, "done", {}),
    ]
    # And no flush asked whether the script exists: it was loaded before the first flush
    # and once more after NOSCRIPT
    assert (exists, loads) == (0, 2)
