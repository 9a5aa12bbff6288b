"""The gateway's pure parts, without a server: OpenAI requests into job bodies, events into
chunks (a restarted job included), routes, and error params. The gateway itself, with real
clients, is tested in test_gateway.py."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from hermes_worker.contract.jobs import JOB_ID_PATTERN, parse_job
from hermes_worker.contract.store import StreamEvent
from hermes_worker.errors import ConfigurationError, InvalidRequest
from hermes_worker.gateway.errors import (
    GatewayError,
    from_invalid_request,
    param_of,
)
from hermes_worker.gateway.openai_shapes import (
    ChunkStream,
    chat_request,
    decode_body,
    idempotent_job_id,
)
from hermes_worker.gateway.routing import Deployment, parse_routes

USER = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(USER), **fields}


def refused(**fields: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        chat_request(body(**fields), None)
    return caught.value


# --- requests -------------------------------------------------------------------------------


def test_openai_only_fields_leave_the_job_body_and_the_rest_is_a_valid_job() -> None:
    # Given a request with every OpenAI-side field a client commonly sends
    request = chat_request(
        body(
            stream=True, stream_options={"include_usage": True}, n=1, logprobs=False,
            parallel_tool_calls=True, max_completion_tokens=64, store=False,
            service_tier="auto", prompt_cache_key="k", user="u-1", temperature=None,
            thinking=True, priority=2,
        ),
        None,
    )  # fmt: skip
    # Then HTTP keeps what it needs, hints are dropped, and the job is what it takes
    assert (request.stream, request.include_usage, request.background) == (True, True, False)
    assert request.job == {
        "model": "m", "messages": USER, "max_tokens": 64, "user": "u-1", "thinking": True,
        "priority": 2, "n": 1, "logprobs": False, "parallel_tool_calls": True,
    }  # fmt: skip
    assert parse_job(request.job).max_tokens == 64


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": "yes"}, "stream"),
        ({"background": 1}, "background"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
        ({"model": 3}, "model"),
    ],
)
def test_fields_with_no_meaning_here_are_refused_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    error = refused(**fields)
    assert (error.status, error.param) == (400, param)


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": TOOLS, "parallel_tool_calls": False},
        {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
        {"logprobs": True, "top_logprobs": 5},
        {"n": 3},
    ],
)
def test_n_logprobs_and_parallel_tool_calls_are_the_jobs_own(fields: dict[str, Any]) -> None:
    job = chat_request(body(**fields), None).job
    assert {name: job[name] for name in fields} == fields
    parse_job(job)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
    ],
)
def test_bad_n_logprobs_and_parallel_tool_calls_are_refused_by_the_job_contract(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_job(chat_request(body(**fields), None).job)
    assert from_invalid_request(caught.value, {}).param == param


def test_an_sdk_message_sent_back_in_the_history_loses_its_null_response_fields() -> None:
    # Given an assistant message as an OpenAI SDK dumps it (refusal, annotations... null)
    echoed = {
        "role": "assistant", "content": "Hi", "refusal": None, "annotations": [],
        "audio": None, "function_call": None, "reasoning_content": "hmm",
    }  # fmt: skip
    request = chat_request(body(messages=[*USER, echoed, *USER]), None)
    # Then the job gets the message it understands
    assert request.job["messages"][1] == {
        "role": "assistant",
        "content": "Hi",
        "reasoning_content": "hmm",
    }
    parse_job(request.job)


@pytest.mark.parametrize("key", ["retry-1", "ümlaut key with spaces", "x" * 255, "../../etc"])
def test_any_idempotency_key_maps_to_a_valid_job_id_of_its_own(key: str) -> None:
    request = chat_request(body(), key)
    assert request.job_id == idempotent_job_id(key) == request.job["id"]
    assert re.fullmatch(JOB_ID_PATTERN, request.job_id)
    assert idempotent_job_id(key) != idempotent_job_id(key + " ")
    assert idempotent_job_id(key, scope="tenant-a") != idempotent_job_id(key, scope="tenant-b")


def test_an_idempotency_key_and_a_body_id_together_are_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        chat_request(body(id="mine"), "key")
    assert caught.value.param == "id"
    with pytest.raises(GatewayError):
        chat_request(body(), "x" * 256)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b"\xff", "not valid UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "nested"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400_saying_why(raw: bytes, says: str) -> None:
    with pytest.raises(GatewayError) as caught:
        decode_body(raw)
    assert caught.value.status == 400 and says in caught.value.message


def test_contract_errors_name_the_field_as_the_client_wrote_it() -> None:
    assert param_of("messages.0.content: Field required") == "messages.0.content"
    assert param_of("metadata.k (key): String should have at most 64 characters") == "metadata.k"
    assert param_of("body is not valid JSON: x") is None
    error = from_invalid_request(
        InvalidRequest("max_tokens: Input should be greater than or equal to 1"),
        {"max_tokens": "max_completion_tokens"},
    )
    assert error.param == "max_completion_tokens"
    assert error.message.startswith("max_completion_tokens: Input should be")
    too_big = from_invalid_request(
        InvalidRequest("body is 70000 bytes, over the 65536-byte limit"), {}
    )
    assert too_big.status == 413


# --- routes ---------------------------------------------------------------------------------

DEFAULT = Deployment("hermes", "hermes:")


def test_routes_read_as_json_or_as_name_equals_queue() -> None:
    expected = {
        "hermes-405b": Deployment("hermes", "hermes:"),
        "hermes-70b": Deployment("hermes-70b", "hermes-70b:"),
    }
    text = "hermes-405b=hermes, hermes-70b=hermes-70b@hermes-70b:"
    assert parse_routes(text, DEFAULT) == expected
    as_json = {
        "hermes-405b": "hermes",
        "hermes-70b": {"queue": "hermes-70b", "key_prefix": "hermes-70b:"},
    }
    assert parse_routes(json.dumps(as_json), DEFAULT) == expected
    assert parse_routes(None, DEFAULT) == parse_routes("  ", DEFAULT) == {}


@pytest.mark.parametrize(
    "text", ["a", "a=", "=q", "a=q,a=r", "{", '{"a": 3}', '{"a": {"queu": "q"}}']
)
def test_a_bad_route_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ConfigurationError, match="HERMES_GATEWAY_ROUTES"):
        parse_routes(text, DEFAULT)


# --- events into chunks ---------------------------------------------------------------------


def events(*items: tuple[str, Any]) -> list[StreamEvent]:
    return [StreamEvent(f"{i + 1}-0", i + 1, kind, data) for i, (kind, data) in enumerate(items)]


def text(kind: str, value: str) -> tuple[str, Any]:
    return (kind, {"text": value})


def run(stream: ChunkStream, items: list[StreamEvent]) -> list[dict[str, Any]]:
    out = [stream.first()]
    for event in items:
        out += stream.feed(event)
        if stream.failed:
            return out
    return out + stream.finish()


def deltas(payloads: list[dict[str, Any]], name: str) -> str:
    return "".join(p["choices"][0]["delta"].get(name) or "" for p in payloads if p.get("choices"))


USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
CALL = {
    "index": 0,
    "id": "call_1",
    "type": "function",
    "function": {"name": "f", "arguments": "{}"},
}


def test_events_become_openai_chunks_ending_with_the_finish_reason_then_usage() -> None:
    stream = ChunkStream("j1", "m", 5, include_usage=True)
    out = run(
        stream,
        events(
            ("started", {"attempt": 1}), text("reasoning", "Hmm."), text("content", "Hi "),
            text("content", "there"), ("tool_call", CALL), ("usage", USAGE),
            ("done", {"finish_reason": "tool_calls"}),
        ),
    )  # fmt: skip
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert deltas(out, "reasoning_content") == "Hmm." and deltas(out, "content") == "Hi there"
    [call] = [
        p["choices"][0]["delta"]["tool_calls"][0]
        for p in out
        if p.get("choices") and "tool_calls" in p["choices"][0]["delta"]
    ]
    assert call == {**CALL, "index": 0}
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[-1]["choices"] == [] and out[-1]["usage"] == USAGE
    assert all(p["id"] == "j1" and p["object"] == "chat.completion.chunk" for p in out)
    assert stream.succeeded


def test_a_restarted_attempt_that_repeats_the_output_streams_on_seamlessly() -> None:
    # Given a job whose first attempt streamed "Once upon" and died, and whose second
    # attempt writes the same text again in other pieces
    out = run(
        ChunkStream("j1", "m", 5, include_usage=False),
        events(
            text("content", "Once"), text("content", " upon"),
            ("error", {"type": "engine_error", "message": "x"}), ("restarted", {"attempt": 2}),
            text("content", "On"), text("content", "ce upon a"), text("content", " time"),
            ("done", {"finish_reason": "stop"}),
        ),
    )  # fmt: skip
    # Then the client gets the text once, and a normal end
    assert deltas(out, "content") == "Once upon a time"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "second",
    [
        [text("content", "Twice")],  # different text
        [text("content", "On"), ("done", {"finish_reason": "stop"})],  # less than was sent
    ],
)
def test_a_restarted_attempt_with_other_output_ends_the_stream_with_an_error(
    second: list[tuple[str, Any]],
) -> None:
    stream = ChunkStream("j1", "m", 5, include_usage=False)
    out = run(stream, events(text("content", "Once"), ("restarted", {"attempt": 2}), *second))
    assert out[-1] == stream.failed
    assert out[-1]["error"]["code"] == "job_restarted"
    assert "GET /v1/jobs/j1" in out[-1]["error"]["message"]
    assert not stream.succeeded


def test_a_restart_before_any_output_changes_nothing() -> None:
    out = run(
        ChunkStream("j1", "m", 5, include_usage=False),
        events(
            ("started", {"attempt": 1}), ("restarted", {"attempt": 2}), text("content", "Hi"),
            ("done", {"finish_reason": "stop"}),
        ),
    )  # fmt: skip
    assert deltas(out, "content") == "Hi" and out[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("end", "code"),
    [
        (("error", {"type": "timeout", "message": "deadline"}), "timeout"),
        (("error", {"type": "engine_error", "message": "dead"}), "engine_error"),
        (("cancelled", {"reason": "cancelled before it started"}), "job_cancelled"),
    ],
)
def test_a_job_that_did_not_succeed_ends_its_stream_with_an_error_object(
    end: tuple[str, Any], code: str
) -> None:
    stream = ChunkStream("j1", "m", 5, include_usage=True)
    out = run(stream, events(text("content", "Hi"), end))
    assert out[-1]["error"]["code"] == code and not stream.succeeded


def lp(*tokens: str) -> list[dict[str, Any]]:
    """Logprob entries of ``tokens``, as a worker writes them on content events."""
    return [
        {"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens
    ]


def chunk_logprobs(payloads: list[dict[str, Any]]) -> list[str]:
    return [
        entry["token"]
        for p in payloads
        if p.get("choices") and p["choices"][0]["logprobs"] is not None
        for entry in p["choices"][0]["logprobs"]["content"]
    ]


def test_content_chunks_carry_their_tokens_logprobs() -> None:
    out = run(
        ChunkStream("j1", "m", 5, include_usage=False),
        events(
            text("reasoning", "Hmm."), ("content", {"text": "Hi", "logprobs": lp("Hi")}),
            ("content", {"text": " there", "logprobs": lp(" there")}),
            ("done", {"finish_reason": "stop"}),
        ),
    )  # fmt: skip
    # Each content chunk has logprobs.content; the others (role, reasoning, end) null
    assert chunk_logprobs(out) == ["Hi", " there"]
    with_text = [p for p in out if p["choices"][0]["delta"].get("content")]
    assert all(p["choices"][0]["logprobs"] is not None for p in with_text)
    assert out[0]["choices"][0]["logprobs"] is None and out[-1]["choices"][0]["logprobs"] is None


def test_a_restarted_attempt_that_repeats_the_output_sends_each_tokens_logprobs_once() -> None:
    out = run(
        ChunkStream("j1", "m", 5, include_usage=False),
        events(
            ("content", {"text": "Once upon", "logprobs": lp("Once", " upon")}),
            ("restarted", {"attempt": 2}), ("content", {"text": "Once", "logprobs": lp("Once")}),
            ("content", {"text": " upon a", "logprobs": lp(" upon", " a")}),
            ("done", {"finish_reason": "stop"}),
        ),
    )  # fmt: skip
    assert deltas(out, "content") == "Once upon a"
    assert chunk_logprobs(out) == ["Once", " upon", " a"]


def test_a_job_of_several_choices_streams_each_with_its_index() -> None:
    # Given events of a job of 2 choices, interleaved, each naming its choice
    out = run(
        ChunkStream("j1", "m", 5, include_usage=True),
        events(
            ("content", {"text": "Hi", "choice": 0}), ("content", {"text": "Yo", "choice": 1}),
            ("tool_call", {**CALL, "choice": 1}), ("content", {"text": "!", "choice": 0}),
            ("usage", USAGE),
            ("done", {"finish_reason": "stop", "finish_reasons": ["stop", "tool_calls"]}),
        ),
    )  # fmt: skip
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for payload in out:
        for choice in payload.get("choices") or ():
            by_index[choice["index"]].append(choice)
    # Then each choice opens with its role, has its own text and calls, and its finish reason
    for index, text, reason in [(0, "Hi!", "stop"), (1, "Yo", "tool_calls")]:
        choices = by_index[index]
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content") or "" for c in choices[1:]) == text
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == [reason]
    [call] = [c["delta"]["tool_calls"][0] for c in by_index[1] if "tool_calls" in c["delta"]]
    assert call["index"] == 0
    assert out[-1]["choices"] == [] and out[-1]["usage"] == USAGE


def test_a_restart_replays_each_choice_on_its_own() -> None:
    out = run(
        ChunkStream("j1", "m", 5, include_usage=False),
        events(
            ("content", {"text": "Once", "choice": 0}), ("content", {"text": "Twice", "choice": 1}),
            ("restarted", {"attempt": 2}), ("content", {"text": "Twice more", "choice": 1}),
            ("content", {"text": "Once upon", "choice": 0}),
            ("done", {"finish_reason": "stop", "finish_reasons": ["stop", "stop"]}),
        ),
    )  # fmt: skip
    texts = ["", ""]
    for payload in out:
        for choice in payload.get("choices") or ():
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == ["Once upon", "Twice more"]
