"""The lease scripts on a real Redis, and a claim whose reply is lost (a Redis reply slower
than the socket timeout): sent again with the same token, it is the same claim."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import redis
import redis.asyncio
from redis.exceptions import TimeoutError as RedisTimeout

from hermes_worker.contract.store import Keys
from hermes_worker.inference.engine_api import EngineLike
from hermes_worker.settings import Settings
from hermes_worker.worker.execution import CLAIM_TRIES, Attempt, JobContext
from hermes_worker.worker.leases import Claimed, Leased, Leases
from hermes_worker.worker.stream import StreamWriter

TTL_S = 30.0


def record(r: redis.Redis, settings: Settings, job_id: str) -> dict[str, str]:
    raw: Any = r.hgetall(Keys(settings.key_prefix).job(job_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_a_claim_sent_again_with_its_token_is_the_same_attempt(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    keys = Keys(hermes_settings.key_prefix)

    async def scenario() -> tuple[Any, Any, Any]:
        async with redis.asyncio.Redis.from_url(hermes_settings.redis_url) as r:
            leases = Leases(r, keys, TTL_S)
            now = time.time()
            # Given a job claimed once by w1 (its reply might never have reached w1)
            first = await leases.claim("job-1", "w1:a", now, "w1")
            # When w1 sends the same claim again, and w2 tries its own
            again = await leases.claim("job-1", "w1:a", now, "w1")
            other = await leases.claim("job-1", "w2:b", now, "w2")
            return first, again, other

    first, again, other = asyncio.run(scenario())
    # Then both of w1's answers are attempt 1, the record counts one attempt, w2 waits
    assert isinstance(first, Claimed) and isinstance(again, Claimed)
    assert first == again and first.attempt == 1
    assert record(redis_client, hermes_settings, "job-1")["attempts"] == "1"
    assert isinstance(other, Leased) and 0 < other.ttl_ms <= TTL_S * 1000


def test_a_second_attempt_claimed_again_keeps_its_number_and_seq(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    keys = Keys(hermes_settings.key_prefix)
    # Given a job whose first attempt wrote three events, then lost its lease (its worker died)
    redis_client.hset(keys.job("job-2"), mapping={"status": "running", "attempts": 1})
    for seq in (1, 2, 3):
        redis_client.xadd(keys.events("job-2"), {"seq": seq, "type": "content", "data": "{}"})

    async def scenario() -> tuple[Any, Any]:
        async with redis.asyncio.Redis.from_url(hermes_settings.redis_url) as r:
            leases = Leases(r, keys, TTL_S)
            now = time.time()
            # When another worker claims it, twice with one token
            return (
                await leases.claim("job-2", "w2:c", now, "w2"),
                await leases.claim("job-2", "w2:c", now, "w2"),
            )

    first, again = asyncio.run(scenario())
    # Then it is attempt 2 both times, continuing after seq 3, and counted once
    assert first == again
    assert isinstance(first, Claimed) and (first.attempt, first.last_seq) == (2, 3)
    assert record(redis_client, hermes_settings, "job-2")["attempts"] == "2"


class LostReplies(Leases):
    """Real claims whose first ``lost`` replies never arrive (the claim did happen)."""

    def __init__(self, *args: Any, lost: int) -> None:
        super().__init__(*args)
        self.lost, self.calls = lost, 0

    async def claim(self, job_id: str, token: str, now: float, worker: str) -> Any:
        self.calls += 1
        outcome = await super().claim(job_id, token, now, worker)
        if self.calls <= self.lost:
            raise RedisTimeout("Timeout reading from socket")
        return outcome


def claim_through_context(settings: Settings, lost: int) -> tuple[Any, int]:
    keys = Keys(settings.key_prefix)

    async def scenario() -> tuple[Any, int]:
        async with redis.asyncio.Redis.from_url(settings.redis_url) as r:
            leases = LostReplies(r, keys, TTL_S, lost=lost)
            writer = StreamWriter(r, keys, flush_s=0.01, ttl_s=60)
            ctx = JobContext(
                cast(EngineLike, None),  # a claim never touches the engine
                r,
                writer,
                leases,
                keys,
                worker="w1",
                model="tiny",
                max_generation_s=60,
            )
            try:
                return await ctx.claim("job-3"), leases.calls
            except RedisTimeout as exc:
                return exc, leases.calls

    return asyncio.run(scenario())


def test_a_worker_whose_claim_reply_was_lost_runs_the_job_as_attempt_one(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a Redis whose answer to the first claim is lost (the claim itself was made)
    # When the worker claims the job
    outcome, calls = claim_through_context(hermes_settings, lost=1)
    # Then it sends the claim again and gets the job at once, as its first attempt
    assert isinstance(outcome, Attempt), outcome
    assert (outcome.number, calls) == (1, 2)
    assert record(redis_client, hermes_settings, "job-3")["attempts"] == "1"


def test_a_claim_that_keeps_failing_goes_up_as_an_error(
    hermes_settings: Settings,
) -> None:
    # Given a Redis that never answers a claim in time
    outcome, calls = claim_through_context(hermes_settings, lost=CLAIM_TRIES)
    # Then after CLAIM_TRIES tries the error reaches the caller (the task retries the job)
    assert isinstance(outcome, RedisTimeout)
    assert calls == CLAIM_TRIES
