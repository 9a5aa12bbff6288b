"""OpenAI's chat-completions API on the job contract, both ways.

In: :func:`chat_request` turns a request body into a job body plus what only HTTP needs
(``stream``, ``stream_options``, ``background``, the idempotency key). Out:
:func:`completion` makes a result an OpenAI ``chat.completion``; :class:`ChunkStream` turns a
job's events into ``chat.completion.chunk`` objects; :func:`job_object` is a background
job as ``GET /v1/jobs/{id}`` shows it.

What happens to each OpenAI field is in docs/gateway.md; in short: the job's own fields pass
through (parse_job validates them); ``max_completion_tokens`` is ``max_tokens``; ``null`` means
"not given", as in OpenAI; ``n``, ``logprobs``, ``top_logprobs`` and ``parallel_tool_calls``
are the job's own; fields OpenAI treats as hints are dropped; the fields with no meaning here
are refused, naming the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hermes_worker.contract import jobs
from hermes_worker.contract.jobs import JobResult
from hermes_worker.contract.store import StreamEvent, job_info_from_record, result_from_record
from hermes_worker.errors import InvalidRequest
from hermes_worker.gateway.errors import GatewayError, event_error, invalid, unsupported

# Fields OpenAI documents as hints or bookkeeping with no effect on the output here: dropped.
IGNORED_HINTS = frozenset(
    {
        "store",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
    }
)
# OpenAI fields that change the output and that this gateway does not honour (yet).
UNSUPPORTED = {
    "functions": "the legacy functions API is not supported; send tools",
    "function_call": "the legacy functions API is not supported; send tool_choice",
    "logit_bias": "logit_bias is not supported",
    "audio": "audio output is not supported: Hermes 4 is a text model",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "Hermes 4 reasons or not, with no effort levels: send thinking: true "
    "(or false) instead",
    "verbosity": "verbosity is not supported",
}
# Response-only fields of an assistant message that clients send back in the history (an
# OpenAI SDK message turned into a dict); dropped when null or empty.
ECHOED_MESSAGE_FIELDS = ("refusal", "annotations", "audio", "function_call")
MAX_IDEMPOTENCY_KEY = 255
IDEMPOTENT_ID_PREFIX = "idem-"


@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions request, split into the job body and what HTTP alone needs."""

    job: dict[str, Any]  # the job body (its "id" set when the client chose one)
    job_id: str | None  # the id the client chose (its Idempotency-Key's, or the body's)
    stream: bool = False
    include_usage: bool = False
    background: bool = False
    model: str | None = None
    # Job fields the client sent under their OpenAI name, for error messages.
    renames: Mapping[str, str] = field(default_factory=dict)

    @property
    def keyed(self) -> bool:
        """Whether the client chose the job id, and so may come back for the job."""
        return self.job_id is not None


# --- in -----------------------------------------------------------------------------------


def decode_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, as strictly as the job contract reads one (no NaN,
    no duplicate keys); a 400 saying what is wrong otherwise."""
    try:
        return jobs.decode_body(raw)
    except InvalidRequest as exc:
        raise invalid(exc.message) from exc


def idempotent_job_id(key: str, scope: str = "") -> str:
    """The job id of an ``Idempotency-Key``: ``idem-`` and 48 hex digits of its SHA-256.

    Any header value maps to a valid id (``JOB_ID_PATTERN``) whatever its characters or
    length, two keys never share a job short of a hash collision, and an id a client writes
    in a body cannot be mistaken for one. ``scope`` is whose key it is (a tenant, once there
    are tenants), so two callers' equal keys name two jobs."""
    digest = hashlib.sha256(f"{scope}\x00{key}".encode()).hexdigest()
    return f"{IDEMPOTENT_ID_PREFIX}{digest[:48]}"


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.pop(name, None)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{name}: Input should be a valid boolean", param=name)
    return value


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    """``include_usage`` from ``stream_options`` (a 400 for anything else in it)."""
    options = body.pop("stream_options", None)
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed with stream: true", param="stream_options")
    if not isinstance(options, dict):
        raise invalid("stream_options: Input should be an object", param="stream_options")
    for key in options:
        if key not in ("include_usage", "include_obfuscation"):
            raise invalid(f"stream_options.{key}: Unknown field", param=f"stream_options.{key}")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise invalid(
            "stream_options.include_usage: Input should be a valid boolean",
            param="stream_options.include_usage",
        )
    return bool(include)


def _max_completion_tokens(body: dict[str, Any], renames: dict[str, str]) -> None:
    value = body.pop("max_completion_tokens", None)
    if value is None:
        return
    given = body.get("max_tokens")
    if given is not None and given != value:
        raise invalid(
            "max_completion_tokens and max_tokens disagree; send one", "max_completion_tokens"
        )
    body["max_tokens"] = value
    renames["max_tokens"] = "max_completion_tokens"


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, why in UNSUPPORTED.items():
        if name not in body:
            continue
        value = body[name]
        if value is None or (name == "logit_bias" and value == {}):
            del body[name]
            continue
        raise unsupported(name, why)
    modalities = body.pop("modalities", None)
    if modalities not in (None, ["text"]):
        raise unsupported("modalities", 'only ["text"] output is supported')


def _drop_echoed_fields(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "assistant":
            for name in ECHOED_MESSAGE_FIELDS:
                if name in message and message[name] in (None, [], ""):
                    del message[name]


def chat_request(
    body: dict[str, Any], idempotency_key: str | None, *, scope: str = ""
) -> ChatRequest:
    """Split a decoded chat-completions body (changed in place) into a :class:`ChatRequest`.
    The job body is validated later, by the client's submit; this refuses what only the
    OpenAI side can get wrong."""
    for name in [k for k, v in body.items() if v is None]:
        del body[name]  # OpenAI: null is "not given", whatever the field
    stream = _flag(body, "stream")
    background = _flag(body, "background")
    include_usage = _stream_options(body, stream)
    renames: dict[str, str] = {}
    _max_completion_tokens(body, renames)
    for name in IGNORED_HINTS:
        body.pop(name, None)
    _refuse_unsupported(body)
    _drop_echoed_fields(body)
    if not stream and not background:
        # Answered whole, once it has ended: its output need not be written as it comes
        # (the job's stream false). A background job's events can be read, so it keeps it.
        body["stream"] = False
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model: Input should be a valid string", param="model")
    job_id = body.get("id")
    if idempotency_key is not None:
        if not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise invalid(
                f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )
        if job_id is not None:
            raise invalid("send an Idempotency-Key header or a body id, not both", param="id")
        job_id = idempotent_job_id(idempotency_key, scope)
        body["id"] = job_id
    return ChatRequest(
        job=body,
        job_id=job_id if isinstance(job_id, str) else None,
        stream=stream,
        include_usage=include_usage,
        background=background,
        model=model,
        renames=renames,
    )


# --- out ----------------------------------------------------------------------------------


def completion(result: JobResult, model: str | None) -> dict[str, Any]:
    """A result as OpenAI's ``chat.completion``: the result less its ``error`` (a completion
    that is answered succeeded), ``model`` as the client named it, the ``job`` kept."""
    data = result.model_dump(mode="json", exclude={"error"})
    if model:
        data["model"] = model
    for choice in data["choices"]:
        choice.setdefault("logprobs", None)
    return data


def job_object(job_id: str, record: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """A job as ``GET /v1/jobs/{id}`` shows it: status, the ``job`` record, and once it has
    ended its ``result`` (the chat.completion, partial output included) and ``error``."""
    info = job_info_from_record(job_id, record)
    raw_body = record.get("body", record.get(b"body"))
    body = json.loads(raw_body) if raw_body else {}
    model = body.get("model") if isinstance(body, dict) else None
    result = result_from_record(record)
    error = None
    if result is not None and result.error is not None:
        kind = "cancelled" if result.error.type == "cancelled" else "error"
        error = event_error(job_id, kind, result.error.model_dump()).error()
    return {
        "id": job_id,
        "object": "job",
        "status": info.status.value,
        "model": model or (result.model if result is not None else None),
        "created": int(info.queued_at or 0),
        "job": info.model_dump(mode="json"),
        "result": None if result is None else completion(result, model),
        "error": error,
    }


TEXT_FIELDS = ("reasoning_content", "content")


@dataclass
class _ChoiceSent:
    """What a stream's client holds of one choice, and, while a restarted job is replayed,
    how much of it the new attempt has repeated."""

    opened: bool = False  # its role chunk went out
    sent: dict[str, str] = field(default_factory=lambda: dict.fromkeys(TEXT_FIELDS, ""))
    calls: list[tuple[str, str]] = field(default_factory=list)
    logprobs: int = 0  # content tokens whose logprobs went out
    new: dict[str, str] = field(default_factory=lambda: dict.fromkeys(TEXT_FIELDS, ""))
    new_calls: list[tuple[str, str]] = field(default_factory=list)
    new_logprobs: int = 0

    @property
    def visible(self) -> bool:
        return bool(self.calls) or any(self.sent.values())

    @property
    def repeated(self) -> bool:
        """Whether the new attempt wrote all the client holds (and no other)."""
        return self.new == self.sent and self.new_calls == self.calls

    def restart(self) -> None:
        self.new, self.new_calls, self.new_logprobs = dict.fromkeys(TEXT_FIELDS, ""), [], 0


class ChunkStream:
    """A job's events as ``chat.completion.chunk`` objects (and, at a bad end, an error).

    Feed each event to :meth:`feed`, then call :meth:`finish` once the job's stream is over:
    the last chunk of each choice carries its ``finish_reason``, then the usage chunk when
    asked for. A job that did not succeed ends with ``{"error": {...}}`` instead, as OpenAI
    ends a stream that failed (its SDKs raise it). A job of ``n`` choices streams each
    chunk with its choice's ``index`` (its events name it in ``choice``); each choice opens
    with its role chunk.

    ``restarted`` (a new attempt took over after a worker died or a transient failure)
    has no OpenAI equivalent. Before any visible output it changes nothing. After some,
    the new attempt's output is compared with what the client already has, choice by
    choice, text kind by text kind (reasoning, content) and call by call: while it repeats
    it, nothing is sent; once it goes beyond, only the rest is (and of the content's
    logprobs, the entries past those sent); so a retried attempt that writes the same
    output (greedy sampling, a ``seed``, a deterministic engine) streams seamlessly. If it
    writes something else, the stream ends with an error (code ``job_restarted``) telling
    the client that what it got is void and where to read the job's final result; the job
    itself runs on.
    """

    def __init__(self, job_id: str, model: str, created: int, *, include_usage: bool) -> None:
        self.job_id, self.model, self.created = job_id, model, created
        self.include_usage = include_usage
        self.choices: dict[int, _ChoiceSent] = {}
        self.replaying = False  # a restarted job whose new attempt must repeat what was sent
        self.usage: Any = None
        self.terminal: StreamEvent | None = None
        self.failed: dict[str, Any] | None = None  # the error payload that ended the stream
        self.succeeded = False

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: list[Any] | None = None,
        index: int = 0,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish_reason,
        }
        out: dict[str, Any] = {
            "id": self.job_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def first(self) -> dict[str, Any]:
        """The opening chunk: the role, as OpenAI sends it before any output."""
        return self._open(0)[0]

    def _open(self, index: int) -> list[dict[str, Any]]:
        """A choice's role chunk, the first time it has something to say."""
        choice = self.choices.setdefault(index, _ChoiceSent())
        if choice.opened:
            return []
        choice.opened = True
        return [self.chunk({"role": "assistant", "content": ""}, index=index)]

    def feed(self, event: StreamEvent) -> list[dict[str, Any]]:
        """The payloads one event makes (none for most bookkeeping events)."""
        kind, data = event.type, event.data
        if kind in ("reasoning", "content", "tool_call") and isinstance(data, dict):
            index = data.get("choice", 0)
            index = index if isinstance(index, int) else 0
            if kind == "tool_call":
                return self._call(index, data)
            name = "reasoning_content" if kind == "reasoning" else "content"
            text = data.get("text", "")
            return self._text(index, name, text, data.get("logprobs")) if text else []
        if kind == "usage":
            self.usage = data
        elif kind in ("done", "error", "cancelled"):
            self.terminal = event  # the last one ends the stream (see finish)
        elif kind == "restarted":
            self.terminal, self.usage = None, None
            if any(choice.visible for choice in self.choices.values()):
                self.replaying = True
                for choice in self.choices.values():
                    choice.restart()
        return []

    def _text(
        self, index: int, name: str, text: str, logprobs: list[Any] | None
    ) -> list[dict[str, Any]]:
        out = self._open(index)
        choice = self.choices[index]
        if not self.replaying:
            choice.sent[name] += text
            choice.logprobs += len(logprobs or ())
            return [*out, self.chunk({name: text}, logprobs=logprobs, index=index)]
        choice.new[name] += text
        new, sent = choice.new[name], choice.sent[name]
        if len(new) <= len(sent):
            if logprobs is not None:
                choice.new_logprobs += len(logprobs)
            return out if sent.startswith(new) else self._diverged()
        if not new.startswith(sent):
            return self._diverged()
        choice.sent[name] = new
        if logprobs is not None:  # the tokens the client has not had yet
            repeated = max(0, choice.logprobs - choice.new_logprobs)
            choice.new_logprobs += len(logprobs)
            logprobs = logprobs[repeated:]
            choice.logprobs += len(logprobs)
        return [*out, self.chunk({name: new[len(sent) :]}, logprobs=logprobs, index=index)]

    def _call(self, index: int, data: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._open(index)
        choice = self.choices[index]
        function = data.get("function") or {}
        key = (str(function.get("name", "")), str(function.get("arguments", "")))
        if self.replaying:
            choice.new_calls.append(key)
            position = len(choice.new_calls) - 1
            if position < len(choice.calls):
                return out if choice.calls[position] == key else self._diverged()
        choice.calls.append(key)
        call = {
            "index": len(choice.calls) - 1,
            "id": data.get("id"),
            "type": "function",
            "function": {"name": key[0], "arguments": key[1]},
        }
        return [*out, self.chunk({"tool_calls": [call]}, index=index)]

    def _diverged(self) -> list[dict[str, Any]]:
        message = (
            f"job {self.job_id}: the worker running it stopped and a new attempt took over "
            "with different output, so the output streamed so far is void; the job runs on: "
            f"its result will be at GET /v1/jobs/{self.job_id} (its events, from the start, "
            f"at GET /v1/jobs/{self.job_id}/events)"
        )
        error = GatewayError(500, message, type="server_error", code="job_restarted")
        self.failed = {"error": error.error()}
        return [self.failed]

    def finish(self) -> list[dict[str, Any]]:
        """The closing payloads, once the job's stream is over."""
        if self.failed is not None:
            return []
        if self.replaying and not all(c.repeated for c in self.choices.values()):
            return self._diverged()  # the new attempt wrote less than the client already has
        end = self.terminal
        if end is None:
            return self.fail(
                GatewayError(500, f"job {self.job_id}: its stream ended without an end",
                             type="server_error", code="job_lost")
            )  # fmt: skip
        if end.type != "done":
            return self.fail(event_error(self.job_id, end.type, end.data))
        data = end.data if isinstance(end.data, dict) else {}
        reasons = data.get("finish_reasons") or [data.get("finish_reason", "stop")]
        out = []
        for index, reason in enumerate(reasons):
            out += self._open(index)
            out.append(self.chunk({}, reason, index=index))
        if self.include_usage and self.usage is not None:
            out.append({**self.chunk({}), "choices": [], "usage": self.usage})
        self.succeeded = True
        return out

    def fail(self, error: GatewayError) -> list[dict[str, Any]]:
        """End the stream with ``error``."""
        self.failed = {"error": error.error()}
        return [self.failed]
