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

Third, the consumer takes a burst of messages in one round trip instead of one each. Stock
kombu pops one message per ``BRPOP`` and records it in the unacked hash in a second round
trip; on a busy box a burst is claimed one message every few milliseconds (every round
trip waiting for a CPU for redis-server). Here, once ``BRPOP``
has delivered a message, one Lua call (:data:`scripts.TAKE_MORE`) pops as many more as the
prefetch limit and ``delivery_batch`` allow and records each in the unacked hash in the same
atomic step, so a worker killed between the pop and the delivery leaves them to the
visibility sweep (stock kombu loses the one message it has popped and not yet recorded).
A burst is then claimed about four times faster (figures: docs/benchmarks.md, "Measurements
behind design choices").

Fifth, a worker's consumer records the delivery tag of every message it holds in a set of
its own (the ``deliveries_key`` transport option, ``Keys.deliveries``), in the same round
trip as kombu's record, and removes it with kombu's; the reaper (worker/reaper.py) puts a
dead worker's messages back on the queue from there, in seconds rather than after the
visibility timeout. And every message put back on a queue (by kombu's visibility sweep, a
reject, a shutdown, or the reaper) gets a new delivery tag: a late ack of the old tag, from
a worker that was only paused, can then never remove the record of the worker that holds
the message now.

Fourth, a full worker (as many jobs as its prefetch limit, the usual state under load) takes
its next job as soon as one ends. With no room, kombu sends no BRPOP (or parks the reply of
one already sent, message inside); Celery's threads pool acks from the job's own thread, and
the consumer's event loop only looked again at its next timer, up to a second later (0.5 s
on average, ``tests/test_transport.py``). An ack or reject that makes room now wakes the
loop through a pipe registered on it.

Sixth, a message this consumer holds goes back on its queue (a reject with requeue, a lost
connection) from the copy it holds when the master has no record of it: after a failover the
record may have been written only on the old master, whose data is thrown away
(``QoS.restore_held``; seen in tests/test_sentinel.py, ``freeze-min-replicas``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import RedisError, ResponseError

from hermes_worker.contract import scripts
from hermes_worker.contract.store import SentinelConnection

log = structlog.stdlib.get_logger(__name__)

# A kombu message on the Redis list is a JSON document: bad bytes or bad JSON raise these.
UNDECODABLE = (ValueError, TypeError)


# What kombu raises when a channel's connection was closed under it.
CONNECTION_GONE = (AttributeError, RedisError)


# The deliveries keys (one per worker) of consumers told to take no more messages.
_stopped: set[str] = set()


def stop_taking(deliveries_key: str) -> None:
    """No more messages for the worker whose consumer records its deliveries under
    ``deliveries_key``: it sends no BRPOP from now on (one already sent may still deliver,
    within ``Transport.brpop_timeout``). For a worker about to hand back everything it holds
    and exit: what it gives back, it must not take again."""
    _stopped.add(deliveries_key)


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # Delivery tags that the TAKE_MORE script has already put in the unacked hash.
        self.recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        # kombu's record (ZADD index, HSET unacked), and ours of who holds it, in one call
        # that a full Redis still runs (scripts.RECORD): BRPOP has popped the message already.
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]
        owned = self.channel.deliveries_key
        keys = [self.unacked_index_key, self.unacked_key, owned or self.unacked_key]
        args = [delivery_tag, time.time(), entry, "1" if owned else "0"]
        try:
            with self.channel.conn_or_acquire() as client:
                if self.channel._record_script is None:  # EVALSHA, the body sent once
                    self.channel._record_script = client.register_script(scripts.RECORD)
                self.channel._record_script(keys=keys, args=args, client=client)
        except CONNECTION_GONE as exc:
            # Popped and not recorded: this process holds the only copy (a failover or a
            # lost connection between the BRPOP and this call). It is not delivered; it
            # goes back on its queue once Redis answers (if the record did land after all,
            # the visibility sweep brings a second copy, which finds the job claimed).
            log.warning("a message taken but not recorded goes back on its queue (%s)", exc)
            self.channel.put_back(message._raw, delivery["exchange"], delivery["routing_key"])
            raise
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def can_consume(self) -> bool:
        if self.channel.deliveries_key in _stopped:
            return False
        return bool(super().can_consume())  # type: ignore[no-untyped-call]

    def can_consume_max_estimate(self) -> int | None:
        if self.channel.deliveries_key in _stopped:
            return 0
        estimate: int | None = super().can_consume_max_estimate()  # type: ignore[no-untyped-call]
        return estimate

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)  # type: ignore[no-untyped-call]
        if self.channel.deliveries_key:
            pipe.srem(self.channel.deliveries_key, delivery_tag)
        return pipe

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

    def restore_held(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """kombu's restore of a message this consumer holds (a reject with requeue, a lost
        connection), which takes the message from the unacked hash. After a failover the
        hash may not have it: its record was written on the old master after the new one
        had replicated the pop (a SIGSTOP between the two, tests/test_sentinel.py), and the
        old master's data is thrown away when it syncs. The copy this process holds is then
        the only one: it is put back on the queue, here or, while Redis refuses or is away,
        by :meth:`Channel.put_back` (a second copy, from a record that survives, finds the
        job claimed or ended). The visibility sweep keeps kombu's restore_by_tag, and so
        does a worker that has handed its messages back itself (:func:`stop_taking`, then
        the reaper): none of them is missing then, only moved."""
        held = self._delivered.get(tag)
        if held is None or self.channel.deliveries_key in _stopped:
            self.restore_by_tag(tag, client, leftmost)  # type: ignore[no-untyped-call]
            return
        delivery = held.delivery_info
        copy = (held._raw, delivery["exchange"], delivery["routing_key"])

        def restore_transaction(pipe: Any) -> None:
            entry = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            message, exchange, routing_key = loads(bytes_to_str(entry)) if entry else copy  # type: ignore[no-untyped-call]
            self.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)

        try:
            with self.channel.conn_or_acquire(client) as conn:
                conn.transaction(restore_transaction, self.unacked_key)
        except CONNECTION_GONE as exc:
            log.warning("a message this worker holds goes back on its queue (%s)", exc)
            self.channel.put_back(*copy, forget=tag)

    def restore_unacked(self, client: Any = None) -> Any:
        """kombu's (every message held goes back on its queue), each through
        :meth:`restore_held`: none is left to a record the master may not have."""
        try:
            for tag in list(self._delivered):
                self.restore_held(tag, client)
        except CONNECTION_GONE as exc:  # a worker handing back its own: kombu's restore
            log.warning("in-flight messages left to the visibility sweep (%s)", exc)
        self._delivered.clear()
        return []

    # A job that ended while the connection was down cannot be acknowledged on its old
    # channel. Its message comes back after the visibility timeout, and the redelivered copy
    # finds the job ended and is skipped, so nothing runs twice.
    def ack(self, delivery_tag: Any) -> None:
        with self._waking_when_room_returns():
            try:
                super().ack(delivery_tag)  # type: ignore[no-untyped-call]
            except CONNECTION_GONE as exc:
                log.warning(
                    "ack lost with the old connection (%s); redelivery will be skipped", exc
                )
                self._quick_ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        with self._waking_when_room_returns():
            try:
                if requeue:  # kombu's reject, through restore_held
                    self.restore_held(delivery_tag, leftmost=True)
                    virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
                else:
                    super().reject(delivery_tag, requeue=False)  # type: ignore[no-untyped-call]
            except CONNECTION_GONE as exc:
                # Refused (a full Redis) or cut off: the message stays recorded for the
                # sweep; its prefetch slot here is freed, or after as many such failures as
                # HERMES_CONCURRENCY the consumer would take no job again.
                log.warning("reject lost (%s); the message is left to the sweep", exc)
                self._quick_ack(delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        """kombu's visibility sweep; one that Redis refuses (its mutex is a SET NX, which a
        full Redis turns down) is tried again at the next interval, not fatal."""
        try:
            return super().restore_visible(*args, **kwargs)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            log.warning("visibility sweep refused (%s); trying again later", exc)
            return None

    @contextmanager
    def _waking_when_room_returns(self) -> Iterator[None]:
        """Around an ack or reject: if the consumer was full, wake its event loop after.
        Celery's threads pool acks from the job's thread, while the loop sleeps until its
        next timer (kombu's binding refresh, each second) with no BRPOP to wait on (none
        is sent without room; one whose reply came in meanwhile is parked, message inside)."""
        full = not self.can_consume()
        yield
        connection = self.channel.connection
        if full and connection is not None:  # None: reconnecting; the new loop polls anyway
            connection.wake_event_loop()


class Channel(kombu_redis.Channel):
    QoS = QoS

    # The most messages taken per BRPOP, the first included (the transport option
    # "delivery_batch", HERMES_DELIVERY_BATCH); the prefetch limit may bind first. 1: stock.
    delivery_batch = 64
    # Where this consumer records the tags of the messages it holds (a worker's
    # Keys.deliveries; None: not recorded, as for a producer's app).
    deliveries_key: str | None = None
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "delivery_batch",
        "deliveries_key",
    )
    _take_more_script: Any = None  # scripts.TAKE_MORE, registered on first use
    _record_script: Any = None  # scripts.RECORD, registered on first use

    def _do_restore_message(
        self, payload: Any, exchange: Any, routing_key: Any, pipe: Any, leftmost: bool = False
    ) -> None:
        """kombu's restore, under a new delivery tag (see the module's docstring)."""
        with contextlib.suppress(KeyError, TypeError):
            payload["properties"]["delivery_tag"] = str(uuid.uuid4())
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)  # type: ignore[no-untyped-call]

    # How long a message taken but not recorded is tried to be put back (put_back).
    put_back_for_s = 120.0

    def put_back(self, payload: Any, exchange: Any, routing_key: Any, forget: Any = None) -> None:
        """Put a message back on its queue (next in line, under a new delivery tag) from a
        thread of its own, trying every half second until Redis takes it or
        ``put_back_for_s`` has passed: the consumer's loop goes on reconnecting meanwhile.
        ``forget``: its old delivery tag, whose record goes in the same round trip (or the
        visibility sweep would bring a second copy)."""

        def put() -> None:
            deadline = time.monotonic() + self.put_back_for_s
            while True:
                try:
                    client = self._create_client()  # type: ignore[no-untyped-call]
                    try:
                        pipe = client.pipeline(transaction=False)
                        if forget is not None:
                            self.qos._remove_from_indices(forget, pipe)
                        self._do_restore_message(payload, exchange, routing_key, pipe)
                        pipe.execute()
                    finally:
                        client.close()
                    log.info("a message put back is back on its queue")
                    return
                except CONNECTION_GONE as exc:
                    if time.monotonic() > deadline:
                        log.error("a message to put back is lost (%s)", exc)
                        return
                    time.sleep(0.5)

        threading.Thread(target=put, name="hermes-put-back", daemon=True).start()

    def _brpop_read(self, **options: Any) -> bool:
        try:
            delivered = bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        except UNDECODABLE as exc:
            log.error("dropped an item on the queue that is not a message: %s", exc)
            raise Empty() from exc
        self._take_more()
        return delivered

    def _take_more(self) -> None:
        """Deliver, after a BRPOP, the messages waiting behind it that the prefetch limit
        allows, taken and recorded in one call (see :data:`scripts.TAKE_MORE`)."""
        room = min(self.qos.can_consume_max_estimate() or 0, self.delivery_batch - 1)
        # Without ack emulation there is no unacked hash; with a global key prefix kombu
        # prefixes keys in its own calls: both left to BRPOP alone.
        if room <= 0 or not self.ack_emulation or self.global_keyprefix:
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        lists = [
            (self._q_for_pri(q, pri), q)  # type: ignore[no-untyped-call]
            for pri in self.priority_steps
            for q in queues
        ]
        owned = self.deliveries_key or self.unacked_key  # the key is unused without one
        keys = [self.unacked_index_key, self.unacked_key, owned, *(name for name, _ in lists)]
        record = "1" if self.deliveries_key else "0"
        with self.conn_or_acquire() as client:
            if self._take_more_script is None:  # EVALSHA, the body sent once
                self._take_more_script = client.register_script(scripts.TAKE_MORE)
            try:
                taken = self._take_more_script(
                    keys=keys, args=[room, time.time(), record], client=client
                )
            except ResponseError as exc:  # an ACL without RPOP, say: carry on as stock kombu
                log.warning("taking one message per BRPOP from now on: %s", exc)
                self.delivery_batch = 1
                return
            for number, item, tag in zip(taken[0::3], taken[1::3], taken[2::3], strict=True):
                queue = lists[int(number) - 1][1]
                try:
                    message = loads(bytes_to_str(item))  # type: ignore[no-untyped-call]
                except UNDECODABLE as exc:
                    log.error("dropped an item on queue %s that is not a message: %s", queue, exc)
                    message = None
                if tag and _acked_as(message) != tag:
                    # Lua's JSON parser read it differently from kombu's (invalid UTF-8,
                    # say): kombu could not ack the record, and restoring it could fail.
                    # Forget it; a message still gets recorded by QoS.append, kombu's way.
                    self.qos._remove_from_indices(tag).execute()
                    tag = b""
                if message is None:
                    continue
                if tag:
                    self.qos.recorded.add(tag.decode())
                try:
                    self.connection._deliver(message, queue)
                except UNDECODABLE as exc:
                    # kombu cannot read it (a body that is not base64, say): dropped, as
                    # _brpop_read drops one that BRPOP took, and its record with it.
                    log.error("dropped a message on queue %s kombu cannot read: %s", queue, exc)
                    if tag:
                        self.qos.recorded.discard(tag.decode())
                        self.qos._remove_from_indices(tag).execute()


def _acked_as(message: Any) -> bytes | None:
    """The bytes of the delivery tag that kombu will ack ``message`` under, if any."""
    try:
        tag = message["properties"]["delivery_tag"]
        return tag.encode() if isinstance(tag, str) else None
    except (KeyError, TypeError, UnicodeEncodeError):
        return None


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # A pipe whose read end is on the event loop: any thread can wake the loop.
        self._wake_fds: tuple[int, int] | None = None
        self._wake_lock = threading.Lock()  # no write to a closed (or reused) descriptor
        self._loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[no-untyped-call]
        with self._wake_lock:
            if self._wake_fds is None:
                read_fd, write_fd = os.pipe()
                os.set_blocking(read_fd, False)
                os.set_blocking(write_fd, False)
                self._wake_fds = (read_fd, write_fd)
            self._loop = loop
            loop.add_reader(self._wake_fds[0], self._on_wake, self._wake_fds[0])

    @staticmethod
    def _on_wake(read_fd: int) -> None:
        # Nothing to do but empty the pipe: the loop's next tick polls for what room allows.
        with contextlib.suppress(OSError):
            os.read(read_fd, 4096)

    def wake_event_loop(self) -> None:
        """Wake the consumer's event loop from any thread (no-op without one)."""
        with self._wake_lock:
            if self._wake_fds is not None:
                with contextlib.suppress(BlockingIOError):  # full: wakes are pending anyway
                    os.write(self._wake_fds[1], b"\0")

    def close_connection(self, connection: Any) -> None:
        try:
            super().close_connection(connection)  # type: ignore[no-untyped-call]
        finally:
            with self._wake_lock:
                fds, self._wake_fds = self._wake_fds, None
                if fds is not None:
                    if self._loop is not None:
                        with contextlib.suppress(Exception):
                            self._loop.remove_reader(fds[0])
                    for fd in fds:
                        os.close(fd)


TRANSPORT = f"{__name__}:Transport"


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """Our channel on kombu's Sentinel channel: its pool asks the sentinels for the master
    on every new connection (a ``sentinel://`` HERMES_REDIS_URL, contract/queue.py)."""

    # A master that refuses writes counts as a lost connection (store.SentinelConnection):
    # Celery takes a refused BRPOP, or a refused queue binding as it reconnects, as fatal
    # and stops consuming for good (seen in tests/test_sentinel.py, min-replicas-to-write).
    connection_class = SentinelConnection
    from_transport_options = (  # type: ignore[assignment]
        *Channel.from_transport_options,
        *(
            name
            for name in kombu_redis.SentinelChannel.from_transport_options
            if name not in Channel.from_transport_options
        ),
    )


class SentinelTransport(Transport):
    """:class:`Transport` through Sentinel. After a failover the consumer's connection
    breaks (Sentinel closes the demoted master's clients) and Celery reconnects, to the new
    master; the messages it held are in the unacked hash, restored by the sweep."""

    Channel = SentinelChannel
    default_port = kombu_redis.SentinelTransport.default_port  # type: ignore[assignment]


SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"
