"""The operator commands (stats, workers, jobs, purge) as a user runs them: the installed
console script, pointed at a Redis namespace through ``HERMES_*`` env vars. The ``--json``
readings the tests check run the same command in this process (``run_json``): a subprocess
each would add only its start-up (most of a second of CPU), and the tables and errors below
still come from the console script.

Most tests use a queue and prefix of their own on database 15, with no worker (the test
writes what a worker would); the engine tests read the session's real worker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from test_cli_jobs import cli, cli_env, one_error_line
from test_client import Worker, queued_messages, running_job
from worker_fixtures import WorkerProcess

from hermes_worker.cli import admin, fleet
from hermes_worker.cli.commands import main
from hermes_worker.contract.jobs import ErrorInfo, JobStatus
from hermes_worker.contract.queue import send_job
from hermes_worker.contract.store import Keys
from hermes_worker.settings import Settings
from hermes_worker.worker import vitals
from hermes_worker.worker.vitals import RecentResults
from producers.client import HermesClient

TIMEOUT = 120.0


@pytest.fixture
def client(hermes_settings: Settings) -> Iterator[HermesClient]:
    with HermesClient(hermes_settings) as client:
        yield client


def chat(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hi"}], **extra}


def run_json(settings: Settings, *args: str) -> Any:
    """What ``hermes-worker ARGS --json`` prints, run in this process with the console
    script's environment."""
    result = CliRunner().invoke(main, [*args, "--json"], env=cli_env(settings))
    assert result.exit_code == 0, (result.stderr, result.exc_info)
    return json.loads(result.stdout)


# --- pure parts ------------------------------------------------------------------------------


def test_the_command_lines_spelled_out_lists_match_the_models() -> None:
    assert tuple(status.value for status in JobStatus) == admin.STATUSES
    assert tuple(vitals.WINDOWS) == admin.WINDOWS


def test_recent_results_count_each_window_and_forget_after_15_minutes() -> None:
    now = [1000.0]
    recent = RecentResults(clock=lambda: now[0])
    # Given a success at t=1000 and a failure at t=1120
    recent.add(failed=False, tokens=10)
    now[0] = 1120.0
    recent.add(failed=True, tokens=5)
    # When read at t=1170, Then the last minute holds only the failure, 5 minutes both
    now[0] = 1170.0
    assert recent.window(60) == (1, 1, 5)
    assert recent.window(300) == (2, 1, 15)
    # And 15 minutes after the first it has left every window
    now[0] = 1900.0
    assert recent.window(900) == (1, 1, 5)
    assert recent.window(60) == (0, 0, 0)


def test_a_message_names_the_job_a_worker_would_run(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    client.submit(chat(id="named-1"))
    [(_, message)] = queued_messages(redis_client, hermes_settings.queue_name)
    assert fleet.message_job_id(json.dumps(message).encode()) == "named-1"
    assert fleet.message_job_id(b"not json") is None
    assert fleet.message_job_id(b'{"headers": {}}') is None


# --- stats and purge on a queue of the test's own ------------------------------------------------


def test_stats_counts_waiting_jobs_per_priority(
    client: HermesClient, hermes_settings: Settings
) -> None:
    # Given four jobs waiting at priorities 0, 3, 3 and 9, and no worker
    for priority in (0, 3, 3, 9):
        client.submit(chat(priority=priority))
    # When stats is asked for JSON
    data = run_json(hermes_settings, "stats")
    # Then it counts them per priority, and nothing runs
    assert data["queue"] == {
        "name": hermes_settings.queue_name,
        "waiting": 4,
        "by_priority": [1, 0, 0, 2, 0, 0, 0, 0, 0, 1],
    }
    assert data["workers"] == []
    assert data["jobs"]["running"] == 0
    assert data["jobs"]["finished"] == {"1m": 0, "5m": 0, "15m": 0}
    # And the table says the same; another queue is empty
    table = cli(hermes_settings, "stats")
    assert table.returncode == 0, table.stderr
    assert f"Queue '{hermes_settings.queue_name}': 4 waiting" in table.stdout
    other = run_json(hermes_settings, "stats", "--queue", f"{hermes_settings.queue_name}-other")
    assert other["queue"]["waiting"] == 0


def test_purge_asks_first_and_no_keeps_the_queue(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    client.submit(chat())
    client.submit(chat())
    result = cli(hermes_settings, "purge", stdin="n\n")
    assert result.returncode == 1
    assert "2 message(s) wait" in result.stderr and "Aborted" in result.stderr
    assert len(queued_messages(redis_client, hermes_settings.queue_name)) == 2


def test_purge_yes_empties_the_queue_and_ends_each_waiting_job(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    queue = hermes_settings.queue_name
    # Given three waiting jobs
    handles = [client.submit(chat(priority=p)) for p in (0, 5, 9)]
    # And a redelivered copy of a running job, a stale copy of an ended one, and garbage
    running_job(redis_client, hermes_settings, "job-running")
    send_job(client.celery, chat(id="job-running"), "job-running", 5, queue)
    Worker(redis_client, hermes_settings, "job-ended").finish()
    send_job(client.celery, chat(id="job-ended"), "job-ended", 5, queue)
    redis_client.lpush(queue, b"\xff garbage")
    # When the queue is purged without a question
    report = run_json(hermes_settings, "purge", "--yes")
    # Then every message but the running job's copy is gone
    assert report == {
        "queue": queue,
        "removed": 5,
        "cancelled": 3,
        "already_ended": 1,
        "no_record": 0,
        "undecodable": 1,
        "kept_running": 1,
    }
    [(_, left)] = queued_messages(redis_client, queue)
    assert left["headers"]["id"] == "job-running"
    # And each waiting job ended cancelled, which whoever waits on it sees
    for handle in handles:
        assert handle.result(timeout=5).job.status is JobStatus.CANCELLED
    # And the running job was left alone (no cancel request)
    record = redis_client.hgetall(Keys(hermes_settings.key_prefix).job("job-running"))
    assert record[b"status"] == b"running" and b"cancel_requested" not in record
    # And a second purge removes nothing: the running job's copy stays
    again = cli(hermes_settings, "purge", "--yes")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("removed 0 job(s)")
    assert "1 copies of running jobs kept" in again.stdout
    # And once the queue is empty, purge does not ask
    redis_client.delete(queue, *(f"{queue}:{step}" for step in range(1, 10)))
    empty = cli(hermes_settings, "purge")
    assert (empty.returncode, empty.stderr) == (0, "")


# --- jobs by status ------------------------------------------------------------------------------


def test_jobs_lists_by_status_newest_first(
    client: HermesClient, redis_client: redis.Redis, hermes_settings: Settings
) -> None:
    # Given jobs in every state: queued, running (with a lease and events), ended
    queued = [client.submit(chat()).id for _ in range(2)]
    running_job(redis_client, hermes_settings, "job-r")
    redis_client.set(Keys(hermes_settings.key_prefix).lease("job-r"), "token", px=60_000)
    for job_id in ("job-old", "job-new"):
        ended = Worker(redis_client, hermes_settings, job_id)
        ended.record(status="running", attempts=1, started_at=time.time())
        ended.finish()
        time.sleep(0.01)
    failed = Worker(redis_client, hermes_settings, "job-bad")
    failed.finish(JobStatus.FAILED, ErrorInfo(type="engine_error", message="engine died"))
    # When each status is listed, Then each job appears under its own, newest first
    succeeded = run_json(hermes_settings, "jobs", "--status", "succeeded")
    assert [j["id"] for j in succeeded] == ["job-new", "job-old"]
    assert succeeded[0]["status"] == "succeeded" and succeeded[0]["attempts"] == 1
    assert succeeded[0]["generation_s"] >= 0
    assert [j["id"] for j in run_json(hermes_settings, "jobs", "--status", "running")] == ["job-r"]
    assert [j["id"] for j in run_json(hermes_settings, "jobs", "--status", "failed")] == ["job-bad"]
    assert sorted(j["id"] for j in run_json(hermes_settings, "jobs", "--status", "queued")) == (
        sorted(queued)
    )
    assert run_json(hermes_settings, "jobs", "--status", "expired") == []
    # And --limit keeps the newest
    newest = run_json(hermes_settings, "jobs", "--status", "succeeded", "--limit", "1")
    assert [j["id"] for j in newest] == ["job-new"]
    # And the table shows the ids
    table = cli(hermes_settings, "jobs", "--status", "succeeded")
    assert table.returncode == 0, table.stderr
    assert "job-new" in table.stdout and "job-old" in table.stdout


def test_jobs_rejects_an_unknown_status(hermes_settings: Settings) -> None:
    result = cli(hermes_settings, "jobs", "--status", "lost")
    assert result.returncode == 2
    assert "'lost' is not one of" in result.stderr


def test_an_unreachable_redis_is_one_line(hermes_settings: Settings) -> None:
    nowhere = hermes_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    for command in (["stats"], ["workers"], ["jobs", "--status", "queued"], ["purge", "--yes"]):
        result = cli(nowhere, *command)
        assert result.returncode == 1, command
        assert one_error_line(result).startswith("Error: redis_error: ConnectionError")


# --- the session's real worker ----------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_client(worker: WorkerProcess) -> Iterator[HermesClient]:
    with HermesClient(worker.settings) as client:
        yield client


def live_worker(settings: Settings, timeout: float = 60.0) -> vitals.WorkerVitals:
    """The session worker's vitals; waits while there are none (on 2 busy cores a starved
    worker can miss three heartbeats, and then counts as dead until its next one)."""
    end = time.monotonic() + timeout
    with redis.Redis.from_url(settings.redis_url) as r:
        while not (found := fleet.live_workers(r, settings.key_prefix)):
            assert time.monotonic() < end, "no live worker"
            time.sleep(0.5)
    [one] = found
    return one


@pytest.mark.engine
def test_stats_shows_the_live_worker_with_its_model(
    worker: WorkerProcess, test_model_dir: Path
) -> None:
    settings = worker.settings
    live_worker(settings)
    # When stats is asked about the session worker's prefix and queue
    data = run_json(settings, "stats")
    # Then it lists that one worker, with its model, queue, uptime and engine load
    [found] = data["workers"]
    assert found["model"] == str(test_model_dir)
    assert found["queue"] == settings.queue_name
    assert found["metrics_port"] == settings.metrics_port
    assert found["uptime_s"] > 0
    assert found["engine"]["running"] >= 0 and found["engine"]["waiting"] >= 0
    assert time.time() - found["heartbeat_at"] < 3 * settings.lease_ttl_s / 3
    # And its vitals key expires, so a dead worker disappears on its own
    with redis.Redis.from_url(settings.redis_url) as r:
        ttl = r.ttl(Keys(settings.key_prefix).worker(found["name"]))
    assert 0 < ttl <= settings.lease_ttl_s  # three heartbeats of a third of the lease TTL
    # And workers says the same
    [same] = run_json(settings, "workers")
    assert (same["name"], same["model"]) == (found["name"], found["model"])
    table = cli(settings, "workers")
    assert table.returncode == 0 and "Workers: 1 live" in table.stdout


@pytest.mark.engine
def test_jobs_and_workers_show_the_jobs_the_worker_ran(
    worker: WorkerProcess, worker_client: HermesClient
) -> None:
    settings = worker.settings
    before = live_worker(settings).finished_total
    # When two jobs run on the worker
    results = [
        worker_client.submit(chat(max_tokens=8, ignore_eos=True)).result(timeout=TIMEOUT)
        for _ in range(2)
    ]
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results)
    # Then jobs --status succeeded lists them, newest first, with their worker
    listed = run_json(settings, "jobs", "--status", "succeeded", "--limit", "2")
    assert [j["id"] for j in listed] == [results[1].id, results[0].id]
    assert listed[0]["worker"] == results[1].job.worker
    # And after the next heartbeat the worker counts them in its last minute
    end = time.monotonic() + settings.lease_ttl_s
    while live_worker(settings).finished_total < before + 2 and time.monotonic() < end:
        time.sleep(0.5)
    [found] = run_json(settings, "workers")
    assert found["finished_total"] >= before + 2
    assert found["finished"]["1m"] >= 2
    assert found["tokens"]["1m"] >= 16
