"""Redis that loses or refuses data: every job ends in a state its producer can see (a
result, or a clear error), none is silently lost, and no producer hangs.

First in-process: producers waiting on a job whose record Redis loses, or across a Redis
restart, and the worker's retry path when Redis refuses the write. Then one private
``redis-server`` without persistence and one scripted worker process (``--engine
scripted``: no model runs, a job takes about a second) serve the rest, in order: a restart
that loses everything mid-load, then a ``maxmemory`` that Redis reaches (``noeviction``)
while jobs are claimed, streamed, ended and retried.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import Reject, Retry
from test_client import Worker
from worker_fixtures import WorkerProcess, scripted_args, start_worker, stop_worker, wait_ready

from hermes_worker.cli.services import LocalRedis
from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.contract.store import Keys, decode_event, sync_client
from hermes_worker.errors import JobLost
from hermes_worker.settings import Settings
from hermes_worker.testing.scripted_engine import SCRIPT_KEY
from hermes_worker.worker import main as worker_main
from producers.client import BLOCK_CHUNK_S, AsyncHermesClient, HermesClient

STORY = "Once upon a time a queue met an engine, and they streamed happily ever after."
TOKENS_PER_S = 40
LEASE_TTL_S = 3.0
VISIBILITY_S = 5
RESULT_TTL_S = 5
WAIT_S = 45.0  # no producer waits longer than this: past it, it hung
TERMINAL = ("done", "error", "cancelled")


@pytest.fixture(scope="module")
def lossy_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """No append-only file, no snapshots: a restart loses everything."""
    server = LocalRedis.start(tmp_path_factory.mktemp("lossy-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(
    lossy_redis: LocalRedis, test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    settings = Settings(
        redis_url=lossy_redis.url,
        key_prefix="dl:",
        queue_name="dl",
        result_ttl_s=RESULT_TTL_S,
        lease_ttl_s=LEASE_TTL_S,
        visibility_timeout_s=VISIBILITY_S,
    )
    process = start_worker(
        settings,
        test_model_dir,
        tmp_path_factory.mktemp("lossy-worker") / "worker.log",
        cli_args=scripted_args(TOKENS_PER_S),
        HERMES_CONCURRENCY="4",
        HERMES_LEASE_TTL_S=str(LEASE_TTL_S),
        HERMES_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        HERMES_RESULT_TTL_S=str(RESULT_TTL_S),
    )
    try:
        wait_ready(process, timeout=120)
        yield process
    finally:
        stop_worker(process)


def assert_alive(worker: WorkerProcess) -> None:
    """Fail at once, not at a timeout, when the worker has stopped serving."""
    log = worker.log()
    assert worker.process.poll() is None and "Unrecoverable error" not in log, log[-3000:]


@pytest.fixture
def live_worker(worker: WorkerProcess) -> WorkerProcess:
    """The module's worker, failing the test at once if an earlier one ended it."""
    assert_alive(worker)
    return worker


def job(tokens: int = 40, padding: int = 0, **script: Any) -> dict[str, Any]:
    """A scripted job of ``tokens`` tokens (40: about a second at the worker's rate);
    ``padding`` KiB of metadata make its record and message bigger, not its prompt."""
    metadata = {SCRIPT_KEY: json.dumps({"text": STORY, **script})}
    for n in range(min(padding * 2, 15)):
        metadata[f"pad{n}"] = "x" * 500
    return {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "metadata": metadata,
    }


def outcome(wait: Callable[[], JobResult]) -> str:
    """How a producer's wait ended: ``succeeded`` (or another status), ``lost`` (a clear
    JobLost), ``hung`` (it timed out) or the error it raised."""
    try:
        return wait().job.status.value
    except JobLost:
        return "lost"
    except TimeoutError:
        return "hung"
    except Exception as exc:  # any other clear error, by name
        return f"error:{type(exc).__name__}"


def async_waits(settings: Settings, ids: list[str], started: threading.Event) -> list[str]:
    """The asyncio client's result() for each id, all at once on one loop (its hub)."""

    async def main() -> list[str]:
        async with AsyncHermesClient(settings) as client:
            handles = [client.job(job_id) for job_id in ids]
            for handle in handles:
                await handle.status()  # seen now
            started.set()

            async def one(handle: Any) -> str:
                try:
                    return (await handle.result(timeout=WAIT_S)).job.status.value
                except JobLost:
                    return "lost"
                except TimeoutError:
                    return "hung"
                except Exception as exc:
                    return f"error:{type(exc).__name__}"

            return list(await asyncio.gather(*(one(h) for h in handles)))

    return asyncio.run(main())


def events_of(r: redis.Redis, keys: Keys, job_id: str) -> list[str]:
    return [decode_event(i, f).type for i, f in r.xrange(keys.events(job_id))]


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- producers: a record that vanishes, a Redis that restarts (in-process) --------------------


def lose_keys(r: redis.Redis, settings: Settings, *job_ids: str) -> None:
    """What an eviction or a restart without persistence does to jobs."""
    keys = Keys(settings.key_prefix)
    r.delete(*(k for j in job_ids for k in (keys.job(j), keys.events(j), keys.lease(j))))


def test_a_wait_on_a_record_redis_lost_ends_with_job_lost(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    with HermesClient(hermes_settings) as client, ThreadPoolExecutor(8) as pool:
        # Given a running job and a queued one, waited on for their results and streams,
        # by the handles submit gave and by a handle made from the id alone
        running, queued = client.submit(job()), client.submit(job())
        worker = Worker(redis_client, hermes_settings, running.id)
        worker.record(status="running", attempts=1, started_at=time.time())
        worker.emit("started", {"attempt": 1})
        waits = [
            pool.submit(outcome, lambda: running.result(timeout=WAIT_S)),
            pool.submit(outcome, lambda: queued.result(timeout=WAIT_S)),
            pool.submit(outcome, lambda: client.job(queued.id).result(timeout=WAIT_S)),
        ]

        def streamed(handle: Any) -> JobResult:
            list(handle.stream(timeout=WAIT_S))
            raise AssertionError("the stream ended without a terminal event")

        waits += [pool.submit(outcome, lambda h=h: streamed(h)) for h in (running, queued)]
        time.sleep(0.5)
        # When Redis loses their keys (evicted, or restarted without persistence)
        lose_keys(redis_client, hermes_settings, running.id, queued.id)
        start = time.monotonic()
        # Then every wait ends with JobLost, within one blocking read, not at its timeout
        assert [w.result(timeout=WAIT_S) for w in waits] == ["lost"] * len(waits)
        assert time.monotonic() - start < BLOCK_CHUNK_S + 2
        # And an id never seen with a record is still waited for (a plain Celery client's job)
        assert outcome(lambda: client.job("never-recorded").result(timeout=0.5)) == "hung"


def test_an_asyncio_wait_on_a_record_redis_lost_ends_with_job_lost(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    async def main() -> list[str]:
        async with AsyncHermesClient(hermes_settings) as client:
            running, queued = await client.submit(job()), await client.submit(job())
            Worker(redis_client, hermes_settings, running.id).emit("started", {"attempt": 1})

            async def streamed(handle: Any) -> str:
                try:
                    async for _ in handle.stream(timeout=WAIT_S):
                        pass
                except JobLost:
                    return "lost"
                return "ended"

            async def result(handle: Any) -> str:
                try:
                    await handle.result(timeout=WAIT_S)
                except JobLost:
                    return "lost"
                return "ended"

            waits = [
                asyncio.create_task(w)
                for w in (streamed(running), streamed(queued), result(running), result(queued))
            ]
            await asyncio.sleep(0.5)
            lose_keys(redis_client, hermes_settings, running.id, queued.id)
            return list(await asyncio.wait_for(asyncio.gather(*waits), BLOCK_CHUNK_S + 2))

    assert asyncio.run(main()) == ["lost"] * 4


@pytest.mark.parametrize("append_only", [True, False], ids=["aof", "no-persistence"])
def test_a_wait_rides_out_a_redis_restart(tmp_path: Path, append_only: bool) -> None:
    server = LocalRedis.start(tmp_path / "redis", append_only=append_only)
    settings = Settings(redis_url=server.url, key_prefix="rs:", queue_name="rs")
    r = redis.Redis.from_url(server.url)
    try:
        with HermesClient(settings) as client, ThreadPoolExecutor(2) as pool:
            # Given a producer waiting on a running job, blocking and with asyncio
            handle = client.submit(job())
            Worker(r, settings, handle.id).record(status="running", attempts=1)
            ready = threading.Event()
            waits = [
                pool.submit(outcome, lambda: handle.result(timeout=WAIT_S)),
                pool.submit(async_waits, settings, [handle.id], ready),
            ]
            assert ready.wait(10)
            time.sleep(0.3)
            # When Redis restarts under it (its connections closed, refused for a moment)
            server.stop()
            time.sleep(0.5)
            server.run()
            start = time.monotonic()
            if append_only:
                # Then, with its data kept, the wait goes on and gets the result
                Worker(r, settings, handle.id).finish()
                expected = "succeeded"
            else:
                # Then, with its data gone, the wait ends with JobLost
                expected = "lost"
            assert waits[0].result(timeout=WAIT_S) == expected
            assert waits[1].result(timeout=WAIT_S) == [expected]
            assert time.monotonic() - start < BLOCK_CHUNK_S + 3
    finally:
        r.close()
        server.stop()


# --- the worker: a retry Redis refuses (in-process) ----------------------------------------------


def test_a_retry_or_dead_letter_redis_refuses_is_written_again_not_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_main, "REFUSED_PAUSE_S", 0.01)
    refusals = iter([Reject("OOM", requeue=False), redis.exceptions.OutOfMemoryError("OOM")])
    tries: list[int] = []

    def send() -> None:  # refused twice (as Celery and redis-py say it), then sent
        tries.append(1)
        error = next(refusals, None)
        raise error if error is not None else Retry()

    # Given a write Redis refuses twice, When the worker makes it, Then it is made again
    # until it goes through (Celery's Retry: the delivery is acknowledged then)
    with pytest.raises(Retry):
        worker_main._while_redis_refuses("j1", "its retry", send, patience_s=10)
    assert len(tries) == 3

    def refused() -> None:
        raise Reject("OOM", requeue=False)

    # And once out of patience the delivery is rejected with requeue: never deleted
    with pytest.raises(Reject) as kept:
        worker_main._while_redis_refuses("j1", "its retry", refused, patience_s=0)
    assert kept.value.requeue is True


# --- a restart that loses everything -----------------------------------------------------------


def test_a_restart_without_persistence_mid_load_ends_every_wait(
    worker: WorkerProcess, lossy_redis: LocalRedis
) -> None:
    settings = worker.settings
    keys = Keys(settings.key_prefix)
    r = redis.Redis.from_url(settings.redis_url)
    # The worker said at start that this Redis keeps nothing across a restart
    assert "redis check: persistence: would lose jobs: none" in worker.log()
    with HermesClient(settings) as client, ThreadPoolExecutor(16) as pool:
        # Given 12 jobs of about a second on a worker that runs 4 at once, waited on by
        # blocking producers (result and stream) and by one asyncio client
        handles = [client.submit(job()) for _ in range(12)]
        waits: dict[str, Future[str]] = {}
        for handle in handles[:6]:
            waits[handle.id] = pool.submit(outcome, lambda h=handle: h.result(timeout=WAIT_S))
        for handle in handles[6:8]:

            def streamed(h: Any = handle) -> JobResult:
                list(h.stream(timeout=WAIT_S))
                return h.result(timeout=WAIT_S)

            waits[handle.id] = pool.submit(outcome, streamed)
        async_ids = [h.id for h in handles[8:]]
        async_ready = threading.Event()
        async_outcomes = pool.submit(async_waits, settings, async_ids, async_ready)
        assert async_ready.wait(20)
        # When Redis restarts without its data while some jobs run and the rest wait
        wait_until(lambda: sum(r.exists(keys.lease(h.id)) for h in handles) >= 2, 20, "jobs")
        lossy_redis.stop()
        lossy_redis.run()
        restarted = time.monotonic()
        # Then every producer's wait ends, with the result or with JobLost: none hangs
        ends = {job_id: future.result(timeout=WAIT_S + 10) for job_id, future in waits.items()}
        ends.update(zip(async_ids, async_outcomes.result(timeout=WAIT_S + 10), strict=True))
        took = time.monotonic() - restarted
        tally = Counter(ends.values())
        assert set(tally) <= {"succeeded", "lost"}, tally
        assert tally["lost"] >= 1, tally  # the jobs that were only queued are gone
        assert took < 20, f"the waits took {took:.1f} s after the restart: {tally}"
        lost = [job_id for job_id, end in ends.items() if end == "lost"]
        # And the worker, full (4 jobs of 4) when Redis restarted, serves on once it has
        # reconnected and handed back the jobs it held (a few seconds). One test, not two:
        # xdist may run a module's tests in different processes, each with its own Redis.
        time.sleep(3)
        assert_alive(worker)
        # A lost job submitted again under its id runs (or, when the worker still held a
        # copy that has run it meanwhile, the submit finds that job), as does a new one
        again = client.submit({**job(), "id": lost[0]})
        assert again.result(timeout=15).job.status is JobStatus.SUCCEEDED
        assert client.submit(job()).result(timeout=15).job.status is JobStatus.SUCCEEDED
    r.close()


# --- a full Redis under noeviction ---------------------------------------------------------------


class MemoryCap:
    """A small ``maxmemory`` under ``noeviction``, and a switch that makes Redis refuse
    every write that needs memory (``maxmemory`` below what it holds) and back."""

    def __init__(self, r: redis.Redis, limit: int) -> None:
        self.r = r
        self.limit = limit
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", limit)

    def fill(self) -> None:
        """Full: writes refused with OOM, nothing evicted."""
        self.r.config_set("maxmemory", 1)

    def release(self) -> None:
        self.r.config_set("maxmemory", self.limit)

    def refusing(self) -> bool:
        try:
            self.r.set("probe", "1")
        except redis.exceptions.OutOfMemoryError:
            return True
        self.r.delete("probe")
        return False


@pytest.fixture
def capped(live_worker: WorkerProcess) -> Iterator[MemoryCap]:
    """maxmemory 4 MiB over what the server holds now, noeviction."""
    r = redis.Redis.from_url(live_worker.settings.redis_url)
    cap = MemoryCap(r, int(r.info("memory")["used_memory"]) + (4 << 20))
    yield cap
    r.config_set("maxmemory", 0)
    r.close()


def unacked_copies(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """The job's messages in kombu's unacknowledged hash (delivered, not acked)."""
    found = []
    for raw in r.hvals("unacked"):
        message = json.loads(raw)[0]
        if message["headers"]["id"] == job_id:
            found.append(message)
    return found


def test_a_retry_redis_refuses_is_kept_not_dropped(
    worker: WorkerProcess, capped: MemoryCap
) -> None:
    settings = worker.settings
    keys = Keys(settings.key_prefix)
    r = capped.r
    with HermesClient(settings) as client:
        # Given a job whose first attempt fails (a transient engine error): Celery sends
        # its retry, which the worker takes at once and holds until its countdown (1 s)
        handle = client.submit(job(fail_after=2, attempts=1))
        wait_until(
            lambda: any(m["headers"].get("retries") for m in unacked_copies(r, handle.id)),
            20,
            "the retry's delivery",
        )
        # When Redis refuses writes as the retry is due: its claim fails, and so does the
        # next retry Celery tries to send
        capped.fill()
        assert capped.refusing()
        time.sleep(5)
        # Then its message is still there, unacknowledged, for a redelivery (Celery drops a
        # message whose retry it could not send)
        assert unacked_copies(r, handle.id), worker.log()[-3000:]
        # And once Redis takes writes again, the job runs and succeeds, ended once
        capped.release()
        result = outcome(lambda: handle.result(timeout=WAIT_S))
        assert result == "succeeded", worker.log()[-3000:]
        assert events_of(r, keys, handle.id).count("done") == 1


def test_a_job_that_ends_while_redis_is_full_still_writes_its_end(
    worker: WorkerProcess, capped: MemoryCap
) -> None:
    settings = worker.settings
    keys = Keys(settings.key_prefix)
    r = capped.r
    with HermesClient(settings) as client:
        # Given a job of about a second, running
        handle = client.submit(job())
        wait_until(lambda: r.exists(keys.lease(handle.id)), 20, "the job to start")
        # When Redis is full (noeviction) through its end
        capped.fill()
        try:
            assert capped.refusing()
            # Then its writes still land (a script that has written is let finish: each of
            # them starts with a write that needs no memory), so it ends, whole, and is
            # acknowledged, and what it holds can expire: a full Redis drains, not wedges
            result = handle.result(timeout=WAIT_S)
            assert result.job.status is JobStatus.SUCCEEDED
            assert result.usage is not None and result.usage.completion_tokens == 40
            streamed = list(handle.stream(timeout=10))
            content = "".join(e.data["text"] for e in streamed if e.type == "content")
            assert content == result.choices[0].message.content
            assert [e.type for e in streamed].count("done") == 1
            wait_until(lambda: not unacked_copies(r, handle.id), 10, "the ack")
            assert capped.refusing()  # Redis was full all along
        finally:
            capped.release()


@pytest.mark.long(30)
def test_a_full_redis_under_load_loses_no_job(worker: WorkerProcess, capped: MemoryCap) -> None:
    """Producers submit as fast as they can, for 8 s, into a Redis with room for a few
    hundred jobs; ended jobs' keys expire after RESULT_TTL_S, so room comes and goes while
    Redis refuses writes on and off: submits, claims, stream writes, ends, retries."""
    settings = worker.settings
    keys = Keys(settings.key_prefix)
    r = capped.r
    stop = threading.Event()
    refused = Counter[str]()
    ends: dict[str, str] = {}
    waiters: list[threading.Thread] = []

    # A connection for each waiting producer (a service would have its own client each)
    with HermesClient(settings, redis=sync_client(settings.redis_url, 512)) as client:

        def wait_for(handle: Any) -> None:
            ends[handle.id] = outcome(lambda: handle.result(timeout=WAIT_S))

        def produce() -> None:
            while not stop.is_set():
                try:
                    handle = client.submit(job(tokens=20, padding=8))
                except redis.exceptions.OutOfMemoryError:
                    refused["submit"] += 1  # the producer knows: nothing was queued
                    time.sleep(0.05)
                    continue
                except redis.exceptions.RedisError as exc:  # known to the producer too
                    refused[type(exc).__name__] += 1
                    time.sleep(0.05)
                    continue
                # Each job's producer waits from its submit on, as a service would
                waiter = threading.Thread(target=wait_for, args=(handle,))
                waiter.start()
                waiters.append(waiter)

        producers = [threading.Thread(target=produce) for _ in range(3)]
        for thread in producers:
            thread.start()
        # Given producers that keep Redis at its limit for a while
        time.sleep(8)
        stop.set()
        for thread in producers:
            thread.join(10)
        # When the operator gives Redis room (a Redis full of queued jobs can stay full:
        # each job needs memory for its end before its keys can expire)
        assert refused["submit"] > 0, "Redis never filled up"
        r.config_set("maxmemory", 0)
        for waiter in waiters:
            waiter.join(WAIT_S + 10)
        # Then every submitted job ended where its producer saw it: none lost, none waited
        # on in vain
        assert len(ends) == len(waiters)
        tally = Counter(ends.values())
        assert tally == {"succeeded": len(ends)}, (tally, worker.log()[-4000:])
        # Each ended once (the keys of the first ones may have expired by now)
        for job_id in ends:
            kinds = events_of(r, keys, job_id)
            assert sum(kinds.count(t) for t in TERMINAL) <= 1, (job_id, kinds)
