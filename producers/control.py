"""Cancel, backpressure and dead letters: the Lua scripts and the pure steps that the
blocking and the asyncio client share (the clients only add the Redis round trips).

* Cancel is one script, so it cannot interleave with a worker claiming the job: a queued
  job ends ``cancelled`` at once (the worker that later takes its message finds it ended and
  skips it); a running one gets ``cancel_requested`` and a message on the cancel channel,
  and its worker aborts the engine request and writes the terminal event itself.
* Backpressure counts the messages waiting in the Celery queue. kombu's Redis transport
  keeps one list per priority step (``_q_for_pri``): the plain queue name for step 0,
  ``<queue><sep><step>`` for the others.
* Dead letters are job ids a worker gave up on; requeue takes one off the list, resets its
  record and queues its message in one script: two operators cannot both requeue it, and
  a producer that dies half way cannot leave it neither dead nor queued. Only a job that is
  still ``failed`` (and holds no lease) is put back; an id whose job has since run again
  or expired is stale and leaves the list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hermes_worker.contract.jobs import (
    ErrorInfo,
    JobResult,
    JobStatus,
    parse_job,
)
from hermes_worker.contract.queue import PRIORITY_STEPS, job_message, queue_list
from hermes_worker.contract.store import (
    ALIVE_TTL_S,
    Keys,
    as_text,
    encode_event,
    job_info_from_record,
    result_from_record,
)
from hermes_worker.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

CANCEL_REASON = "cancelled before it started"

# --- backpressure ------------------------------------------------------------------------


def queue_lists(settings: Settings) -> list[str]:
    """The Redis lists kombu keeps for the job queue, one per priority step (as its
    ``_q_for_pri`` names them: step 0 is the plain queue name)."""
    return [queue_list(settings.queue_name, step) for step in PRIORITY_STEPS]


class DepthGate:
    """When a submit must read the queue depth (one LLEN per priority list).

    Near the limit, every submit reads it, so the limit holds exactly. Far below it (under
    half), a client reads at most once per ``refresh_s`` (5 s) and counts its own submits in
    between: other producers' jobs in that window can push the queue over the limit only
    by more than half of it at once. Thread-safe enough for a shared client: a lost update
    of the estimate only makes the next read come sooner."""

    def __init__(self, limit: int | None, refresh_s: float = 5.0) -> None:
        self.limit = limit
        self.refresh_s = refresh_s
        self._estimate: int | None = None
        self._read_at = 0.0

    def must_read(self, now: float) -> bool:
        if self.limit is None:
            return False
        if self._estimate is not None and 2 * (self._estimate + 1) > self.limit:
            return True
        if self._estimate is None or now - self._read_at >= self.refresh_s:
            # This caller reads; submits racing with it (an asyncio client's, a burst of
            # threads) go on with the estimate instead of all reading at once.
            self._read_at = now
            return True
        return False

    def read(self, depth: int, now: float) -> None:
        self._estimate, self._read_at = depth, now

    def submitted(self) -> None:
        if self._estimate is not None:
            self._estimate += 1


# --- cancel --------------------------------------------------------------------------------


def cancelled_result(job_id: str, record: Mapping[bytes | str, bytes | str], now: float) -> str:
    """The JobResult JSON stored when a queued job is cancelled (it never produced output)."""
    info = job_info_from_record(job_id, record)
    info = info.model_copy(update={"status": JobStatus.CANCELLED, "finished_at": now})
    raw_body = record.get("body", record.get(b"body"))
    model = json.loads(raw_body).get("model", "") if raw_body else ""
    result = JobResult(
        id=job_id,
        created=int(now),
        model=model,
        choices=(),
        job=info,
        error=ErrorInfo(type="cancelled", message=CANCEL_REASON),
    )
    return result.model_dump_json()


def cancel_args(
    job_id: str,
    record: Mapping[bytes | str, bytes | str],
    now: float,
    result_ttl_s: int,
    channel: str,
) -> list[str]:
    """ARGV of :data:`scripts.CANCEL`; the event data is written as ``encode_event`` writes it."""
    data = encode_event(0, "cancelled", {"reason": CANCEL_REASON})["data"]
    result = cancelled_result(job_id, record, now)
    return [repr(now), str(result_ttl_s), result, job_id, channel, data]


def script_reply(reply: Sequence[Any]) -> tuple[str, str]:
    """A ``{outcome, detail}`` script reply as text."""
    outcome, detail = reply
    return as_text(outcome), as_text(detail)


# --- dead letters --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """A job a worker gave up on, as ``dlq list`` shows it."""

    id: str
    status: JobStatus | None  # None: the record has expired; only the id is left
    attempts: int
    error: ErrorInfo | None
    finished_at: float | None

    def to_json(self) -> dict[str, Any]:
        error = None if self.error is None else self.error.model_dump()
        status = None if self.status is None else self.status.value
        return {
            "id": self.id,
            "status": status,
            "attempts": self.attempts,
            "error": error,
            "finished_at": self.finished_at,
        }


def unique_ids(raw_ids: Iterable[bytes | str]) -> list[str]:
    """The ids of an LRANGE, each once, in list order (a job may have been pushed twice)."""
    return list(dict.fromkeys(as_text(raw) for raw in raw_ids))


def requeue_call(
    keys: Keys, job_id: str, stored: bytes | str | None, app: Celery, queue: str
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of :data:`scripts.REQUEUE` for a job whose record holds body ``stored``
    (None: no record; the script then says which error it is)."""
    record_keys = [keys.dead_letters, *job_keys(keys, [job_id])]
    if stored is None:
        return [*record_keys, queue_list(queue, 0)], [job_id, str(ALIVE_TTL_S), "", ""]
    body_json = as_text(stored)
    body: dict[str, Any] = json.loads(body_json)
    list_key, message = job_message(app, body, job_id, parse_job(body).priority, queue)
    return [*record_keys, list_key], [job_id, str(ALIVE_TTL_S), message, body_json]


def job_keys(keys: Keys, ids: Iterable[str]) -> list[str]:
    """Every key of these jobs: record, events and lease."""
    return [
        key for job_id in ids for key in (keys.job(job_id), keys.events(job_id), keys.lease(job_id))
    ]


def dead_letter(job_id: str, record: Mapping[bytes | str, bytes | str]) -> DeadLetter:
    """One dead letter from its job record (HGETALL; empty once the record expired)."""
    if not record:
        return DeadLetter(job_id, None, 0, None, None)
    info = job_info_from_record(job_id, record)
    result = result_from_record(record)
    error = result.error if result is not None else None
    return DeadLetter(job_id, info.status, info.attempts, error, info.finished_at)
