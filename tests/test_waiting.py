"""Waiting for a result costs a constant number of Redis commands and one connection per
client, whatever the tokens: ``result()`` wakes on the job's ends stream (its submitting
client's own, ``{prefix}ends:{id}``, or the shared ``{prefix}ends``), which every script that
ends a job appends to, not on the job's event stream. Real Redis, a real ``hermes-worker run
--engine scripted`` process; one test (marked ``engine``) on the session's vLLM worker.
tests/test_ends_streams.py shows where each end goes, and whom it wakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from worker_fixtures import (
    WorkerProcess,
    clean_redis,
    patient_redis,
    running_scripted_worker,
    unique_settings,
)

import producers.client as client_module
from hermes_worker.contract.jobs import JobStatus
from hermes_worker.contract.store import Keys, async_client
from hermes_worker.settings import Settings
from hermes_worker.testing.scripted_engine import SCRIPT_KEY
from producers.client import AsyncHermesClient, HermesClient

STORY = "Once upon a time a queue met an engine, and they streamed happily ever after."
# Fast enough for short tests, slow enough that a job's stream gets a write every few tokens.
TOKENS_PER_S = "100"


def job(max_tokens: int) -> dict[str, Any]:
    """A scripted job that generates exactly ``max_tokens`` tokens."""
    return {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "metadata": {SCRIPT_KEY: json.dumps({"text": STORY})},
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }


@pytest.fixture(scope="module")
def scripted(
    test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A scripted worker that writes a job's stream every few tokens and runs 256 jobs at once."""
    log_path = tmp_path_factory.mktemp("waiting-worker") / "worker.log"
    with running_scripted_worker(
        test_model_dir,
        log_path,
        TOKENS_PER_S,
        HERMES_STREAM_FLUSH_MS="10",
        HERMES_STREAM_MIN_TOKENS="1",
        HERMES_CONCURRENCY="256",
        HERMES_MAX_NUM_SEQS="256",
    ) as process:
        yield process


class CountingAsyncRedis(AsyncRedis):
    """An asyncio client that counts the commands it sends, those in pipelines included."""

    commands = 0

    def count(self, args: tuple[Any, ...]) -> None:
        self.commands += 1

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.count(args)
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        stage = pipe.pipeline_execute_command

        def counted(*args: Any, **options: Any) -> Any:
            self.count(args)
            return stage(*args, **options)

        pipe.pipeline_execute_command = counted  # type: ignore[method-assign]
        return pipe


class CountingRedis(redis.Redis):
    commands = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def checks_within(elapsed: float) -> int:
    """How many periodic checks of its record a waiter makes in ``elapsed`` seconds."""
    done, total = 0, 0.0
    for wait_s in client_module.end_checks():
        total += wait_s
        if total > elapsed:
            return done
        done += 1
    return done


def stream_entries(settings: Settings, job_ids: list[str]) -> int:
    keys, r = Keys(settings.key_prefix), patient_redis(settings.redis_url)
    return sum(int(r.xlen(keys.events(job_id))) for job_id in job_ids)


def test_an_async_result_wait_wakes_once_per_job_not_per_token(scripted: WorkerProcess) -> None:
    settings = scripted.settings

    async def scenario() -> tuple[list[Any], int, int, float, str]:
        counting = CountingAsyncRedis.from_url(settings.redis_url)
        async with AsyncHermesClient(settings, redis=counting) as client:
            # Given 8 jobs of 200 tokens, each streamed in many writes
            handles = [await client.submit(job(200)) for _ in range(8)]
            commands, reads, start = counting.commands, client.hub.reads, time.monotonic()
            # When the producer awaits every result, without reading a stream
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            elapsed = time.monotonic() - start
            spent = counting.commands - commands, client.hub.reads - reads
        await counting.aclose()
        return results, *spent, elapsed, client.ends_key

    results, commands, reads, elapsed, ends_key = asyncio.run(scenario())
    # Then each job ran its 200 tokens in many stream writes (what a stream reader wakes on)
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results)
    assert all(r.usage is not None and r.usage.completion_tokens == 200 for r in results)
    writes = stream_entries(settings, [r.id for r in results])
    assert writes >= 8 * 20
    # But the waits woke once per job at most: one shared XREAD per batch of ends (plus one
    # per quiet 2 s), and a few commands a job (its record checked before and after, and
    # now and then: end_checks)
    assert reads <= 8 + 2 + elapsed / client_module.BLOCK_CHUNK_S
    assert commands <= 8 * (3 + checks_within(elapsed)) + reads + 1, (commands, writes)
    # And every end is on the client's own ends stream, written with the result
    ends = patient_redis(settings.redis_url).xrange(ends_key)
    assert {r.id for r in results} <= {fields[b"id"].decode() for _, fields in ends}


def test_a_blocking_result_wait_wakes_once_per_job_from_many_threads(
    scripted: WorkerProcess,
) -> None:
    settings = scripted.settings
    counting = CountingRedis.from_url(settings.redis_url)
    assert isinstance(counting, CountingRedis)
    with HermesClient(settings, redis=counting) as client:
        # Given 8 jobs of 200 tokens
        handles = [client.submit(job(200)) for _ in range(8)]
        commands, start = counting.commands, time.monotonic()
        # When 8 threads each wait for one result
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda h: h.result(timeout=60), handles))
        elapsed = time.monotonic() - start
        commands, reads = counting.commands - commands, client.ends.reads
    counting.close()
    # Then they shared one reader, woken once per end, and a few commands a job
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results)
    assert stream_entries(settings, [r.id for r in results]) >= 8 * 20
    assert reads <= 8 + 2 + elapsed / client_module.BLOCK_CHUNK_S
    assert commands <= 8 * (3 + checks_within(elapsed)) + reads + 1


def blocked_connections(settings: Settings, name: str) -> tuple[int, int]:
    """(connections named ``name``, those blocked in a command) from CLIENT LIST."""
    listed = patient_redis(settings.redis_url).client_list()
    mine = [c for c in listed if c.get("name") == name]
    return len(mine), sum(1 for c in mine if "b" in c.get("flags", ""))


def test_two_hundred_waiters_share_one_blocking_connection(scripted: WorkerProcess) -> None:
    settings = scripted.settings
    name = f"waiting-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[list[Any], list[tuple[int, int]], int, int]:
        redis_client = async_client(f"{settings.redis_url}?client_name={name}")
        async with AsyncHermesClient(settings, redis=redis_client) as client:
            # Given 200 jobs of 4 s each (400 tokens at 100/s), all running at once
            handles = [await client.submit(job(400)) for _ in range(200)]
            # When 200 requests await their results
            waits = [asyncio.create_task(h.result(timeout=120)) for h in handles]
            seen, most = [], 0
            while not all(w.done() for w in waits):
                await asyncio.sleep(0.1)
                waiting = client.hub.end_waits
                most = max(most, waiting)
                if waiting >= len(waits) // 2:  # most waits are registered, none ended
                    seen.append(await asyncio.to_thread(blocked_connections, settings, name))
            results = await asyncio.gather(*waits)
            reads = client.hub.reads
        await redis_client.aclose()
        return results, seen, reads, most

    results, seen, reads, most = asyncio.run(scenario())
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results)
    # Then, while a hundred or more waited at once, one connection at most was blocked (the
    # hub's XREAD; none for the moment between two reads), and the client held no more
    # connections than its pool's bound
    assert most >= 100 and seen, f"at most {most} waits registered at once"
    assert all(blocked <= 1 for _, blocked in seen) and any(b == 1 for _, b in seen), seen
    assert all(total <= 64 for total, _ in seen), seen
    assert reads <= 200 + 10


def test_an_end_written_before_the_wait_began_is_seen_at_once(scripted: WorkerProcess) -> None:
    settings = scripted.settings
    with HermesClient(settings) as client:
        # Given a job that has ended
        handle = client.submit(job(5))
        handle.result(timeout=30)
    counting = CountingRedis.from_url(settings.redis_url)
    assert isinstance(counting, CountingRedis)
    with HermesClient(settings, redis=counting) as fresh:
        # When another client, that never watched the ends stream, awaits its result
        start = time.monotonic()
        result = fresh.job(handle.id).result(timeout=30)
        elapsed = time.monotonic() - start
        # Then it comes at once, from one read of the record
        assert result.job.status is JobStatus.SUCCEEDED
        assert elapsed < 0.5
        assert counting.commands == 1 and fresh.ends.reads == 0
    counting.close()


def end_by_hand(r: redis.Redis, settings: Settings, job_id: str, *, trimmed: bool) -> None:
    """End a queued job: its result and terminal event, and either no notification (as a
    worker older than the ends stream does) or one trimmed away in the same transaction (as
    a reader that lagged more than ENDS_MAXLEN ends behind loses it), on the job's ends
    stream (the one its record names)."""
    keys = Keys(settings.key_prefix)
    ends = keys.end_stream(r.hget(keys.job(job_id), "ends"))
    result = {
        "id": job_id,
        "created": int(time.time()),
        "model": "hermes-4",
        "choices": [],
        "job": {"id": job_id, "status": "succeeded", "attempts": 1},
    }
    with r.pipeline(transaction=True) as pipe:
        pipe.hset(keys.job(job_id), mapping={"status": "succeeded", "result": json.dumps(result)})
        pipe.xadd(keys.events(job_id), {"seq": "1", "type": "done", "data": "{}"})
        if trimmed:
            pipe.xadd(ends, {"id": job_id})
            pipe.xtrim(ends, maxlen=0)
        pipe.execute()


@pytest.fixture
def idle_deployment() -> Iterator[Settings]:
    """A deployment no worker serves: its jobs stay queued until a test ends them."""
    settings = unique_settings()
    yield settings
    clean_redis(settings)


def test_a_missed_notification_is_found_by_the_periodic_check(
    idle_deployment: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = idle_deployment
    monkeypatch.setattr(client_module, "END_CHECK_S", 0.5)
    r = patient_redis(settings.redis_url)

    async def scenario() -> tuple[Any, float, int]:
        async with AsyncHermesClient(settings) as client:
            # Given a queued job whose result a producer awaits
            handle = await client.submit(job(5))
            wait = asyncio.create_task(handle.result(timeout=20))
            await asyncio.sleep(0.2)
            # When it ends without a notification on an ends stream
            start = time.monotonic()
            await asyncio.to_thread(end_by_hand, r, settings, handle.id, trimmed=False)
            result = await wait
            keys = Keys(settings.key_prefix)
            ends = int(r.xlen(keys.ends)) + int(r.xlen(client.ends_key))
            return result, time.monotonic() - start, ends

    result, elapsed, ends = asyncio.run(scenario())
    # Then the wait still ends, at its next check of the record
    assert ends == 0
    assert result.job.status is JobStatus.SUCCEEDED
    assert elapsed < 0.5 + 1.5


def test_a_blocking_wait_finds_a_trimmed_notification_by_the_periodic_check(
    idle_deployment: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = idle_deployment
    monkeypatch.setattr(client_module, "END_CHECK_S", 0.5)
    r = patient_redis(settings.redis_url)
    keys = Keys(settings.key_prefix)
    with HermesClient(settings) as client:
        # Given a queued job whose result a thread awaits
        handle = client.submit(job(5))
        box: list[Any] = []
        waiter = threading.Thread(target=lambda: box.append(handle.result(timeout=20)))
        waiter.start()
        time.sleep(0.2)
        # When the job ends and its notification is trimmed away before it could be read
        start = time.monotonic()
        end_by_hand(r, settings, handle.id, trimmed=True)
        waiter.join(20)
        elapsed = time.monotonic() - start
    # Then the wait still ends, at its next check of the record
    assert int(r.xlen(client.ends_key)) == 0 and int(r.xlen(keys.ends)) == 0
    assert box and box[0].job.status is JobStatus.SUCCEEDED
    assert elapsed < 0.5 + 1.5


def test_a_cancel_of_a_queued_job_wakes_its_waiter_at_once(idle_deployment: Settings) -> None:
    settings = idle_deployment

    async def scenario() -> tuple[Any, float]:
        async with AsyncHermesClient(settings) as client:
            # Given a queued job whose result a producer awaits
            handle = await client.submit(job(5))
            wait = asyncio.create_task(handle.result(timeout=20))
            await asyncio.sleep(0.3)
            # When another producer cancels it
            start = time.monotonic()
            with HermesClient(settings) as other:
                assert other.job(handle.id).cancel() == "cancelled"
            result = await wait
            return result, time.monotonic() - start

    result, elapsed = asyncio.run(scenario())
    # Then the wait ends on the cancel's notification, well before a periodic check
    assert result.job.status is JobStatus.CANCELLED
    assert elapsed < client_module.END_CHECK_S / 2


class HmgetCountingAsyncRedis(CountingAsyncRedis):
    """An asyncio client that counts the HMGETs it sends, those in pipelines included."""

    hmgets = 0

    def count(self, args: tuple[Any, ...]) -> None:
        self.hmgets += args[0] == "HMGET"


class HmgetCountingRedis(redis.Redis):
    hmgets = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.hmgets += args[0] == "HMGET"
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def test_a_wait_on_a_job_just_submitted_reads_its_record_once_then_the_job_of_another_twice(
    idle_deployment: Settings,
) -> None:
    settings = idle_deployment

    async def scenario() -> tuple[int, int, JobStatus]:
        counting = HmgetCountingAsyncRedis.from_url(settings.redis_url)
        async with AsyncHermesClient(settings, redis=counting) as client:
            # Given a job this client has just submitted, which stays queued
            handle = await client.submit(job(5))
            # When it awaits its result, which does not come within the wait
            with pytest.raises(TimeoutError):
                await handle.result(timeout=0.5)
            fresh = counting.hmgets
            # And then awaits it again through a handle it did not submit with
            with pytest.raises(TimeoutError):
                await client.job(handle.id).result(timeout=0.5)
            again = counting.hmgets - fresh
            # (and the job, cancelled now, ends the wait through the fresh handle's path)
            other = await client.submit(job(5))
            wait = asyncio.create_task(other.result(timeout=10))
            await asyncio.sleep(0.2)
            assert await client.job(other.id).cancel() == "cancelled"
            status = (await wait).job.status
        await counting.aclose()
        return fresh, again, status

    fresh, again, status = asyncio.run(scenario())
    # Then the fresh handle watched its own ends stream before its first read of the record
    # (the job could not have ended before it was queued): one read fewer than another
    # handle's, which reads it, watches, and reads it again (both read it once more when
    # their wait timed out)
    assert again == fresh + 1 and fresh <= 2, (fresh, again)
    assert status is JobStatus.CANCELLED
    # And so does the blocking client
    counting = HmgetCountingRedis.from_url(settings.redis_url)
    assert isinstance(counting, HmgetCountingRedis)
    with HermesClient(settings, redis=counting) as client:
        handle = client.submit(job(5))
        with pytest.raises(TimeoutError):
            handle.result(timeout=0.5)
        assert counting.hmgets == fresh
    counting.close()


def test_a_job_submitted_while_its_ends_stream_is_read_is_awaited_without_a_record_read(
    idle_deployment: Settings,
) -> None:
    settings = idle_deployment

    async def scenario() -> dict[str, Any]:
        counting = HmgetCountingAsyncRedis.from_url(settings.redis_url)
        async with AsyncHermesClient(settings, redis=counting) as client:
            # Given a client whose hub reads its ends stream (a wait on a queued job)
            first = await client.submit(job(5))
            keep = asyncio.create_task(first.result(timeout=10))
            await asyncio.sleep(0.2)
            # When it submits a job and awaits it, which stays queued through the wait
            before = counting.hmgets
            waited = await client.submit(job(5))
            with pytest.raises(TimeoutError):
                await waited.result(timeout=0.5)
            quiet = counting.hmgets - before
            # And submits one that ends (cancelled) before its wait begins, its end read
            # by the hub with no waiter yet
            early = await client.submit(job(5))
            assert await client.job(early.id).cancel() == "cancelled"
            await asyncio.sleep(0.3)
            start = time.monotonic()
            early_status = (await early.result(timeout=10)).job.status
            early_s = time.monotonic() - start
            # And submits one that ends while it is awaited
            late = await client.submit(job(5))
            wait = asyncio.create_task(late.result(timeout=10))
            await asyncio.sleep(0.2)
            start = time.monotonic()
            assert await client.job(late.id).cancel() == "cancelled"
            late_status = (await wait).job.status
            late_s = time.monotonic() - start
            keep.cancel()
        await counting.aclose()
        return {
            "quiet": quiet,
            "early": (early_status, early_s),
            "late": (late_status, late_s),
        }

    seen = asyncio.run(scenario())
    # Then the wait on the queued job read its record once only, when it timed out: its
    # end could only come after the submit, on a stream the hub read since before it
    assert seen["quiet"] == 1
    # And the job whose end the hub had read already was found at once, by a read of its
    # record (not at a periodic check, a second or more later)
    assert seen["early"][0] is JobStatus.CANCELLED and seen["early"][1] < 0.5
    # And the one that ended while awaited woke its waiter at once
    assert seen["late"][0] is JobStatus.CANCELLED and seen["late"][1] < 0.5
    # And the blocking client does the same
    counting = HmgetCountingRedis.from_url(settings.redis_url)
    assert isinstance(counting, HmgetCountingRedis)
    with HermesClient(settings, redis=counting) as client:
        first = client.submit(job(5))
        waiting = threading.Thread(target=_timing_out, args=(first, 3.0), daemon=True)
        waiting.start()
        time.sleep(0.3)
        before = counting.hmgets
        with pytest.raises(TimeoutError):
            client.submit(job(5)).result(timeout=0.5)
        assert counting.hmgets - before == 1
        early = client.submit(job(5))
        assert client.job(early.id).cancel() == "cancelled"
        time.sleep(0.3)
        start = time.monotonic()
        assert early.result(timeout=10).job.status is JobStatus.CANCELLED
        assert time.monotonic() - start < 0.5
        waiting.join()
    counting.close()


def _timing_out(handle: Any, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        handle.result(timeout=timeout)


def test_result_waiters_of_one_client_read_their_records_together(
    idle_deployment: Settings,
) -> None:
    settings = idle_deployment

    async def scenario() -> tuple[int, int, list[Any]]:
        counting = HmgetCountingAsyncRedis.from_url(settings.redis_url)
        async with AsyncHermesClient(settings, redis=counting) as client:
            # Given 20 jobs that stay queued, each awaited (through a handle not from this
            # submit), the waits begun and their ends stream watched
            ids = [(await client.submit(job(5))).id for _ in range(20)]
            waits = (client.job(job_id).result(timeout=3.5) for job_id in ids)
            outcomes = asyncio.gather(*waits, return_exceptions=True)
            await asyncio.sleep(1.5)
            hmgets, pipelines = counting.hmgets, client.records.pipelines
            # When they check their records on the grid, then once more at their deadline
            done = await outcomes
            spent = counting.hmgets - hmgets, client.records.pipelines - pipelines
        await counting.aclose()
        return *spent, done

    hmgets, pipelines, outcomes = asyncio.run(scenario())
    # Then each read its record twice or more, and timed out
    assert all(isinstance(outcome, TimeoutError) for outcome in outcomes)
    assert hmgets >= 20 * 2
    # And the 20 waiters made those reads together: a round trip for all of them each time
    # (two when the grid's step fell among their starts)
    assert pipelines <= 4, (hmgets, pipelines)


def test_a_waiters_checks_fall_on_the_grid_never_sooner_than_due() -> None:
    grid = client_module.END_CHECK_GRID_S
    for now in (100.0, 100.2, 100.999, 101.0):
        for wait_s in (2.0, 6.0, 30.0):
            stretched = client_module.on_check_grid(wait_s, now)
            assert wait_s < stretched <= wait_s + grid
            assert abs((now + stretched) / grid - round((now + stretched) / grid)) < 1e-6


# --- the real engine ---------------------------------------------------------------------------


@pytest.mark.engine
def test_real_engine_jobs_wake_their_waiters_once_and_a_cancel_ends_a_running_one(
    worker: WorkerProcess,
) -> None:
    """The session's vLLM worker (tests/worker_fixtures.py): its ends reach the ends stream,
    a cancelled running job's too."""
    settings = worker.settings
    ask = {"messages": [{"role": "user", "content": "Tell me a story."}], "ignore_eos": True}

    async def scenario() -> tuple[list[Any], int, float, Any, float, str]:
        async with AsyncHermesClient(settings, redis=patient_async(settings)) as client:
            # Given 4 jobs of 96 tokens on the real engine
            handles = [await client.submit({**ask, "max_tokens": 96}) for _ in range(4)]
            reads, start = client.hub.reads, time.monotonic()
            # When the producer awaits their results
            results = await asyncio.gather(*(h.result(timeout=300) for h in handles))
            reads, elapsed = client.hub.reads - reads, time.monotonic() - start
            # And awaits a long job that another producer cancels once it runs
            long = await client.submit({**ask, "max_tokens": 1500})
            wait = asyncio.create_task(long.result(timeout=300))
            while (await long.status()).status is not JobStatus.RUNNING:
                await asyncio.sleep(0.05)
            cancelled_at = time.monotonic()
            with HermesClient(settings) as other:
                assert other.job(long.id).cancel() == "cancelling"
            ended = await wait
            cancel_s = time.monotonic() - cancelled_at
            return results, reads, elapsed, ended, cancel_s, client.ends_key

    results, reads, elapsed, cancelled, cancel_s, ends_key = asyncio.run(scenario())
    # Then each job ran, and the waits woke about once per job, not once per stream write
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results), results
    assert all(r.usage is not None and r.usage.completion_tokens == 96 for r in results)
    assert reads <= 4 + 2 + elapsed / client_module.BLOCK_CHUNK_S
    # And the cancelled job's end, written by the worker, woke its waiter well before a
    # periodic check would have
    assert cancelled.job.status is JobStatus.CANCELLED
    assert cancel_s < client_module.END_CHECK_S
    # And every end, the cancelled job's too, is on the submitting client's ends stream
    ends = {f[b"id"].decode() for _, f in patient_redis(settings.redis_url).xrange(ends_key)}
    assert {r.id for r in results} | {cancelled.id} <= ends


def patient_async(settings: Settings) -> AsyncRedis:
    """An asyncio client that waits out a Redis starved of CPU beside the engine."""
    return AsyncRedis.from_url(settings.redis_url, socket_timeout=60, socket_connect_timeout=60)
