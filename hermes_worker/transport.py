"""kombu's Redis transport, hardened against items on the queue that are not messages.

Anyone who can write to Redis can push raw bytes onto the queue's list. Stock kombu fails
to decode such an item inside the consumer's poll, and Celery takes that as an
unrecoverable error: every worker that pops it shuts down (reproduced in
``tests/test_hostile_input.py``). Here an undecodable item is logged and dropped (it was
already popped, so nothing else sees it) and the worker goes on polling. Celery's own
checks still handle well-formed messages with bad content (pickle, wrong encoding).

Second, when the broker connection drops, Celery closes it before kombu tries to put the
in-flight messages back, and that attempt fails on the closed connection; Celery takes the
error as unrecoverable and the worker exits instead of reconnecting (reproduced in
``tests/test_redis_faults.py``). The messages are safe where they are (kombu's unacked
hash, restored by the visibility-timeout sweep), so the failed restore is logged and the
consumer reconnects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from redis.exceptions import RedisError

log = structlog.stdlib.get_logger(__name__)

# A kombu message on the Redis list is a JSON document: bad bytes or bad JSON raise these.
UNDECODABLE = (ValueError, TypeError)


# What kombu raises when a channel's connection was closed under it.
CONNECTION_GONE = (AttributeError, RedisError)


class QoS(kombu_redis.QoS):
    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        """kombu's, without MULTI/EXEC (4 commands less per job). The unacked bookkeeping
        (ZADD + HSET on delivery, ZREM + HDEL on ack) still goes in one round trip, in
        order. A pair cut in half by a crash is harmless: the visibility sweep skips an
        index entry without its message; a message left without its index entry is never
        restored, only left behind. A sweep that slips between an ack's two commands
        requeues a job that has ended, and the redelivered copy finds it ended."""
        if pipe:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as conn:
                yield conn.pipeline(transaction=False)

    def restore_unacked(self, client: Any = None) -> Any:
        try:
            return super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except CONNECTION_GONE as exc:
            log.warning("in-flight messages left to the visibility sweep (%s)", exc)
            return []

    # A job that ended while the connection was down cannot be acknowledged on its old
    # channel. Its message comes back after the visibility timeout, and the redelivered copy
    # finds the job ended and is skipped, so nothing runs twice.
    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]
        except CONNECTION_GONE as exc:
            log.warning("ack lost with the old connection (%s); redelivery will be skipped", exc)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]
        except CONNECTION_GONE as exc:
            log.warning("reject lost with the old connection (%s)", exc)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        except UNDECODABLE as exc:
            log.error("dropped an item on the queue that is not a message: %s", exc)
            raise Empty() from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)  # type: ignore[no-untyped-call]
        except UNDECODABLE as exc:
            log.error("dropped an item on queue %s that is not a message: %s", queue, exc)
            raise Empty() from exc


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
