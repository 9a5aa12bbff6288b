"""Wire models shared by producers and the worker.

A job body (:class:`ChatJob`) is an OpenAI chat-completions request plus the
Hermes fields (``thinking``, ``keep_cots``, ``json_whitespace``, ``priority``,
deadlines). It is untrusted input: :func:`parse_job` is the one entry point that turns
a body into a job, and every way a body can be wrong ends as :class:`InvalidRequest`
with a one-line message naming the offending fields by dotted path.

A job's result (:class:`JobResult`) is an OpenAI ``chat.completion`` object plus
the job's own record (:class:`JobInfo`) and an optional :class:`ErrorInfo`.

Request models reject unknown fields (the contract is explicit); response models
ignore them (so an older reader survives a newer writer). All models are frozen
and hold sequences as tuples, so a job cannot change once parsed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from hermes_worker.errors import HermesError, InvalidRequest

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_MESSAGES",
    "TERMINAL_STATUSES",
    "AssistantMessage",
    "ChatJob",
    "Choice",
    "ChoiceLogprobs",
    "CompletionTokensDetails",
    "Content",
    "DeveloperMessage",
    "ErrorInfo",
    "FrozenList",
    "FunctionCall",
    "FunctionDefinition",
    "JobInfo",
    "JobResult",
    "JobStatus",
    "JsonObjectFormat",
    "JsonSchemaFormat",
    "JsonSchemaSpec",
    "Message",
    "NamedFunction",
    "NamedToolChoice",
    "PromptTokensDetails",
    "ResponseFormat",
    "ResponseFunctionCall",
    "ResponseMessage",
    "ResponseToolCall",
    "SystemMessage",
    "TextFormat",
    "TextPart",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolMessage",
    "TopLogprob",
    "Usage",
    "UserMessage",
    "content_text",
    "format_validation_error",
    "parse_job",
]

MAX_MESSAGES = 4096
MAX_TOOLS = 128  # OpenAI's own limit; a prompt with more tools would not fit anyway.
MAX_STOP = 16
MAX_METADATA_KEYS = 16
MAX_JSON_DEPTH = 100  # far deeper than any real schema; keeps every later walk shallow
MAX_INT_DIGITS = 100  # any integer a job needs has far fewer digits
MAX_CHOICES = 16  # each takes one of the engine's sequences
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs
MAX_REPORTED_ERRORS = 20  # one line, even for a body with thousands of bad messages

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# A job's events stream and lease are its record's key plus these (store.Keys): an id that
# ends in one would name a record at another job's stream or lease (``x:lease``: job
# ``x``'s lease, held for ever), so no id may.
RESERVED_ID_ENDINGS = (":events", ":lease")
RESERVED_ID_ENDINGS_TEXT = " or ".join(f"'{ending}'" for ending in RESERVED_ID_ENDINGS)


def usable_job_id(text: str) -> bool:
    """Whether ``text`` may be a job id: JOB_ID_PATTERN, and no RESERVED_ID_ENDINGS."""
    return bool(re.fullmatch(JOB_ID_PATTERN, text)) and not text.endswith(RESERVED_ID_ENDINGS)


TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_.-]{1,64}$"

# Scalars are strict: JSON "0.5" is not a temperature and 1 is not a boolean.
# Containers stay lax so Python producers can pass lists and dicts.
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]  # strict floats still accept JSON integers
StrictBool = Annotated[bool, Strict()]
NonEmptyStr = Annotated[str, Field(min_length=1)]

T = TypeVar("T")
# Callers pass lists or tuples (mypy accepts both); the model always holds a tuple, so a
# parsed job cannot change and two equal jobs compare equal however they were built.
FrozenList = Annotated[Sequence[T], AfterValidator(tuple)]


def _short(value: object, limit: int = 60) -> str:
    """``repr`` of a client-supplied value, cut so error messages stay short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _problem(message: str) -> PydanticCustomError:
    # No context is passed, so braces in client values are never formatted.
    return PydanticCustomError("invalid_request", message)


class _Problem(NamedTuple):
    """A cross-field problem, found after the fields themselves validated."""

    loc: tuple[str | int, ...]
    message: str
    value: object


def _raise_problems(title: str, problems: list[_Problem]) -> None:
    """Raise every cross-field problem at once, each at its own location."""
    if problems:
        details = [
            InitErrorDetails(type=_problem(p.message), loc=p.loc, input=p.value) for p in problems
        ]
        raise ValidationError.from_exception_data(title, details)


# --- strict JSON -----------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers disagree on which duplicate wins; refuse to guess.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_short(key)}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_int(digits: str) -> int:
    # Python refuses over 4,300 digits with advice meant for the server's operator.
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer with more than {MAX_INT_DIGITS} digits")
    return int(digits)


def _loads(text: str) -> Any:
    """Strict ``json.loads``: no NaN/Infinity, no duplicate keys, no absurd integers."""
    return json.loads(
        text,
        object_pairs_hook=_unique_keys,
        parse_constant=_reject_constant,
        parse_int=_parse_int,
    )


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- message content -------------------------------------------------------------------


class TextPart(_Request):
    """An OpenAI text content part; the only part type a text model accepts."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "type" in data and data["type"] != "text":
            raise _problem(
                f"only text content parts are supported, got type {_short(data['type'])}"
            )
        return data


def _content_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | tuple):
        return "parts"
    return None


Content = Annotated[
    Annotated[str, Tag("str")] | Annotated[FrozenList[TextPart], Tag("parts")],
    Discriminator(
        _content_kind,
        custom_error_type="content_type",
        custom_error_message="Input should be a string or a list of text parts",
    ),
]


def content_text(content: str | Sequence[TextPart] | None) -> str:
    """The plain text of a message's content: parts joined with no separator."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


# --- tool calls and tools --------------------------------------------------------------


class FunctionCall(_Request):
    """The function half of an assistant's tool call; ``arguments`` is a JSON object as text."""

    name: NonEmptyStr
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _arguments_are_object(cls, value: str) -> str:
        try:
            parsed = _loads(value)
        except RecursionError:
            raise _problem("arguments are nested too deeply") from None
        except ValueError as exc:
            raise _problem(f"arguments must be a JSON object encoded as a string ({exc})") from None
        if not isinstance(parsed, dict):
            raise _problem(f"arguments must encode a JSON object, got {type(parsed).__name__}")
        return value

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments decoded into a dict (validated as a JSON object at parse time)."""
        parsed: dict[str, Any] = _loads(self.arguments)
        return parsed


class ToolCall(_Request):
    """A tool call made by an earlier assistant turn."""

    id: NonEmptyStr
    type: Literal["function"] = "function"
    function: FunctionCall

    def parsed_arguments(self) -> dict[str, Any]:
        """Shortcut for ``function.parsed_arguments()``."""
        return self.function.parsed_arguments()


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a valid JSON Schema (draft 2020-12), or None."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return f"not a valid JSON Schema: {_short(exc.message, 120)} at {exc.json_path}"
    except RecursionError:
        return "JSON Schema is nested too deeply"
    return None


class FunctionDefinition(_Request):
    """A function the model may call; ``parameters`` is a JSON Schema for its arguments."""

    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _object_schema(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _problem("tool parameters must be an object schema (a JSON object)")
        problem = _schema_problem(value)
        if problem is not None:
            raise _problem(problem)
        if "type" in value and value["type"] != "object":
            raise _problem(
                f'tool parameters must be an object schema ("type": "object"), '
                f"got type {_short(value['type'])}"
            )
        return value


class Tool(_Request):
    """A tool offered to the model (OpenAI format; only functions exist)."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: NonEmptyStr


class NamedToolChoice(_Request):
    """Forces one named tool: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


def _tool_choice_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "mode"
    if isinstance(value, Mapping | NamedToolChoice):
        return "named"
    return None


ToolChoice = Annotated[
    Annotated[Literal["auto", "none", "required"], Tag("mode")]
    | Annotated[NamedToolChoice, Tag("named")],
    Discriminator(
        _tool_choice_kind,
        custom_error_type="tool_choice_type",
        custom_error_message="Input should be 'auto', 'none', 'required' or a named tool choice",
    ),
]


# --- messages --------------------------------------------------------------------------


class SystemMessage(_Request):
    role: Literal["system"]
    content: Content
    name: str | None = None


class DeveloperMessage(_Request):
    """OpenAI's newer name for a system message; templates treat it as one."""

    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(_Request):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Request):
    """An earlier assistant turn: text, an optional reasoning trace, and tool calls."""

    role: Literal["assistant"]
    content: Content | None = None
    reasoning_content: str | None = None
    tool_calls: FrozenList[ToolCall] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise _problem("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Request):
    """A tool's result, answering the assistant tool call with id ``tool_call_id``."""

    role: Literal["tool"]
    content: Content
    tool_call_id: NonEmptyStr
    name: str | None = None


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


# --- response_format -------------------------------------------------------------------


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaSpec(_Request):
    """The ``json_schema`` object of a structured-output request."""

    model_config = ConfigDict(
        validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    description: str | None = None
    # ``schema`` would shadow a BaseModel attribute; the wire name stays "schema".
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = _schema_problem(value)
        if problem is not None:
            raise _problem(problem)
        return value


class JsonSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


# --- the job ---------------------------------------------------------------------------

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class ChatJob(_Request):
    """One chat-completion job: an OpenAI chat request plus the Hermes fields.

    Sampling defaults follow the Hermes 4 model card (temperature 0.6, top_p 0.95,
    top_k 20). ``max_tokens=None`` means "up to the context limit"; the worker decides.

    ``priority`` runs from 0 (most urgent) to 9 (least); 5 is the default. Lower
    is sooner, the same direction as vLLM's priority scheduler and Celery's Redis
    transport, so the value passes through unchanged.

    ``timeout_s`` counts from the moment the job was queued; ``deadline`` is an
    absolute unix time. Both may be given: the earlier one wins (see
    :meth:`effective_deadline`).

    ``id`` is the client's idempotency key; ``model`` is accepted for OpenAI
    compatibility and is informational only (a worker serves one model).

    ``json_whitespace`` shapes the grammar of constrained output (a forced tool call,
    ``tool_choice`` "required", ``json_object``, ``json_schema``): "compact" (the default)
    allows no free whitespace, only ``", "`` and ``": "`` between items, so a weak model
    cannot spend its budget on blanks (vLLM's ``disable_any_whitespace``); "any" is vLLM's
    default JSON grammar, any whitespace between tokens.

    ``n``: that many choices, each sampled on its own (``seed`` + index with a seed).
    ``logprobs`` / ``top_logprobs`` (0-20, only with ``logprobs``) are OpenAI's: each choice
    gets the log probability of each token of its ``content``, and of the most likely
    tokens at each place. ``parallel_tool_calls`` false: at most one call; generation stops
    once the first call is complete.

    ``stream`` false (OpenAI's field, as a promise): nobody reads the job's output as it is
    generated, so the worker writes none of it to the job's events stream; the stream holds
    the job's bookkeeping events and its end, and the result holds all its output. For
    producers that only await results (batches): half of what Redis does for a job.
    """

    id: Annotated[str, Field(pattern=JOB_ID_PATTERN)] | None = None
    model: str | None = None
    messages: FrozenList[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: FrozenList[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None

    temperature: StrictFloat = Field(default=0.6, ge=0, le=2)
    top_p: StrictFloat = Field(default=0.95, gt=0, le=1)
    top_k: StrictInt = Field(default=20, ge=-1)  # -1 or 0: disabled
    min_p: StrictFloat = Field(default=0.0, ge=0, le=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    min_tokens: StrictInt = Field(default=0, ge=0)
    stop: FrozenList[NonEmptyStr] | None = Field(default=None, max_length=MAX_STOP)
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: StrictFloat = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: StrictFloat = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: StrictFloat = Field(default=1.0, gt=0, le=2)
    ignore_eos: StrictBool = False
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    parallel_tool_calls: StrictBool = True
    stream: StrictBool = True

    thinking: StrictBool = False
    keep_cots: StrictBool = False
    json_whitespace: Literal["compact", "any"] = "compact"
    priority: StrictInt = Field(default=5, ge=0, le=9)
    timeout_s: StrictFloat | None = Field(default=None, gt=0)
    deadline: StrictFloat | None = Field(default=None, gt=0)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        default=None, max_length=MAX_METADATA_KEYS
    )
    user: str | None = None

    @field_validator("id")
    @classmethod
    def _not_another_jobs_key(cls, value: str | None) -> str | None:
        if value is not None and value.endswith(RESERVED_ID_ENDINGS):
            raise ValueError(
                f"a job id must not end in {RESERVED_ID_ENDINGS_TEXT} (those name a job's "
                "stream and lease)"
            )
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_is_a_list(cls, value: Any) -> Any:
        # OpenAI allows a bare string; always holding a sequence keeps consumers simple.
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> ChatJob:
        problems = self._tool_call_id_problems() + self._tool_problems()
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            message = f"must not exceed max_tokens ({self.max_tokens})"
            problems.append(_Problem(("min_tokens",), message, self.min_tokens))
        if self.top_logprobs and not self.logprobs:
            message = "needs logprobs: true"
            problems.append(_Problem(("top_logprobs",), message, self.top_logprobs))
        _raise_problems(type(self).__name__, problems)
        return self

    def _tool_call_id_problems(self) -> list[_Problem]:
        problems: list[_Problem] = []
        seen: set[str] = set()
        for index, message in enumerate(self.messages):
            if isinstance(message, AssistantMessage):
                seen.update(call.id for call in message.tool_calls or ())
            elif isinstance(message, ToolMessage) and message.tool_call_id not in seen:
                call_id = message.tool_call_id
                text = f"no earlier assistant tool call has id {_short(call_id)}"
                problems.append(_Problem(("messages", index, "tool_call_id"), text, call_id))
        return problems

    def _tool_problems(self) -> list[_Problem]:
        problems: list[_Problem] = []
        first_index: dict[str, int] = {}
        for index, tool in enumerate(self.tools or ()):
            name = tool.function.name
            if name in first_index:
                message = f"duplicate tool name {name!r} (first at tools.{first_index[name]})"
                problems.append(_Problem(("tools", index, "function", "name"), message, name))
            first_index.setdefault(name, index)
        choice = self.tool_choice
        if choice == "required" and not first_index:
            message = "'required' needs at least one tool in tools"
            problems.append(_Problem(("tool_choice",), message, choice))
        elif isinstance(choice, NamedToolChoice) and choice.function.name not in first_index:
            name = choice.function.name
            message = f"no tool named {_short(name)} in tools"
            problems.append(_Problem(("tool_choice", "function", "name"), message, name))
        return problems

    @property
    def effective_tool_choice(self) -> Literal["auto", "none", "required"] | NamedToolChoice:
        """``tool_choice`` as given, else "auto" when tools are offered and "none" otherwise."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def effective_deadline(self, queued_at: float) -> float | None:
        """The unix time the job must end by: the earlier of ``deadline`` and
        ``queued_at + timeout_s``, or None when neither is set."""
        candidates = [self.deadline]
        if self.timeout_s is not None:
            candidates.append(queued_at + self.timeout_s)
        return min((c for c in candidates if c is not None), default=None)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready body without unset or null fields; :func:`parse_job` reads it back."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)


# --- parsing untrusted bodies ----------------------------------------------------------

# Pydantic puts the chosen union member's tag into an error's location (for example
# messages.0.user.content). These tables say where such a tag can sit, so the path a
# client sees is the path of its own JSON: messages.0.content. Exactly one tag follows
# a union, so only one element is dropped there (response_format.json_schema.json_schema
# is the tag followed by the real field).
_ROLE_TAGS = frozenset({"system", "developer", "user", "assistant", "tool"})
_TAGS_AFTER_FIELD = {
    "content": frozenset({"str", "parts"}),
    "tool_choice": frozenset({"mode", "named"}),
    "response_format": frozenset({"text", "json_object", "json_schema"}),
}
_FRIENDLIER = {
    "extra_forbidden": "Unknown field (not part of the job contract)",
    "is_instance_of": "Input should be a list",  # only FrozenList checks an instance type
    "sequence_str": "Input should be a list",
    "model_type": "Input should be an object",
    "model_attributes_type": "Input should be an object",
    "dict_type": "Input should be an object",
}


def _tags_after(path: list[str | int]) -> frozenset[str]:
    if len(path) >= 2 and path[-2] == "messages" and isinstance(path[-1], int):
        return _ROLE_TAGS
    if path and isinstance(path[-1], str):
        return _TAGS_AFTER_FIELD.get(path[-1], frozenset())
    return frozenset()


def _client_path(loc: tuple[str | int, ...]) -> list[str | int]:
    path: list[str | int] = []
    tag_may_follow = True
    for part in loc:
        if tag_may_follow and isinstance(part, str) and part in _tags_after(path):
            tag_may_follow = False
            continue
        path.append(part)
        tag_may_follow = True
    return path


def _join_path(path: Sequence[str | int]) -> str:
    """Dotted path for a message; client keys are cut short and kept on one line."""
    parts = [" ".join(str(p).split()) for p in path]
    return ".".join(p if len(p) <= 40 else p[:39] + "…" for p in parts) or "body"


def _message(kind: str, msg: str, ctx: Mapping[str, Any]) -> str:
    if kind in ("too_short", "too_long"):
        # Pydantic says "Value", "Tuple" or "Dictionary"; say it in the client's JSON terms.
        noun = "Object" if ctx.get("field_type") == "Dictionary" else "List"
        unit = "key" if noun == "Object" else "item"
        if kind == "too_short":
            bound = ctx["min_length"]
            return f"{noun} should have at least {bound} {unit}{'s' if bound != 1 else ''}"
        bound = ctx["max_length"]
        return f"{noun} should have at most {bound} {unit}{'s' if bound != 1 else ''}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return _FRIENDLIER.get(kind, msg)


def _render_error(error: Mapping[str, Any]) -> str:
    path = _client_path(tuple(error["loc"]))
    kind = str(error["type"])
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    message = _message(kind, str(error["msg"]), ctx)
    if kind == "union_tag_invalid":
        path.append(str(ctx["discriminator"]).strip("'"))
        message = f"Input should be one of {ctx['expected_tags']}; got {_short(ctx['tag'])}"
    elif kind == "union_tag_not_found":
        path.append(str(ctx["discriminator"]).strip("'"))
        message = "Field required"
    suffix = ""
    if path and path[-1] == "[key]":  # pydantic's marker for a dict key's own error
        path.pop()
        suffix = " (key)"
    return f"{_join_path(path)}{suffix}: {message}"


def format_validation_error(exc: ValidationError) -> str:
    """Render pydantic's errors as one line: ``path: message`` joined by "; ".

    Paths are dotted with list indexes as numbers and name fields as the client wrote
    them (``messages.0.role``); pydantic's union tags are dropped.
    """
    errors = exc.errors(include_url=False, include_input=False)
    lines: list[str] = []
    for error in errors:
        line = " ".join(_render_error(error).split())  # one line, whatever the input held
        if line not in lines:
            lines.append(line)
    if len(lines) > MAX_REPORTED_ERRORS:
        hidden = len(lines) - MAX_REPORTED_ERRORS
        lines = [*lines[:MAX_REPORTED_ERRORS], f"and {hidden} more problem(s)"]
    return "; ".join(lines)


def _check_tree(body: object) -> None:
    """Reject what JSON allows but the pipeline cannot carry: deep nesting (pydantic and
    jsonschema recurse), lone surrogates (Redis and the tokenizer need UTF-8), and
    infinite numbers. Iterative, so it cannot overflow the stack itself."""
    stack: list[tuple[object, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise InvalidRequest(f"body is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest(
                        f"{_join_path(path)}: string holds an unpaired UTF-16 surrogate"
                    ) from None
        elif isinstance(node, float) and not math.isfinite(node):
            raise InvalidRequest(f"{_join_path(path)}: number is out of range")
        elif isinstance(node, Mapping):
            for key, value in node.items():
                stack.append((key, path))  # a key sits at its object's depth
                stack.append((value, (*path, str(key))))
        elif isinstance(node, list | tuple):
            stack.extend((value, (*path, index)) for index, value in enumerate(node))


def decode_body(raw: object) -> dict[str, Any]:
    """Turn a raw body into a JSON object, or raise a one-line InvalidRequest (no NaN, no
    duplicate keys, no integer too long, a bounded depth: the strict reading every path of
    the service shares)."""
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                f"body is not valid UTF-8: {exc.reason} at byte {exc.start}"
            ) from exc
    if isinstance(raw, str):
        try:
            raw = _loads(raw)
        except RecursionError:
            raise InvalidRequest(f"body is nested more than {MAX_JSON_DEPTH} levels deep") from None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from exc
        except ValueError as exc:  # duplicate keys, NaN, integers too long to convert
            raise InvalidRequest(f"body is not valid JSON: {' '.join(str(exc).split())}") from exc
    elif not isinstance(raw, Mapping):
        raise InvalidRequest(f"body must be JSON text or a mapping, got {type(raw).__name__}")
    if not isinstance(raw, Mapping):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
            type(raw), "number"
        )
        raise InvalidRequest(f"body must be a JSON object, got {kind}")
    _check_tree(raw)
    return dict(raw)


def parse_job(raw: bytes | str | Mapping[str, Any]) -> ChatJob:
    """Validate an untrusted body (JSON bytes, JSON text, or a decoded mapping) into a job.

    Raises :class:`InvalidRequest`, and nothing else, for any body that is not a valid
    job; its message is one line naming each offending field by dotted path.
    """
    body = decode_body(raw)
    try:
        return ChatJob.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(format_validation_error(exc)) from exc
    except RecursionError as exc:  # guarded by _check_tree; kept so no other error escapes
        raise InvalidRequest("body is nested too deeply") from exc


# --- results ---------------------------------------------------------------------------


class ResponseFunctionCall(_Response):
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: FrozenList[ResponseToolCall] | None = None


class TopLogprob(_Response):
    """One of the most likely tokens at a position: OpenAI's ``top_logprobs`` item."""

    token: str
    logprob: float
    bytes: FrozenList[int] | None = None


class TokenLogprob(TopLogprob):
    """A generated token with its log probability and the most likely tokens at its place."""

    top_logprobs: FrozenList[TopLogprob] = ()


class ChoiceLogprobs(_Response):
    """A choice's ``logprobs``: the tokens of its ``content`` (none of reasoning or calls)."""

    content: FrozenList[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "timeout", "error"]


class Choice(_Response):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None  # when the job asked for them


class CompletionTokensDetails(_Response):
    reasoning_tokens: int = 0


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: CompletionTokensDetails = Field(
        default_factory=CompletionTokensDetails
    )
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class JobStatus(StrEnum):
    """Where a job stands. ``queued`` and ``running`` are the only non-terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        """True once the job can no longer change."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


class JobInfo(_Response):
    """The job's own record beside the completion. Times are unix seconds."""

    id: str
    status: JobStatus
    attempts: int = 0
    worker: str | None = None
    queued_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    problems: FrozenList[str] = ()  # parse problems in the model's output

    @computed_field  # type: ignore[prop-decorator]  # mypy does not model pydantic's decorator
    @property
    def queue_wait_s(self) -> float | None:
        """Seconds from queued to started (the last attempt's start)."""
        return _between(self.queued_at, self.started_at)

    @computed_field  # type: ignore[prop-decorator]  # as above
    @property
    def time_to_first_token_s(self) -> float | None:
        """Seconds from started to the first generated token (queue wait excluded)."""
        return _between(self.started_at, self.first_token_at)

    @computed_field  # type: ignore[prop-decorator]  # as above
    @property
    def generation_s(self) -> float | None:
        """Seconds from started to finished: prefill plus decode."""
        return _between(self.started_at, self.finished_at)


class ErrorInfo(_Response):
    """Why a job failed: an OpenAI-style error object."""

    type: str
    message: str

    @classmethod
    def from_error(cls, error: HermesError) -> ErrorInfo:
        return cls(type=error.type, message=error.message)


class JobResult(_Response):
    """An OpenAI ``chat.completion`` object plus the job record and any error."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: FrozenList[Choice] = ()
    usage: Usage | None = None
    job: JobInfo
    error: ErrorInfo | None = None
