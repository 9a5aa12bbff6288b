"""Logging: one structlog pipeline, JSON or console, job fields bound, vLLM's lines included.

Each case runs in a fresh interpreter: logging is process-wide state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from worker_fixtures import WorkerProcess

from producers.client import HermesClient

SCRIPT = """
import asyncio, logging, structlog
from hermes_worker.worker.logs import configure_logging, job_context
configure_logging("INFO", {fmt!r}, worker="w1")
logging.getLogger("vllm.engine").info("engine says %s", "hi")
logging.getLogger("celery.worker").debug("too quiet to show")
log = structlog.stdlib.get_logger("hermes_worker.test")
with job_context(job_id="j1", attempt=2):
    log.info("job ended", status="succeeded", completion_tokens=7)

async def in_a_task():
    structlog.contextvars.bind_contextvars(job_id="j2")
    log.warning("inside")
async def main():
    await asyncio.create_task(in_a_task())
    log.info("outside")
asyncio.run(main())
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("kombu").exception("boom")
"""


def run(fmt: str, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(fmt=fmt)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    return [line for line in out.stderr.splitlines() if line.strip()]


def test_json_lines_carry_level_logger_worker_and_the_job() -> None:
    records = [json.loads(line) for line in run("json") if line.startswith("{")]
    by_msg = {r["msg"]: r for r in records}
    # A foreign stdlib logger goes through the same pipeline
    vllm = by_msg["engine says hi"]
    assert (vllm["level"], vllm["logger"], vllm["worker"]) == ("info", "vllm.engine", "w1")
    assert vllm["timestamp"].endswith("Z")
    # Our lines carry their key-value fields and the job bound around them
    ended = by_msg["job ended"]
    assert (ended["job_id"], ended["attempt"], ended["completion_tokens"]) == ("j1", 2, 7)
    # A binding inside an asyncio task stays in that task
    assert by_msg["inside"]["job_id"] == "j2"
    assert "job_id" not in by_msg["outside"]
    # Below the level nothing shows; exceptions come with their traceback
    assert "too quiet to show" not in by_msg
    assert "ZeroDivisionError" in by_msg["boom"]["exception"]


def test_console_lines_are_readable_text() -> None:
    lines = run("console")
    assert not any(line.startswith("{") for line in lines)
    ended = next(line for line in lines if "job ended" in line)
    assert "job_id=j1" in ended and "completion_tokens=7" in ended
    assert any("engine says hi" in line for line in lines)


def test_the_format_comes_from_the_environment() -> None:
    lines = run("", env={"HERMES_LOG_FORMAT": "json"})
    assert json.loads(next(line for line in lines if "job ended" in line))["job_id"] == "j1"
    with pytest.raises(subprocess.CalledProcessError):
        run("", env={"HERMES_LOG_FORMAT": "xml"})


def test_vllm_child_processes_get_the_same_formatter() -> None:
    # What vLLM's engine core does at import: dictConfig from VLLM_LOGGING_CONFIG_PATH
    child = textwrap.dedent(
        """
        import json, logging.config, os
        from hermes_worker.worker.logs import configure_logging
        configure_logging("INFO", "json", worker="w9")
        path = os.environ["VLLM_LOGGING_CONFIG_PATH"]
        logging.getLogger().handlers = []  # a fresh process has none of the parent's
        logging.config.dictConfig(json.load(open(path)))
        logging.getLogger("vllm.v1.engine.core").info("core up")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, check=True, timeout=120
    )
    line = next(line for line in out.stderr.splitlines() if "core up" in line)
    record = json.loads(line)
    assert (record["logger"], record["worker"], record["level"]) == (
        "vllm.v1.engine.core",
        "w9",
        "info",
    )


@pytest.mark.engine
def test_the_worker_logs_one_json_line_per_job(worker: WorkerProcess) -> None:
    with HermesClient(worker.settings) as client:
        handle = client.submit({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        result = handle.result(timeout=120)
    deadline = time.monotonic() + 10
    ended: list[dict[str, Any]] = []
    while not ended and time.monotonic() < deadline:
        for line in worker.log().splitlines():
            if line.startswith("{") and handle.id in line:
                record = json.loads(line)
                if record.get("msg") == "job ended":
                    ended.append(record)
        time.sleep(0.2)
    assert len(ended) == 1
    assert ended[0]["job_id"] == handle.id and ended[0]["attempt"] == result.job.attempts
    assert ended[0]["status"] == "succeeded" and ended[0]["worker"] == result.job.worker
    assert ended[0]["completion_tokens"] == result.usage.completion_tokens  # type: ignore[union-attr]
    # vLLM's engine core logged through the same pipeline
    assert any(
        line.startswith("{") and '"logger": "vllm' in line for line in worker.log().splitlines()
    )
