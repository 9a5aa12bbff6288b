"""The fleet as Redis shows it: queue depth, live workers, jobs by status; and purge.

What each answer costs:

* Queue depth: one LLEN per priority list of the queue (kombu keeps one list per step:
  ``queue`` for priority 0, ``queue:N`` for the others; :func:`producers.control.queue_lists`).
* Workers, running jobs, jobs finished / failed lately: the workers' vitals hashes
  (:mod:`hermes_worker.worker.vitals`), found through the ``{prefix}workers`` index. Workers count
  in memory and publish with their heartbeat, so this costs no Redis command per job; the
  numbers are as old as the last heartbeat (a third of the lease TTL: 10 s by default).
* Jobs by status: a SCAN over the job records (``{prefix}job:*``, hashes only) with one
  pipelined HMGET per batch. Nothing is written per job for it (no index to keep in step
  with records that expire on their own), so it costs the workers nothing; one listing
  walks the whole database: about (keys in the db) / 1000 SCAN calls plus one HMGET per
  job record, and a sort of the matches.
* Purge: the queue's lists are emptied in one transaction; each job taken that was still
  ``queued`` is then cancelled as the producer's ``cancel`` does it, so whoever waits on it
  sees it end.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from redis import Redis

from hermes_worker.contract.jobs import JobInfo, JobStatus, usable_job_id
from hermes_worker.contract.store import Keys, as_text, job_info_from_record
from hermes_worker.errors import JobAlreadyEnded, JobNotFound
from hermes_worker.settings import Settings
from hermes_worker.worker.vitals import WINDOWS, WorkerVitals
from producers.client import HermesClient
from producers.control import queue_lists

SCAN_COUNT = 1000
# What a listing reads of each job record (not the body or the result: they can be large).
JOB_FIELDS = (
    "status", "attempts", "worker", "queued_at", "started_at", "first_token_at", "finished_at",
)  # fmt: skip


def queue_depth(r: Redis, settings: Settings) -> list[int]:
    """Messages waiting in the queue, indexed by priority (0-9)."""
    with r.pipeline(transaction=False) as pipe:
        for name in queue_lists(settings):
            pipe.llen(name)
        return [int(n) for n in pipe.execute()]


def live_workers(r: Redis, prefix: str) -> list[WorkerVitals]:
    """Workers whose vitals hash is alive (a dead worker's has expired), by name."""
    members = r.zrange(Keys(prefix).workers, 0, -1)
    names = [as_text(name) for name in members if isinstance(name, bytes | str)]
    with r.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(Keys(prefix).worker(name))
        hashes = pipe.execute()
    found = [WorkerVitals.from_hash(n, h) for n, h in zip(names, hashes, strict=True) if h]
    return sorted(found, key=lambda w: w.name)


def find_jobs(r: Redis, prefix: str, status: JobStatus, limit: int) -> list[JobInfo]:
    """Jobs whose record has ``status``, newest first (by end, start or queue time)."""
    found: dict[str, JobInfo] = {}
    for batch in _job_key_batches(r, prefix):
        with r.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.hmget(key, JOB_FIELDS)
            replies = pipe.execute()
        for key, values in zip(batch, replies, strict=True):
            if values[0] is None or as_text(values[0]) != status.value:
                continue  # another status, or expired since the SCAN saw it
            record: dict[bytes | str, bytes | str] = {
                field: value
                for field, value in zip(JOB_FIELDS, values, strict=True)
                if value is not None
            }
            job_id = key[len(prefix) + len("job:") :]
            found[job_id] = job_info_from_record(job_id, record)
    return sorted(found.values(), key=_newest, reverse=True)[:limit]


def _newest(info: JobInfo) -> float:
    return info.finished_at or info.started_at or info.queued_at or 0.0


def _job_key_batches(r: Redis, prefix: str) -> Iterator[list[str]]:
    """The job record keys under ``prefix``, in batches, each once. TYPE hash leaves out
    the events streams and leases, which share the ``job:`` pattern."""
    pattern = re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + "job:*"
    seen: set[str] = set()
    batch: list[str] = []
    for raw in r.scan_iter(match=pattern, count=SCAN_COUNT, _type="hash"):
        key = as_text(raw)
        if key not in seen:  # SCAN may return a key twice
            seen.add(key)
            batch.append(key)
        if len(batch) >= SCAN_COUNT:
            yield batch
            batch = []
    if batch:
        yield batch


# --- purge -----------------------------------------------------------------------------------


@dataclass
class PurgeReport:
    """What ``purge`` did with each message it took off the queue."""

    queue: str
    removed: int = 0  # messages gone from the queue
    cancelled: int = 0  # their job was queued: now cancelled, its producer sees it end
    already_ended: int = 0  # a stale copy of a job that had ended
    no_record: int = 0  # no job record (expired, or a foreign producer's job)
    undecodable: int = 0  # not a Celery message at all
    # A redelivered copy of a running job: put back, since it is what runs the job again
    # if that job's worker dies.
    kept_running: int = 0


def message_job_id(raw: bytes) -> str | None:
    """The job id a worker would give this message (the body's id when usable, else the
    Celery task id; see ``runtime.job_id_for``), or None for garbage."""
    try:
        message = json.loads(raw)
        task_id = message["headers"]["id"]
        body: Any = None
        if message.get("properties", {}).get("body_encoding") == "base64":
            args = json.loads(base64.b64decode(message["body"]))[0]
            body = args[0] if args else None
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    candidate = body.get("id") if isinstance(body, dict) else None
    if isinstance(candidate, str) and usable_job_id(candidate):
        return candidate
    return task_id if isinstance(task_id, str) else None


def take_queued(r: Redis, lists: list[str]) -> list[tuple[str, bytes]]:
    """Every message on ``lists``, removed in one transaction: a worker pops each message
    either before (it runs) or not at all."""
    with r.pipeline(transaction=True) as pipe:
        for name in lists:
            pipe.lrange(name, 0, -1)
        for name in lists:
            pipe.delete(name)
        replies = pipe.execute()
    return [(name, raw) for name, items in zip(lists, replies, strict=False) for raw in items]


def purge_queue(client: HermesClient) -> PurgeReport:
    """Empty the client's queue and cancel the jobs that were waiting in it."""

    r, keys = client.redis, client.keys
    taken = take_queued(r, queue_lists(client.settings))
    report = PurgeReport(client.settings.queue_name)
    ids = [(name, raw, message_job_id(raw)) for name, raw in taken]
    with r.pipeline(transaction=False) as pipe:
        for _, _, job_id in ids:
            pipe.hget(keys.job(job_id or ""), "status")
        statuses = [None if s is None else as_text(s) for s in pipe.execute()]
    for (name, raw, job_id), status in zip(ids, statuses, strict=True):
        if job_id is None:
            report.undecodable += 1
        elif status == JobStatus.RUNNING:
            r.lpush(name, raw)  # as kombu queues a message
            report.kept_running += 1
            continue
        elif status is None:
            report.no_record += 1
        else:
            try:
                client.job(job_id).cancel()  # the producer's cancel: one script, atomic
                report.cancelled += 1
            except JobAlreadyEnded:
                report.already_ended += 1
            except JobNotFound:
                report.no_record += 1
        report.removed += 1
    return report


def stats_json(depth: list[int], workers: list[WorkerVitals], queue: str) -> dict[str, Any]:
    """The ``stats --json`` document."""

    def total(field: str) -> dict[str, int]:
        return {label: sum(getattr(w, field)[label] for w in workers) for label in WINDOWS}

    tokens = total("tokens")
    return {
        "queue": {"name": queue, "waiting": sum(depth), "by_priority": depth},
        "jobs": {
            "running": sum(w.running for w in workers),
            "finished": total("finished"),
            "failed": total("failed"),
            "tokens_per_s_1m": round(tokens["1m"] / 60, 3),
        },
        "workers": [w.to_json() for w in workers],
    }
