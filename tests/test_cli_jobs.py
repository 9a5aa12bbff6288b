"""The queue commands of the CLI (submit, status, result, tail) as a user runs them: the
installed console script in a subprocess, pointed at the test's Redis namespace through the
``HERMES_*`` env vars. Each command runs so at least once; its other variants (exit codes,
errors, options) run the same command in this process (``cli_here``), where a subprocess
would add only its start-up, most of a second of CPU. No worker runs: the tests write what a
worker would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from test_client import Worker, queued_messages, running_job

from hermes_worker.cli.commands import main
from hermes_worker.contract.jobs import ErrorInfo, JobStatus
from hermes_worker.contract.store import Keys
from hermes_worker.settings import Settings

EXAMPLE_JOB = Path(__file__).parent.parent / "producers" / "examples" / "weather_job.json"


def cli_env(settings: Settings) -> dict[str, str]:
    plain = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    return {
        **plain,
        "HERMES_REDIS_URL": settings.redis_url,
        "HERMES_KEY_PREFIX": settings.key_prefix,
        "HERMES_QUEUE_NAME": settings.queue_name,
    }


def exe() -> str:
    path = shutil.which("hermes-worker", path=str(Path(sys.executable).parent))
    assert path, "the console script is installed beside the interpreter"
    return path


def cli(
    settings: Settings, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe(), *args],
        input=stdin,
        env={**cli_env(settings), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_here(
    settings: Settings, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """:func:`cli`'s command run in this process, answered in the same shape. Whatever went
    wrong ended as click's exit, never as an exception out of the command."""
    result = CliRunner().invoke(
        main, list(args), input=stdin, env={**cli_env(settings), **(env or {})}
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return subprocess.CompletedProcess(
        ["hermes-worker", *args], result.exit_code, result.stdout, result.stderr
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ")
    return line


def start_cli(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [exe(), *args],
        env=cli_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished_job(r: redis.Redis, settings: Settings, *, failed: bool = False) -> Worker:
    worker = running_job(r, settings)
    worker.emit("content", {"text": "Hello!"})
    if failed:
        worker.finish(JobStatus.FAILED, ErrorInfo(type="engine_error", message="engine died"))
    else:
        worker.finish()
    return worker


# --- submit --------------------------------------------------------------------------------


def test_submit_prints_the_id_and_queues_the_job(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # When the example job (client id, priority 3) is submitted from a file
    result = cli(hermes_settings, "submit", str(EXAMPLE_JOB))
    # Then its id is printed, the record exists and one message waits in the priority-3 list
    assert result.returncode == 0, result.stderr
    assert result.stdout == "demo-weather-1\n"
    record = redis_client.hgetall(Keys(hermes_settings.key_prefix).job("demo-weather-1"))
    assert record[b"status"] == b"queued"
    assert json.loads(record[b"body"])["id"] == "demo-weather-1"
    [(name, _)] = queued_messages(redis_client, hermes_settings.queue_name)
    assert name == f"{hermes_settings.queue_name}:3"
    # And submitting it again prints the same id and queues nothing more
    again = cli_here(hermes_settings, "submit", str(EXAMPLE_JOB))
    assert (again.returncode, again.stdout) == (0, "demo-weather-1\n")
    assert "not queued again" in again.stderr
    assert len(queued_messages(redis_client, hermes_settings.queue_name)) == 1


def test_submit_reads_stdin_and_makes_an_id(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}]})
    result = cli(hermes_settings, "submit", "-", stdin=body)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert len(job_id) == 32
    assert redis_client.exists(Keys(hermes_settings.key_prefix).job(job_id))


def test_submit_rejects_a_bad_body_and_queues_nothing(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    result = cli_here(hermes_settings, "submit", "-", stdin='{"messages": []}')
    assert result.returncode == 1
    assert one_error_line(result).startswith("Error: invalid_request_error: messages")
    assert queued_messages(redis_client, hermes_settings.queue_name) == []


def submit_and_play_worker(
    settings: Settings, r: redis.Redis, tmp_path: Path, *flags: str, failed: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``submit JOB FLAGS``; once it has printed the id, run the job as a worker would."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"id": "cli-1", "messages": [{"role": "user", "content": "Hi"}]}))
    process = start_cli(settings, "submit", str(job), *flags)
    assert process.stdout is not None
    assert process.stdout.readline() == "cli-1\n"
    time.sleep(0.3)  # the command is waiting by now: what follows must wake it
    worker = Worker(r, settings, "cli-1")
    worker.record(status="running", attempts=1, started_at=time.time())
    worker.emit("started", {"attempt": 1})
    worker.emit("content", {"text": "Hello!"})
    if failed:
        worker.finish(JobStatus.FAILED, ErrorInfo(type="engine_error", message="engine died"))
    else:
        worker.finish()
    out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_submit_stream_prints_events_then_the_result(
    hermes_settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # When a job is submitted with --stream and a worker runs it
    flags = ("--stream", "--timeout", "20")
    done = submit_and_play_worker(hermes_settings, redis_client, tmp_path, *flags)
    # Then each event came as a JSON line, then the result as pretty JSON, and status 0
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    events = [json.loads(line) for line in lines[:3]]
    assert [e["type"] for e in events] == ["started", "content", "done"]
    assert events[1]["data"] == {"text": "Hello!"} and events[1]["seq"] == 2
    result = json.loads("\n".join(lines[3:]))
    assert result["choices"][0]["message"]["content"] == "Hello!"
    assert result["job"]["status"] == "succeeded"


def test_submit_wait_on_a_failing_job_exits_1_with_the_result(
    hermes_settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # When a job is submitted with --wait and it fails, Then the result and one error line
    done = submit_and_play_worker(hermes_settings, redis_client, tmp_path, "--wait", failed=True)
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["type"] == "engine_error"
    assert one_error_line(done) == "Error: job cli-1 failed: engine_error: engine died"


def test_submit_wait_times_out_with_status_2(hermes_settings: Settings) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}]})
    result = cli_here(hermes_settings, "submit", "-", "--wait", "--timeout", "0.5", stdin=body)
    assert result.returncode == 2
    assert len(result.stdout.strip()) == 32  # the id came first
    assert one_error_line(result).startswith("Error: timeout: job ")


# --- status, result, tail ------------------------------------------------------------------


def test_status_prints_the_record(hermes_settings: Settings, redis_client: redis.Redis) -> None:
    running_job(redis_client, hermes_settings)
    result = cli(hermes_settings, "status", "job-1")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["id"], info["status"], info["attempts"]) == ("job-1", "running", 1)
    assert info["queue_wait_s"] is not None


@pytest.mark.parametrize("command", [["status"], ["result"], ["result", "--wait"], ["tail"]])
def test_an_unknown_id_is_not_found(hermes_settings: Settings, command: list[str]) -> None:
    # The CLI fails fast on an id without a record (the library would wait for one)
    result = cli_here(hermes_settings, *command, "no-such-job")
    assert result.returncode == 1
    assert one_error_line(result).startswith("Error: not_found: no job 'no-such-job'")


def test_result_prints_a_finished_jobs_result(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    finished_job(redis_client, hermes_settings)
    result = cli(hermes_settings, "result", "job-1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["choices"][0]["message"]["content"] == "Hello!"


def test_result_of_a_failed_job_exits_1(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    finished_job(redis_client, hermes_settings, failed=True)
    result = cli_here(hermes_settings, "result", "job-1")
    assert result.returncode == 1
    assert json.loads(result.stdout)["job"]["status"] == "failed"
    assert one_error_line(result) == "Error: job job-1 failed: engine_error: engine died"


def test_result_of_an_unfinished_job_exits_3(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    running_job(redis_client, hermes_settings)
    result = cli_here(hermes_settings, "result", "job-1")
    assert result.returncode == 3
    assert result.stdout == ""
    assert one_error_line(result) == "Error: job job-1 has not finished (status running)"


def test_result_wait_times_out_with_status_2(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    running_job(redis_client, hermes_settings)
    start = time.monotonic()
    result = cli_here(hermes_settings, "result", "job-1", "--wait", "--timeout", "0.5")
    assert result.returncode == 2
    assert one_error_line(result) == "Error: timeout: job job-1 did not end within 0.5 s"
    assert time.monotonic() - start >= 0.5


def test_tail_prints_events_and_resumes(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a finished job
    finished_job(redis_client, hermes_settings)
    # When its events are tailed, Then they come as JSON lines up to the terminal one
    result = cli(hermes_settings, "tail", "job-1")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["type"] for e in events] == ["started", "content", "done"]
    # And --from resumes right after a given entry
    resumed = cli_here(hermes_settings, "tail", "job-1", "--from", events[0]["id"])
    assert [json.loads(line)["type"] for line in resumed.stdout.splitlines()] == [
        "content",
        "done",
    ]


def test_tail_of_a_quiet_job_times_out_with_status_2(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    running_job(redis_client, hermes_settings)
    result = cli_here(hermes_settings, "tail", "job-1", "--timeout", "0.5")
    assert result.returncode == 2
    assert json.loads(result.stdout)["type"] == "started"
    assert one_error_line(result).startswith("Error: timeout: ")


def test_an_unreachable_redis_is_one_line(hermes_settings: Settings) -> None:
    nowhere = hermes_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    result = cli(nowhere, "status", "job-1")
    assert result.returncode == 1
    assert one_error_line(result).startswith("Error: redis_error: ConnectionError")
