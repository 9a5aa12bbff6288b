"""Redis's clock: the one clock every host of a deployment shares.

A time that one host writes and another reads (a job's ``queued_at``, ``started_at``,
``first_token_at``, ``finished_at``; its deadline; a worker's heartbeat; a batch's times) is
on Redis's clock (``TIME``), not on the clock of the host that writes it: a producer, worker
or gateway whose clock is a minute off must neither expire a job at once nor give it a minute
more, nor make a live worker look dead. Scripts that stamp a time call ``TIME`` themselves
(``scripts.py``); other code reads it in the round trip it makes anyway, or from a
:class:`RedisClock`, where it needs Redis's now without a round trip per look (a worker
checking a deadline while it generates). Durations measured on one host (generation time,
waits, lease proofs) stay on that host's monotonic clock. Why: docs/reliability.md, "Clocks".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module stays light: the command line imports it
    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis

# A measured offset is trusted this long; then the next measurement replaces it, however
# loose. Until then a measurement replaces it only when tighter (a quicker round trip).
REFRESH_S = 30.0


def redis_time(reply: Sequence[int | str | bytes]) -> float:
    """A ``TIME`` reply ([seconds, microseconds]) as unix seconds."""
    seconds, micros = reply
    return int(seconds) + int(micros) / 1_000_000


class RedisClock:
    """Redis's now on this host, without a round trip: this host's monotonic clock plus the
    offset measured by a round trip (:meth:`observe`, :meth:`sync`). On the monotonic clock,
    not the wall clock, so a step of this host's wall clock (NTP, an operator) moves nothing;
    a measurement is good to half its round trip. Before the first one, :meth:`now` is this
    host's wall clock (:attr:`measured` says which)."""

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic, self._wall = monotonic, wall
        self._offset: float | None = None  # Redis's now minus this host's monotonic time
        self._error = math.inf  # half the round trip of the measurement the offset is from
        self._at = -math.inf  # monotonic time of that measurement

    @property
    def measured(self) -> bool:
        return self._offset is not None

    @property
    def offset_s(self) -> float | None:
        """Redis's clock minus this host's wall clock (the skew doctor reports), if measured."""
        return None if self._offset is None else self.now() - self._wall()

    @property
    def monotonic_offset_s(self) -> float:
        """Redis's clock minus this host's monotonic clock (0.0 before the first measurement):
        a time on one is the other's plus this."""
        return 0.0 if self._offset is None else self._offset

    def observe(self, redis_now: float, sent: float, received: float) -> None:
        """A Redis now (``TIME``, or a script's reply) read between the monotonic times
        ``sent`` and ``received``."""
        error = max(0.0, received - sent) / 2
        if self._offset is None or error <= self._error or received - self._at > REFRESH_S:
            self._offset, self._error, self._at = redis_now - (sent + error), error, received

    def now(self) -> float:
        """Redis's now in unix seconds, as of the last measurement."""
        if self._offset is None:
            return self._wall()
        return self._monotonic() + self._offset

    async def sync(self, redis: AsyncRedis) -> float:
        """Measure the offset (one ``TIME``); Redis's now."""
        sent = self._monotonic()
        now = redis_time(await redis.time())
        self.observe(now, sent, self._monotonic())
        return now

    def sync_blocking(self, redis: Redis) -> float:
        """:meth:`sync` on a blocking client."""
        sent = self._monotonic()
        now = redis_time(redis.time())
        self.observe(now, sent, self._monotonic())
        return now
