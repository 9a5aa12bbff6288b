"""Wire models: what a producer may send, what parse_job makes of it, and what comes back."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hermes_worker.contract.jobs import (
    MAX_MESSAGES,
    AssistantMessage,
    ChatJob,
    Choice,
    DeveloperMessage,
    ErrorInfo,
    JobInfo,
    JobResult,
    JobStatus,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    SystemMessage,
    TextPart,
    ToolMessage,
    Usage,
    UserMessage,
    content_text,
    format_validation_error,
    parse_job,
)
from hermes_worker.errors import InvalidRequest
from hermes_worker.testing.tools import weather_tool

Body = dict[str, Any]


def conversation() -> Body:
    """A valid tool-using conversation: system, user, assistant call, tool result."""
    return {
        "messages": [
            {"role": "system", "content": "You are Hermes."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
        ],
        "tools": [weather_tool()],
    }


def full_body() -> Body:
    """Every request field set, every role present, every optional message field used."""
    body = conversation()
    body["messages"] = [
        {"role": "system", "content": "You are Hermes.", "name": "sys"},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}], "name": "dev"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather "},
                {"type": "text", "text": "in Paris?"},
            ],
            "name": "ann",
        },
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "The user wants weather.",
            "name": "hermes",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C", "name": "get_weather"},
    ]
    body["tools"][0]["function"]["strict"] = True
    body.update(
        id="job-42:retry.1",
        model="Hermes-4-70B",
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "description": "The final answer",
                "schema": {"type": "object", "properties": {"text": {"type": "string"}}},
                "strict": True,
            },
        },
        temperature=0.2,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        max_tokens=512,
        min_tokens=8,
        stop=["</answer>", "###"],
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        ignore_eos=True,
        thinking=True,
        keep_cots=True,
        json_whitespace="any",
        priority=0,
        timeout_s=30.5,
        deadline=1_900_000_000.0,
        metadata={"tenant": "acme", "trace": "abc123"},
        user="user-7",
    )
    return body


def _raises_invalid(raw: Any) -> str:
    """Parse ``raw``; assert it fails as a one-line InvalidRequest and return the message."""
    with pytest.raises(InvalidRequest) as caught:
        parse_job(raw)
    message = str(caught.value)
    assert message
    assert "\n" not in message and "Traceback" not in message
    return message


# --- valid bodies ----------------------------------------------------------------------


def test_given_minimal_body_when_parsed_then_hermes_card_defaults_apply() -> None:
    # Given a body with one user message and nothing else
    body = {"messages": [{"role": "user", "content": "Hi"}]}

    # When it is parsed
    job = parse_job(body)

    # Then sampling follows the Hermes 4 card and the Hermes switches are off
    assert (job.temperature, job.top_p, job.top_k, job.min_p) == (0.6, 0.95, 20, 0.0)
    assert job.max_tokens is None and job.min_tokens == 0
    assert (job.presence_penalty, job.frequency_penalty, job.repetition_penalty) == (0, 0, 1)
    assert job.thinking is False and job.keep_cots is False and job.ignore_eos is False
    assert job.json_whitespace == "compact"
    assert job.priority == 5 and job.n == 1
    assert job.id is None and job.tools is None and job.stop is None and job.seed is None
    assert job.effective_tool_choice == "none"
    assert job.effective_deadline(queued_at=100.0) is None
    assert isinstance(job.messages[0], UserMessage)


@pytest.mark.parametrize("form", ["dict", "str", "bytes"])
def test_given_each_body_form_when_parsed_then_same_job(form: str) -> None:
    # Given the same body as a mapping, JSON text and UTF-8 bytes
    text = json.dumps(full_body(), ensure_ascii=False)
    raw: Any = {"dict": full_body(), "str": text, "bytes": text.encode()}[form]

    # When parsed / Then each gives the same job
    assert parse_job(raw) == parse_job(full_body())


def test_given_full_body_when_parsed_then_every_field_of_every_role_is_kept() -> None:
    # Given / When
    job = parse_job(full_body())

    # Then every role maps to its class with all its fields
    system, developer, user, assistant, tool = job.messages
    assert isinstance(system, SystemMessage) and system.name == "sys"
    assert (
        isinstance(developer, DeveloperMessage) and content_text(developer.content) == "Be brief."
    )
    assert isinstance(user, UserMessage) and user.name == "ann"
    assert content_text(user.content) == "Weather in Paris?"
    assert isinstance(assistant, AssistantMessage)
    assert assistant.content == "Let me check." and assistant.name == "hermes"
    assert assistant.reasoning_content == "The user wants weather."
    assert assistant.tool_calls is not None
    assert assistant.tool_calls[0].parsed_arguments() == {"city": "Paris"}
    assert isinstance(tool, ToolMessage)
    assert (tool.tool_call_id, tool.name, tool.content) == ("call_1", "get_weather", "18 C")
    # and every top-level field is kept
    assert job.tools is not None and job.tools[0].function.strict is True
    assert isinstance(job.tool_choice, NamedToolChoice)
    assert job.tool_choice.function.name == "get_weather"
    assert isinstance(job.response_format, JsonSchemaFormat)
    assert job.response_format.json_schema.schema_["type"] == "object"
    assert job.response_format.json_schema.strict is True
    assert (job.temperature, job.top_p, job.top_k, job.min_p) == (0.2, 0.9, -1, 0.05)
    assert (job.max_tokens, job.min_tokens, job.seed) == (512, 8, 1234)
    assert job.stop == ("</answer>", "###")
    assert (job.presence_penalty, job.frequency_penalty, job.repetition_penalty) == (0.5, -0.5, 1.1)
    assert job.ignore_eos and job.thinking and job.keep_cots
    assert job.json_whitespace == "any"
    assert (job.priority, job.timeout_s, job.deadline) == (0, 30.5, 1_900_000_000.0)
    assert job.metadata == {"tenant": "acme", "trace": "abc123"}
    assert (job.id, job.model, job.user) == ("job-42:retry.1", "Hermes-4-70B", "user-7")


@pytest.mark.parametrize("make", [full_body, conversation], ids=["full", "conversation"])
def test_given_job_when_sent_through_to_wire_then_parse_job_gives_it_back(
    make: Callable[[], Body],
) -> None:
    # Given a parsed job
    job = parse_job(make())

    # When it goes to the wire as JSON and comes back
    wire = job.to_wire()
    again = parse_job(json.dumps(wire))

    # Then nothing is lost, and the wire form uses the client's field names
    assert again == job
    assert again.to_wire() == wire
    if job.response_format is not None:
        assert "schema" in wire["response_format"]["json_schema"]


def test_given_minimal_job_when_sent_to_wire_then_defaults_and_nulls_stay_off_the_wire() -> None:
    # Given a job built from a minimal body
    job = parse_job({"messages": [{"role": "user", "content": "Hi"}]})

    # When / Then its wire form is exactly what was sent
    assert job.to_wire() == {"messages": [{"role": "user", "content": "Hi"}]}


def test_given_tools_without_tool_choice_then_effective_tool_choice_is_auto() -> None:
    job = parse_job(conversation())
    assert job.tool_choice is None
    assert job.effective_tool_choice == "auto"


def test_given_explicit_tool_choice_then_it_wins_over_the_default() -> None:
    job = parse_job({**conversation(), "tool_choice": "none"})
    assert job.effective_tool_choice == "none"


@pytest.mark.parametrize(
    ("timeout_s", "deadline", "expected"),
    [
        (None, None, None),
        (10.0, None, 1010.0),
        (None, 1005.0, 1005.0),
        (10.0, 1005.0, 1005.0),  # the deadline comes first
        (3.0, 1005.0, 1003.0),  # the timeout comes first
    ],
)
def test_given_timeout_and_deadline_when_effective_deadline_then_earlier_wins(
    timeout_s: float | None, deadline: float | None, expected: float | None
) -> None:
    body: Body = {"messages": [{"role": "user", "content": "Hi"}]}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    if deadline is not None:
        body["deadline"] = deadline
    assert parse_job(body).effective_deadline(queued_at=1000.0) == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_k", -1), ("top_k", 0), ("top_k", 1), ("priority", 0), ("priority", 9)],
)
def test_given_boundary_values_when_parsed_then_accepted(field: str, value: int) -> None:
    job = parse_job({"messages": [{"role": "user", "content": "Hi"}], field: value})
    assert getattr(job, field) == value


def test_given_integer_for_float_field_when_parsed_then_accepted_as_float() -> None:
    # JSON has one number type; 1 is a fine temperature.
    job = parse_job({"messages": [{"role": "user", "content": "Hi"}], "temperature": 1})
    assert job.temperature == 1.0


def test_given_bare_stop_string_when_parsed_then_held_as_one_item_tuple() -> None:
    job = parse_job({"messages": [{"role": "user", "content": "Hi"}], "stop": "END"})
    assert job.stop == ("END",)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, (False, None, True)),
        ({"logprobs": True}, (True, None, True)),
        ({"logprobs": True, "top_logprobs": 20}, (True, 20, True)),
        ({"logprobs": False, "top_logprobs": 0}, (False, 0, True)),  # 0 asks for nothing
        ({"parallel_tool_calls": False}, (False, None, False)),
    ],
)
def test_given_logprobs_and_parallel_tool_calls_when_parsed_then_kept_as_openai_means_them(
    fields: Body, expected: tuple[bool, int | None, bool]
) -> None:
    job = parse_job({"messages": [{"role": "user", "content": "Hi"}], **fields})
    assert (job.logprobs, job.top_logprobs, job.parallel_tool_calls) == expected
    assert parse_job(job.to_wire()) == job


def test_given_top_logprobs_without_logprobs_then_the_message_says_what_it_needs() -> None:
    message = _raises_invalid({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2})
    assert message == "top_logprobs: needs logprobs: true"


@pytest.mark.parametrize(
    "response_format",
    [{"type": "text"}, {"type": "json_object"}],
)
def test_given_simple_response_formats_when_parsed_then_accepted(
    response_format: Body,
) -> None:
    job = parse_job(
        {"messages": [{"role": "user", "content": "Hi"}], "response_format": response_format}
    )
    assert job.response_format is not None
    assert job.response_format.type == response_format["type"]


def test_given_parsed_job_when_assigning_a_field_then_refused() -> None:
    # Given a job (frozen: a worker must not change what the producer sent)
    job = parse_job(conversation())

    # When / Then
    with pytest.raises(ValidationError):
        job.temperature = 1.5
    assert isinstance(job.messages, tuple)


def test_given_python_producer_when_building_a_job_from_models_then_same_as_parsed() -> None:
    # Given a producer that builds the job in Python with lists
    job = ChatJob(
        messages=[
            SystemMessage(role="system", content="You are Hermes."),
            UserMessage(role="user", content=[TextPart(type="text", text="Hi")]),
        ],
        stop=["END"],
    )

    # When / Then sequences are held as tuples and the job equals its parsed wire form
    assert isinstance(job.messages, tuple) and job.stop == ("END",)
    assert parse_job(json.dumps(job.to_wire())) == job


def test_given_python_producer_when_tool_result_has_no_call_then_cross_checks_still_run() -> None:
    with pytest.raises(ValidationError) as caught:
        ChatJob(messages=[ToolMessage(role="tool", content="18 C", tool_call_id="call_1")])
    assert "messages.0.tool_call_id:" in format_validation_error(caught.value)


def test_given_more_messages_than_the_limit_then_invalid_request() -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}] * (MAX_MESSAGES + 1)}
    assert _raises_invalid(body) == f"messages: List should have at most {MAX_MESSAGES} items"


def test_given_text_parts_when_content_text_then_joined_without_separator() -> None:
    parts = (TextPart(type="text", text="a"), TextPart(type="text", text="b"))
    assert content_text(parts) == "ab"
    assert content_text("plain") == "plain"
    assert content_text(None) == ""
    assert content_text(()) == ""


# --- invalid bodies --------------------------------------------------------------------

Mutation = Callable[[Body], object]


def _set(key: str, value: Any) -> Mutation:
    return lambda body: body.__setitem__(key, value)


def _set_in_message(index: int, key: str, value: Any) -> Mutation:
    return lambda body: body["messages"][index].__setitem__(key, value)


def _set_arguments(arguments: str) -> Mutation:
    def mutate(body: Body) -> None:
        body["messages"][2]["tool_calls"][0]["function"]["arguments"] = arguments

    return mutate


def _set_parameters(parameters: Any) -> Mutation:
    def mutate(body: Body) -> None:
        body["tools"][0]["function"]["parameters"] = parameters

    return mutate


def _move_tool_result_before_its_call(body: Body) -> None:
    system, user, assistant, tool = body["messages"]
    body["messages"] = [system, user, tool, assistant]


def _drop_tools_require_one(body: Body) -> None:
    body["messages"] = body["messages"][:2]
    del body["tools"]
    body["tool_choice"] = "required"


BAD_BODIES = [
    pytest.param(_set("colour", "red"), "colour", id="unknown top-level field"),
    pytest.param(
        _set_in_message(1, "mood", "happy"), "messages.1.mood", id="unknown message field"
    ),
    pytest.param(_set_in_message(1, "role", "robot"), "messages.1.role", id="wrong role"),
    pytest.param(_set_in_message(1, "role", None), "messages.1.role", id="null role"),
    pytest.param(_set("messages", []), "messages", id="empty messages"),
    pytest.param(_set("messages", ["hi"]), "messages.0", id="message not an object"),
    pytest.param(_set_in_message(1, "content", 5), "messages.1.content", id="content a number"),
    pytest.param(
        _set_in_message(3, "tool_call_id", "call_9"),
        "messages.3.tool_call_id",
        id="tool call id unknown",
    ),
    pytest.param(
        _move_tool_result_before_its_call, "messages.2.tool_call_id", id="tool call id only later"
    ),
    pytest.param(_set_in_message(2, "tool_calls", []), "messages.2", id="assistant says nothing"),
    pytest.param(_set("max_tokens", 0), "max_tokens", id="zero max_tokens"),
    pytest.param(_set("max_tokens", -5), "max_tokens", id="negative max_tokens"),
    pytest.param(_set("temperature", 3), "temperature", id="temperature 3"),
    pytest.param(_set("temperature", "0.5"), "temperature", id="temperature as string"),
    pytest.param(_set("top_p", 0), "top_p", id="top_p 0"),
    pytest.param(_set("top_k", -2), "top_k", id="top_k -2"),
    pytest.param(_set("priority", 10), "priority", id="priority 10"),
    pytest.param(_set("priority", 2.5), "priority", id="priority not an integer"),
    pytest.param(_set("thinking", "yes"), "thinking", id="thinking not a boolean"),
    pytest.param(_set("json_whitespace", "none"), "json_whitespace", id="json_whitespace unknown"),
    pytest.param(_set("json_whitespace", True), "json_whitespace", id="json_whitespace a boolean"),
    pytest.param(_set("timeout_s", 0), "timeout_s", id="zero timeout"),
    pytest.param(
        lambda body: body.update(max_tokens=4, min_tokens=5), "min_tokens", id="min over max"
    ),
    pytest.param(
        _set_parameters({"type": "string"}),
        "tools.0.function.parameters",
        id="tool parameters not an object schema",
    ),
    pytest.param(
        _set_parameters(["city"]), "tools.0.function.parameters", id="tool parameters a list"
    ),
    pytest.param(
        _set_parameters({"type": 5}),
        "tools.0.function.parameters",
        id="tool parameters invalid JSON Schema",
    ),
    pytest.param(
        lambda body: body["tools"].append(weather_tool()),
        "tools.1.function.name",
        id="duplicate tool name",
    ),
    pytest.param(
        lambda body: body["tools"][0]["function"].__setitem__("name", "get weather"),
        "tools.0.function.name",
        id="tool name with a space",
    ),
    pytest.param(
        _set(
            "response_format",
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 5}}},
        ),
        "response_format.json_schema.schema",
        id="response_format invalid schema",
    ),
    pytest.param(
        _set("response_format", {"type": "xml"}), "response_format.type", id="unknown format"
    ),
    pytest.param(
        _set("tool_choice", {"type": "function", "function": {"name": "get_time"}}),
        "tool_choice.function.name",
        id="named tool choice missing from tools",
    ),
    pytest.param(_set("tool_choice", "sometimes"), "tool_choice", id="unknown tool choice"),
    pytest.param(_drop_tools_require_one, "tool_choice", id="required without tools"),
    pytest.param(
        _set_arguments("{city: Paris}"),
        "messages.2.tool_calls.0.function.arguments",
        id="arguments not JSON",
    ),
    pytest.param(
        _set_arguments('["Paris"]'),
        "messages.2.tool_calls.0.function.arguments",
        id="arguments not an object",
    ),
    pytest.param(
        _set_in_message(
            1, "content", [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
        ),
        "messages.1.content.0",
        id="image content part",
    ),
    pytest.param(
        _set("metadata", {f"k{i}": "v" for i in range(17)}), "metadata", id="metadata 17 keys"
    ),
    pytest.param(_set("metadata", {"k": "v" * 513}), "metadata.k", id="metadata value too long"),
    pytest.param(_set("metadata", {"k": 5}), "metadata.k", id="metadata value not a string"),
    pytest.param(_set("metadata", {"k" * 65: "v"}), "metadata.", id="metadata key too long"),
    pytest.param(_set("id", "-starts-with-dash"), "id", id="invalid id"),
    pytest.param(_set("id", "x" * 129), "id", id="id too long"),
    pytest.param(_set("id", "job-1:events"), "id", id="id naming another job's stream"),
    pytest.param(_set("id", "job-1:lease"), "id", id="id naming another job's lease"),
    pytest.param(_set("stop", ["a"] * 17), "stop", id="too many stops"),
    pytest.param(_set("stop", [""]), "stop.0", id="empty stop string"),
    pytest.param(_set("logprobs", 1), "logprobs", id="logprobs not a boolean"),
    pytest.param(
        lambda body: body.update(logprobs=True, top_logprobs=21), "top_logprobs", id="top 21"
    ),
    pytest.param(
        lambda body: body.update(logprobs=True, top_logprobs=-1), "top_logprobs", id="top -1"
    ),
    pytest.param(_set("top_logprobs", 3), "top_logprobs", id="top_logprobs without logprobs"),
    pytest.param(_set("n", 0), "n", id="n 0"),
    pytest.param(_set("n", 17), "n", id="n over 16"),
    pytest.param(_set("n", "2"), "n", id="n a string"),
    pytest.param(
        _set("parallel_tool_calls", "no"), "parallel_tool_calls", id="parallel_tool_calls a string"
    ),
]


@pytest.mark.parametrize(("mutate", "path"), BAD_BODIES)
def test_given_bad_body_when_parsed_then_invalid_request_names_the_field(
    mutate: Mutation, path: str
) -> None:
    # Given a valid conversation with one thing wrong
    body = conversation()
    mutate(body)

    # When parsed (both as a mapping and as JSON text)
    messages = [_raises_invalid(body), _raises_invalid(json.dumps(body))]

    # Then the message names the offending field by its dotted path ("metadata." stands for
    # a path that continues with the client's over-long key)
    for message in messages:
        paths = [part.partition(": ")[0] for part in message.split("; ")]
        assert any(p == path or (path.endswith(".") and p.startswith(path)) for p in paths), message


def test_given_unknown_tool_call_id_then_message_quotes_the_id() -> None:
    body = conversation()
    body["messages"][3]["tool_call_id"] = "call_9"
    message = _raises_invalid(body)
    assert message == "messages.3.tool_call_id: no earlier assistant tool call has id 'call_9'"


def test_given_wrong_role_then_message_lists_allowed_roles() -> None:
    body = conversation()
    body["messages"][1]["role"] = "robot"
    message = _raises_invalid(body)
    for role in ("system", "developer", "user", "assistant", "tool"):
        assert f"'{role}'" in message
    assert "'robot'" in message


def test_given_temperature_3_then_message_reads_like_the_contract() -> None:
    message = _raises_invalid({"messages": [{"role": "user", "content": "Hi"}], "temperature": 3})
    assert message == "temperature: Input should be less than or equal to 2"


def test_given_unknown_json_whitespace_then_message_lists_the_choices() -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "json_whitespace": "pretty"}
    assert _raises_invalid(body) == "json_whitespace: Input should be 'compact' or 'any'"


def test_given_image_part_then_message_says_only_text_is_supported() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert "only text content parts are supported" in _raises_invalid(body)


def test_given_non_object_tool_parameters_then_message_says_object_schema() -> None:
    body = conversation()
    body["tools"][0]["function"]["parameters"] = {"type": "string"}
    assert "tool parameters must be an object schema" in _raises_invalid(body)


def test_given_several_problems_then_each_is_reported_once_on_one_line() -> None:
    # Given a body with three independent mistakes
    body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 3, "top_p": 0, "x": 1}

    # When / Then all three appear, separated by "; "
    parts = _raises_invalid(body).split("; ")
    assert sorted(p.split(":")[0] for p in parts) == ["temperature", "top_p", "x"]


def test_given_many_bad_messages_then_the_message_stays_bounded() -> None:
    body = {"messages": [{"role": "user", "content": 5}] * 500}
    message = _raises_invalid(body)
    assert message.endswith("and 480 more problem(s)")
    assert len(message) < 2000


def test_given_field_name_with_newline_then_message_is_still_one_line() -> None:
    _raises_invalid({"messages": [{"role": "user", "content": "Hi"}], "bad\nfield\r\n": 1})


def _deep_list(depth: int) -> list[Any]:
    deep: list[Any] = []
    for _ in range(depth):
        deep = [deep]
    return deep


MINIMAL_JSON = '{"messages": [{"role": "user", "content": "Hi"}]'
BAD_RAW = [
    pytest.param("{not json", "not valid JSON", id="invalid JSON text"),
    pytest.param("", "not valid JSON", id="empty text"),
    pytest.param(b"\xff\xfe", "not valid UTF-8", id="invalid UTF-8 bytes"),
    pytest.param(b'{"messages": "\xc3"}', "not valid UTF-8", id="truncated UTF-8 sequence"),
    pytest.param("[]", "must be a JSON object, got array", id="top-level array"),
    pytest.param('"hi"', "must be a JSON object, got string", id="top-level string"),
    pytest.param("null", "must be a JSON object, got null", id="top-level null"),
    pytest.param(42, "JSON text or a mapping", id="not text at all"),
    pytest.param(
        MINIMAL_JSON + ', "metadata": ' + "[" * 10_000 + "]" * 10_000 + "}",
        "nested",
        id="10000 nested lists in metadata",
    ),
    pytest.param(
        MINIMAL_JSON + ', "metadata": ' + "[" * 150 + "]" * 150 + "}",
        "nested",
        id="150 nested lists in metadata",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "Hi"}], "metadata": {"k": _deep_list(10_000)}},
        "nested",
        id="deeply nested mapping",
    ),
    pytest.param(MINIMAL_JSON + ', "temperature": NaN}', "NaN", id="NaN"),
    pytest.param(MINIMAL_JSON + ', "seed": 1e999}', "seed: number is out of range", id="1e999"),
    pytest.param(
        MINIMAL_JSON + ', "seed": ' + "9" * 5000 + "}",
        "body is not valid JSON: integer with more than 100 digits",
        id="huge int",
    ),
    pytest.param(MINIMAL_JSON + ', "top_k": 1, "top_k": 2}', "duplicate key", id="duplicate key"),
    pytest.param(
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "messages.0.content: string holds an unpaired UTF-16 surrogate",
        id="lone surrogate",
    ),
]


@pytest.mark.parametrize(("raw", "fragment"), BAD_RAW)
def test_given_undecodable_body_when_parsed_then_one_clear_invalid_request(
    raw: Any, fragment: str
) -> None:
    # Given a body that is not a JSON object at all / When parsed / Then one clear line
    message = _raises_invalid(raw)
    assert fragment in message, message
    assert len(message) < 300


def test_given_rejected_body_then_error_carries_the_openai_type_and_is_permanent() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_job("[]")
    assert caught.value.to_dict()["type"] == "invalid_request_error"
    assert caught.value.retryable is False


def test_given_error_inside_tagged_union_when_formatted_then_tags_are_dropped() -> None:
    # Given pydantic's own error for a bad content part inside a tagged union
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    with pytest.raises(ValidationError) as caught:
        ChatJob.model_validate(body)
    assert "user" in caught.value.errors()[0]["loc"]  # pydantic's loc has the tag

    # When rendered / Then the path is the client's own
    assert format_validation_error(caught.value) == (
        "messages.0.content.0.text: Input should be a valid string"
    )


# --- fuzzing: nothing but InvalidRequest ever escapes ------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["messages", "tools", "tool_choice", "response_format", "temperature", "stop", "metadata"]
)


@settings(max_examples=300, deadline=None)
@given(field=FIELDS, value=JSON_VALUES)
def test_given_any_json_value_in_a_field_then_job_or_invalid_request(
    field: str, value: Any
) -> None:
    body = conversation()
    body[field] = value
    try:
        job = parse_job(body)
    except InvalidRequest as exc:
        assert "\n" not in str(exc)
    else:
        assert parse_job(job.to_wire()) == job


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=64))
def test_given_any_bytes_or_text_then_job_or_invalid_request(raw: bytes | str) -> None:
    try:
        parse_job(raw)
    except InvalidRequest as exc:
        assert "\n" not in str(exc)


# --- results ---------------------------------------------------------------------------


def make_result() -> JobResult:
    call = ResponseToolCall(
        id="call_a", function=ResponseFunctionCall(name="get_weather", arguments='{"city":"Oslo"}')
    )
    return JobResult(
        id="chatcmpl-1",
        created=1_700_000_000,
        model="Hermes-4-70B",
        choices=[
            Choice(
                index=0,
                message=ResponseMessage(content=None, reasoning_content="think", tool_calls=[call]),
                finish_reason="tool_calls",
            )
        ],
        usage=Usage.model_validate(
            {
                "prompt_tokens": 100,
                "completion_tokens": 20,
                "total_tokens": 120,
                "completion_tokens_details": {"reasoning_tokens": 7},
                "prompt_tokens_details": {"cached_tokens": 64},
            }
        ),
        job=JobInfo(
            id="job-1",
            status=JobStatus.SUCCEEDED,
            attempts=1,
            worker="w1",
            queued_at=10.0,
            started_at=10.5,
            first_token_at=11.0,
            finished_at=13.5,
            problems=["tool call 2: arguments are not JSON"],
        ),
    )


def test_given_result_when_dumped_to_json_and_parsed_then_equal() -> None:
    # Given a result with a tool call and full usage
    result = make_result()

    # When it goes through JSON
    wire = result.model_dump_json()
    again = JobResult.model_validate_json(wire)

    # Then it is unchanged and reads as an OpenAI chat.completion
    assert again == result
    data = json.loads(wire)
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["choices"][0]["message"]["tool_calls"][0]["type"] == "function"
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 7
    assert data["job"]["status"] == "succeeded"


def test_given_a_choice_with_logprobs_then_it_reads_and_writes_openais_shape() -> None:
    # Given a choice's logprobs as OpenAI writes them
    token = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}
    data = {"content": [{**token, "top_logprobs": [token, {**token, "token": "Yo"}]}]}
    choice = Choice.model_validate({"message": {"content": "Hi"}, "logprobs": data})
    # Then it goes through JSON unchanged, and a choice without them says null
    assert choice.model_dump(mode="json")["logprobs"] == data
    assert Choice.model_validate_json(choice.model_dump_json()) == choice
    assert Choice(message=ResponseMessage(content="Hi")).model_dump()["logprobs"] is None


def test_given_result_then_job_timings_are_derived_and_serialized() -> None:
    info = make_result().job
    assert (info.queue_wait_s, info.time_to_first_token_s, info.generation_s) == (0.5, 0.5, 3.0)
    dumped = info.model_dump(mode="json")
    assert dumped["queue_wait_s"] == 0.5 and dumped["generation_s"] == 3.0
    assert JobInfo(id="j", status=JobStatus.QUEUED).queue_wait_s is None


def test_given_result_from_a_newer_writer_when_parsed_then_unknown_fields_are_ignored() -> None:
    # Given a result JSON carrying fields this version does not know, at several levels
    data = json.loads(make_result().model_dump_json())
    data["system_fingerprint"] = "fp_1"
    data["choices"][0]["message"]["audio"] = {"id": "a"}
    data["job"]["region"] = "eu"

    # When parsed / Then it parses to the same result
    again = JobResult.model_validate(data)
    assert again == make_result()
    assert not hasattr(again, "system_fingerprint")


def test_given_failed_job_then_error_info_comes_from_the_hermes_error() -> None:
    error = ErrorInfo.from_error(InvalidRequest("temperature: too hot"))
    result = JobResult(
        id="chatcmpl-2",
        created=1,
        model="m",
        job=JobInfo(id="j", status=JobStatus.FAILED),
        error=error,
    )
    again = JobResult.model_validate_json(result.model_dump_json())
    assert again.error == ErrorInfo(type="invalid_request_error", message="temperature: too hot")
    assert again.choices == () and again.usage is None


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        ("queued", False),
        ("running", False),
        ("succeeded", True),
        ("failed", True),
        ("cancelled", True),
        ("expired", True),
    ],
)
def test_given_each_status_then_only_finished_ones_are_terminal(
    status: str, terminal: bool
) -> None:
    assert JobStatus(status).is_terminal is terminal
