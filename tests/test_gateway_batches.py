"""The gateway's Files and Batches endpoints through the official openai SDK and curl: a real
gateway process (running batches itself) and a scripted worker process on real Redis."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from test_gateway import USER, script, start_gateway, wait_gateway
from worker_fixtures import (
    WorkerProcess,
    clean_redis,
    scripted_args,
    start_worker,
    stop_worker,
    unique_settings,
    wait_ready,
)

from hermes_worker.cli.services import ServiceProcess, free_port
from hermes_worker.settings import Settings

MAX_FILE = 64 * 1024
TIMEOUT = 60.0


@dataclass
class Stack:
    url: str
    settings: Settings
    gateway: ServiceProcess
    worker: WorkerProcess

    def sdk(self) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stack(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = unique_settings()
    logs = tmp_path_factory.mktemp("gateway-batches")
    worker = start_worker(settings, test_model_dir, logs / "worker.log", scripted_args(200))
    served = settings.model_copy(
        update={
            "gateway_port": free_port(),
            "gateway_auth": "none",  # tenants: tests/test_gateway_tenants.py
            "files_dir": str(logs / "files"),
            "batch_max_bytes": MAX_FILE,
            "batch_poll_s": 0.05,
        }
    )
    gateway = start_gateway(served, logs / "gateway.log")
    url = f"http://127.0.0.1:{served.gateway_port}"
    try:
        wait_ready(worker, timeout=60)
        wait_gateway(gateway, url)
        yield Stack(url, served, gateway, worker)
    finally:
        gateway.stop(10)
        stop_worker(worker)
        clean_redis(settings)


def request(custom_id: str, **metadata: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": USER, "max_completion_tokens": 64}
    if metadata:
        body["metadata"] = metadata
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def wait_batch(client: Any, batch_id: str, *statuses: str) -> Any:
    end = time.monotonic() + TIMEOUT
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < end, batch
        time.sleep(0.1)


def lines_of(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_the_sdk_runs_a_batch_file_to_its_output(stack: Stack) -> None:
    client = stack.sdk()
    # Given a file uploaded with files.create, one line of which fails
    lines = [request(f"r{i}") for i in range(6)] + [request("bad", **script(fail_after=0))]
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert (uploaded.purpose, uploaded.bytes) == ("batch", len(jsonl(lines)))
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    # When a batch is made of it
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "search"},
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"team": "search"}
    # Then the gateway's own runner completes it
    done = wait_batch(client, batch.id, "completed", "failed")
    assert done.status == "completed"
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 6, 1)
    out = lines_of(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == [f"r{i}" for i in range(6)]
    assert out[0]["response"]["body"]["object"] == "chat.completion"
    [error] = lines_of(client, done.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 500
    # And it is listed, and cannot be cancelled once ended
    assert batch.id in [b.id for b in client.batches.list(limit=10)]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_the_sdk_cancels_a_running_batch(stack: Stack) -> None:
    client = stack.sdk()
    slow = [request(f"s{i}", **script(text="a b c d e f", tokens_per_s=3)) for i in range(40)]
    uploaded = client.files.create(file=("slow.jsonl", jsonl(slow)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_batch(client, batch.id, "in_progress")
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = wait_batch(client, batch.id, "cancelled")
    out, err = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"s{i}" for i in range(40))
    assert done.request_counts.completed + done.request_counts.failed == 40
    # (every line was queued at once: each ended as its job did, cancelled while it ran)
    codes = {(e["error"] or e["response"]["body"]["error"])["code"] for e in err}
    assert err and codes <= {"job_cancelled", "batch_cancelled"}


def test_a_file_with_bad_lines_makes_a_failed_batch_naming_them(stack: Stack) -> None:
    client = stack.sdk()
    content = jsonl([request("a"), request("a")]) + b"not json\n"
    uploaded = client.files.create(file=("bad.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_batch(client, batch.id, "failed")
    assert [(e.line, e.code) for e in failed.errors.data] == [
        (2, "duplicate_custom_id"),
        (3, "invalid_json"),
    ]


def test_wrong_requests_are_openai_errors(stack: Stack) -> None:
    client = stack.sdk()
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-000000000000000000000000")
    uploaded = client.files.create(file=("ok.jsonl", jsonl([request("a")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.APIStatusError) as too_large:
        client.files.create(file=("big.jsonl", b"x" * (MAX_FILE + 1)), purpose="batch")
    assert too_large.value.status_code == 413


def test_curl_uploads_a_file(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([request("c1")]))
    reply = subprocess.run(
        ["curl", "-sS", f"{stack.url}/v1/files", "-F", "purpose=batch", "-F", f"file=@{path}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    uploaded = json.loads(reply.stdout)
    assert uploaded["object"] == "file" and uploaded["bytes"] == path.stat().st_size
    assert stack.sdk().files.content(uploaded["id"]).content == path.read_bytes()
