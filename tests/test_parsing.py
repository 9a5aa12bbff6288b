"""The Hermes output parser: one-shot and streaming agree for every chunking.

Every case runs one-shot and streamed (1-char deltas, fixed chunk sizes, random cuts),
and every streamed run must satisfy the invariants: joined reasoning and content events
equal the aggregate, tool call events equal its calls, the aggregate equals one-shot.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parser_cases import CASES, Case

from hermes_worker.inference.parsing import (
    ParsedCompletion,
    ParsedToolCall,
    ParserEvent,
    StreamingParser,
    parse_completion,
)

CHUNK_SIZES = [1, 2, 3, 5, 7, 11, 13, 64]


# -- helpers ---------------------------------------------------------------------------


def chunks_of(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def cut_at(text: str, cuts: Sequence[int]) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def stream(deltas: Sequence[str]) -> tuple[list[ParserEvent], ParsedCompletion]:
    parser = StreamingParser()
    events: list[ParserEvent] = []
    for delta in deltas:
        events.extend(parser.feed(delta))
    events.extend(parser.finish())
    return events, parser.result()


def joined(events: Sequence[ParserEvent], kind: str) -> str:
    return "".join(e.text or "" for e in events if e.type == kind)


def assert_stream_matches(text: str, deltas: Sequence[str]) -> ParsedCompletion:
    """The rule-8 invariants; returns the streamed result."""
    assert "".join(deltas) == text
    events, result = stream(deltas)
    for event in events:
        if event.type == "tool_call":
            assert event.tool_call is not None and event.text is None
        else:
            assert event.text and event.tool_call is None  # no empty text events
    assert joined(events, "reasoning") == (result.reasoning or "")
    assert joined(events, "content") == (result.content or "")
    assert tuple(e.tool_call for e in events if e.type == "tool_call") == result.tool_calls
    assert result == parse_completion(text)
    for tool_call in result.tool_calls:
        assert isinstance(json.loads(tool_call.arguments), dict)
    return result


def case_id(case: Case) -> str:
    return case.name


# -- the corpus --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_corpus_one_shot(case: Case) -> None:
    assert parse_completion(case.text) == case.expected


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_corpus_streamed_in_fixed_chunks(case: Case, size: int) -> None:
    assert assert_stream_matches(case.text, chunks_of(case.text, size)) == case.expected


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_corpus_streamed_in_random_chunks(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CASES), label="case")
    cuts = data.draw(st.lists(st.integers(0, len(case.text)), max_size=30), label="cuts")
    assert assert_stream_matches(case.text, cut_at(case.text, cuts)) == case.expected


def test_corpus_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


# -- generated outputs -------------------------------------------------------------------

# Pieces chosen to hit every transition: tags, partial tags, JSON string syntax.
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
PARTIAL_TAGS = ["<thi", "<tool_c", "</tool_", "</thi", "<", ">", "/"]
JSON_SYNTAX = ['"', "\\", '\\"', "{", "}", ":", ","]
TEXT = [" ", "\n", "\t", "  \n", "word", "é", "🤖", "name", "arguments"]
CALL_BODIES = [
    '{"name": "f", "arguments": {"a": 1}}',
    '{"name": "g", "arguments": {"s": "</tool_call>"}}',
    '{"name": "h"}',
    '{"name": 1}',
    '{"name": "x" "y"}',
]
PIECES = TAGS + PARTIAL_TAGS + JSON_SYNTAX + TEXT + CALL_BODIES


def cuts_for(text: str) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(text)), max_size=25)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_random_grammar_outputs_stream_like_one_shot(data: st.DataObject) -> None:
    pieces = data.draw(
        st.lists(st.sampled_from(PIECES) | st.text(max_size=6), max_size=40), label="pieces"
    )
    text = "".join(pieces)
    cuts = data.draw(cuts_for(text), label="cuts")
    assert_stream_matches(text, cut_at(text, cuts))
    assert_stream_matches(text, chunks_of(text, 1))


# Content that can never form a tag: every "<" is followed by a space.
SAFE_TEXT = st.lists(
    st.sampled_from(["a", "b", " ", "\n", "\t", '"', "{", "}", "\\", "< ", "é", "🤖", ">", "/"]),
    max_size=12,
).map("".join)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
ARGUMENTS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)
WS = st.sampled_from(["", "\n", " ", "\n\n"])


@st.composite
def well_formed_outputs(draw: st.DrawFn) -> tuple[str, ParsedCompletion]:
    """Reasoning, content and good calls (with any strings inside), and what they parse to."""
    parts: list[str] = []
    content: list[str] = []
    blocks: list[str] = []
    calls: list[ParsedToolCall] = []
    for kind in draw(st.lists(st.sampled_from(["content", "think", "call"]), max_size=8)):
        if kind == "content":
            text = draw(SAFE_TEXT)
            parts.append(text)
            content.append(text)
        elif kind == "think":
            text = draw(SAFE_TEXT)
            parts.append(f"<think>{text}</think>")
            blocks.append(text)
        else:
            name = draw(st.text(min_size=1, max_size=10))
            arguments = draw(ARGUMENTS)
            body = json.dumps(
                {"name": name, "arguments": arguments}, ensure_ascii=draw(st.booleans())
            )
            parts.append(f"<tool_call>{draw(WS)}{body}{draw(WS)}</tool_call>")
            calls.append(ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False)))
    expected = ParsedCompletion(
        reasoning="\n".join(b.strip() for b in blocks if b.strip()) or None,
        content="".join(content).strip() or None,
        tool_calls=tuple(calls),
        problems=(),
    )
    return "".join(parts), expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_well_formed_outputs_parse_exactly(data: st.DataObject) -> None:
    text, expected = data.draw(well_formed_outputs(), label="output")
    cuts = data.draw(cuts_for(text), label="cuts")
    assert parse_completion(text) == expected
    assert assert_stream_matches(text, cut_at(text, cuts)) == expected


# -- streaming really streams -----------------------------------------------------------


def content(text: str) -> ParserEvent:
    return ParserEvent(type="content", text=text)


def reasoning(text: str) -> ParserEvent:
    return ParserEvent(type="reasoning", text=text)


def test_content_goes_out_as_it_arrives() -> None:
    # Given a parser, when deltas arrive, then everything but trailing space goes out at once.
    parser = StreamingParser()
    assert parser.feed("Hello wor") == [content("Hello wor")]
    assert parser.feed("ld ") == [content("ld")]
    assert parser.feed(" \n") == []
    assert parser.feed("!") == [content("  \n!")]
    assert parser.finish() == []
    assert parser.result().content == "Hello world  \n!"


def test_partial_tag_is_held_then_released_as_text() -> None:
    parser = StreamingParser()
    assert parser.feed("see <tool_c") == [content("see")]
    assert parser.feed("x") == [content(" <tool_cx")]
    assert parser.feed(" <thi") == []
    assert parser.finish() == [content(" <thi")]
    assert parser.result().content == "see <tool_cx <thi"


def test_partial_tag_that_completes_switches_mode() -> None:
    parser = StreamingParser()
    assert parser.feed("a<thi") == [content("a")]
    assert parser.feed("nk>deep") == [reasoning("deep")]
    assert parser.feed("</th") == []
    assert parser.feed("ink> b") == [content(" b")]


def test_tool_call_is_emitted_at_its_closing_tag() -> None:
    parser = StreamingParser()
    assert parser.feed('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n') == []
    events = parser.feed("</tool_call>")
    assert events == [ParserEvent(type="tool_call", tool_call=ParsedToolCall("f", '{"a": 1}'))]


def test_malformed_call_is_emitted_as_content_when_closed() -> None:
    parser = StreamingParser()
    assert parser.feed("ok <tool_call>{oops}") == [content("ok")]
    assert parser.feed("</tool_call>") == [content(" <tool_call>{oops}</tool_call>")]
    parser.finish()
    assert parser.result().problems == (
        "tool call 1: invalid JSON (Expecting property name enclosed in double quotes at char 1)",
    )


def test_raw_control_characters_in_argument_strings_come_out_escaped() -> None:
    # Given a call whose string holds a raw tab and newline (models write them; so does
    # xgrammar's grammar for a maxLength string), which strict JSON refuses
    raw = '<tool_call>{"name": "f", "arguments": {"city": "Pa\tris\n"}}</tool_call>'
    # When it is parsed, then it is a call, and its arguments are valid JSON again
    [call] = parse_completion(raw).tool_calls
    assert call.arguments == '{"city": "Pa\\tris\\n"}'
    assert json.loads(call.arguments) == {"city": "Pa\tris\n"}


def test_reasoning_separator_waits_for_the_next_non_empty_block() -> None:
    parser = StreamingParser()
    assert parser.feed("<think> one </think>") == [reasoning("one")]
    assert parser.feed("<think>\n\n") == []
    assert parser.feed("</think><think> ") == []
    assert parser.feed("two") == [reasoning("\ntwo")]


def test_many_tokens_in_one_delta_give_one_event_per_run() -> None:
    parser = StreamingParser()
    events = parser.feed('<think>r</think>c1 <tool_call>{"name": "f"}</tool_call> c2')
    assert events == [
        reasoning("r"),
        content("c1"),
        ParserEvent(type="tool_call", tool_call=ParsedToolCall("f", "{}")),
        content("  c2"),
    ]


def test_unclosed_well_formed_call_is_emitted_at_finish() -> None:
    parser = StreamingParser()
    assert parser.feed('<tool_call>{"name": "f"}') == []
    assert parser.finish() == [ParserEvent(type="tool_call", tool_call=ParsedToolCall("f", "{}"))]
    assert parser.result().problems == ()


def test_lifecycle_errors() -> None:
    parser = StreamingParser()
    with pytest.raises(RuntimeError):
        parser.result()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(RuntimeError):
        parser.finish()


def test_char_by_char_feeding_stays_linear() -> None:
    # A quadratic rescan would take minutes here; linear takes a fraction of a second.
    call = '<tool_call>{"name": "f", "arguments": {"s": "' + 'x\\"' * 20_000 + '"}}</tool_call>'
    text = "<think>" + "thought " * 10_000 + "</think>" + "word    \n" * 10_000 + call
    start = time.perf_counter()
    result = assert_stream_matches(text, list(text))
    assert time.perf_counter() - start < 20
    assert len(result.tool_calls) == 1


# -- cross-check against vLLM's hermes tool parser --------------------------------------

Extract = Callable[[str], list[tuple[str, Any]]]  # output -> [(name, parsed arguments)]


@pytest.fixture(scope="module")
def vllm_hermes() -> Extract:
    pytest.importorskip("vllm")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    # The parser only needs a tokenizer whose vocabulary holds the call tags.
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        ["name arguments get weather city", "hello world"],
        trainers.WordLevelTrainer(special_tokens=["[UNK]"]),
    )
    # transformers leaves this constructor untyped; vLLM only needs the TokenizerLike protocol.
    tokenizer: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call, unused-ignore]
        tokenizer_object=backend, unk_token="[UNK]"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    assert "<tool_call>" in tokenizer.get_vocab()
    parser = Hermes2ProToolParser(tokenizer)
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "model": "test"}
    )

    def extract(text: str) -> list[tuple[str, Any]]:
        info = parser.extract_tool_calls(text, request)
        assert info.tools_called
        return [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls]

    return extract


def ours(text: str) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in parse_completion(text).tool_calls]


@pytest.mark.parametrize("case", [c for c in CASES if c.vllm_agrees], ids=case_id)
def test_matches_vllm_hermes_parser_on_corpus(case: Case, vllm_hermes: Extract) -> None:
    assert ours(case.text) == vllm_hermes(case.text)


# vLLM's regex cuts at the first "</tool_call>", even inside a string, so keep "<" out.
NO_TAGS = st.text(alphabet=st.characters(exclude_characters="<"), max_size=12)
VLLM_ARGUMENTS = st.dictionaries(
    NO_TAGS,
    st.recursive(
        st.none() | st.booleans() | st.integers() | NO_TAGS,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NO_TAGS, inner, max_size=3),
        max_leaves=6,
    ),
    max_size=4,
)


def tc_text(name: str, arguments: dict[str, Any], ws: str) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>{ws}{body}{ws}</tool_call>"


VLLM_FRIENDLY_OUTPUTS = st.builds(
    lambda lead, calls: lead + "".join(tc_text(*c) for c in calls),
    NO_TAGS,
    st.lists(st.tuples(NO_TAGS.filter(bool), VLLM_ARGUMENTS, WS), min_size=1, max_size=3),
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=VLLM_FRIENDLY_OUTPUTS)
def test_matches_vllm_hermes_parser_on_generated_calls(text: str, vllm_hermes: Extract) -> None:
    assert ours(text) == vllm_hermes(text)


def test_in_reasoning_follows_the_think_block() -> None:
    parser = StreamingParser()
    assert not parser.in_reasoning
    parser.feed("<think>pondering")
    assert parser.in_reasoning
    parser.feed("</think>answer")
    assert not parser.in_reasoning


@given(
    text=st.lists(st.sampled_from([*' \n{}":,ab<>/', "<think>", "<tool_call>"])).map("".join),
    cuts=st.lists(st.integers(min_value=0, max_value=200)),
)
def test_content_parser_keeps_everything_as_content_for_any_chunking(
    text: str, cuts: list[int]
) -> None:
    from hermes_worker.inference.parsing import ContentParser

    # Given a JSON-constrained output, which may hold tags inside its strings
    parser = ContentParser()
    points = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    events = []
    for start, end in itertools.pairwise(points):
        events += parser.feed(text[start:end])
    events += parser.finish()
    result = parser.result()
    # Then nothing is split out, and the streamed text equals the stripped whole
    assert result.reasoning is None and result.tool_calls == () and result.problems == ()
    assert result.content == (text.strip() or None)
    assert "".join(e.text or "" for e in events) == (result.content or "")
    assert all(e.type == "content" for e in events)
