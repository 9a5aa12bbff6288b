"""Reliability through real processes: no job lost, none run twice, one terminal state each.

Tests on the session worker cover cancel, deadlines, retries and duplicates; tests that kill
or stop a worker share a pair of their own with short timeouts (see :class:`Pair`)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from worker_fixtures import (
    WorkerProcess,
    clean_redis,
    patient_redis,
    start_worker,
    stop_worker,
    unique_settings,
    wait_ready,
)

from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.contract.queue import make_celery, send_job
from hermes_worker.contract.store import Keys, StreamEvent, decode_event
from hermes_worker.settings import Settings
from hermes_worker.testing.model import TinyModelSpec, build_test_model
from hermes_worker.worker.runtime import EXIT_ENGINE_DEAD
from producers.client import HermesClient

pytestmark = pytest.mark.engine
TIMEOUT = 120.0


def long_job(max_tokens: int = 1900, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


def events(settings: Settings, job_id: str) -> list[StreamEvent]:
    client = patient_redis(settings.redis_url)
    return [decode_event(i, f) for i, f in client.xrange(Keys(settings.key_prefix).events(job_id))]


def types(settings: Settings, job_id: str) -> list[str]:
    return [e.type for e in events(settings, job_id)]


def wait_for_output(settings: Settings, job_id: str, timeout: float = 60.0) -> str:
    """Wait until the job is generating (an output event exists); return its worker."""
    client = patient_redis(settings.redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if {"content", "reasoning"} & set(types(settings, job_id)):
            worker = client.hget(Keys(settings.key_prefix).job(job_id), "worker")
            assert worker is not None
            return worker.decode()
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} produced no output in {timeout}s")


def request_cancel(settings: Settings, job_id: str) -> None:
    """What a producer's cancel does for a running job: the flag, then the publish."""
    client = patient_redis(settings.redis_url)
    keys = Keys(settings.key_prefix)
    client.hset(keys.job(job_id), "cancel_requested", time.time())
    client.publish(keys.cancel_channel, job_id)


# --- on the session worker --------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[HermesClient]:
    with HermesClient(worker.settings, redis=patient_redis(worker.settings.redis_url)) as c:
        yield c


def test_cancel_of_a_running_job_aborts_it_within_a_second(
    client: HermesClient, worker: WorkerProcess
) -> None:
    settings = worker.settings
    # Given a long job that is generating (while the engine generates, this 2-core box can
    # starve the test process for longer than the job lasts: a job that had ended before the
    # cancel was even sent is tried again, at most three times)
    for _ in range(3):
        handle = client.submit(long_job())
        wait_for_output(settings, handle.id)
        # When it is cancelled
        asked = time.time()
        request_cancel(settings, handle.id)
        result = handle.result(timeout=TIMEOUT)
        if not (result.job.finished_at is not None and result.job.finished_at <= asked):
            break
    # Then it ends cancelled within a second, keeping the output it had
    assert result.job.status is JobStatus.CANCELLED
    assert result.job.finished_at is not None and result.job.finished_at - asked < 1.0
    assert result.error is not None and result.error.type == "cancelled"
    assert result.choices[0].finish_reason == "cancelled"
    assert result.usage is not None and 0 < result.usage.completion_tokens < 1900
    assert [t for t in types(settings, handle.id) if t in ("done", "error", "cancelled")] == [
        "cancelled"
    ]
    # And the engine holds no request any more (the worker's vitals, written after the cancel)
    vitals_key = Keys(settings.key_prefix).worker(result.job.worker)
    server = patient_redis(settings.redis_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        vitals = server.hgetall(vitals_key)
        if vitals and float(vitals[b"heartbeat_at"]) > (result.job.finished_at or 0):
            assert int(vitals[b"engine_unfinished"]) == 0
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no worker heartbeat after the cancel")


def send_directly(settings: Settings, body: dict[str, Any], job_id: str) -> None:
    send_job(make_celery(settings), {**body, "id": job_id}, job_id, 5, settings.queue_name)


def test_a_deadline_passed_while_queued_expires_without_the_engine(
    client: HermesClient, worker: WorkerProcess
) -> None:
    settings = worker.settings
    # Given a job whose record says it was queued two seconds ago, with a one-second budget
    job_id = uuid.uuid4().hex
    keys = Keys(settings.key_prefix)
    patient_redis(settings.redis_url).hset(
        keys.job(job_id), mapping={"status": "queued", "queued_at": time.time() - 2}
    )
    send_directly(settings, long_job(timeout_s=1.0), job_id)
    # Then it ends expired and never started generating
    result = client.job(job_id).result(timeout=TIMEOUT)
    assert result.job.status is JobStatus.EXPIRED
    assert result.error is not None and result.error.type == "expired"
    assert types(settings, job_id) == ["error"]


def test_a_deadline_reached_while_generating_stops_it_with_partial_output(
    client: HermesClient, worker: WorkerProcess
) -> None:
    handle = client.submit(long_job(max_tokens=2000 - 30, timeout_s=0.6))
    result = handle.result(timeout=TIMEOUT)
    assert result.job.status is JobStatus.FAILED
    assert result.error is not None and result.error.type == "timeout"
    assert result.choices[0].finish_reason == "timeout"
    assert result.usage is not None and 0 < result.usage.completion_tokens < 1970
    assert result.job.finished_at is not None and result.job.queued_at is not None
    assert result.job.finished_at - result.job.queued_at < 0.6 + 0.5


def test_a_client_id_submitted_twice_runs_once(client: HermesClient, worker: WorkerProcess) -> None:
    job_id = f"idem-{uuid.uuid4().hex[:8]}"
    body = long_job(max_tokens=16, id=job_id)
    first = client.submit(body)
    second = client.submit(body)
    assert (first.id, second.id) == (job_id, job_id)
    assert first.created and not second.created
    result = second.result(timeout=TIMEOUT)
    assert result == first.result(timeout=TIMEOUT)
    assert result.job.attempts == 1
    assert types(worker.settings, job_id).count("started") == 1


def test_a_duplicate_delivery_of_an_ended_job_is_skipped(
    client: HermesClient, worker: WorkerProcess
) -> None:
    handle = client.submit(long_job(max_tokens=8))
    before = handle.result(timeout=TIMEOUT)
    # When the same message arrives again (as a redelivery would)
    send_directly(worker.settings, long_job(max_tokens=8), handle.id)
    marker = client.submit(long_job(max_tokens=8)).result(timeout=TIMEOUT)  # runs after it
    # Then the job did not run again
    assert marker.job.status is JobStatus.SUCCEEDED
    assert client.job(handle.id).result(timeout=TIMEOUT) == before
    assert types(worker.settings, handle.id).count("started") == 1


def test_a_transient_failure_is_retried_and_the_job_succeeds(
    client: HermesClient, worker: WorkerProcess
) -> None:
    # Given a job whose first attempt fails with a (injected) transient engine error
    handle = client.submit(long_job(max_tokens=8, metadata={"hermes_fault": "transient:1"}))
    result = handle.result(timeout=TIMEOUT)
    # Then Celery retried it and the second attempt succeeded, one story in the stream
    assert_one_story(worker.settings, result, attempts=2)


def test_a_job_out_of_retries_goes_to_the_dead_letters(
    client: HermesClient, worker: WorkerProcess
) -> None:
    # Given a job that fails transiently on every attempt
    handle = client.submit(long_job(max_tokens=8, metadata={"hermes_fault": "transient"}))
    result = handle.result(timeout=TIMEOUT)
    # Then after 1 + HERMES_MAX_RETRIES attempts it failed for good, once, and is listed
    assert result.job.status is JobStatus.FAILED
    assert result.error is not None and result.error.type == "engine_error"
    assert result.job.attempts == 1 + worker.settings.max_retries
    seen = types(worker.settings, handle.id)
    assert [t for t in seen if t in ("done", "error", "cancelled")] == ["error"]
    assert handle.id in [letter.id for letter in client.dead_letters()]


def test_a_cancelled_queued_job_never_starts_even_when_delivered(
    client: HermesClient, worker: WorkerProcess
) -> None:
    settings = worker.settings
    # Given a job waiting on a queue no worker reads, cancelled there
    parked = settings.model_copy(update={"queue_name": f"{settings.queue_name}-parked"})
    with HermesClient(parked) as parked_client:
        handle = parked_client.submit(long_job(max_tokens=8))
        assert handle.cancel() == "cancelled"
    # When its message still reaches the worker
    send_directly(settings, long_job(max_tokens=8), handle.id)
    client.submit(long_job(max_tokens=4)).result(timeout=TIMEOUT)  # served after it
    # Then it never started: no attempt, no started event, still cancelled
    result = client.job(handle.id).result(timeout=TIMEOUT)
    assert result.job.status is JobStatus.CANCELLED
    assert result.job.attempts == 0
    assert types(settings, handle.id) == ["cancelled"]


# --- a pair of workers of their own ------------------------------------------------------------
#
# The tests that kill or stop a worker share one pair (engine starts are the slow part of this
# suite): each test first brings back whichever worker the one before it stopped.


GRACE_S = 0.5  # the pair's shutdown grace period


class Pair:
    """Two workers, w1 and w2, on one queue of their own with a short visibility timeout
    (5 s) and the default lease (30 s): on this 2-core VM the whole machine was seen to
    stall for 20 s while two engines ran (Redis pings from an idle process took seconds),
    and only a dead worker should lose its lease."""

    def __init__(self, model: Path, directory: Path) -> None:
        self.env = {
            "HERMES_VISIBILITY_TIMEOUT_S": "5",
            "HERMES_LEASE_TTL_S": "30",
            "HERMES_SHUTDOWN_GRACE_S": str(GRACE_S),
            "HERMES_MAX_MODEL_LEN": "32768",
        }
        self.settings = unique_settings()
        self.model, self.directory = model, directory
        self.workers: dict[str, WorkerProcess] = {}
        self.retired: set[str] = set()  # signalled or killed by a test: never reused
        self.starts = 0
        self.patient = patient_redis(self.settings.redis_url)

    def client(self) -> HermesClient:
        """The tests' client; its reads wait out a stalled VM (seen: 20 s) instead of
        failing after redis-py's default 5 s (on the shared patient Redis client, which it
        does not close)."""
        return HermesClient(self.settings, redis=self.patient)

    def retire(self, name: str, sig: signal.Signals) -> None:
        """Send ``sig`` to a worker (SIGKILL: to its whole process group); the next test
        gets a fresh one in its place, whether this test got to see it exit or not."""
        worker = self.workers[name]
        self.retired.add(name)
        if sig is signal.SIGKILL:
            os.killpg(worker.process.pid, sig)
        else:
            worker.process.send_signal(sig)

    def both_alive(self) -> dict[str, WorkerProcess]:
        """Start whichever of the two is not running; return both, ready."""
        down = [
            name
            for name in ("w1", "w2")
            if name not in self.workers
            or name in self.retired
            or self.workers[name].process.poll() is not None
        ]
        self.retired -= set(down)
        for name in down:
            if name in self.workers:
                stop_worker(self.workers[name])  # whatever of its process group is left
            self.starts += 1
            log_path = self.directory / f"{name}-{self.starts}.log"
            self.workers[name] = start_worker(
                self.settings, self.model, log_path, HERMES_WORKER_NAME=name, **self.env
            )
        for name in down:
            wait_ready(self.workers[name])
        return self.workers

    def logs(self) -> str:
        return "".join(w.log() for w in self.workers.values())

    def close(self) -> None:
        for w in self.workers.values():
            stop_worker(w)
        clean_redis(self.settings)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinyModelSpec(max_position_embeddings=32768)
    return build_test_model(tmp_path_factory.mktemp("tiny-32k"), spec)


@pytest.fixture(scope="module")
def pair(long_context_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    shared = Pair(long_context_model, tmp_path_factory.mktemp("pair"))
    try:
        yield shared
    finally:
        shared.close()


def is_engine_core(process: psutil.Process) -> bool:
    """vLLM's engine core process (it renames itself ``VLLM::EngineCore``)."""
    return "EngineCore" in " ".join(process.cmdline()) + process.name()


def assert_one_story(settings: Settings, result: JobResult, attempts: int) -> None:
    """Status, stream and result agree: one done, one restart per extra attempt."""
    story = events(settings, result.id)
    seen = [e.type for e in story]
    assert result.job.status is JobStatus.SUCCEEDED
    assert result.job.attempts == attempts
    assert seen.count("done") == 1 and seen[-1] == "done"
    assert seen.count("restarted") == attempts - 1
    assert seen.count("error") == 0 and seen.count("cancelled") == 0
    seqs = [e.seq for e in story]
    assert seqs == list(range(1, len(seqs) + 1)), [(e.id, e.seq, e.type) for e in story]


def test_a_job_longer_than_the_visibility_timeout_runs_exactly_once(pair: Pair) -> None:
    pair.both_alive()
    settings = pair.settings
    with pair.client() as client:
        # Given a job that generates for minutes while Redis redelivers it every ~5 s
        handle = client.submit(long_job(max_tokens=32000))
        wait_for_output(settings, handle.id)
        # Then Redis does deliver it again (the trap is real): wait for a second copy
        # rather than a fixed time, since a starved 2-core box sweeps late.
        received = f"hermes.chat[{handle.id}] received"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and pair.logs().count(received) < 2:
            time.sleep(0.5)
        time.sleep(6)  # and let a copy or two more arrive while it still runs
        request_cancel(settings, handle.id)  # enough: stop it rather than wait it out
        result = handle.result(timeout=TIMEOUT)
    assert pair.logs().count(received) >= 2
    # ... yet it ran once: one attempt, one start, no restart, one terminal event
    assert result.job.attempts == 1
    assert result.job.status is JobStatus.CANCELLED
    seen = types(settings, handle.id)
    assert seen.count("started") == 1 and "restarted" not in seen
    assert [t for t in seen if t in ("done", "error", "cancelled")] == ["cancelled"]
    assert result.usage is not None and result.usage.completion_tokens > 1000


def test_sigterm_hands_running_jobs_to_another_worker_and_leaves_no_process(
    pair: Pair,
) -> None:
    # A job of 8000 tokens (seconds of generation), so it is surely still running when the
    # 0.5 s grace period ends, however long the signal takes to be handled.
    # (The test process can be starved for seconds while the engines generate: a job that
    # ended before its worker could have acted on the signal is tried again, at most 3 times.)
    settings = pair.settings
    for _ in range(3):
        workers = pair.both_alive()
        with pair.client() as client:
            handle = client.submit(long_job(max_tokens=8000))
            leaving = wait_for_output(settings, handle.id)
            process = psutil.Process(workers[leaving].process.pid)
            family = [process, *process.children(recursive=True)]
            assert any(is_engine_core(p) for p in family)
            # When the worker running it is asked to stop, with a short grace period
            sent = time.time()
            pair.retire(leaving, signal.SIGTERM)
            result = handle.result(timeout=TIMEOUT)
            code = workers[leaving].process.wait(60)
        ended = result.job.finished_at or 0
        if not (result.job.worker == leaving and ended <= sent + GRACE_S):
            break
    # Then it exits cleanly, every process it started (vLLM's engine core included) is gone,
    # and the job is finished by the other worker without loss
    assert code == 0, workers[leaving].log()[-3000:]
    psutil.wait_procs(family, timeout=15)
    assert [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert result.job.worker == ({"w1", "w2"} - {leaving}).pop()
    assert_one_story(settings, result, attempts=2)
    assert result.usage is not None and result.usage.completion_tokens == 8000


def test_kill_9_mid_generation_loses_nothing(pair: Pair) -> None:
    settings = pair.settings
    # (A job that ended on its worker before the kill was even sent is tried again, at most
    # three times: the test process can be starved for seconds while the engines generate.)
    for _ in range(3):
        pair.both_alive()
        with pair.client() as client:
            # Given a job generating on one of two workers
            handle = client.submit(long_job())
            victim = wait_for_output(settings, handle.id)
            # When that worker is killed outright
            killed = time.time()
            pair.retire(victim, signal.SIGKILL)
            result = handle.result(timeout=TIMEOUT + 30)  # its lease lives 30 s
        ended = result.job.finished_at or 0
        if not (result.job.worker == victim and ended <= killed):
            break
    # Then the other worker finished it as attempt 2 (once the lease expired), after a
    # restarted event
    survivor = ({"w1", "w2"} - {victim}).pop()
    assert result.job.worker == survivor
    assert_one_story(settings, result, attempts=2)
    assert result.usage is not None and result.usage.completion_tokens == 1900


def test_a_dead_engine_hands_every_job_to_the_other_worker_and_exits(pair: Pair) -> None:
    # Given jobs generating on both workers (last in this module: the worker it ends is not
    # started again)
    settings = pair.settings
    workers = pair.both_alive()
    with pair.client() as client:
        handles = [client.submit(long_job(max_tokens=2000)) for _ in range(4)]
        first_on = {handle.id: wait_for_output(settings, handle.id) for handle in handles}
        victim = first_on[handles[0].id]
        survivor = ({"w1", "w2"} - {victim}).pop()
        worker = workers[victim]
        [core] = [p for p in psutil.Process(worker.process.pid).children(recursive=True)
                  if is_engine_core(p)]  # fmt: skip
        pair.retired.add(victim)
        # When the engine core of one of them dies mid-batch
        core.kill()
        died = time.time()
        code = worker.process.wait(60)
        results = [handle.result(timeout=TIMEOUT) for handle in handles]
    # Then that worker exits with the engine-dead status, having handed its jobs back
    assert code == EXIT_ENGINE_DEAD, worker.log()[-3000:]
    assert "the engine died" in worker.log()
    assert "handing every job back" in worker.log()
    # And every job ended once, on the survivor, as attempt 2 for those of the dead one,
    # which it started within seconds of the death rather than after the 30 s lease
    for result in results:
        moved = first_on[result.id] == victim
        assert result.job.worker == survivor
        assert_one_story(settings, result, attempts=2 if moved else 1)
        assert result.usage is not None and result.usage.completion_tokens == 2000
        if moved:
            assert result.job.started_at is not None and result.job.started_at - died < 15
    assert sum(first_on[h.id] == victim for h in handles) >= 1
