"""Every error the gateway answers, in OpenAI's shape and with OpenAI's status.

The body is always ``{"error": {"message", "type", "param", "code"}}`` (plus, for a job
that ended badly, the ``job`` object beside it). Types, by status: ``invalid_request_error``
(400, 404, 409, 413), ``request_timeout`` (408), ``rate_limit_error`` (429),
``server_error`` (500, 503) and ``timeout_error`` (504). ``param`` names the offending field
by the job contract's dotted path (``messages.0.content``).

The OpenAI SDKs retry 408, 409, 429 and 5xx on their own; an answer that a retry cannot
change (a 409, a 504) carries ``x-should-retry: false`` so they do not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from hermes_worker.contract.jobs import JobInfo, JobResult, JobStatus
from hermes_worker.errors import InvalidRequest

NO_RETRY = {"x-should-retry": "false"}

# "messages.0.content: Field required; ..." -> "messages.0.content"; what parse_job and the
# gateway write before the first ": " when it is a field's path.
_PARAM = re.compile(r"^(?P<path>[A-Za-z_][\w.\-…]*)(?: \(key\))?: ")
_OVER_LIMIT = re.compile(r"^body is \d+ bytes, over the \d+-byte limit")


class GatewayError(Exception):
    """An error answer: HTTP ``status`` and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def error(self) -> dict[str, Any]:
        """OpenAI's error object (what an SSE stream sends as ``{"error": ...}``)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict[str, Any]:
        """The whole response body."""
        return {"error": self.error(), **self.extra}


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 400 ``invalid_request_error``."""
    return GatewayError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> GatewayError:
    """A 400 for a field this gateway does not honour (yet)."""
    return GatewayError(400, message, param=param, code="unsupported_parameter")


def not_found(message: str, code: str) -> GatewayError:
    return GatewayError(404, message, code=code)


def too_large(size: int | None, limit: int) -> GatewayError:
    what = "the body" if size is None else f"the body ({size} bytes)"
    return GatewayError(
        413, f"{what} is over the {limit}-byte limit", code="request_too_large", headers=NO_RETRY
    )


def param_of(message: str) -> str | None:
    """The field an :class:`InvalidRequest` message names first, or None (a body-wide problem)."""
    match = _PARAM.match(message)
    if match is None or match.group("path") == "body":
        return None
    return match.group("path")


def from_invalid_request(exc: InvalidRequest, renames: Mapping[str, str]) -> GatewayError:
    """A job contract error as a 400 naming its field (a 413 for a body over the size
    limit). ``renames``: fields the client sent under their OpenAI name (the job's
    ``max_tokens`` came as ``max_completion_tokens``) are named as the client wrote them."""
    message = exc.message
    if _OVER_LIMIT.match(message):
        return GatewayError(413, message, code="request_too_large", headers=NO_RETRY)
    param = param_of(message)
    if param is not None:
        head = param.split(".", 1)[0]
        if head in renames:
            renamed = renames[head] + param[len(head) :]
            message = renamed + message[len(param) :]
            param = renamed
    return GatewayError(400, message, param=param)


# A job's error type -> (status, OpenAI type, param, code). Unlisted types are server errors.
_JOB_ERRORS: dict[str, tuple[int, str, str | None]] = {
    "invalid_request_error": (400, "invalid_request_error", None),
    "template_error": (400, "invalid_request_error", "messages"),
    "context_length_exceeded": (400, "invalid_request_error", "messages"),
    "expired": (504, "timeout_error", None),
    "timeout": (504, "timeout_error", None),
    "cancelled": (409, "invalid_request_error", None),
}


def job_error(
    job_id: str, error_type: str, message: str, *, info: JobInfo | None = None
) -> GatewayError:
    """A job that ended without succeeding (an ``error`` or ``cancelled`` end) as an error
    answer: 400 for a bad request the worker found, 409 cancelled, 504 its deadline, else
    500. The ``job`` object rides along when known."""
    status, kind, param = _JOB_ERRORS.get(error_type, (500, "server_error", None))
    code = "job_cancelled" if error_type == "cancelled" else error_type
    text = f"job {job_id} {_ended(error_type)}: {message}"
    extra = {} if info is None else {"job": info.model_dump(mode="json")}
    headers = NO_RETRY if status in (409, 504) else {}
    return GatewayError(
        status, text, type=kind, param=param, code=code, headers=headers, extra=extra
    )


def _ended(error_type: str) -> str:
    return {
        "cancelled": "was cancelled",
        "expired": "expired before it started (its deadline passed)",
        "timeout": "reached its deadline",
    }.get(error_type, "failed")


def result_error(result: JobResult) -> GatewayError:
    """The error answer for a result that did not succeed."""
    info = result.job
    if result.error is not None:
        return job_error(result.id, result.error.type, result.error.message, info=info)
    kind = "cancelled" if info.status is JobStatus.CANCELLED else info.status.value
    return job_error(result.id, kind, f"it ended {info.status.value}", info=info)


def event_error(job_id: str, event_type: str, data: Any) -> GatewayError:
    """A terminal ``error`` or ``cancelled`` event as an error (for an SSE stream)."""
    fields = data if isinstance(data, Mapping) else {}
    if event_type == "cancelled":
        reason = fields.get("message") or fields.get("reason") or "cancelled"
        return job_error(job_id, "cancelled", str(reason))
    return job_error(
        job_id, str(fields.get("type", "internal_error")), str(fields.get("message", ""))
    )
