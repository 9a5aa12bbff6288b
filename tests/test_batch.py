"""Batches (hermes_worker/batch/): an OpenAI Batch JSONL file through validation, the queue
and a real scripted worker process into output and error files; cancel, expiry, and a
runner stopped and resumed with every line written exactly once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lifecycle_fixtures import STORY
from test_cli_jobs import cli_env, exe
from test_recovery import Fleet, assert_one_end
from worker_fixtures import (
    WorkerProcess,
    clean_redis,
    patient_redis,
    running_scripted_worker,
    unique_settings,
)

from hermes_worker.batch.files import FileStore
from hermes_worker.batch.lines import line_job_id
from hermes_worker.batch.runner import BatchRunner
from hermes_worker.batch.store import BatchStore
from hermes_worker.errors import BatchAlreadyEnded, InvalidRequest
from hermes_worker.settings import Settings
from producers.client import AsyncHermesClient, HermesClient
from producers.control import queue_lists

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def batch_worker(
    test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A scripted worker (``--engine scripted``), no retries: a failing line fails at once."""
    log_path = tmp_path_factory.mktemp("batch-worker") / "worker.log"
    with running_scripted_worker(test_model_dir, log_path, 400, HERMES_MAX_RETRIES="0") as process:
        yield process


@pytest.fixture
def settings(batch_worker: WorkerProcess, tmp_path: Path) -> Settings:
    return batch_worker.settings.model_copy(
        update={"files_dir": str(tmp_path / "files"), "batch_poll_s": 0.05, "batch_window": 8}
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[HermesClient]:
    with HermesClient(settings, redis=patient_redis(settings.redis_url)) as client:
        yield client


def line(custom_id: str, text: str = "Hi", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "hermes", "messages": [{"role": "user", "content": text}], **body},
    }


def scripted(custom_id: str, **script: Any) -> dict[str, Any]:
    """A line whose job the scripted engine runs on ``script``."""
    return line(custom_id, metadata={"hermes_script": json.dumps(script)})


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def create(
    client: HermesClient, content: bytes, window: str = "1h"
) -> tuple[FileStore, BatchStore, dict[str, Any]]:
    files = FileStore(client.settings.files_dir)
    store = BatchStore(client.redis, client.keys)
    source = files.create(content, filename="in.jsonl", purpose="batch")
    output = files.create_empty(filename="out.jsonl", purpose="batch_output")
    errors = files.create_empty(filename="err.jsonl", purpose="batch_output")
    batch = store.create(
        input_file_id=source.id,
        output_file_id=output.id,
        error_file_id=errors.id,
        completion_window=window,
        metadata={"team": "search"},
        priority=client.settings.batch_priority,
    )
    return files, store, batch


def read(files: FileStore, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in files.lines(file_id)]


def run(client: HermesClient, files: FileStore, batch_id: str) -> bool:
    return BatchRunner(client, files).run(batch_id)


def test_a_batch_runs_every_line_into_its_output_file(client: HermesClient) -> None:
    # Given a file of 20 requests
    lines = [line(f"req-{i}", f"Question {i}", max_completion_tokens=50) for i in range(20)]
    files, store, batch = create(client, jsonl(lines))
    assert batch["status"] == "validating" and batch["object"] == "batch"
    # When a runner runs it
    assert run(client, files, batch["id"])
    # Then every line has its chat.completion, and the counts say so
    done = store.get(batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert done["completed_at"] >= done["in_progress_at"] >= done["created_at"]
    assert done["metadata"] == {"team": "search"}
    out = read(files, batch["output_file_id"])
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(20))
    first = out[0]
    assert first["error"] is None and first["id"].startswith("batch_req_")
    assert first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "hermes"
    assert body["choices"][0]["message"]["content"]
    assert first["response"]["request_id"] == body["id"]
    assert read(files, batch["error_file_id"]) == []
    assert done["usage"]["output_tokens"] == sum(
        o["response"]["body"]["usage"]["completion_tokens"] for o in out
    )
    # And its jobs ran at the batch priority, below interactive jobs, without their output
    # written as it came (stream false: nobody reads a line's stream)
    stored = client.redis.hget(client.keys.job(first["response"]["request_id"]), "body")
    assert json.loads(stored)["priority"] == client.settings.batch_priority
    assert json.loads(stored)["stream"] is False


def test_a_failed_line_goes_to_the_error_file_and_the_rest_finish(client: HermesClient) -> None:
    lines = [scripted("ok-1"), scripted("bad", fail_after=1), scripted("ok-2")]
    files, store, batch = create(client, jsonl(lines))
    assert run(client, files, batch["id"])
    done = store.get(batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    [error] = read(files, batch["error_file_id"])
    assert error["custom_id"] == "bad" and error["error"] is None
    assert error["response"]["status_code"] == 500
    assert error["response"]["body"]["error"]["code"] == "engine_error"
    assert {o["custom_id"] for o in read(files, batch["output_file_id"])} == {"ok-1", "ok-2"}


def test_a_file_with_bad_lines_fails_whole_naming_each(client: HermesClient) -> None:
    # Given a file with a bad body, an unknown url, a duplicate custom_id and broken JSON
    content = (
        jsonl([line("a"), line("b", temperature=-1)])
        + json.dumps({**line("c"), "url": "/v1/embeddings"}).encode()
        + b"\n"
        + jsonl([line("a")])
        + b"{not json\n"
        + jsonl([line("d", stream=True)])
    )
    files, store, batch = create(client, content)
    # When it runs, Then it fails as a whole, each bad line listed, and nothing was queued
    assert run(client, files, batch["id"])
    failed = store.get(batch["id"])
    assert failed["status"] == "failed" and failed["failed_at"] is not None
    errors = {e["line"]: e for e in failed["errors"]["data"]}
    assert sorted(errors) == [2, 3, 4, 5, 6]
    assert errors[2]["param"] == "body.temperature"
    assert (errors[3]["code"], errors[3]["param"]) == ("invalid_url", "url")
    assert errors[4]["code"] == "duplicate_custom_id"
    assert errors[5]["code"] == "invalid_json"
    assert errors[6]["param"] == "body.stream"
    assert failed["request_counts"]["total"] == 0
    assert read(files, batch["output_file_id"]) == []


def test_too_many_lines_is_a_clear_error(client: HermesClient) -> None:
    few = client.settings.model_copy(update={"batch_max_lines": 2})
    files, store, batch = create(client, jsonl([line(f"r{i}") for i in range(3)]))
    with HermesClient(few, redis=client.redis) as limited:
        assert BatchRunner(limited, files).run(batch["id"])
    [error] = store.get(batch["id"])["errors"]["data"]
    assert error["code"] == "too_many_lines" and "2" in error["message"]


def test_cancel_stops_feeding_and_accounts_for_every_line(client: HermesClient) -> None:
    # Given 30 slow lines (2 s each) fed 8 at a time
    slow = [scripted(f"s{i}", text="one two three four", tokens_per_s=2) for i in range(30)]
    files, store, batch = create(client, jsonl(slow))
    runner = threading.Thread(target=run, args=(client, files, batch["id"]))
    runner.start()
    wait_for(lambda: store.get(batch["id"])["status"] == "in_progress")
    # When it is cancelled while its first window runs
    cancelling = store.cancel(batch["id"])
    assert cancelling["status"] == "cancelling"
    runner.join(TIMEOUT)
    # Then it ends cancelled with every line in one file or the other, once
    done = store.get(batch["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    out, err = read(files, batch["output_file_id"]), read(files, batch["error_file_id"])
    ids = [x["custom_id"] for x in out + err]
    assert sorted(ids) == sorted(f"s{i}" for i in range(30))
    counts = done["request_counts"]
    assert (counts["completed"], counts["failed"]) == (len(out), len(err))
    never_ran = [e for e in err if e["response"] is None]
    assert len(never_ran) >= 30 - 8  # at most one window was queued
    assert never_ran[0]["error"]["code"] == "batch_cancelled"
    # And a cancelled batch cannot be cancelled again
    with pytest.raises(BatchAlreadyEnded):
        store.cancel(batch["id"])


def test_a_batch_past_its_window_expires_keeping_what_finished(client: HermesClient) -> None:
    lines = [scripted(f"q{i}") for i in range(3)] + [
        scripted(f"slow{i}", text="a b c d e f g h", tokens_per_s=1) for i in range(12)
    ]
    files, store, batch = create(client, jsonl(lines), window="4s")
    assert run(client, files, batch["id"])
    done = store.get(batch["id"])
    assert done["status"] == "expired" and done["expired_at"] is not None
    out, err = read(files, batch["output_file_id"]), read(files, batch["error_file_id"])
    assert {o["custom_id"] for o in out} >= {"q0", "q1", "q2"}
    assert len(out) + len(err) == 15
    codes = {(e["error"] or e["response"]["body"]["error"])["code"] for e in err}
    assert codes <= {"batch_expired", "timeout", "expired", "job_cancelled"}


def test_a_stopped_runner_is_resumed_by_another_without_a_line_twice(
    client: HermesClient,
) -> None:
    # Given a runner stopped after its first lines were written
    lines = [scripted(f"r{i}", text="x y z", tokens_per_s=20) for i in range(24)]
    files, store, batch = create(client, jsonl(lines))
    stop = threading.Event()
    first = BatchRunner(client, files, lease_s=1.0)
    thread = threading.Thread(target=first.run, args=(batch["id"], stop))
    thread.start()
    wait_for(lambda: store.get(batch["id"])["request_counts"]["completed"] >= 5)
    stop.set()
    thread.join(TIMEOUT)
    # And a half-written line at the end of its output file, as a crash mid-write leaves
    path = files.path(batch["output_file_id"])
    with path.open("ab") as f:
        f.write(b'{"id": "batch_req_x", "custom_id": "r2')
    # When another runner takes the batch once the first one's lease has expired
    time.sleep(1.1)
    assert BatchRunner(client, files).run(batch["id"])
    # Then every line is written exactly once, and the counts match the files
    done = store.get(batch["id"])
    out, err = read(files, batch["output_file_id"]), read(files, batch["error_file_id"])
    assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(24))
    assert err == []
    assert done["request_counts"] == {"total": 24, "completed": 24, "failed": 0}


def test_a_batch_held_by_a_live_runner_is_not_run_twice(client: HermesClient) -> None:
    files, store, batch = create(client, jsonl([scripted("a", tokens_per_s=5)]))
    stop = threading.Event()
    holder = threading.Thread(target=BatchRunner(client, files).run, args=(batch["id"], stop))
    holder.start()
    wait_for(lambda: store.get(batch["id"])["status"] == "in_progress")
    try:
        assert BatchRunner(client, files).run(batch["id"]) is False
    finally:
        holder.join(TIMEOUT)
    assert store.get(batch["id"])["status"] == "completed"


def test_a_completion_window_must_be_a_duration(client: HermesClient) -> None:
    with pytest.raises(InvalidRequest, match="completion_window"):
        create(client, jsonl([line("a")]), window="tomorrow")


def wait_for(condition: Any, timeout: float = TIMEOUT, why: Any = None) -> None:
    """Until ``condition()``; ``why()`` says what was seen, if it never came."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out: {why() if why else ''}"
        time.sleep(0.05)


# --- the client and the CLI ------------------------------------------------------------------


def test_the_client_creates_waits_and_reads_results(client: HermesClient, tmp_path: Path) -> None:
    # Given a JSONL file on disk
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([line(f"c{i}", f"Question {i}") for i in range(5)]))
    batches = client.batches
    # When the client makes a batch of it and waits (running it in this process)
    made = batches.create(path, metadata={"run": "nightly"})
    ended = batches.wait(made["id"], timeout=TIMEOUT)
    # Then it completed, its results are in OpenAI's per-line shape, and it is listed
    assert ended["status"] == "completed"
    lines = list(batches.results(made["id"]))
    assert sorted(x["custom_id"] for x in lines) == [f"c{i}" for i in range(5)]
    assert all(x["response"]["status_code"] == 200 for x in lines)
    assert made["id"] in [b["id"] for b in batches.list()]
    stored = batches.files.get(made["input_file_id"])
    assert (stored.purpose, stored.bytes) == ("batch", path.stat().st_size)


def test_the_async_client_has_the_same_calls(settings: Settings, tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with AsyncHermesClient(settings) as client:
            made = await client.batches.create(jsonl([line("a1"), line("a2")]))
            ended = await client.batches.wait(made["id"], timeout=TIMEOUT)
            assert (await client.batches.retrieve(made["id"]))["status"] == "completed"
            return ended, await client.batches.results(made["id"])

    ended, lines = asyncio.run(scenario())
    assert ended["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert sorted(x["custom_id"] for x in lines) == ["a1", "a2"]


def batch_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **cli_env(settings),
        "HERMES_FILES_DIR": settings.files_dir,
        "HERMES_BATCH_POLL_S": "0.05",
    }
    return subprocess.run(
        [exe(), "batch", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_cli_runs_a_file_and_writes_its_results(settings: Settings, tmp_path: Path) -> None:
    # Given a file with one line that fails
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([scripted("a"), scripted("b", fail_after=0), scripted("c")]))
    # When `batch create --wait` runs it
    made = batch_cli(settings, "create", str(path), "--wait", "--json")
    # Then it completed (a failed line is not a failed batch), with a progress line
    assert made.returncode == 0, made.stderr
    batch = json.loads(made.stdout)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert "tok/s" in made.stderr and "ETA" in made.stderr
    # And `batch results` writes the output and error files
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    written = batch_cli(settings, "results", batch["id"], "-o", str(out), "--errors", str(err))
    assert written.returncode == 0, written.stderr
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == ["a", "c"]
    assert [json.loads(x)["custom_id"] for x in err.read_text().splitlines()] == ["b"]
    # And status, list and cancel answer as documented
    status = batch_cli(settings, "status", batch["id"])
    assert status.stdout.split()[:2] == [batch["id"], "completed"]
    listed = batch_cli(settings, "list", "--json")
    assert batch["id"] in [json.loads(x)["id"] for x in listed.stdout.splitlines()]
    again = batch_cli(settings, "cancel", batch["id"])
    assert again.returncode == 1
    assert again.stderr.strip().startswith("Error: already_ended: batch")


def test_the_cli_names_the_bad_lines_of_a_file_that_fails(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([line("a"), line("a")]))
    made = batch_cli(settings, "create", str(path), "--wait")
    assert made.returncode == 1
    last = made.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: batch batch_") and "failed: line 2: custom_id" in last


# --- kill -9 -----------------------------------------------------------------------------------


@pytest.fixture
def fleet(test_model_dir: Path, tmp_path: Path) -> Iterator[Fleet]:
    """Scripted worker processes on a deployment of their own (test_recovery.Fleet)."""
    made = Fleet(test_model_dir, tmp_path)
    yield made
    made.close()


@pytest.mark.long(10)
def test_every_line_once_with_the_runner_and_a_worker_killed(fleet: Fleet, tmp_path: Path) -> None:
    # Given two scripted workers (lease 4 s) and a batch runner process (lease 2 s)
    fleet.start(2)
    settings = fleet.settings.model_copy(update={"files_dir": str(tmp_path / "files")})
    env = {
        **cli_env(settings),
        "HERMES_FILES_DIR": settings.files_dir,
        "HERMES_BATCH_POLL_S": "0.05",
        "HERMES_BATCH_WINDOW": "16",
        "HERMES_BATCH_LEASE_S": "2",
        "HERMES_BATCH_RESEND_S": "3",  # a message lost with the killed worker: sent again
    }

    def runner(name: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        return subprocess.Popen(
            [exe(), "batch", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    # 240 lines of 0.2 s each, 16 at a time: about 3 s of work
    lines = [scripted(f"k{i}", text=STORY, tokens_per_s=100) for i in range(240)]
    with HermesClient(settings, redis=fleet.redis) as client:
        files, store, batch = create(client, jsonl(lines))
    first = runner("runner-1")

    def done() -> int:
        counts = store.get(batch["id"])["request_counts"]
        return int(counts["completed"] + counts["failed"])

    def seen() -> str:
        """The batch, the jobs of the lines not yet written, and the runners' logs."""
        logs = "".join((tmp_path / f"runner-{n}.log").read_text()[-2000:] for n in (1, 2))
        written = {o["custom_id"] for o in read(files, batch["output_file_id"])}
        missing = [int(c[1:]) for c in (f"k{i}" for i in range(240)) if c not in written]
        jobs = [(i, fleet.record(line_job_id(batch["id"], i))) for i in missing[:5]]
        return f"{store.record(batch['id'])}\nnot written: {missing[:20]} {jobs}\n{logs}"

    # When the runner is killed at a third and another takes over after its lease
    wait_for(lambda: done() >= 80, why=seen)
    first.kill()
    first.wait(10)
    second = runner("runner-2")
    # And a worker is killed at two thirds
    try:
        wait_for(lambda: done() >= 160, why=seen)
        fleet.workers["w1"].process.kill()
        wait_for(lambda: store.get(batch["id"])["status"] == "completed", timeout=60, why=seen)
    finally:
        second.terminate()
        assert second.wait(20) == 0
    # Then every line was written once, each a success, and the counts match the files
    out = read(files, batch["output_file_id"])
    assert sorted(o["custom_id"] for o in out) == sorted(f"k{i}" for i in range(240))
    assert read(files, batch["error_file_id"]) == []
    assert store.get(batch["id"])["request_counts"] == {
        "total": 240,
        "completed": 240,
        "failed": 0,
    }
    # And each line's job ended once (one terminal event, seq without a gap), with its text
    for o in out:
        assert o["response"]["body"]["choices"][0]["message"]["content"] == STORY
        assert_one_end(fleet.events(o["response"]["request_id"]))


def test_a_lines_lost_message_is_sent_again_and_only_a_lost_one(tmp_path: Path) -> None:
    # Given a batch on a queue no worker serves, two lines queued
    settings = unique_settings().model_copy(
        update={"files_dir": str(tmp_path / "files"), "batch_poll_s": 0.05, "batch_resend_s": 0.5}
    )
    with HermesClient(settings, redis=patient_redis(settings.redis_url)) as client:
        try:
            files, _, batch = create(client, jsonl([line("lost"), line("waiting")]))
            stop = threading.Event()
            runner = threading.Thread(
                target=BatchRunner(client, files).run, args=(batch["id"], stop)
            )
            runner.start()
            lists = queue_lists(settings)

            def copies(index: int) -> int:
                needle = f'"{line_job_id(batch["id"], index)}"'.encode()
                items = [i for name in lists for i in client.redis.lrange(name, 0, -1)]
                return sum(needle in item for item in items)

            wait_for(lambda: copies(0) == 1 and copies(1) == 1)
            # When line 0's message is taken off the queue and never recorded (a worker
            # killed between its BRPOP and its record)
            for name in lists:
                for item in client.redis.lrange(name, 0, -1):
                    if f'"{line_job_id(batch["id"], 0)}"'.encode() in item:
                        client.redis.lrem(name, 1, item)
            assert copies(0) == 0
            # Then the runner sends it again once it has waited batch_resend_s, the job still
            # queued and never delivered; the line still on the queue is not sent twice
            wait_for(lambda: copies(0) == 1, timeout=10)
            time.sleep(1.0)
            assert (copies(0), copies(1)) == (1, 1)
            record = client.redis.hgetall(client.keys.job(line_job_id(batch["id"], 0)))
            assert record[b"status"] == b"queued"
            stop.set()
            runner.join(TIMEOUT)
        finally:
            clean_redis(settings)
