"""Prompt rendering: the Hermes 4 format, token ids, template choice and the sandbox."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from hermes_worker.contract.jobs import parse_job
from hermes_worker.errors import TemplateError
from hermes_worker.inference.template import PromptRenderer, compile_template
from hermes_worker.inference.templates import fallback_template
from hermes_worker.testing.tools import weather_tool

THINKING_PROMPT = (
    "You are a deep thinking AI, you may use extremely long chains of thought to deeply consider "
    "the problem and deliberate with yourself via systematic reasoning processes to help come to "
    "a correct solution prior to answering. You should enclose your thoughts and internal "
    "monologue inside <think> </think> tags, and then provide your solution or response to the "
    "problem."
)
WEATHER_TOOL = weather_tool()


STANDARD_PROMPT = "You are Hermes, created by Nous Research."


def header(role: str) -> str:
    # As in the official Hermes 4 template: one newline after the assistant header, two after
    # the others (the Llama-3 default is two for every role).
    newlines = "\n" if role == "assistant" else "\n\n"
    return f"<|start_header_id|>{role}<|end_header_id|>{newlines}"


def turn(role: str, text: str) -> str:
    return f"{header(role)}{text}<|eot_id|>"


@pytest.fixture(scope="module")
def renderer(test_model_dir: Path) -> PromptRenderer:
    return PromptRenderer.from_pretrained(test_model_dir)


def render(renderer: PromptRenderer, **body: Any) -> str:
    return renderer.render_text(parse_job(body))


def test_plain_chat_renders_llama3_headers_and_generation_prompt(renderer: PromptRenderer) -> None:
    # Given a system and a user message
    text = render(
        renderer,
        messages=[
            {"role": "system", "content": "You are Hermes 4. Be concise."},
            {"role": "user", "content": "Explain the photoelectric effect simply."},
        ],
    )
    # Then the prompt is exactly one BOS, the two turns, and the open assistant header
    assert text == (
        "<|begin_of_text|>"
        + turn("system", "You are Hermes 4. Be concise.")
        + turn("user", "Explain the photoelectric effect simply.")
        + header("assistant")
    )


def test_without_a_system_message_the_standard_prompt_is_the_system_turn(
    renderer: PromptRenderer,
) -> None:
    # Given no system message and thinking off, then the system turn is the official
    # template's standard prompt
    text = render(renderer, messages=[{"role": "user", "content": "Hi"}])
    assert text == (
        "<|begin_of_text|>"
        + turn("system", STANDARD_PROMPT)
        + turn("user", "Hi")
        + header("assistant")
    )


def test_the_assistant_header_is_followed_by_one_newline(renderer: PromptRenderer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = render(renderer, messages=messages)
    assert "<|start_header_id|>assistant<|end_header_id|>\nHello<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n")


def test_token_ids_hold_exactly_one_bos(renderer: PromptRenderer) -> None:
    # Given a tokenizer that, like Llama-3's, prepends BOS on a plain encode()
    tokenizer = renderer.tokenizer
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    # When a job is rendered to ids
    prompt = renderer.render(parse_job({"messages": [{"role": "user", "content": "Hi"}]}))
    # Then BOS appears once, first, and the ids decode back to the text
    assert prompt.token_ids[0] == tokenizer.bos_token_id
    assert prompt.token_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(prompt.token_ids) == prompt.text


def test_control_tokens_are_single_ids(renderer: PromptRenderer) -> None:
    prompt = renderer.render(parse_job({"messages": [{"role": "user", "content": "Hi"}]}))
    tokenizer = renderer.tokenizer
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tokenizer.convert_tokens_to_ids(token) in prompt.token_ids


def test_thinking_adds_the_cards_system_prompt_before_the_users(renderer: PromptRenderer) -> None:
    text = render(
        renderer,
        thinking=True,
        messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hi"},
        ],
    )
    assert text.startswith(
        "<|begin_of_text|>" + turn("system", THINKING_PROMPT + "\n\nAnswer in French.")
    )


def test_thinking_without_a_system_message_makes_one(renderer: PromptRenderer) -> None:
    text = render(renderer, thinking=True, messages=[{"role": "user", "content": "Hi"}])
    assert text == (
        "<|begin_of_text|>"
        + turn("system", THINKING_PROMPT)
        + turn("user", "Hi")
        + header("assistant")
    )


def test_tools_go_into_the_system_turn_one_json_per_line(renderer: PromptRenderer) -> None:
    second = {"type": "function", "function": {"name": "now", "description": "Time <UTC> & date"}}
    text = render(
        renderer,
        tools=[WEATHER_TOOL, second],
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    )
    system = text.split("<|eot_id|>")[0]
    assert system.startswith("<|begin_of_text|>" + header("system") + "Be brief.\n\n")
    block = system.split("<tools>\n")[1].split("\n</tools>")[0]
    lines = block.split("\n")
    # one JSON object per tool, not HTML-escaped
    assert lines == [
        '{"type": "function", "function": {"name": "get_weather",'
        ' "description": "Current weather for a city",'
        ' "parameters": {"type": "object", "properties": {"city": {"type": "string"}},'
        ' "required": ["city"]}}}',
        '{"type": "function", "function": {"name": "now", "description": "Time <UTC> & date"}}',
    ]
    shape = '{"name": <function-name>, "arguments": <arguments-object>}'
    assert f"<tool_call>\n{shape}\n</tool_call>" in system


def test_tool_choice_none_shows_no_tools(renderer: PromptRenderer) -> None:
    text = render(
        renderer,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert "<tools>" not in text
    assert text == (
        "<|begin_of_text|>"
        + turn("system", STANDARD_PROMPT)
        + turn("user", "Hi")
        + header("assistant")
    )


def tool_loop_messages(**assistant_extra: Any) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
            **assistant_extra,
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "rain"}'},
        {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
        {"role": "user", "content": "Thanks"},
    ]


def test_earlier_tool_calls_and_results_are_replayed(renderer: PromptRenderer) -> None:
    text = render(renderer, tools=[WEATHER_TOOL], messages=tool_loop_messages())
    after_system = text.split("</tools>", 1)[1].split("<|eot_id|>", 1)[1]
    assert after_system == (
        turn("user", "Weather in Paris and Rome?")
        + turn(
            "assistant",
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
        )
        + turn(
            "tool",
            '<tool_response>\n{"sky": "rain"}\n</tool_response>\n'
            "<tool_response>\nsunny\n</tool_response>",
        )
        + turn("user", "Thanks")
        + header("assistant")
    )


def test_earlier_reasoning_is_dropped_by_default(renderer: PromptRenderer) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two plus two"},
        {"role": "user", "content": "and 3+3?"},
    ]
    text = render(renderer, messages=messages)
    assert "two plus two" not in text
    assert turn("assistant", "4") in text


def test_keep_cots_keeps_earlier_reasoning(renderer: PromptRenderer) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two plus two"},
        {"role": "user", "content": "and 3+3?"},
    ]
    text = render(renderer, keep_cots=True, messages=messages)
    assert turn("assistant", "<think>\ntwo plus two\n</think>\n4") in text


def test_echoed_raw_output_loses_its_think_block_unless_kept(renderer: PromptRenderer) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nsecret plan\n</think>\n4"},
        {"role": "user", "content": "ok"},
    ]
    assert turn("assistant", "4") in render(renderer, messages=messages)
    kept = render(renderer, keep_cots=True, messages=messages)
    assert turn("assistant", "<think>\nsecret plan\n</think>\n4") in kept


def test_text_parts_are_joined(renderer: PromptRenderer) -> None:
    content = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    text = render(renderer, messages=[{"role": "user", "content": content}])
    assert turn("user", "Hello, world") in text


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ 7 * 7 }}",
        "{% for x in range(3) %}x{% endfor %}",
        "{{ raise_exception('boom') }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{#",
    ],
)
def test_template_syntax_in_messages_is_plain_text(renderer: PromptRenderer, hostile: str) -> None:
    # Given message text that is Jinja syntax
    text = render(renderer, messages=[{"role": "user", "content": hostile}])
    # Then it appears verbatim: data is never compiled as template
    assert turn("user", hostile) in text


def test_checkpoint_template_and_fallback_agree_for_the_test_model(
    test_model_dir: Path, bare_model_dir: Path
) -> None:
    job = parse_job({"tools": [WEATHER_TOOL], "thinking": True, "messages": tool_loop_messages()})
    own = PromptRenderer.from_pretrained(test_model_dir).render(job)
    bare = PromptRenderer.from_pretrained(bare_model_dir).render(job)
    assert own.template_source == "checkpoint"
    assert bare.template_source == "fallback"
    assert own.text == bare.text
    assert own.token_ids == bare.token_ids


def test_a_checkpoints_own_template_wins(test_model_dir: Path, tmp_path: Path) -> None:
    # Given a checkpoint whose template is ChatML (like SmolLM2's)
    model = tmp_path / "chatml"
    shutil.copytree(test_model_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    job = parse_job({"messages": [{"role": "user", "content": "Hi"}]})
    # When rendering, then that template is used, unless the fallback is forced
    assert PromptRenderer.from_pretrained(model).render_text(job) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    forced = PromptRenderer.from_pretrained(model, force_fallback=True).render(job)
    assert forced.template_source == "fallback"
    assert forced.text.startswith("<|begin_of_text|>")


def test_the_sandbox_stops_a_hostile_template() -> None:
    template = compile_template("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match=r"unsafe|access"):
        template.render()


def test_a_template_that_does_not_compile_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        compile_template("{% for %}")


def test_the_fallback_ships_with_the_package() -> None:
    source = fallback_template()
    assert "<|start_header_id|>" in source
    assert "<tool_response>" in source
