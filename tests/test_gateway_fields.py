"""``logprobs`` / ``top_logprobs`` and ``parallel_tool_calls`` through the gateway, with the
official ``openai`` SDK: the same fields as in a queued job (tests/test_output_fields.py), on
test_gateway.py's stack (a real gateway, Redis and scripted worker, started for this module)."""

from __future__ import annotations

import json

import openai
import pytest
from test_gateway import TOOLS, USER, Stack, script, stack

from hermes_worker.testing.scripted_engine import SCRIPT_KEY, split_tokens

__all__ = ["stack"]  # the fixture, imported so that this module gets a stack of its own

CONTENT = "The weather in Paris is mild."
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
OSLO = {"name": "get_weather", "arguments": {"city": "Oslo"}}


def test_a_completion_with_logprobs_has_them_per_content_token(stack: Stack) -> None:
    # Given the SDK asking for logprobs and the 2 likeliest tokens
    client = stack.sdk()
    reply = client.chat.completions.create(
        model="tiny",
        messages=USER,
        metadata=script(f"<think>Hmm.</think>{CONTENT}"),
        logprobs=True,
        top_logprobs=2,
    )
    # Then the choice's logprobs hold the content's tokens, each with its 2 top tokens
    choice = reply.choices[0]
    assert choice.message.content == CONTENT
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert [t.token for t in tokens] == split_tokens(CONTENT)
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    assert tokens[0].bytes == list(tokens[0].token.encode())


def test_a_stream_with_logprobs_carries_them_on_its_content_chunks(stack: Stack) -> None:
    client = stack.sdk()
    stream = client.chat.completions.create(
        model="tiny", messages=USER, metadata=script(CONTENT), logprobs=True, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = [
        entry.token
        for c in chunks
        if c.choices and c.choices[0].logprobs is not None
        for entry in c.choices[0].logprobs.content or ()
    ]
    assert text == CONTENT and tokens == split_tokens(CONTENT)


def test_parallel_tool_calls_false_gets_one_call(stack: Stack) -> None:
    # Given a model output with two calls, and a request that allows one
    calls = f"<tool_call>{json.dumps(PARIS)}</tool_call><tool_call>{json.dumps(OSLO)}</tool_call>"
    client = stack.sdk()
    reply = client.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=TOOLS,
        parallel_tool_calls=False,
        metadata=script(calls),
    )
    # Then the answer has the first call only
    message = reply.choices[0].message
    assert message.tool_calls is not None
    assert [json.loads(c.function.arguments) for c in message.tool_calls] == [PARIS["arguments"]]
    assert reply.choices[0].finish_reason == "tool_calls"
    # And by default both come back
    both = client.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=TOOLS,
        metadata=script(calls),
    )
    assert both.choices[0].message.tool_calls is not None
    assert len(both.choices[0].message.tool_calls) == 2


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_logprobs_fields_are_a_400_naming_them(
    stack: Stack, fields: dict[str, object], param: str
) -> None:
    client = stack.sdk(max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=USER, **fields)
    assert bad.value.param == param


def test_n_choices_come_back_as_n_choices(stack: Stack) -> None:
    # Given the SDK asking for 2 choices of a job whose choices say different things
    client = stack.sdk()
    texts = ["First answer.", "Second answer."]
    reply = client.chat.completions.create(
        model="tiny", messages=USER, n=2, metadata={SCRIPT_KEY: json.dumps({"choices": texts})}
    )
    # Then it gets both, indexed, and usage counts both
    assert [(c.index, c.message.content) for c in reply.choices] == [(0, texts[0]), (1, texts[1])]
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(len(split_tokens(t)) for t in texts)


def test_a_stream_of_n_choices_has_chunks_for_each_index(stack: Stack) -> None:
    client = stack.sdk()
    texts = ["First answer.", "Second answer."]
    stream = client.chat.completions.create(
        model="tiny",
        messages=USER,
        n=2,
        stream=True,
        metadata={SCRIPT_KEY: json.dumps({"choices": texts})},
    )
    got = ["", ""]
    reasons: list[str | None] = [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            got[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert got == texts and reasons == ["stop", "stop"]
