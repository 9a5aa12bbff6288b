"""OpenAI's chat-completions API on the job contract, both ways.

In: :func:`chat_request` turns a request body into a job body plus what only HTTP needs
(``stream``, ``stream_options``, ``background``, the idempotency key). Out:
:func:`completion` makes a result an OpenAI ``chat.completion``; :class:`ChunkStream` turns a
job's events into ``chat.completion.chunk`` objects; :func:`job_object` is a background
job as ``GET /v1/jobs/{id}`` shows it.

What happens to each OpenAI field is in docs/gateway.md; in short: the job's own fields pass
through (parse_job validates them); ``max_completion_tokens`` is ``max_tokens``; ``null`` means
"not given", as in OpenAI; fields OpenAI treats as hints are dropped; ``n`` other than 1,
``logprobs`` and the other fields with no meaning here are refused, naming the field.
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


def _one_choice(body: dict[str, Any]) -> None:
    n = body.pop("n", None)
    if n is None or (n == 1 and isinstance(n, int) and not isinstance(n, bool)):
        return
    raise unsupported("n", "n other than 1 is not supported yet (several choices are coming)")


def _no_logprobs(body: dict[str, Any]) -> None:
    logprobs, top = body.pop("logprobs", None), body.pop("top_logprobs", None)
    if logprobs not in (None, False):
        raise unsupported("logprobs", "logprobs are not supported yet (coming)")
    if top not in (None, 0) or isinstance(top, bool):
        raise unsupported("top_logprobs", "top_logprobs are not supported yet (coming)")


def _parallel_tool_calls(body: dict[str, Any]) -> None:
    """``parallel_tool_calls``: true is what a job does; false is honoured where a job makes
    at most one call anyway (no tools, tool_choice "none", "required" or a named function:
    the worker forces exactly one call), and refused with tool_choice "auto", where Hermes
    may call several tools in one turn."""
    value = body.pop("parallel_tool_calls", None)
    if value is None or value is True:
        return
    if not isinstance(value, bool):
        raise invalid("parallel_tool_calls: Input should be a valid boolean", "parallel_tool_calls")
    choice = body.get("tool_choice")
    if not body.get("tools") or choice in ("none", "required") or isinstance(choice, dict):
        return
    raise unsupported(
        "parallel_tool_calls",
        'parallel_tool_calls: false is supported only with tool_choice "required" or a named '
        'function (exactly one call), or without tools; with tool_choice "auto" Hermes may '
        "call several tools in one turn",
    )


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
    _one_choice(body)
    _no_logprobs(body)
    _parallel_tool_calls(body)
    renames: dict[str, str] = {}
    _max_completion_tokens(body, renames)
    for name in IGNORED_HINTS:
        body.pop(name, None)
    _refuse_unsupported(body)
    _drop_echoed_fields(body)
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


class ChunkStream:
    """A job's events as ``chat.completion.chunk`` objects (and, at a bad end, an error).

    Feed each event to :meth:`feed`, then call :meth:`finish` once the job's stream is over:
    the last chunk carries ``finish_reason``, then the usage chunk when asked for. A job
    that did not succeed ends with ``{"error": {...}}`` instead, as OpenAI ends a stream
    that failed (its SDKs raise it).

    ``restarted`` (a new attempt took over after a worker died or a transient failure)
    has no OpenAI equivalent. Before any visible output it changes nothing. After some,
    the new attempt's output is compared with what the client already has, text kind by
    text kind (reasoning, content) and call by call: while it repeats it, nothing is sent;
    once it goes beyond, only the rest is; so a retried attempt that writes the same output
    (greedy sampling, a ``seed``, a deterministic engine) streams seamlessly. If it writes
    something else, the stream ends with an error (code ``job_restarted``) telling the
    client that what it got is void and where to read the job's final result; the job
    itself runs on.
    """

    def __init__(self, job_id: str, model: str, created: int, *, include_usage: bool) -> None:
        self.job_id, self.model, self.created = job_id, model, created
        self.include_usage = include_usage
        self.sent: dict[str, str] = {"reasoning_content": "", "content": ""}
        self.sent_calls: list[tuple[str, str]] = []
        self.replaying = False  # a restarted job whose new attempt must repeat `sent`
        self.new: dict[str, str] = {"reasoning_content": "", "content": ""}
        self.new_calls: list[tuple[str, str]] = []
        self.usage: Any = None
        self.terminal: StreamEvent | None = None
        self.failed: dict[str, Any] | None = None  # the error payload that ended the stream
        self.succeeded = False

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.job_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def first(self) -> dict[str, Any]:
        """The opening chunk: the role, as OpenAI sends it before any output."""
        return self.chunk({"role": "assistant", "content": ""})

    def feed(self, event: StreamEvent) -> list[dict[str, Any]]:
        """The payloads one event makes (none for most bookkeeping events)."""
        kind, data = event.type, event.data
        if kind in ("reasoning", "content"):
            text = data.get("text", "") if isinstance(data, dict) else ""
            name = "reasoning_content" if kind == "reasoning" else "content"
            return self._text(name, text) if text else []
        if kind == "tool_call" and isinstance(data, dict):
            return self._call(data)
        if kind == "usage":
            self.usage = data
        elif kind in ("done", "error", "cancelled"):
            self.terminal = event  # the last one ends the stream (see finish)
        elif kind == "restarted":
            self.terminal, self.usage = None, None
            if self.sent_calls or any(self.sent.values()):
                self.replaying = True
                self.new = {name: "" for name in self.new}
                self.new_calls = []
        return []

    def _text(self, name: str, text: str) -> list[dict[str, Any]]:
        if not self.replaying:
            self.sent[name] += text
            return [self.chunk({name: text})]
        self.new[name] += text
        new, sent = self.new[name], self.sent[name]
        if len(new) <= len(sent):
            return [] if sent.startswith(new) else self._diverged()
        if not new.startswith(sent):
            return self._diverged()
        self.sent[name] = new
        return [self.chunk({name: new[len(sent) :]})]

    def _call(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        function = data.get("function") or {}
        key = (str(function.get("name", "")), str(function.get("arguments", "")))
        if self.replaying:
            self.new_calls.append(key)
            index = len(self.new_calls) - 1
            if index < len(self.sent_calls):
                return [] if self.sent_calls[index] == key else self._diverged()
        self.sent_calls.append(key)
        index = len(self.sent_calls) - 1
        call = {
            "index": index,
            "id": data.get("id"),
            "type": "function",
            "function": {"name": key[0], "arguments": key[1]},
        }
        return [self.chunk({"tool_calls": [call]})]

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
        if self.replaying and (
            self.new != self.sent or self.new_calls != self.sent_calls
        ):  # the new attempt wrote less than the client already has
            return self._diverged()
        end = self.terminal
        if end is None:
            return self.fail(
                GatewayError(500, f"job {self.job_id}: its stream ended without an end",
                             type="server_error", code="job_lost")
            )  # fmt: skip
        if end.type != "done":
            return self.fail(event_error(self.job_id, end.type, end.data))
        reason = end.data.get("finish_reason", "stop") if isinstance(end.data, dict) else "stop"
        out = [self.chunk({}, reason)]
        if self.include_usage and self.usage is not None:
            out.append({**self.chunk({}), "choices": [], "usage": self.usage})
        self.succeeded = True
        return out

    def fail(self, error: GatewayError) -> list[dict[str, Any]]:
        """End the stream with ``error``."""
        self.failed = {"error": error.error()}
        return [self.failed]
