"""Leases: effectively-once execution on top of Celery's at-least-once delivery.

Redis re-delivers an unacknowledged job once it is older than the visibility timeout, even
while the first worker is still generating (docs/reliability.md). So an attempt runs only under a
lease: ``SET {job}:lease <token> NX PX ttl``, renewed by the runtime's heartbeat.

* A copy that finds the job ended skips it (and is acknowledged).
* A copy that finds a live lease waits: if the holder finishes, the copy skips; if the
  holder dies, its lease expires and the copy runs the job as the next attempt.
* Claiming, counting the attempt and marking the record ``running`` is one Lua script, so
  two workers can never both claim, and a cancel of a queued job (also atomic, on the
  producer side) either wins before the claim or is seen by it.
* A claim is safe to send again with the same token: when the reply to the first one was
  lost (a Redis reply slower than the socket timeout), the second finds its own lease and
  answers with the same attempt instead of waiting that lease out as someone else's.
* Every write of an attempt checks its token (``worker/stream.py``), and a worker that
  cannot renew a lease for longer than its TTL less a beat stops that job itself
  (``worker/heartbeat.py``): a worker that lost its lease never writes into another's run.
* Every delivery is counted before the body is even read (:meth:`Leases.count_delivery`),
  and must carry the body its record holds: a message that keeps killing its worker ends
  as ``poison``, and a forged one never runs under another job's id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from redis.asyncio import Redis

from hermes_worker.contract import scripts
from hermes_worker.contract.store import ALIVE_TTL_S, Keys, as_text


@dataclass(frozen=True)
class Claimed:
    """A claimed job. Its times are on Redis's clock: ``started_at`` when the attempt's
    first claim was made, ``now`` when this one was (the worker's offset from Redis's
    clock is measured with it; not part of the attempt's identity)."""

    attempt: int
    queued_at: float
    last_seq: int
    cancel_requested: bool
    tenant: str | None = None  # the gateway tenant that submitted it (its record's)
    started_at: float = 0.0
    now: float = field(default=0.0, compare=False)
    # The notice stream its writes name it on (Keys.notices of the client's own ends stream
    # its record names); '' for a job whose record names none.
    notices: str = ""


@dataclass(frozen=True)
class Ended:
    status: str


@dataclass(frozen=True)
class Leased:
    """Another worker holds a live lease; it expires in ``ttl_ms`` unless renewed."""

    ttl_ms: int


class Leases:
    """The lease scripts, bound to one Redis client and key layout."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: float) -> None:
        self._keys = keys
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._claim = redis.register_script(scripts.CLAIM)
        self._renew = redis.register_script(scripts.RENEW)
        self._release = redis.register_script(scripts.RELEASE)
        self._delivery = redis.register_script(scripts.DELIVERY)
        self._uncount = redis.register_script(scripts.UNCOUNT)
        self._dead_letter = redis.register_script(scripts.DEAD_LETTER)
        self._redis = redis

    async def claim(
        self, job_id: str, token: str, now: float, worker: str
    ) -> Claimed | Ended | Leased:
        """Claim the job for ``token``. ``now`` (this worker's) is not recorded: the claim
        stamps the attempt on Redis's clock (``Claimed.started_at``)."""
        keys = [self._keys.job(job_id), self._keys.lease(job_id), self._keys.events(job_id)]
        args: list[str | int] = [token, self.ttl_ms, repr(now), worker, ALIVE_TTL_S]
        reply = [as_text(v) for v in await self._claim(keys=keys, args=args)]
        if reply[0] == "ended":
            return Ended(reply[1])
        if reply[0] == "leased":
            return Leased(int(reply[1]))
        return Claimed(
            attempt=int(reply[1]),
            queued_at=float(reply[2]),
            last_seq=int(reply[3]),
            cancel_requested=bool(reply[4]),
            tenant=reply[5] or None,
            started_at=float(reply[6]),
            now=float(reply[7]),
            notices=self._notices(reply[8] if len(reply) > 8 else None),
        )

    def _notices(self, ends: str | None) -> str:
        stream = self._keys.end_stream(ends)
        return self._keys.notices(stream) if stream != self._keys.ends else ""

    async def renew(self, held: dict[str, str]) -> tuple[set[str], set[str]]:
        """Renew every lease held here in one call, whatever their number; returns (lost
        leases, jobs with a cancel request).

        Checking ``cancel_requested`` here too makes cancellation survive a missed pub/sub
        message (a Redis reconnect drops subscriptions for a moment)."""
        jobs = list(held)
        if not jobs:
            return set(), set()
        keys = [self._keys.lease(job_id) for job_id in jobs]
        keys += [self._keys.job(job_id) for job_id in jobs]
        args: list[str | int] = [self.ttl_ms, *(held[job_id] for job_id in jobs)]
        replies = await self._renew(keys=keys, args=args)
        renewed, flags = replies[: len(jobs)], replies[len(jobs) :]
        lost = {job for job, ok in zip(jobs, renewed, strict=True) if not int(ok)}
        cancelled = {job for job, flag in zip(jobs, flags, strict=True) if int(flag)}
        return lost, cancelled

    async def release(self, job_id: str, token: str, *, requeue: bool = False) -> bool:
        keys = [self._keys.lease(job_id), self._keys.job(job_id)]
        args = [token, "requeue" if requeue else "keep"]
        return bool(await self._release(keys=keys, args=args))

    async def count_delivery(
        self, job_id: str, digest: str, max_deliveries: int
    ) -> tuple[str, str]:
        """Count one delivery of the job whose body has ``digest`` (see
        :data:`~hermes_worker.contract.scripts.DELIVERY`): (outcome, detail)."""
        args: list[str | int] = [digest, max_deliveries, ALIVE_TTL_S]
        outcome, detail = await self._delivery(keys=[self._keys.job(job_id)], args=args)
        return as_text(outcome), as_text(detail)

    async def uncount_delivery(self, job_id: str) -> None:
        """A delivery ended without ending its job (a retry, a hand-back): not a crash."""
        await self._uncount(keys=[self._keys.job(job_id)])

    async def dead_letter(
        self, job_id: str, now: float, ttl_s: int, result_json: str, data: object
    ) -> str:
        """Fail the job and list it in the dead letters unless an attempt holds it or it
        has ended: ``dead``, ``leased`` or the status it ended with."""
        keys = self._keys
        script_keys = [
            keys.job(job_id), keys.events(job_id), keys.lease(job_id), keys.dead_letters,
            keys.ends,
        ]  # fmt: skip
        data_json = json.dumps(data, ensure_ascii=False)
        args: list[str | int | float] = [repr(now), ttl_s, result_json, data_json, job_id]
        outcome, status = await self._dead_letter(keys=script_keys, args=args)
        return as_text(status) if as_text(outcome) == "ended" else as_text(outcome)
