"""Whatever a producer sends, the worker answers clearly or drops it safely, and keeps serving.

Messages are put on the real queue (some crafted byte by byte in kombu's Redis format) and
the session worker must then still run a normal job."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from worker_fixtures import WorkerProcess

from hermes_worker.contract.jobs import JobStatus
from hermes_worker.contract.queue import make_celery, send_job
from hermes_worker.contract.store import Keys
from hermes_worker.settings import Settings
from producers.client import HermesClient

pytestmark = pytest.mark.engine
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[HermesClient]:
    with HermesClient(worker.settings) as c:
        yield c


def still_serving(client: HermesClient) -> None:
    body = {"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}
    assert client.submit(body).result(timeout=TIMEOUT).job.status is JobStatus.SUCCEEDED


def captured_message(settings: Settings, body: Any, task_id: str) -> dict[str, Any]:
    """A real Celery message for ``body``, taken off a queue no worker reads."""
    spare = f"{settings.queue_name}-spare"
    send_job(make_celery(settings), body, task_id, 0, spare)
    server = redis.Redis.from_url(settings.redis_url)
    raw = server.rpop(spare)
    assert raw is not None
    return dict(json.loads(raw))


def push(settings: Settings, message: dict[str, Any] | bytes) -> None:
    raw = message if isinstance(message, bytes) else json.dumps(message).encode()
    redis.Redis.from_url(settings.redis_url).lpush(settings.queue_name, raw)


def record(settings: Settings, job_id: str) -> dict[bytes, bytes]:
    return dict(
        redis.Redis.from_url(settings.redis_url).hgetall(Keys(settings.key_prefix).job(job_id))
    )


def test_a_pickle_message_is_refused_unexecuted(
    client: HermesClient, worker: WorkerProcess
) -> None:
    settings = worker.settings
    # Given a message serialized with pickle (which would run code on load)
    job_id = uuid.uuid4().hex
    app = make_celery(settings)
    app.send_task(
        "hermes.chat",
        args=[{"messages": [{"role": "user", "content": "x"}]}],
        task_id=job_id,
        queue=settings.queue_name,
        serializer="pickle",
    )
    # Then the worker refuses to deserialize it, runs nothing, and keeps serving
    still_serving(client)
    deadline = time.monotonic() + 30
    while "pickle" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "ContentDisallowed" in worker.log() or "untrusted content" in worker.log()
    assert record(settings, job_id) == {}


def test_invalid_utf8_in_a_message_is_dropped_safely(
    client: HermesClient, worker: WorkerProcess
) -> None:
    settings = worker.settings
    job_id = uuid.uuid4().hex
    message = captured_message(settings, {"messages": [{"role": "user", "content": "x"}]}, job_id)
    message["body"] = base64.b64encode(b'[[{"messages": "\xff\xfe"}], {}, {}]').decode()
    push(settings, message)
    still_serving(client)
    assert record(settings, job_id) == {}


def test_garbage_on_the_queue_is_survived(client: HermesClient, worker: WorkerProcess) -> None:
    push(worker.settings, b"\x00\x01 this is not a kombu message \xff")
    push(worker.settings, b'{"body": "not base64!", "headers": 5}')
    still_serving(client)


def test_an_oversized_body_fails_as_a_bad_request(
    client: HermesClient, worker: WorkerProcess
) -> None:
    settings = worker.settings
    job_id = uuid.uuid4().hex
    huge = {"messages": [{"role": "user", "content": "x" * (settings.max_body_bytes + 10)}]}
    send_job(make_celery(settings), huge, job_id, 5, settings.queue_name)
    result = client.job(job_id).result(timeout=TIMEOUT)
    assert result.job.status is JobStatus.FAILED
    assert result.error is not None and result.error.type == "invalid_request_error"
    assert "byte limit" in result.error.message
    still_serving(client)


@pytest.mark.parametrize(
    "args",
    [
        [],  # no body at all
        ["just a string"],
        [[1, 2, 3]],
        [{"messages": [{"role": "user", "content": "x"}]}, "an extra positional"],
    ],
)
def test_wrong_task_arguments_fail_clearly(
    client: HermesClient, worker: WorkerProcess, args: list[Any]
) -> None:
    job_id = uuid.uuid4().hex
    make_celery(worker.settings).send_task(
        "hermes.chat", args=args, task_id=job_id, queue=worker.settings.queue_name
    )
    result = client.job(job_id).result(timeout=TIMEOUT)
    assert result.job.status is JobStatus.FAILED
    assert result.error is not None and result.error.type == "invalid_request_error"
    still_serving(client)


def test_deeply_nested_json_is_a_clear_error(client: HermesClient, worker: WorkerProcess) -> None:
    # 500 levels: deep enough to hurt a naive walker, shallow enough for any JSON encoder
    nested: Any = "x"
    for _ in range(500):
        nested = [nested]
    job_id = uuid.uuid4().hex
    body = {"messages": [{"role": "user", "content": "x"}], "metadata": {"k": nested}}
    send_job(make_celery(worker.settings), body, job_id, 5, worker.settings.queue_name)
    result = client.job(job_id).result(timeout=TIMEOUT)
    assert result.error is not None and result.error.type == "invalid_request_error"
    assert "nested" in result.error.message
    still_serving(client)
