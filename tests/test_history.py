"""Multi-turn history through the checkpoint's own template: the test checkpoint whose template
behaves as the official Hermes 4 one is documented to (reads only ``content`` of earlier
assistant turns; with thinking on and keep_cots off, cuts each at its first ``</think>`` and
fails on a turn without one). History the service produced must render in every mode."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import jinja2
import pytest

from hermes_worker.contract.jobs import parse_job
from hermes_worker.inference.template import (
    EMPTY_THINK,
    PromptRenderer,
    assistant_history,
    compile_template,
)
from hermes_worker.testing.model import official_like_template
from hermes_worker.testing.tools import weather_tool

ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n"
WEATHER_TOOL = weather_tool()
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
MODES = list(itertools.product([False, True], [False, True]))  # (thinking, keep_cots)


def history() -> list[dict[str, Any]]:
    """A tool loop as this service returns it: reasoning as reasoning_content, calls as
    tool_calls with no content, then a plain answer without any reasoning."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "The user wants weather; call the tool.",
            "tool_calls": [CALL],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "rain"}'},
        {"role": "assistant", "content": "It rains in Paris."},
        {"role": "user", "content": "And tomorrow?"},
    ]


@pytest.fixture(scope="module")
def official(official_like_model_dir: Path) -> PromptRenderer:
    return PromptRenderer.from_pretrained(official_like_model_dir)


def assistant_turns(text: str) -> list[str]:
    """The bodies of the earlier assistant turns of a rendered prompt."""
    return [part.split("<|eot_id|>")[0] for part in text.split(ASSISTANT)[1:-1]]


@pytest.mark.parametrize(("thinking", "keep_cots"), MODES)
def test_service_history_renders_through_the_official_like_template(
    official: PromptRenderer, thinking: bool, keep_cots: bool
) -> None:
    # Given history as the service returns it, with tools, in each thinking / keep_cots mode
    job = parse_job(
        {
            "messages": history(),
            "tools": [WEATHER_TOOL],
            "thinking": thinking,
            "keep_cots": keep_cots,
        }
    )
    # When it renders with the checkpoint's own template
    prompt = official.render(job)
    assert prompt.template_source == "checkpoint"
    call_turn, answer_turn = assistant_turns(prompt.text)
    # Then the tool call reaches the model although the template reads only content
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert call_turn.endswith(call)
    assert answer_turn.endswith("It rains in Paris.")
    assert '<tool_response>\n{"sky": "rain"}\n</tool_response>' in prompt.text
    # And the reasoning is there exactly when keep_cots asks for it
    reasoning = "<think>\nThe user wants weather; call the tool.\n</think>\n"
    assert (reasoning in call_turn) is keep_cots
    # And with thinking on and nothing kept, every turn shows the template's empty think block
    if thinking and not keep_cots:
        assert call_turn == EMPTY_THINK + call
        assert answer_turn == EMPTY_THINK + "It rains in Paris."


def test_the_official_like_template_fails_on_raw_history_as_documented() -> None:
    # Given the test template fed the history as a client sends it, without this service's
    # reshaping: the answer turn has no </think>
    template = compile_template(official_like_template())
    raw = history()
    raw[1]["content"] = ""
    # When thinking is on and keep_cots off, then it fails as the official one is reported to
    with pytest.raises(jinja2.UndefinedError):
        template.render(messages=raw, thinking=True, keep_cots=False, bos_token="")
    # And otherwise it renders, but drops the reasoning and the tool calls
    text = template.render(messages=raw, thinking=False, bos_token="", add_generation_prompt=True)
    assert "<tool_call>" not in text
    assert "call the tool" not in text


@pytest.mark.parametrize(("thinking", "keep_cots"), MODES)
def test_the_fallback_and_the_official_like_template_see_the_same_turns(
    official: PromptRenderer, test_model_dir: Path, thinking: bool, keep_cots: bool
) -> None:
    # Given the same job on the fallback template (the test checkpoint's own)
    body = {"messages": history(), "thinking": thinking, "keep_cots": keep_cots}
    fallback = PromptRenderer.from_pretrained(test_model_dir).render_text(parse_job(body))
    theirs = official.render_text(parse_job(body))
    # Then both show the model the same assistant turns, up to the official template's empty
    # think block (the fallback drops reasoning without one)
    ours = [t.removeprefix(EMPTY_THINK) for t in assistant_turns(theirs)]
    assert assistant_turns(fallback) == ours


def test_assistant_history_folds_reasoning_answer_and_calls_into_content() -> None:
    message = {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "plan",
        "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
    }
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    kept = assistant_history(message, thinking=True, keep_cots=True)
    assert kept == {"role": "assistant", "content": f"<think>\nplan\n</think>\nChecking.\n{call}"}
    dropped = assistant_history(message, thinking=False, keep_cots=False)
    assert dropped["content"] == f"Checking.\n{call}"


def test_echoed_raw_output_keeps_its_reasoning_only_with_keep_cots() -> None:
    echoed = {"role": "assistant", "content": "<think>\nsecret\n</think>\n\nAnswer"}
    assert assistant_history(echoed, thinking=False, keep_cots=False)["content"] == "Answer"
    assert assistant_history(echoed, thinking=True, keep_cots=False)["content"] == (
        EMPTY_THINK + "\nAnswer"
    )
    assert (
        assistant_history(echoed, thinking=True, keep_cots=True)["content"] == (echoed["content"])
    )


def test_an_empty_turn_in_thinking_mode_is_an_empty_think_block() -> None:
    empty = {"role": "assistant", "content": ""}
    assert assistant_history(empty, thinking=True, keep_cots=False)["content"] == EMPTY_THINK
    assert assistant_history(empty, thinking=False, keep_cots=False)["content"] == ""
