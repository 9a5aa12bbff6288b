"""The in-process worker of the lifecycle tests: a :class:`Harness` runs the worker's own
:class:`Runtime` on the scripted engine against real Redis, and the test plays the Celery
task (it hands a queued message's body to ``Runtime.run_job`` in a thread, as the task
does). The ``harness`` fixture (tests/conftest.py) gives one; tests/test_lifecycle.py,
test_output_fields.py and test_clock.py use it."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import redis
from test_client import queued_messages, task_args

from hermes_worker.contract.jobs import JobStatus
from hermes_worker.contract.store import Keys, StreamEvent, decode_event
from hermes_worker.settings import Settings
from hermes_worker.testing.scripted_engine import SCRIPT_KEY
from hermes_worker.worker.runtime import Runtime
from producers.client import HermesClient

REASONING = "The user wants the weather in Paris."
CONTENT = "Let me look that up."
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TEXT = f"<think>{REASONING}</think>{CONTENT}<tool_call>{json.dumps(CALL)}</tool_call>"
STORY = "Once upon a time a queue met an engine, and they streamed happily ever after."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TERMINAL = ("done", "error", "cancelled")


def job(script: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """A chat job whose metadata carries its script for the scripted engine."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Weather in Paris?"}]}
    if script is not None:
        body["metadata"] = {SCRIPT_KEY: json.dumps(script)}
    return {**body, **fields}


# --- the in-process worker -------------------------------------------------------------------


class Harness:
    """Runtimes on the test's own keys and queue, and the Celery task's part, played here."""

    def __init__(self, settings: Settings, model: Path, redis_client: redis.Redis) -> None:
        self.settings = settings.model_copy(
            update={
                "engine": "scripted",
                "model": str(model),
                "scripted_tokens_per_s": 0.0,  # no pause: a job takes milliseconds unless it stalls
                "lease_ttl_s": 0.9,  # a heartbeat every 0.3 s
                "stream_flush_ms": 5.0,
                "stream_min_tokens": 0,
                "max_retries": 1,
            }
        )
        self.redis = redis_client
        self.keys = Keys(self.settings.key_prefix)
        self.client = HermesClient(self.settings)
        self.runtimes: list[Runtime] = []
        self.tasks = ThreadPoolExecutor(4, thread_name_prefix="celery-task")

    def start(self) -> Runtime:
        """A started runtime (a worker without its Celery consumer), named w1, w2, ..."""
        name = f"w{len(self.runtimes) + 1}"
        runtime = Runtime(self.settings.model_copy(update={"worker_name": name}))
        runtime.start(timeout=30)
        self.runtimes.append(runtime)
        return runtime

    def deliver(self, runtime: Runtime, job_id: str) -> Future[JobStatus | None]:
        """Run the job's queued message on ``runtime``, as the Celery task does."""
        messages = queued_messages(self.redis, self.settings.queue_name)
        [body] = [task_args(m)[0] for _, m in messages if m["headers"]["id"] == job_id]
        return self.tasks.submit(runtime.run_job, body, job_id)

    def events(self, job_id: str) -> list[StreamEvent]:
        return [decode_event(i, f) for i, f in self.redis.xrange(self.keys.events(job_id))]

    def types(self, job_id: str) -> list[str]:
        return [event.type for event in self.events(job_id)]

    def record(self, job_id: str) -> dict[str, str]:
        raw: Any = self.redis.hgetall(self.keys.job(job_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def wait_for_output(self, job_id: str) -> None:
        wait_until(lambda: {"content", "reasoning"} & set(self.types(job_id)))

    def close(self) -> None:
        try:
            for runtime in self.runtimes:
                stop(runtime)
        finally:
            self.tasks.shutdown(wait=False, cancel_futures=True)
            self.client.close()


def stop(runtime: Runtime, timeout: float = 30.0) -> None:
    """Stop a runtime; one that does not stop in time fails the test with what its loop
    thread was doing and the tasks still pending there, taken before ``Runtime.stop`` gives
    up (a stop that hung in CI, on a loaded box)."""
    seen: list[str] = []

    def look() -> None:
        frame = sys._current_frames().get(runtime._thread.ident or -1)
        seen.append("".join(traceback.format_stack(frame)) if frame else "(no loop thread)")
        for task in asyncio.all_tasks(runtime._loop):
            seen.append(f"pending {task!r}:\n" + "".join(_task_stack(task)))

    watch = threading.Timer(timeout - 1, look)
    watch.start()
    try:
        runtime.stop(timeout=timeout)
    except FutureTimeout:
        message = f"the runtime did not stop in {timeout} s; its loop:\n" + "\n".join(seen)
        raise AssertionError(message) from None
    finally:
        watch.cancel()


def _task_stack(task: asyncio.Task[Any]) -> list[str]:
    """Where a suspended task waits, innermost frame last (its coroutine chain)."""
    lines: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}\n")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return lines


def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def output_of(events: list[StreamEvent], kind: str) -> str:
    """The text a reader joins from the stream: the last attempt's ``kind`` events."""
    last = max((i for i, e in enumerate(events) if e.type == "restarted"), default=-1)
    return "".join(e.data["text"] for e in events[last + 1 :] if e.type == kind)


def assert_one_ending(harness: Harness, job_id: str, terminal: str) -> None:
    """One terminal event, the last, and the stream numbered without a gap."""
    events = harness.events(job_id)
    assert [e.type for e in events if e.type in TERMINAL] == [terminal]
    assert events[-1].type == terminal
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
