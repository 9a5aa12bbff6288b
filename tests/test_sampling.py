"""Generation plans: sampling values, token budgets and output constraints, per job."""

from __future__ import annotations

from typing import Any

import pytest

from hermes_worker.contract.jobs import parse_job
from hermes_worker.errors import ContextLengthExceeded
from hermes_worker.inference.sampling import FORCED_CALL_PREFIX, forces_tool_call, plan_generation

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
OTHER = {"type": "function", "function": {"name": "now"}}


def job(**extra: Any) -> Any:
    return parse_job({"messages": [{"role": "user", "content": "Hi"}], **extra})


def test_hermes_card_defaults_reach_the_engine() -> None:
    plan = plan_generation(job(), prompt_tokens=10, max_model_len=100)
    assert plan.sampling["temperature"] == 0.6
    assert plan.sampling["top_p"] == 0.95
    assert plan.sampling["top_k"] == 20
    assert plan.constraint is None and plan.forced_prefix == ""


def test_every_sampling_field_is_passed_through() -> None:
    plan = plan_generation(
        job(
            temperature=0.1, top_p=0.5, top_k=5, min_p=0.2, min_tokens=3, max_tokens=9,
            stop="END", seed=7, presence_penalty=0.5, frequency_penalty=-0.5,
            repetition_penalty=1.2, ignore_eos=True, logprobs=True, top_logprobs=4,
        ),
        prompt_tokens=10,
        max_model_len=100,
    )  # fmt: skip
    assert plan.max_tokens == 9
    assert plan.sampling == {
        "temperature": 0.1, "top_p": 0.5, "top_k": 5, "min_p": 0.2, "min_tokens": 3,
        "stop": ["END"], "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "ignore_eos": True, "logprobs": 4,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "logprobs"),
    [({}, None), ({"logprobs": True}, 0), ({"logprobs": False, "top_logprobs": 0}, None)],
)
def test_logprobs_become_vllms_count_of_top_tokens(
    fields: dict[str, Any], logprobs: int | None
) -> None:
    assert plan_generation(job(**fields), 1, 10).sampling["logprobs"] == logprobs


@pytest.mark.parametrize("top_k", [0, -1])
def test_disabled_top_k_is_zero_for_vllm(top_k: int) -> None:
    assert plan_generation(job(top_k=top_k), 1, 10).sampling["top_k"] == 0


def test_no_max_tokens_means_the_rest_of_the_context() -> None:
    assert plan_generation(job(), prompt_tokens=30, max_model_len=100).max_tokens == 70


def test_a_prompt_that_fills_the_context_is_context_length_exceeded() -> None:
    with pytest.raises(ContextLengthExceeded, match="100 tokens"):
        plan_generation(job(), prompt_tokens=100, max_model_len=100)


def test_max_tokens_past_the_context_is_context_length_exceeded() -> None:
    with pytest.raises(ContextLengthExceeded, match=r"130 were requested \(30 in the prompt"):
        plan_generation(job(max_tokens=100), prompt_tokens=30, max_model_len=100)


def test_json_object_format_is_a_json_object_constraint() -> None:
    plan = plan_generation(job(response_format={"type": "json_object"}), 1, 10)
    assert plan.constraint is not None and plan.constraint.kind == "json_object"


def test_json_schema_format_passes_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    plan = plan_generation(job(response_format=fmt), 1, 10)
    assert plan.constraint is not None
    assert (plan.constraint.kind, plan.constraint.schema) == ("json", schema)


def test_auto_tool_choice_is_not_forced() -> None:
    j = job(tools=[TOOL])
    assert not forces_tool_call(j)
    assert plan_generation(j, 1, 10).constraint is None


def test_named_tool_choice_forces_one_call_of_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_generation(job(tools=[TOOL, OTHER], tool_choice=choice), 1, 10)
    assert plan.forced_prefix == FORCED_CALL_PREFIX == "<tool_call>\n"
    assert plan.forced_suffix == "\n</tool_call>"
    assert plan.constraint is not None and plan.constraint.schema == {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": TOOL["function"]["parameters"],  # type: ignore[index]
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def test_required_tool_choice_allows_any_tool() -> None:
    plan = plan_generation(job(tools=[TOOL, OTHER], tool_choice="required"), 1, 10)
    assert plan.constraint is not None and plan.constraint.schema is not None
    options = plan.constraint.schema["anyOf"]
    assert [o["properties"]["name"]["const"] for o in options] == ["get_weather", "now"]
    # a tool without parameters takes any object
    assert options[1]["properties"]["arguments"] == {"type": "object"}


def test_forced_call_wins_over_response_format() -> None:
    plan = plan_generation(
        job(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}), 1, 10
    )
    assert plan.forced_prefix and plan.constraint is not None and plan.constraint.kind == "json"


CONSTRAINED = {
    "forced call": {"tools": [TOOL], "tool_choice": "required"},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        }
    },
}


@pytest.mark.parametrize("extra", CONSTRAINED.values(), ids=CONSTRAINED.keys())
def test_constrained_output_is_compact_unless_the_job_says_otherwise(extra: Any) -> None:
    # Given a job whose output is constrained, without json_whitespace
    plan = plan_generation(job(**extra), 1, 10)
    # Then its constraint allows no free whitespace
    assert plan.constraint is not None and plan.constraint.whitespace == "compact"


@pytest.mark.parametrize("extra", CONSTRAINED.values(), ids=CONSTRAINED.keys())
def test_json_whitespace_any_reaches_the_constraint(extra: Any) -> None:
    # Given the same job asking for vLLM's default grammar
    plan = plan_generation(job(json_whitespace="any", **extra), 1, 10)
    # Then its constraint says so
    assert plan.constraint is not None and plan.constraint.whitespace == "any"


def test_json_whitespace_alone_constrains_nothing() -> None:
    assert plan_generation(job(json_whitespace="any"), 1, 10).constraint is None
