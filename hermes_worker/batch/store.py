"""A batch's record in Redis and the OpenAI batch object it is shown as.

``{prefix}batch:{id}`` is a hash of the batch object's fields (timestamps, file ids, status,
counts, ``metadata`` and ``errors`` as JSON) plus the feeder's cursor ``fed`` (the lines
submitted so far, in file order) and ``tokens`` (completion tokens of the lines written);
``{prefix}batches`` a sorted set of batch ids by creation time. Status changes go through
one script (:data:`hermes_worker.contract.scripts.BATCH_STATUS`) that checks the status it
leaves, so a cancel and the runner's own moves never cross.

Statuses, as OpenAI's: ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``;
``validating`` -> ``failed`` (bad lines); ``cancelling`` -> ``cancelled``; ``expired`` once the
completion window has passed (what finished is kept, the rest is written as expired).
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from redis import Redis

from hermes_worker.contract import scripts
from hermes_worker.contract.clock import redis_time
from hermes_worker.contract.store import Keys
from hermes_worker.errors import BatchAlreadyEnded, BatchNotFound, InvalidRequest

BATCH_ID_PREFIX = "batch_"
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
ENDED = ("completed", "failed", "expired", "cancelled")
TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str) -> int:
    """``24h`` (OpenAI's only value), or any whole number of s, m, h or d."""
    match = _WINDOW.match(window)
    if match is None or int(match.group(1)) == 0:
        raise InvalidRequest(
            f"completion_window: {window!r} is not a duration such as 24h, 90m or 3600s"
        )
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def new_batch_id() -> str:
    return f"{BATCH_ID_PREFIX}{secrets.token_hex(12)}"


class BatchStore:
    """Batch records on one Redis, under one deployment's key prefix."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._status = redis.register_script(scripts.BATCH_STATUS)

    def now(self) -> int:
        """Redis's now, whole unix seconds: a batch's times are on Redis's clock, which
        every gateway and runner shares (contract/clock.py)."""
        return int(redis_time(self.redis.time()))

    def create(
        self,
        *,
        input_file_id: str,
        output_file_id: str,
        error_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        priority: int,
        batch_id: str | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        window_s = window_seconds(completion_window)
        batch_id = batch_id or new_batch_id()
        now = self.now()
        fields: dict[Any, Any] = {
            "id": batch_id,
            "status": "validating",
            "endpoint": "/v1/chat/completions",
            "input_file_id": input_file_id,
            "output_file_id": output_file_id,
            "error_file_id": error_file_id,
            "completion_window": completion_window,
            "created_at": now,
            "expires_at": now + window_s,
            "metadata": json.dumps(metadata or {}),
            "priority": priority,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "fed": 0,
            "tokens": 0,
        }
        if tenant is not None:
            fields["tenant"] = tenant  # the gateway tenant that made it: only it sees it
        pipe = self.redis.pipeline()
        pipe.hset(self.keys.batch(batch_id), mapping=fields)
        pipe.zadd(self.keys.batches, {batch_id: now})
        pipe.execute()
        return self.get(batch_id)

    def record(self, batch_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(self.keys.batch(batch_id))
        if not raw:
            raise BatchNotFound(f"no batch {batch_id!r}")
        return {_text(k): _text(v) for k, v in raw.items()}

    def get(self, batch_id: str) -> dict[str, Any]:
        """The batch as OpenAI's batch object."""
        return batch_object(self.record(batch_id))

    def page(
        self, limit: int = 20, after: str | None = None, *, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Batches, newest first (``after``: the last id of the previous page); with
        ``tenant``, only that tenant's."""
        ids = [_text(i) for i in self.redis.zrevrange(self.keys.batches, 0, -1)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        found: list[dict[str, Any]] = []
        for batch_id in ids:
            if len(found) >= limit:
                break
            try:
                record = self.record(batch_id)
            except BatchNotFound:
                self.redis.zrem(self.keys.batches, batch_id)
                continue
            if tenant is None or record.get("tenant") == tenant:
                found.append(batch_object(record))
        return found

    def active(self) -> list[str]:
        """Ids of the batches still running (any process may run them)."""
        ids = [_text(i) for i in self.redis.zrange(self.keys.batches, 0, -1)]
        pipe = self.redis.pipeline()
        for batch_id in ids:
            pipe.hget(self.keys.batch(batch_id), "status")
        return [i for i, s in zip(ids, pipe.execute(), strict=True) if _text(s) in ACTIVE]

    def move(self, batch_id: str, to: str, *, allowed: tuple[str, ...], **fields: Any) -> bool:
        """Set ``status`` to ``to`` (stamping ``{to}_at`` on Redis's clock) and ``fields``,
        only while the status is one of ``allowed``; whether it moved."""
        flat: list[str] = []
        for name, value in fields.items():
            flat += [name, value if isinstance(value, str) else json.dumps(value)]
        args = [to, "", ",".join(allowed), *flat]  # "": the script reads Redis's clock
        return bool(self._status(keys=[self.keys.batch(batch_id)], args=args))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask for a batch to stop: ``cancelling`` (its runner cancels what runs and writes
        the rest off); :class:`BatchAlreadyEnded` once it has ended."""
        if not self.move(batch_id, "cancelling", allowed=("validating", "in_progress")):
            status = self.record(batch_id)["status"]
            if status in ENDED:
                raise BatchAlreadyEnded(f"batch {batch_id!r} already ended ({status})")
        return self.get(batch_id)

    def set(self, batch_id: str, **fields: int | str) -> None:
        mapping: dict[Any, Any] = fields
        self.redis.hset(self.keys.batch(batch_id), mapping=mapping)


def batch_object(record: dict[str, str]) -> dict[str, Any]:
    """A record as OpenAI's batch object."""
    errors = json.loads(record["errors"]) if record.get("errors") else None
    obj: dict[str, Any] = {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "errors": None if errors is None else {"object": "list", "data": errors},
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": record["status"],
        "output_file_id": record["output_file_id"],
        "error_file_id": record["error_file_id"],
        "request_counts": {
            "total": int(record["total"]),
            "completed": int(record["completed"]),
            "failed": int(record["failed"]),
        },
        "metadata": json.loads(record["metadata"]) or None,
    }
    for name in TIMESTAMPS:
        obj[name] = int(record[name]) if record.get(name) else None
    obj["usage"] = {"output_tokens": int(record.get("tokens") or 0)}
    return obj


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else value
