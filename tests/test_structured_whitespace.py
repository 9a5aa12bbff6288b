"""Constrained output without free whitespace (``json_whitespace``): the grammars the engine
gets, and what they do on the real engine with the tiny random-weight checkpoint.

vLLM 0.32 ignores a request's ``disable_any_whitespace``, so the worker sends xgrammar
grammars of its own (see ``engine.structured_outputs``); these tests read them back with
xgrammar, the library vLLM compiles them with."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from worker_fixtures import WorkerProcess, patient_redis

from hermes_worker.contract.jobs import JobResult, JobStatus, parse_job
from hermes_worker.errors import InvalidRequest
from hermes_worker.inference.sampling import plan_generation
from hermes_worker.settings import Settings
from producers.client import HermesClient


def engine() -> ModuleType:
    """``hermes_worker.inference.engine``, imported by the tests that call it: it loads vLLM
    (7-8 s of CPU), which each pytest-xdist worker of the fast tier would otherwise pay only
    to collect this file."""
    return importlib.import_module("hermes_worker.inference.engine")


TIMEOUT = 120.0
# Two required fields, bounded, so the compact call has a short longest form. Patterns, not
# maxLength: xgrammar 0.2.8 lets raw control characters into a maxLength string, which is
# invalid JSON in any spacing (a bug of its own, seen here as "Invalid control character").
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "pattern": "^[a-z]{1,16}$"},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["answer", "ok", "n"],
    "additionalProperties": False,
}
FORCED_CALL = {
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
}
JSON_SCHEMA = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}
}
JSON_OBJECT = {"response_format": {"type": "json_object"}}

HERMES_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
LOOSE_CALLS = [
    '{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}',
    '{ "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"name": "get_weather",\n"arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}\t}',
]


def body(extra: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}], **extra, **fields}


def grammar_of(extra: dict[str, Any], **fields: Any) -> str:
    """The grammar ``sampling_params`` hands vLLM for a job."""
    params = engine().sampling_params(plan_generation(parse_job(body(extra, **fields)), 5, 1000))
    structured = params.structured_outputs
    assert structured is not None and structured.grammar is not None
    assert (structured.json, structured.json_object) == (None, None)
    return str(structured.grammar)


def accepts(grammar: str, text: str) -> bool:
    """Whether ``grammar`` matches all of ``text``, compiled as vLLM's xgrammar backend does."""
    import xgrammar  # 2-3 s to import: only where a test reads a grammar

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([]), cache_enabled=False)
    compiled = compiler.compile_grammar(grammar)
    matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return bool(matcher.accept_string(text)) and bool(matcher.is_terminated())


# --- the grammars --------------------------------------------------------------------


def test_a_forced_call_is_held_to_the_hermes_form_without_free_whitespace() -> None:
    # Given a forced get_weather call, json_whitespace left at its default
    grammar = grammar_of(FORCED_CALL)
    # Then the conventional Hermes form is the only spacing it allows
    assert accepts(grammar, HERMES_CALL)
    for loose in LOOSE_CALLS:
        assert not accepts(grammar, loose), loose


def test_json_whitespace_any_is_vllms_default_grammar() -> None:
    # Given the same call with json_whitespace "any"
    grammar = grammar_of(FORCED_CALL, json_whitespace="any")
    # Then any spacing JSON allows is allowed
    for text in [HERMES_CALL, *LOOSE_CALLS]:
        assert accepts(grammar, text), text


@pytest.mark.parametrize(
    ("extra", "tight", "loose"),
    [
        (
            JSON_SCHEMA,
            '{"answer": "hi", "ok": true, "n": 7}',
            '{"answer": "hi", "ok": true,"n": 7}',
        ),
        (JSON_OBJECT, '{"a": [1, {"b": null}], "c": "x y"}', '{"a": [1, {"b": null}] }'),
    ],
    ids=["json_schema", "json_object"],
)
def test_response_formats_are_compact_unless_the_job_says_any(
    extra: dict[str, Any], tight: str, loose: str
) -> None:
    # Given a response_format job, compact by default and "any" on request
    compact, default = grammar_of(extra), grammar_of(extra, json_whitespace="any")
    # Then the compact grammar takes only the json.dumps spacing, the default takes both
    assert accepts(compact, tight) and not accepts(compact, loose)
    assert accepts(default, tight) and accepts(default, loose)


def test_sampling_params_record_the_choice_for_vllm() -> None:
    compact = engine().sampling_params(plan_generation(parse_job(body(JSON_OBJECT)), 5, 100))
    wide = engine().sampling_params(
        plan_generation(parse_job(body(JSON_OBJECT, json_whitespace="any")), 5, 100)
    )
    assert compact.structured_outputs is not None and wide.structured_outputs is not None
    assert compact.structured_outputs.disable_any_whitespace is True
    assert wide.structured_outputs.disable_any_whitespace is False


def test_vllms_auto_backend_gives_every_constraint_to_xgrammar() -> None:
    # vLLM's "auto" choice: xgrammar when this validation passes, else guidance or outlines
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar
    from vllm.v1.structured_output.utils import grammar_is_likely_lark

    # multipleOf alone would send a plain JSON schema to guidance
    odd = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}
    odd_schema = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": odd}}
    }
    for extra in (FORCED_CALL, JSON_SCHEMA, JSON_OBJECT, odd_schema):
        for mode in ("compact", "any"):
            job = parse_job(body(extra, json_whitespace=mode))
            params = engine().sampling_params(plan_generation(job, 5, 1000))
            validate_xgrammar_grammar(params)  # raises where "auto" would look elsewhere
            assert not grammar_is_likely_lark(params.structured_outputs.grammar)


def test_the_engine_keeps_a_grammar_backend_that_reads_these_grammars() -> None:
    # A guidance engine would fail every one of them: it reads EBNF as llama.cpp's GBNF
    backend = engine().engine_args(Settings(model="m")).structured_outputs_config.backend
    assert backend in ("auto", "xgrammar")


def test_a_schema_xgrammar_cannot_compile_is_an_invalid_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}
    fmt = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    }
    with pytest.raises(InvalidRequest, match=r"^the engine rejected the schema: .*Lookbehind"):
        engine().sampling_params(plan_generation(parse_job(body(fmt)), 5, 100))


# --- on the engine -------------------------------------------------------------------

SEEDS = range(6)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"?')


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[HermesClient]:
    with HermesClient(worker.settings, redis=patient_redis(worker.settings.redis_url)) as c:
        yield c


def free_whitespace(text: str) -> int:
    """Whitespace characters of a JSON text outside its strings, less one space after each
    "," and ":" (the compact grammar's separators)."""
    layout = re.sub(r"([,:]) ", r"\1", STRING.sub('""', text))
    return sum(char.isspace() for char in layout)


def completion_tokens(result: JobResult) -> int:
    assert result.usage is not None
    return result.usage.completion_tokens


def check_call(result: JobResult) -> None:
    choice = result.choices[0]
    assert (choice.finish_reason, result.job.problems) == ("tool_calls", ()), choice
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def check_answer(result: JobResult) -> None:
    content = result.choices[0].message.content
    assert result.choices[0].finish_reason == "stop" and content is not None, content
    jsonschema.validate(json.loads(content), ANSWER)
    assert free_whitespace(content) == 0, content


@pytest.mark.engine
@pytest.mark.parametrize(
    ("extra", "check"),
    [(FORCED_CALL, check_call), (JSON_SCHEMA, check_answer)],
    ids=["forced call", "json_schema"],
)
def test_compact_jobs_end_within_budget_on_fewer_tokens_than_any(
    client: HermesClient, extra: dict[str, Any], check: Any
) -> None:
    # Given the same constrained job, six seeds, with json_whitespace "any" and "compact",
    # on a budget the compact form fits (the random model pads "any" output with blanks)
    handles = {
        (mode, seed): client.submit(body(extra, seed=seed, max_tokens=120, json_whitespace=mode))
        for mode in ("any", "compact")
        for seed in SEEDS
    }
    # When they run
    results = {key: handle.result(timeout=TIMEOUT) for key, handle in handles.items()}
    assert all(r.job.status is JobStatus.SUCCEEDED for r in results.values())
    # Then every compact one is complete and valid within the budget
    for seed in SEEDS:
        check(results[("compact", seed)])
    # and the compact ones used fewer tokens in all than the same jobs with "any"
    totals = {
        mode: sum(completion_tokens(results[(mode, seed)]) for seed in SEEDS)
        for mode in ("any", "compact")
    }
    assert totals["compact"] < totals["any"], totals
