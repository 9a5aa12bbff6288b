"""The HTTP gateway with real clients: the official ``openai`` SDK (sync and async), httpx and
curl, against a real ``hermes-worker gateway`` process, real Redis and a real scripted worker
process (``hermes-worker run --engine scripted``: no vLLM, each job's text set by its
``hermes_script`` metadata). One gateway and one worker serve the whole module; the drain test
starts a second gateway of its own.

The gateway routes ``tiny`` to the worker's queue, ``ghost`` to a queue no worker serves, and
``backlog`` to a queue whose only "worker" is a vitals hash written here (live, taking
nothing: its jobs stay queued)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from worker_fixtures import (
    WORKER_REDIS_URL,
    WorkerProcess,
    clean_redis,
    patient_redis,
    scripted_args,
    start_worker,
    stop_worker,
    unique_settings,
    wait_ready,
)

from hermes_worker.cli.services import (
    ServiceProcess,
    free_port,
    process_env,
    settings_env,
    worker_command,
)
from hermes_worker.contract.store import Keys, as_text
from hermes_worker.settings import Settings
from hermes_worker.testing.scripted_engine import SCRIPT_KEY
from producers.control import queue_lists

STORY = "Once upon a time a queue met an engine, and they streamed happily ever after."
REASONING = "The user says hi."
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
USER = [{"role": "user", "content": "Hi"}]
MAX_BODY = 64 * 1024
MAX_DEPTH = 4
DISCONNECT_GRACE_S = 1.5
LONG = " ".join(f"word{i}" for i in range(30))  # 30 tokens: 3 s at 10 a second


@dataclass
class Stack:
    url: str
    settings: Settings  # the deployment's (keys, queue) as the gateway has them
    gateway: ServiceProcess
    worker: WorkerProcess
    checkpoint: str  # what the worker serves
    backlog: str  # the queue of the "backlog" route

    @property
    def redis(self) -> redis.Redis:
        return patient_redis(WORKER_REDIS_URL)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix)

    def sdk(self, **options: Any) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", **options)

    def async_sdk(self, **options: Any) -> Any:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", **options)

    def job(self, job_id: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=10)
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 15) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            found = self.job(job_id)
            if found["status"] in statuses or time.monotonic() > end:
                return found
            time.sleep(0.05)


def script(text: str = STORY, **fields: Any) -> dict[str, str]:
    """The metadata that makes the scripted engine write ``text`` (at ``tokens_per_s``...)."""
    return {SCRIPT_KEY: json.dumps({"text": text, **fields})}


def chat(**fields: Any) -> dict[str, Any]:
    """A request body for model ``tiny``."""
    return {"model": "tiny", "messages": USER, **fields}


def start_gateway(settings: Settings, log_path: Path) -> ServiceProcess:
    """``hermes-worker gateway`` on exactly ``settings`` (its HERMES_* environment), its
    file store beside its log unless the settings name one."""
    if settings.files_dir == Settings.model_fields["files_dir"].default:
        settings = settings.model_copy(update={"files_dir": str(log_path.parent / "files")})
    command = [*worker_command(), "gateway", "--log-level", "warning"]
    env = process_env(settings_env(settings))
    return ServiceProcess.spawn(command, env, log_path, own_session=False)


def wait_gateway(gateway: ServiceProcess, url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while True:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"the gateway exited: {gateway.log_tail(20)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"the gateway did not come up: {gateway.log_tail(20)}")
        time.sleep(0.1)


def gateway_settings(settings: Settings, backlog: str) -> Settings:
    routes = {
        "tiny": settings.queue_name,
        "ghost": f"{settings.queue_name}-ghost",
        "backlog": backlog,
    }
    return settings.model_copy(
        update={
            "gateway_port": free_port(),
            "gateway_routes": json.dumps(routes),
            "max_body_bytes": MAX_BODY,
            "max_queue_depth": MAX_DEPTH,
            "gateway_disconnect_grace_s": DISCONNECT_GRACE_S,
            "gateway_keepalive_s": 0.5,
            # No API keys: these tests are about the core (and script jobs through hermes_*
            # metadata); tenants are tested in test_gateway_tenants.py
            "gateway_auth": "none",
        }
    )


@pytest.fixture(scope="module")
def stack(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = unique_settings()
    logs = tmp_path_factory.mktemp("gateway")
    backlog = f"{settings.queue_name}-backlog"
    worker = start_worker(
        settings,
        test_model_dir,
        logs / "worker.log",
        cli_args=scripted_args(200),
        HERMES_MAX_RETRIES="1",
    )
    served = gateway_settings(settings, backlog)
    gateway = start_gateway(served, logs / "gateway.log")
    url = f"http://127.0.0.1:{served.gateway_port}"
    keys = Keys(settings.key_prefix)
    r = patient_redis(WORKER_REDIS_URL)
    # The backlog queue's "worker": live vitals, and no consumer behind them.
    r.hset(keys.worker("backlog-worker"), mapping={"model": "none", "queue": backlog})
    r.zadd(keys.workers, {"backlog-worker": time.time()})
    try:
        wait_ready(worker, timeout=60)
        wait_gateway(gateway, url)
        yield Stack(url, served, gateway, worker, str(test_model_dir), backlog)
    finally:
        gateway.stop(10)
        stop_worker(worker)
        clean_redis(settings)
        r.delete(*queue_lists(settings.model_copy(update={"queue_name": backlog})))


def sse_events(response: Any) -> Iterator[dict[str, str]]:
    """The events of an SSE response (httpx), comments as {"comment": ...}."""
    event: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")
    if event:
        yield event


# --- chat completions through the OpenAI SDK --------------------------------------------------


def test_the_sync_sdk_gets_a_chat_completion_with_reasoning_and_usage(stack: Stack) -> None:
    # Given the sync SDK pointed at the gateway
    client = stack.sdk()
    # When it asks for a completion (Hermes fields through extra_body)
    text = f"<think>{REASONING}</think>{STORY}"
    reply = client.chat.completions.create(
        model="tiny", messages=USER, metadata=script(text), extra_body={"thinking": True}
    )
    # Then it gets OpenAI's chat.completion: content, reasoning, finish reason, usage
    message = reply.choices[0].message
    assert (message.content, message.reasoning_content) == (STORY, REASONING)
    assert reply.choices[0].finish_reason == "stop" and reply.model == "tiny"
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # And the completion's id is its job's
    assert stack.job(reply.id)["job"]["worker"] is not None
    # And, answered whole, its job wrote none of its output as it came (stream false)
    assert json.loads(stack.redis.hget(stack.keys.job(reply.id), "body"))["stream"] is False
    assert not {"content", "reasoning"} & set(event_types(stack, reply.id))


def event_types(stack: Stack, job_id: str) -> list[str]:
    entries = stack.redis.xrange(stack.keys.events(job_id))
    return [as_text(fields[b"type"]) for _, fields in entries]


def test_the_async_sdk_streams_reasoning_content_and_usage_chunks(stack: Stack) -> None:
    async def run() -> list[Any]:
        async with stack.async_sdk() as client:
            stream = await client.chat.completions.create(
                model="tiny",
                messages=USER,
                stream=True,
                stream_options={"include_usage": True},
                metadata=script(f"<think>{REASONING}</think>{STORY}"),
            )
            return [chunk async for chunk in stream]

    # When the async SDK streams a completion with include_usage
    chunks = asyncio.run(run())
    # Then the first chunk carries the role, the deltas join to the output, the last choice
    # carries finish_reason and a final chunk without choices the usage
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [c for c in chunks if c.choices]
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in with_choice
    )
    content = "".join(c.choices[0].delta.content or "" for c in with_choice)
    assert (reasoning, content) == (REASONING, STORY)
    assert with_choice[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1
    # And its job wrote its output as it came
    assert {"content", "reasoning"} <= set(event_types(stack, chunks[0].id))


def test_a_tool_call_comes_back_as_openai_tool_calls_streamed_or_not(stack: Stack) -> None:
    client = stack.sdk()
    text = f"Let me check.<tool_call>{json.dumps(CALL)}</tool_call>"
    # When the model calls a tool offered in the request
    reply = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, metadata=script(text)
    )
    # Then the completion has the call, its arguments as a JSON string
    [call] = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    # And the SDK's stream helper assembles the same from the chunks
    with client.chat.completions.stream(
        model="tiny", messages=USER, tools=TOOLS, metadata=script(text)
    ) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == (
        call.function.name,
        call.function.arguments,
    )
    # And the SDK's own message goes back in the history of the next turn (a tool loop)
    history = [
        *USER,
        reply.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    again = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, metadata=script("Sunny.")
    )
    assert again.choices[0].message.content == "Sunny."


def test_a_restarted_attempt_streams_seamlessly_when_it_writes_the_same(stack: Stack) -> None:
    # Given a job whose first attempt fails after 5 tokens (the worker retries it once)
    client = stack.sdk()
    stream = client.chat.completions.create(
        model="tiny", messages=USER, stream=True,
        metadata=script(STORY, fail_after=5, attempts=1, tokens_per_s=50),
    )  # fmt: skip
    chunks = list(stream)
    # Then the client gets the story once, with a normal end, from a job run twice
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == STORY
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stack.job(chunks[0].id)["job"]["attempts"] == 2


# --- idempotency, disconnects ------------------------------------------------------------------


def test_an_idempotency_key_makes_one_job_and_another_body_under_it_is_a_409(stack: Stack) -> None:
    client = stack.sdk(max_retries=0)
    key = f"order-{uuid.uuid4()}"
    options = {"extra_headers": {"Idempotency-Key": key}}
    # When a request is sent twice with one key
    first = client.chat.completions.create(
        model="tiny", messages=USER, metadata=script(), **options
    )
    second = client.chat.completions.create(
        model="tiny", messages=USER, metadata=script(), **options
    )
    # Then both answers are the one job's
    assert first.id == second.id and first.id.startswith("idem-")
    assert first.created == second.created and stack.job(first.id)["job"]["attempts"] == 1
    # And the same key with another body is refused, not joined
    with pytest.raises(openai.ConflictError) as caught:
        client.chat.completions.create(
            model="tiny", messages=USER, metadata=script("other"), **options
        )
    assert caught.value.code == "idempotency_key_reused"


def test_a_client_that_leaves_gets_its_job_cancelled(stack: Stack) -> None:
    slow = script(LONG, tokens_per_s=10)
    # When a streaming client reads its first words and hangs up
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/chat/completions",
        json=chat(stream=True, metadata=slow),
        timeout=10,
    ) as reply:
        events = sse_events(reply)
        job_id = json.loads(next(events)["data"])["id"]
        next(e for e in events if "content" in json.loads(e["data"])["choices"][0]["delta"])
    # Then its job is cancelled, keeping its output so far
    ended = stack.wait_status(job_id, "cancelled")
    assert ended["status"] == "cancelled" and ended["result"]["choices"][0]["message"]["content"]
    # And so is the job of a client that stops waiting for a completion
    marker = uuid.uuid4().hex
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{stack.url}/v1/chat/completions",
            json=chat(metadata={**slow, "marker": marker}),
            timeout=1.0,
        )
    [waited] = [
        as_text(k)
        for k in stack.redis.scan_iter(f"{stack.settings.key_prefix}job:*", _type="hash")
        if marker.encode() in (stack.redis.hget(k, "body") or b"")
    ]
    assert stack.wait_status(waited.rsplit(":", 1)[-1], "cancelled")["status"] == "cancelled"
    # But a client that asked for background keeps its job when it leaves its stream
    ticks = script(" ".join(["tick"] * 10), tokens_per_s=20)
    body = chat(stream=True, background=True, metadata=ticks)
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=10) as reply:
        job_id = json.loads(next(sse_events(reply))["data"])["id"]
    assert stack.wait_status(job_id, "succeeded", "cancelled")["status"] == "succeeded"


def test_a_client_with_an_idempotency_key_that_comes_back_keeps_its_job(stack: Stack) -> None:
    slow = chat(stream=True, metadata=script(LONG, tokens_per_s=10))
    url = f"{stack.url}/v1/chat/completions"
    # Given a streaming client with a key that hangs up after its first words
    key = {"Idempotency-Key": f"stream-{uuid.uuid4()}"}
    with httpx.stream("POST", url, json=slow, headers=key, timeout=10) as reply:
        events = sse_events(reply)
        job_id = json.loads(next(events)["data"])["id"]
        next(events)
    # When it sends the same request again at once
    with httpx.stream("POST", url, json=slow, headers=key, timeout=30) as reply:
        data = [e["data"] for e in sse_events(reply) if "data" in e]
    # Then it streams the job from its start to its end, which ran once, uncancelled
    chunks = [json.loads(d) for d in data[:-1]]
    assert data[-1] == "[DONE]" and {c["id"] for c in chunks} == {job_id}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == LONG
    assert (stack.job(job_id)["status"], stack.job(job_id)["job"]["attempts"]) == ("succeeded", 1)
    # And one that does not come back has its job cancelled after the grace
    key = {"Idempotency-Key": f"stream-{uuid.uuid4()}"}
    with httpx.stream("POST", url, json=slow, headers=key, timeout=10) as reply:
        job_id = json.loads(next(sse_events(reply))["data"])["id"]
    time.sleep(DISCONNECT_GRACE_S / 2)
    assert stack.job(job_id)["status"] in ("queued", "running")
    assert stack.wait_status(job_id, "cancelled")["status"] == "cancelled"


# --- background jobs ---------------------------------------------------------------------------


def test_a_background_job_is_created_retrieved_and_its_events_resumed(stack: Stack) -> None:
    client = stack.sdk()
    text = " ".join(f"w{i}" for i in range(20))
    # When a background job is created through the SDK's raw post
    created = client.post(
        "/chat/completions",
        body=chat(background=True, metadata=script(text, tokens_per_s=40)),
        cast_to=object,
    )
    job_id = created["id"]
    # (answered at once: queued, or already taken by the idle worker)
    assert created["object"] == "job" and created["status"] in ("queued", "running")
    # And its events are read in two goes: a first connection dropped after two events
    url = f"{stack.url}/v1/jobs/{job_id}/events"
    with httpx.stream("GET", url, timeout=60) as reply:
        first = [
            e for e, _ in zip((e for e in sse_events(reply) if "id" in e), range(2), strict=False)
        ]
    with httpx.stream("GET", url, headers={"Last-Event-ID": first[-1]["id"]}, timeout=60) as reply:
        rest = [e for e in sse_events(reply) if "id" in e]
    # Then the second picks up right after the first, and together they are the whole job
    seen = first + rest
    with httpx.stream("GET", url, timeout=60) as reply:
        whole = [e for e in sse_events(reply) if "id" in e]
    assert [e["id"] for e in seen] == [e["id"] for e in whole]
    assert rest[-1]["event"] == "done"
    joined = "".join(json.loads(e["data"])["data"]["text"] for e in seen if e["event"] == "content")
    assert joined == text
    # And the job, retrieved, holds its completion (the events' reader leaving cancels nothing)
    found = client.get(f"/jobs/{job_id}", cast_to=object)
    assert (
        found["status"] == "succeeded"
        and found["result"]["choices"][0]["message"]["content"] == text
    )


def test_a_background_job_is_cancelled_once(stack: Stack) -> None:
    client = stack.sdk(max_retries=0)
    created = client.post(
        "/chat/completions",
        body=chat(background=True, metadata=script(LONG, tokens_per_s=10)),
        cast_to=object,
    )
    stack.wait_status(created["id"], "running")
    # When it is cancelled
    cancelled = client.post(f"/jobs/{created['id']}/cancel", cast_to=object)
    # Then it stops (keeping its output so far), and a second cancel is a 409
    assert cancelled["cancel"] in ("cancelling", "cancelled")
    assert stack.wait_status(created["id"], "cancelled")["status"] == "cancelled"
    with pytest.raises(openai.ConflictError) as caught:
        client.post(f"/jobs/{created['id']}/cancel", cast_to=object)
    assert caught.value.code == "already_ended"
    with pytest.raises(openai.NotFoundError):
        client.get("/jobs/no-such-job", cast_to=object)


def test_a_full_queue_is_a_429_with_retry_after_and_a_queued_job_streams_keep_alives(
    stack: Stack,
) -> None:
    client = stack.sdk(max_retries=0)
    # Given a queue nobody takes from, filled to the gateway's limit
    ids = [
        client.post(
            "/chat/completions", body={**chat(background=True), "model": "backlog"}, cast_to=object
        )["id"]
        for _ in range(MAX_DEPTH)
    ]
    try:
        # When one more job comes: 429 queue_full, with Retry-After
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="backlog", messages=USER)
        assert caught.value.code == "queue_full"
        assert caught.value.response.headers["retry-after"] == "2"
        # And a waiting job's event stream says it is alive while nothing happens
        with httpx.stream("GET", f"{stack.url}/v1/jobs/{ids[0]}/events", timeout=10) as reply:
            assert next(sse_events(reply)) == {"comment": "keep-alive"}
    finally:
        for job_id in ids:
            client.post(f"/jobs/{job_id}/cancel", cast_to=object)


# --- errors ------------------------------------------------------------------------------------


def test_errors_have_openais_shape_and_status(stack: Stack) -> None:
    client = stack.sdk(max_retries=0)
    # A field the job contract refuses: 400 naming it
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[{"role": "user"}])
    assert (bad.value.param, bad.value.type) == ("messages.0.content", "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=USER, max_completion_tokens=0)
    assert bad.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=USER, logit_bias={"1": 5})
    assert (bad.value.param, bad.value.code) == ("logit_bias", "unsupported_parameter")
    # A model nobody routes: 404; one no live worker serves: 503
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.InternalServerError) as down:
        client.chat.completions.create(model="ghost", messages=USER)
    assert (down.value.status_code, down.value.code) == (503, "no_live_worker")
    # A body over HERMES_MAX_BODY_BYTES: 413, and the gateway serves the next request
    with pytest.raises(openai.APIStatusError) as large:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * MAX_BODY}]
        )
    assert (large.value.status_code, large.value.code) == (413, "request_too_large")
    # Malformed JSON: 400 in OpenAI's shape
    broken = httpx.post(f"{stack.url}/v1/chat/completions", content=b'{"model": ', timeout=10)
    assert broken.status_code == 400 and broken.json()["error"]["message"].startswith(
        "body is not valid JSON"
    )
    # A deadline reached while generating: 504
    with pytest.raises(openai.APIStatusError) as late:
        client.chat.completions.create(
            model="tiny",
            messages=USER,
            metadata=script(LONG, tokens_per_s=10),
            extra_body={"timeout_s": 0.5},
        )
    assert late.value.status_code == 504 and late.value.code in ("timeout", "expired")
    assert late.value.response.headers["x-should-retry"] == "false"
    # An unknown route: 404 in the same shape
    unknown = httpx.get(f"{stack.url}/v2/nothing", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_route"
    assert (
        client.chat.completions.create(model="tiny", messages=USER, metadata=script("ok"))
        .choices[0]
        .message.content
        == "ok"
    )


# --- models, health, metrics -------------------------------------------------------------------


def test_models_health_and_metrics(stack: Stack) -> None:
    client = stack.sdk()
    # The models live workers serve, by their route names (ghost has no worker)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "backlog"}
    assert models["tiny"].served_by == [stack.checkpoint]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(f"{stack.url}/healthz", timeout=10).json() == {"status": "ok", "redis": "ok"}
    # Requests counted by route template and status, latency, open streams (0 once closed)
    stack.job(client.chat.completions.create(model="tiny", messages=USER).id)
    list(client.chat.completions.create(model="tiny", messages=USER, stream=True))
    closed = (
        'hermes_gateway_open_streams{model="tiny",route="/v1/chat/completions",'
        'tenant="anonymous"} 0.0'
    )
    end = time.monotonic() + 5
    while closed not in (text := httpx.get(f"{stack.url}/metrics", timeout=10).text):
        assert time.monotonic() < end, text
        time.sleep(0.05)
    models_ok = 'method="GET",route="/v1/models",status="200",tenant="anonymous"'
    assert f"hermes_gateway_requests_total{{{models_ok}}}" in text
    assert 'route="/v1/jobs/{job_id}"' in text
    assert "hermes_gateway_request_duration_seconds_bucket" in text


# --- curl --------------------------------------------------------------------------------------


def curl(url: str, body: dict[str, Any], *flags: str) -> str:
    command = [
        "curl",
        "-sS",
        "--fail-with-body",
        *flags,
        url,
        "-H",
        "Content-Type: application/json",
        "-d",
        "@-",
    ]
    done = subprocess.run(
        command, input=json.dumps(body), capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_curl_gets_a_completion_and_a_stream(stack: Stack) -> None:
    url = f"{stack.url}/v1/chat/completions"
    # A plain request: one chat.completion
    completion = json.loads(curl(url, chat(metadata=script())))
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == STORY
    # A stream (-N): data lines of chunks, then [DONE]
    lines = [
        line for line in curl(url, chat(stream=True, metadata=script()), "-N").splitlines() if line
    ]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == STORY


# --- shutdown ------------------------------------------------------------------------------------


def test_sigterm_lets_an_open_stream_finish_then_the_gateway_exits(
    stack: Stack, tmp_path: Path
) -> None:
    # Given a second gateway on the same deployment, streaming a job of 1.5 s
    settings = stack.settings.model_copy(update={"gateway_port": free_port()})
    url = f"http://127.0.0.1:{settings.gateway_port}"
    gateway = start_gateway(settings, tmp_path / "gateway.log")
    try:
        wait_gateway(gateway, url)
        body = chat(stream=True, metadata=script(" ".join(["tick"] * 15), tokens_per_s=10))
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as reply:
            events = sse_events(reply)
            next(events)
            # When it gets SIGTERM mid-stream
            gateway.process.send_signal(signal.SIGTERM)
            rest = [e["data"] for e in events if "data" in e]
        # Then the stream still runs to its end, and the gateway exits
        assert rest[-1] == "[DONE]"
        content = "".join(
            json.loads(d)["choices"][0]["delta"].get("content") or "" for d in rest[:-1]
        )
        assert content.split() == ["tick"] * 15
        # (uvicorn raises the signal again once drained: the status says SIGTERM ended it)
        assert gateway.process.wait(30) in (0, -signal.SIGTERM)
    finally:
        gateway.stop(10)
