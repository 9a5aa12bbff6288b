"""Edge cases for the Hermes output parser, each with the exact expected split.

Arguments are written as Python objects and serialized the way the parser promises
(``json.dumps(obj, ensure_ascii=False)``), so a case reads as what the model meant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hermes_worker.inference.parsing import ParsedCompletion, ParsedToolCall


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    expected: ParsedCompletion
    # vLLM's hermes parser gets this one right too (see test_matches_vllm_hermes_parser).
    vllm_agrees: bool = False


def call(name: str, arguments: dict[str, Any] | None = None) -> ParsedToolCall:
    return ParsedToolCall(name=name, arguments=json.dumps(arguments or {}, ensure_ascii=False))


def done(
    reasoning: str | None = None,
    content: str | None = None,
    calls: tuple[ParsedToolCall, ...] = (),
    problems: tuple[str, ...] = (),
) -> ParsedCompletion:
    return ParsedCompletion(
        reasoning=reasoning, content=content, tool_calls=calls, problems=problems
    )


def tc(body: str) -> str:
    """A call the way Hermes writes it: tags on their own lines."""
    return f"<tool_call>\n{body}\n</tool_call>"


WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
BAD_B = '{"name": "b" "arguments": {}}'

CASES: list[Case] = [
    # -- content and reasoning -------------------------------------------------------
    Case("plain_text", "Hello, world.", done(content="Hello, world.")),
    Case("inner_whitespace_kept", "  a \n\n b\t", done(content="a \n\n b")),
    Case("only_reasoning", "<think>\nI should greet.\n</think>", done("I should greet.")),
    Case(
        "think_then_content",
        "<think>\nThe user wants 6*7.\n</think>\n\nIt is 42.",
        done("The user wants 6*7.", "It is 42."),
    ),
    Case(
        "two_think_blocks_and_an_empty_one",
        "<think> first </think>middle<think>\n\n</think> <think>second\n</think>end",
        done("first\nsecond", "middle end"),
    ),
    Case("unclosed_think", "<think>still thinking", done("still thinking")),
    Case(
        "tool_call_inside_think_is_reasoning",
        '<think>maybe <tool_call>{"name": "f", "arguments": {}}</tool_call></think>done',
        done('maybe <tool_call>{"name": "f", "arguments": {}}</tool_call>', "done"),
    ),
    Case("unclosed_think_with_call_tag", "<think>plan <tool_call>", done("plan <tool_call>")),
    Case("nested_think_is_literal", "<think>a <think> b</think>c", done("a <think> b", "c")),
    Case("empty_think_only", "<think>  </think>  ", done()),
    Case("empty_output", "", done()),
    Case("whitespace_only", " \n\t \n", done()),
    # -- tool calls --------------------------------------------------------------------
    Case(
        "one_call",
        tc(WEATHER),
        done(calls=(call("get_weather", {"city": "Paris", "unit": "celsius"}),)),
        vllm_agrees=True,
    ),
    Case(
        "think_then_call",
        "<think>\nNeed the weather.\n</think>\n" + tc(WEATHER),
        done(
            "Need the weather.", calls=(call("get_weather", {"city": "Paris", "unit": "celsius"}),)
        ),
    ),
    Case(
        "two_calls_with_text_between_and_after",
        "Let me check.\n"
        + tc('{"name": "a", "arguments": {"x": 1}}')
        + "\nand\n"
        + tc('{"name": "b", "arguments": {"y": [1, 2.5, null, true]}}')
        + "\nDone.",
        done(
            content="Let me check.\n\nand\n\nDone.",
            calls=(call("a", {"x": 1}), call("b", {"y": [1, 2.5, None, True]})),
        ),
    ),
    Case(
        "two_calls_back_to_back",
        tc('{"name": "a", "arguments": {"x": 1}}') + tc('{"name": "b", "arguments": {}}'),
        done(calls=(call("a", {"x": 1}), call("b"))),
        vllm_agrees=True,
    ),
    Case(
        "arguments_as_json_string",
        tc('{"name": "search", "arguments": "{\\"q\\": \\"cats\\"}"}'),
        done(calls=(call("search", {"q": "cats"}),)),
    ),
    Case("arguments_absent", tc('{"name": "now"}'), done(calls=(call("now"),))),
    Case("arguments_null", tc('{"name": "now", "arguments": null}'), done(calls=(call("now"),))),
    Case(
        "extra_keys_ignored",
        tc('{"name": "f", "arguments": {"a": 1}, "id": "x1"}'),
        done(calls=(call("f", {"a": 1}),)),
    ),
    Case(
        "compact_call_no_newlines",
        '<tool_call>{"name":"f","arguments":{"a":"b"}}</tool_call>',
        done(calls=(call("f", {"a": "b"}),)),
        vllm_agrees=True,
    ),
    Case(
        "close_tag_inside_json_string",
        tc('{"name": "echo", "arguments": {"text": "</tool_call> is the closing tag"}}') + "after",
        done(content="after", calls=(call("echo", {"text": "</tool_call> is the closing tag"}),)),
    ),
    Case(
        "braces_and_escaped_quotes_in_strings",
        tc('{"name": "f", "arguments": {"s": "say \\"hi\\" {x} \\\\", "t": "}{"}}'),
        done(calls=(call("f", {"s": 'say "hi" {x} \\', "t": "}{"}),)),
        vllm_agrees=True,
    ),
    Case(
        "escaped_quote_then_close_tag_in_string",
        tc('{"name": "f", "arguments": {"s": "\\"</tool_call>\\\\"}}'),
        done(calls=(call("f", {"s": '"</tool_call>\\'}),)),
    ),
    Case(
        "unicode_and_emoji",
        "<think>考える 🤔</think>Réponse ✓ "
        + tc('{"name": "météo", "arguments": {"ville": "Zürich 🇨🇭", "e": "\\u00e9"}}'),
        done("考える 🤔", "Réponse ✓", (call("météo", {"ville": "Zürich 🇨🇭", "e": "é"}),)),
    ),
    Case(
        "unclosed_final_call_with_complete_json",
        "Sure.\n<tool_call>\n" + WEATHER + "\n",
        done(content="Sure.", calls=(call("get_weather", {"city": "Paris", "unit": "celsius"}),)),
        vllm_agrees=True,
    ),
    # -- malformed calls -----------------------------------------------------------------
    Case(
        "malformed_call_between_two_good_ones",
        tc('{"name": "a", "arguments": {}}')
        + "\n"
        + tc(BAD_B)
        + "\n"
        + tc('{"name": "c", "arguments": {"k": "v"}}'),
        done(
            content=tc(BAD_B),
            calls=(call("a"), call("c", {"k": "v"})),
            problems=("tool call 2: invalid JSON (Expecting ',' delimiter at char 13)",),
        ),
    ),
    Case(
        "unclosed_final_call_with_incomplete_json",
        'Sure.\n<tool_call>\n{"name": "f", "argu',
        done(
            content='Sure.\n<tool_call>\n{"name": "f", "argu',
            problems=(
                "tool call 1: not closed and invalid JSON "
                "(Unterminated string starting at char 14)",
            ),
        ),
    ),
    Case(
        "unclosed_call_with_partial_close_tag",
        '<tool_call>{"name": "f"}</tool_ca',
        done(
            content='<tool_call>{"name": "f"}</tool_ca',
            problems=("tool call 1: not closed and invalid JSON (Extra data at char 13)",),
        ),
    ),
    Case(
        "unclosed_string_swallows_the_rest",
        '<tool_call>"oops</tool_call> tail <tool_call>{"name": "g"}</tool_call>',
        done(
            content='<tool_call>"oops</tool_call> tail <tool_call>{"name": "g"}</tool_call>',
            problems=("tool call 1: not closed and invalid JSON (Extra data at char 36)",),
        ),
    ),
    Case(
        "extra_data_after_json",
        '<tool_call>{"name": "f", "arguments": {}} {"name": "g"}</tool_call>',
        done(
            content='<tool_call>{"name": "f", "arguments": {}} {"name": "g"}</tool_call>',
            problems=("tool call 1: invalid JSON (Extra data at char 31)",),
        ),
    ),
    Case(
        "empty_call",
        "x <tool_call></tool_call>",
        done(
            content="x <tool_call></tool_call>",
            problems=("tool call 1: invalid JSON (Expecting value at char 0)",),
        ),
    ),
    Case(
        "name_missing",
        '<tool_call>{"arguments": {}}</tool_call>',
        done(
            content='<tool_call>{"arguments": {}}</tool_call>',
            problems=('tool call 1: "name" must be a non-empty string',),
        ),
    ),
    Case(
        "name_not_a_string_then_good_call",
        '<tool_call>{"name": 7}</tool_call><tool_call>{"name": "ok"}</tool_call>',
        done(
            content='<tool_call>{"name": 7}</tool_call>',
            calls=(call("ok"),),
            problems=('tool call 1: "name" must be a non-empty string',),
        ),
    ),
    Case(
        "name_empty",
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',
        done(
            content='<tool_call>{"name": "", "arguments": {}}</tool_call>',
            problems=('tool call 1: "name" must be a non-empty string',),
        ),
    ),
    Case(
        "arguments_a_list",
        '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',
        done(
            content='<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',
            problems=(
                'tool call 1: "arguments" must be a JSON object, a string holding one, or null',
            ),
        ),
    ),
    Case(
        "arguments_string_without_object",
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        done(
            content='<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
            problems=('tool call 1: "arguments" is a string that does not hold a JSON object',),
        ),
    ),
    Case(
        "call_not_an_object",
        '<tool_call>["f", {}]</tool_call>',
        done(
            content='<tool_call>["f", {}]</tool_call>',
            problems=("tool call 1: not a JSON object",),
        ),
    ),
    Case(
        "nan_is_not_json",
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        done(
            content='<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
            problems=("tool call 1: invalid JSON (NaN is not valid JSON)",),
        ),
    ),
    # -- tags that are not tags ----------------------------------------------------------
    Case("stray_close_think", "a </think> b", done(content="a </think> b")),
    Case("stray_close_tool_call", "a </tool_call> b", done(content="a </tool_call> b")),
    Case(
        "lt_that_is_not_a_tag",
        "if a < b and c<d: <tool> <thinking> <tool_calls> <<think",
        done(content="if a < b and c<d: <tool> <thinking> <tool_calls> <<think"),
    ),
    Case("partial_think_tag_at_end", "hello <thi", done(content="hello <thi")),
    Case("partial_call_tag_at_end", "hello <tool_c", done(content="hello <tool_c")),
    Case("lone_lt_at_end", "a <", done(content="a <")),
    Case("partial_close_think_at_end", "<think>hmm</thi", done("hmm</thi")),
]
