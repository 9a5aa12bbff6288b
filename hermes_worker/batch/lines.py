"""The lines of a batch: an input line read and validated into a job, and the output and
error lines a finished request becomes, all in the OpenAI Batch API's shapes.

An input line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``;
its body is a chat-completions request, read exactly as the gateway reads one
(:func:`hermes_worker.gateway.openai_shapes.chat_request`) and then validated as a job, so a
body means the same in a batch as over HTTP or on the queue. The batch sets what it owns: a
body may not carry ``id``, ``priority``, ``deadline``, ``stream`` or ``background``. A line's
job has ``stream`` false: its output is not written as it is generated, only its result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hermes_worker.contract.jobs import JobResult, decode_body
from hermes_worker.errors import InvalidRequest
from hermes_worker.gateway.errors import GatewayError, from_invalid_request, result_error
from hermes_worker.gateway.openai_shapes import chat_request, completion
from producers.client import prepare_submission

ENDPOINT = "/v1/chat/completions"
LINE_FIELDS = frozenset({"custom_id", "method", "url", "body"})
BATCH_OWNED = ("id", "priority", "deadline", "stream", "background")
MAX_CUSTOM_ID = 512
RESERVED_METADATA_PREFIX = "hermes_"  # the scripted engine's and fault injection's keys
MAX_REPORTED_ERRORS = 100  # a file with more bad lines reports the first 100 and the count


@dataclass(frozen=True)
class LineError:
    """One bad input line, as OpenAI lists them in a failed batch's ``errors``."""

    line: int  # 1-based, as in an editor
    code: str
    message: str
    param: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


class BadLine(Exception):
    def __init__(self, error: LineError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class BatchRequest:
    """An input line ready to be submitted."""

    index: int  # 0-based line number
    custom_id: str
    job: dict[str, Any]  # the job body, its id and priority set
    model: str | None


def line_job_id(batch_id: str, index: int) -> str:
    """The job id of a batch's line: derived, so a feeder that starts over submits the same
    job (which is not queued again) instead of a duplicate."""
    return f"{batch_id}.{index}".replace("_", "-")


def read_request(
    raw: bytes,
    index: int,
    *,
    batch_id: str,
    priority: int,
    max_body_bytes: int,
    reserved_metadata: bool = True,
    check_job: bool = True,
) -> BatchRequest:
    """Read one input line; :class:`BadLine` says what is wrong with it. ``check_job``:
    validate the job as the submit will (a runner feeding lines validated before skips it:
    the submit validates them anyway). Without
    ``reserved_metadata`` (a gateway tenant's batch), ``hermes_*`` metadata keys are refused,
    as in the tenant's own requests."""

    def bad(code: str, message: str, param: str | None = None) -> BadLine:
        return BadLine(LineError(index + 1, code, message, param))

    try:
        line = decode_body(raw)
    except InvalidRequest as exc:
        raise bad("invalid_json", exc.message) from exc
    unknown = sorted(set(line) - LINE_FIELDS)
    if unknown:
        raise bad("invalid_request", f"{unknown[0]}: unknown field of a batch line", unknown[0])
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        message = f"custom_id: a string of 1 to {MAX_CUSTOM_ID} characters is required"
        raise bad("invalid_custom_id", message, "custom_id")
    if line.get("method") != "POST":
        raise bad("invalid_method", "method: only POST is supported", "method")
    if line.get("url") != ENDPOINT:
        raise bad("invalid_url", f"url: only {ENDPOINT} is supported", "url")
    body = line.get("body")
    if not isinstance(body, dict):
        raise bad("invalid_request", "body: a JSON object is required", "body")
    for name in BATCH_OWNED:
        if body.get(name) not in (None, False):
            raise bad(
                "invalid_request", f"body.{name}: set by the batch, not by a line", f"body.{name}"
            )
    metadata = body.get("metadata")
    if not reserved_metadata and isinstance(metadata, dict):
        for key in metadata:
            if isinstance(key, str) and key.startswith(RESERVED_METADATA_PREFIX):
                param = f"body.metadata.{key}"
                raise bad("invalid_request", f"{param}: hermes_* keys are reserved", param)
    try:
        request = chat_request(body, None)
    except GatewayError as exc:
        raise bad("invalid_request", exc.message, _body_param(exc.param)) from exc
    # A line is neither streamed nor background (refused above), so chat_request gave its
    # job ``stream`` false: nobody reads its output as it is generated, only its result.
    job = {**request.job, "id": line_job_id(batch_id, index), "priority": priority}
    if not check_job:
        return BatchRequest(index, custom_id, job, request.model)
    try:
        prepare_submission(job, max_body_bytes)  # validated now, as the submit will
    except InvalidRequest as exc:
        error = from_invalid_request(exc, request.renames)
        raise bad("invalid_request", error.message, _body_param(error.param)) from exc
    return BatchRequest(index, custom_id, job, request.model)


def _body_param(param: str | None) -> str:
    return "body" if param is None else f"body.{param}"


@dataclass
class Validation:
    """What a pass over an input file found."""

    total: int = 0
    errors: list[LineError] | None = None
    error_count: int = 0

    def add(self, error: LineError) -> None:
        self.error_count += 1
        self.errors = self.errors or []
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)


def validate(
    lines: Iterable[bytes],
    *,
    batch_id: str,
    priority: int,
    max_body_bytes: int,
    max_lines: int,
    reserved_metadata: bool = True,
) -> Validation:
    """Read every line (without keeping them): the count, and the bad lines and duplicate
    ``custom_id``s. Memory: the set of custom ids (at most ``max_lines``)."""
    found = Validation()
    seen: set[str] = set()
    blank: int | None = None  # blank lines are allowed only at the end of the file
    for index, raw in enumerate(lines):
        if not raw.strip():
            blank = index if blank is None else blank
            continue
        if blank is not None:
            found.add(LineError(blank + 1, "empty_line", "an empty line between requests"))
            blank = None
        found.total += 1
        if found.total > max_lines:
            message = f"the file has more than {max_lines} requests, the limit of a batch"
            found.add(LineError(index + 1, "too_many_lines", message))
            break
        try:
            request = read_request(
                raw,
                index,
                batch_id=batch_id,
                priority=priority,
                max_body_bytes=max_body_bytes,
                reserved_metadata=reserved_metadata,
            )
        except BadLine as exc:
            found.add(exc.error)
            continue
        if request.custom_id in seen:
            message = f"custom_id: {request.custom_id!r} is used by an earlier line"
            found.add(LineError(index + 1, "duplicate_custom_id", message, "custom_id"))
        seen.add(request.custom_id)
    if found.total == 0 and not found.error_count:
        found.add(LineError(1, "empty_file", "the file has no requests"))
    return found


# --- out -------------------------------------------------------------------------------------


def _request_id(job_id: str) -> str:
    return "batch_req_" + hashlib.sha256(job_id.encode()).hexdigest()[:24]


def result_line(
    custom_id: str, job_id: str, result: JobResult, model: str | None
) -> dict[str, Any]:
    """A finished request's line: a ``chat.completion`` with status 200 for a job that
    succeeded (the output file), else the error answer the gateway would give (the error
    file), both with the job id as ``request_id``."""
    if result.error is None and result.job.status.value == "succeeded":
        response = {"status_code": 200, "request_id": job_id, "body": completion(result, model)}
    else:
        error = result_error(result)
        response = {
            "status_code": error.status,
            "request_id": job_id,
            "body": {"error": error.error()},
        }
    return {"id": _request_id(job_id), "custom_id": custom_id, "response": response, "error": None}


def unrun_line(custom_id: str, job_id: str, code: str, message: str) -> dict[str, Any]:
    """The error line of a request that never ran (its batch was cancelled or expired)."""
    return {
        "id": _request_id(job_id),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def is_output(line: dict[str, Any]) -> bool:
    """Whether a line belongs in the output file (else the error file)."""
    response = line.get("response")
    return isinstance(response, dict) and response.get("status_code") == 200


def encode_line(line: dict[str, Any]) -> bytes:
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
