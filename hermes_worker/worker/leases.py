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
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from hermes_worker.contract.store import ALIVE_TTL_S, Keys, as_text

TERMINAL = ("succeeded", "failed", "cancelled", "expired")

_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'queued_at', 'cancel_requested',
                       'attempts', 'requeued')
local status = rec[1]
for _, ended in ipairs({'succeeded', 'failed', 'cancelled', 'expired'}) do
  if status == ended then return {'ended', status} end
end
local before = tonumber(rec[4] or '0') or 0
local queued_at = rec[2] or ARGV[3]
if redis.call('GET', KEYS[2]) == ARGV[1] then
  -- Our own claim again: the reply to the first one was lost (a timeout). Same attempt.
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  before = math.max(before - 1, 0)
elseif not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'leased', tostring(redis.call('PTTL', KEYS[2]))}
else
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[3], 'worker', ARGV[4],
             'attempts', tostring(before + 1), 'queued_at', queued_at)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
-- Events exist only after an earlier attempt (or before a requeue): continue their seq.
local seq = 0
if before > 0 or rec[5] then
  local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  if last[1] then
    local fields = last[1][2]
    for i = 1, #fields, 2 do
      if fields[i] == 'seq' then seq = tonumber(fields[i + 1]) end
    end
  end
end
return {'claimed', tostring(before + 1), queued_at, tostring(seq), rec[3] or ''}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# release: drop the lease if it is still ours. With ARGV[2] == 'requeue' the job also goes
# back to 'queued' (a shutdown handing it to another worker).
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == 'requeue' then redis.call('HSET', KEYS[2], 'status', 'queued') end
return 1
"""


@dataclass(frozen=True)
class Claimed:
    attempt: int
    queued_at: float
    last_seq: int
    cancel_requested: bool


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
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._redis = redis

    async def claim(
        self, job_id: str, token: str, now: float, worker: str
    ) -> Claimed | Ended | Leased:
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
        )

    async def renew(self, held: dict[str, str]) -> tuple[set[str], set[str]]:
        """Renew every lease held here; returns (lost leases, jobs with a cancel request).

        Checking ``cancel_requested`` here too makes cancellation survive a missed pub/sub
        message (a Redis reconnect drops subscriptions for a moment)."""
        pipe = self._redis.pipeline(transaction=False)
        jobs = list(held)
        for job_id in jobs:
            # Awaiting a script on a pipeline only queues it (and its SCRIPT LOAD if needed).
            lease_key = self._keys.lease(job_id)
            await self._renew(keys=[lease_key], args=[held[job_id], self.ttl_ms], client=pipe)
            pipe.hexists(self._keys.job(job_id), "cancel_requested")
        replies = await pipe.execute() if jobs else []
        lost = {job for job, ok in zip(jobs, replies[0::2], strict=True) if not int(ok)}
        cancelled = {job for job, flag in zip(jobs, replies[1::2], strict=True) if flag}
        return lost, cancelled

    async def release(self, job_id: str, token: str, *, requeue: bool = False) -> bool:
        keys = [self._keys.lease(job_id), self._keys.job(job_id)]
        args = [token, "requeue" if requeue else "keep"]
        return bool(await self._release(keys=keys, args=args))
