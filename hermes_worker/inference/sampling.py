"""What to ask of the engine for one job: sampling values, token budget, output constraint.

Pure and engine-agnostic, so every rule here is unit-tested without vLLM; ``engine.py``
turns a :class:`GenerationPlan` into vLLM's ``SamplingParams``.

Where the OpenAI contract needs more than sampling:

* ``response_format`` ``json_object`` / ``json_schema`` -> a JSON (schema) constraint.
* ``tool_choice`` ``required`` or a named function -> the assistant turn is opened with
  ``<tool_call>\\n`` in the prompt and the output is constrained to the JSON of one call
  (``{"name": …, "arguments": …}`` with the arguments valid against the tool's schema);
  the parser is fed the opening tag first and the closing tag last, so the forced call is
  an ordinary Hermes call. One forced call per job (``required`` lets the model pick which).

Every constraint carries the job's ``json_whitespace``: "compact" (the default) is a grammar
with no free whitespace, so a weak model cannot spend its budget on blanks; "any" is vLLM's
default JSON grammar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hermes_worker.contract.jobs import ChatJob, JsonObjectFormat, JsonSchemaFormat, NamedToolChoice
from hermes_worker.errors import ContextLengthExceeded

FORCED_CALL_PREFIX = "<tool_call>\n"
FORCED_CALL_SUFFIX = "\n</tool_call>"


@dataclass(frozen=True)
class Constraint:
    """An output constraint: ``json_object`` (any JSON object) or ``json`` (a JSON Schema).
    ``whitespace`` "compact": no whitespace between JSON tokens but the fixed ``", "`` and
    ``": "``; "any": whatever whitespace JSON allows."""

    kind: Literal["json_object", "json"]
    schema: dict[str, Any] | None = None
    whitespace: Literal["compact", "any"] = "compact"


@dataclass(frozen=True)
class GenerationPlan:
    """Everything the engine call needs besides the prompt."""

    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    constraint: Constraint | None = None
    forced_prefix: str = ""  # appended to the prompt and fed to the parser first
    forced_suffix: str = ""  # fed to the parser after the last delta
    n: int = 1  # choices: vLLM samples each on its own

    @property
    def json_document(self) -> bool:
        """True when the whole output is one JSON document (``response_format``): Hermes
        tags inside it are string data, not structure, so it is not split."""
        return self.constraint is not None and not self.forced_prefix


def _call_schema(job: ChatJob) -> dict[str, Any]:
    """JSON Schema of one Hermes call object for the tools the job's tool_choice allows."""
    choice = job.effective_tool_choice
    tools = job.tools or ()
    if isinstance(choice, NamedToolChoice):
        tools = tuple(t for t in tools if t.function.name == choice.function.name)
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def forces_tool_call(job: ChatJob) -> bool:
    choice = job.effective_tool_choice
    return bool(job.tools) and (choice == "required" or isinstance(choice, NamedToolChoice))


def prompt_suffix(job: ChatJob) -> str:
    """What follows the rendered prompt: a forced call's opening tag, or nothing."""
    return FORCED_CALL_PREFIX if forces_tool_call(job) else ""


def _constraint(job: ChatJob) -> Constraint | None:
    whitespace = job.json_whitespace
    if forces_tool_call(job):
        return Constraint("json", _call_schema(job), whitespace)
    fmt = job.response_format
    if isinstance(fmt, JsonObjectFormat):
        return Constraint("json_object", whitespace=whitespace)
    if isinstance(fmt, JsonSchemaFormat):
        return Constraint("json", dict(fmt.json_schema.schema_), whitespace)
    return None


def token_budget(job: ChatJob, prompt_tokens: int, max_model_len: int) -> int:
    """``max_tokens`` for the engine; a prompt that cannot fit is a clear error, not a crash."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise ContextLengthExceeded(
            f"the prompt is {prompt_tokens} tokens, but the model's context is "
            f"{max_model_len} tokens; shorten the messages"
        )
    if job.max_tokens is None:
        return room
    if job.max_tokens > room:
        raise ContextLengthExceeded(
            f"the model's context is {max_model_len} tokens, but {prompt_tokens + job.max_tokens}"
            f" were requested ({prompt_tokens} in the prompt, {job.max_tokens} in max_tokens)"
        )
    return job.max_tokens


def plan_generation(job: ChatJob, prompt_tokens: int, max_model_len: int) -> GenerationPlan:
    """The engine request for ``job`` whose prompt (forced prefix included) is
    ``prompt_tokens`` long."""
    forced = forces_tool_call(job)
    sampling: dict[str, Any] = {
        "temperature": job.temperature,
        "top_p": job.top_p,
        "top_k": job.top_k if job.top_k > 0 else 0,
        "min_p": job.min_p,
        "min_tokens": job.min_tokens,
        "stop": list(job.stop) if job.stop else None,
        "seed": job.seed,
        "presence_penalty": job.presence_penalty,
        "frequency_penalty": job.frequency_penalty,
        "repetition_penalty": job.repetition_penalty,
        "ignore_eos": job.ignore_eos,
        # vLLM's logprobs: None, or how many of the most likely tokens besides the sampled one.
        "logprobs": (job.top_logprobs or 0) if job.logprobs else None,
    }
    return GenerationPlan(
        max_tokens=token_budget(job, prompt_tokens, max_model_len),
        sampling=sampling,
        constraint=_constraint(job),
        forced_prefix=FORCED_CALL_PREFIX if forced else "",
        forced_suffix=FORCED_CALL_SUFFIX if forced else "",
        n=job.n,
    )
