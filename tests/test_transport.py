"""The consumer's side of our kombu transport against a real Redis: a burst of messages is
taken in one call after BRPOP, in priority order, within the prefetch limit, and each one is
recorded in kombu's unacked hash exactly as kombu's own QoS would record it (so the
visibility sweep and restore read them back).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Message, Queue
from kombu.asynchronous import Hub

from hermes_worker.contract import scripts
from hermes_worker.contract.queue import job_message, make_celery
from hermes_worker.settings import Settings

UNACKED, UNACKED_INDEX = b"unacked", b"unacked_index"


class Taker:
    """A kombu consumer of one queue through our transport, as Celery's would be, with the
    messages it got (never acked unless a test says so)."""

    def __init__(self, settings: Settings, prefetch: int, url: str | None = None) -> None:
        self.settings = settings
        self.connection: Connection = make_celery(settings).connection_for_read(url)
        self.channel = self.connection.channel()
        self.channel.basic_qos(0, prefetch, False)
        self.got: list[Message] = []
        queue = Queue(settings.queue_name, routing_key=settings.queue_name)
        self.consumer = Consumer(
            self.channel, queues=[queue], callbacks=[self._on_message], accept=["json"]
        )
        self.consumer.consume()

    def _on_message(self, body: Any, message: Message) -> None:
        self.got.append(message)

    def drain_once(self) -> list[Message]:
        """One wait for the queue (one BRPOP and what comes with it): what it delivered."""
        before = len(self.got)
        self.connection.drain_events(timeout=5)
        return self.got[before:]

    def close(self) -> None:
        self.connection.release()


@pytest.fixture
def takers(hermes_settings: Settings) -> Iterator[list[Taker]]:
    made: list[Taker] = []
    yield made
    for taker in made:
        for message in taker.got:
            if not message.acknowledged:
                message.ack()  # leaves nothing in the shared unacked hash
        taker.close()


def build(settings: Settings, priority: int = 0) -> tuple[str, str]:
    """A job message as a producer builds it: its list and its payload."""
    body = {"messages": [{"role": "user", "content": "hi"}]}
    return job_message(make_celery(settings), body, uuid.uuid4().hex, priority, settings.queue_name)


def push(client: redis.Redis, settings: Settings, priority: int = 0) -> dict[str, Any]:
    """Push one job message as a producer does; returns it as pushed."""
    name, message = build(settings, priority)
    client.lpush(name, message)
    return dict(json.loads(message))


def task_id(message: Message) -> str:
    return str(message.headers["id"])


def test_a_burst_is_taken_in_one_wait_in_order_and_recorded_as_kombu_would(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    pushed = [push(redis_client, hermes_settings) for _ in range(5)]
    taker = Taker(hermes_settings, prefetch=10)
    takers.append(taker)

    got = taker.drain_once()

    assert [task_id(m) for m in got] == [p["headers"]["id"] for p in pushed]
    assert redis_client.llen(hermes_settings.queue_name) == 0
    for message, payload in zip(got, pushed, strict=True):
        tag = message.delivery_tag
        assert redis_client.zscore(UNACKED_INDEX, tag) is not None
        # [message, exchange, routing key]: what kombu's QoS.append writes and restores from.
        stored = json.loads(redis_client.hget(UNACKED, tag) or b"null")
        assert stored == [payload, "", hermes_settings.queue_name]

    for message in got:
        message.ack()
    assert not any(redis_client.hexists(UNACKED, m.delivery_tag) for m in got)
    assert not any(redis_client.zscore(UNACKED_INDEX, m.delivery_tag) for m in got)


def test_a_burst_stops_at_the_prefetch_limit(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    for _ in range(5):
        push(redis_client, hermes_settings)
    taker = Taker(hermes_settings, prefetch=3)
    takers.append(taker)

    assert len(taker.drain_once()) == 3
    assert redis_client.llen(hermes_settings.queue_name) == 2


@pytest.mark.parametrize("batch", [1, 2])
def test_the_delivery_batch_setting_bounds_a_burst(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker], batch: int
) -> None:
    for _ in range(5):
        push(redis_client, hermes_settings)
    taker = Taker(hermes_settings.model_copy(update={"delivery_batch": batch}), prefetch=10)
    takers.append(taker)

    assert len(taker.drain_once()) == batch
    assert redis_client.llen(hermes_settings.queue_name) == 5 - batch


def test_a_burst_is_taken_most_urgent_first(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    pushed = [push(redis_client, hermes_settings, priority) for priority in (9, 5, 0, 5, 9, 0)]
    taker = Taker(hermes_settings, prefetch=4)
    takers.append(taker)

    got = taker.drain_once()

    by_id = {p["headers"]["id"]: p["properties"]["priority"] for p in pushed}
    assert [by_id[task_id(m)] for m in got] == [0, 0, 5, 5]


def test_a_message_taken_in_a_burst_and_never_acked_is_restored(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    pushed = [push(redis_client, hermes_settings, 3) for _ in range(3)]
    taker = Taker(hermes_settings, prefetch=10)
    takers.append(taker)
    got = taker.drain_once()
    assert len(got) == 3
    last = got[-1]  # taken by the Lua call, not by BRPOP

    # What the visibility sweep does for each stale entry, as for a worker that died.
    taker.channel.qos.restore_by_tag(last.delivery_tag)

    restored = redis_client.lrange(f"{hermes_settings.queue_name}:3", 0, -1)
    assert len(restored) == 1
    message = json.loads(restored[0])
    assert message["headers"]["id"] == pushed[-1]["headers"]["id"]
    assert message["body"] == pushed[-1]["body"]
    assert message["properties"]["delivery_info"]["redelivered"] is True
    assert not redis_client.hexists(UNACKED, last.delivery_tag)


def test_a_message_taken_but_not_recorded_goes_back_on_its_queue(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    # Given a message, and a consumer whose record of it fails after BRPOP popped it (the
    # master killed in between, in a failover)
    pushed = push(redis_client, hermes_settings)
    taker = Taker(hermes_settings, prefetch=1)
    takers.append(taker)

    def lost_connection(**_: Any) -> None:
        raise redis.ConnectionError("Connection closed by server.")

    taker.channel._record_script = lost_connection
    # When it takes the message, Then the error reaches the consumer (which reconnects) and
    # nothing is delivered
    with pytest.raises(redis.ConnectionError):
        taker.drain_once()
    assert taker.got == []
    # And the message is back on its queue, under a new delivery tag, marked redelivered
    deadline = time.monotonic() + 5
    while not redis_client.llen(hermes_settings.queue_name):
        assert time.monotonic() < deadline, "the message never came back"
        time.sleep(0.01)
    [back] = [json.loads(m) for m in redis_client.lrange(hermes_settings.queue_name, 0, -1)]
    assert back["headers"]["id"] == pushed["headers"]["id"] and back["body"] == pushed["body"]
    assert back["properties"]["delivery_tag"] != pushed["properties"]["delivery_tag"]
    assert back["properties"]["delivery_info"]["redelivered"] is True
    assert not redis_client.hexists(UNACKED, pushed["properties"]["delivery_tag"])


def held_without_record(
    settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> tuple[dict[str, Any], Taker, Any]:
    """A message pushed, taken by a consumer, and its unacked record removed (as if written
    on a master that a failover then threw away): the message, the consumer, what it got."""
    pushed = push(redis_client, settings)
    taker = Taker(settings, prefetch=1)
    takers.append(taker)
    [got] = taker.drain_once()
    redis_client.hdel(UNACKED, got.delivery_tag)
    return pushed, taker, got


@pytest.mark.parametrize("how", ["reject", "connection lost"])
def test_a_held_message_the_master_has_no_record_of_goes_back_from_the_workers_copy(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker], how: str
) -> None:
    # Given a message a consumer holds, whose record is not in the unacked hash (it was
    # written on a master that a failover then threw away)
    pushed, taker, got = held_without_record(hermes_settings, redis_client, takers)
    # When it is rejected with requeue, or the consumer's connection is lost
    if how == "reject":
        got.reject(requeue=True)
    else:
        taker.channel.qos.restore_unacked()
    # Then the consumer's own copy is back on the queue, under a new delivery tag
    [back] = [json.loads(m) for m in redis_client.lrange(hermes_settings.queue_name, 0, -1)]
    assert back["headers"]["id"] == pushed["headers"]["id"] and back["body"] == pushed["body"]
    assert back["properties"]["delivery_tag"] != pushed["properties"]["delivery_tag"]
    assert redis_client.zscore(UNACKED_INDEX, got.delivery_tag) is None


def test_a_held_message_goes_back_once_a_refusing_redis_takes_it(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    # Given a message a consumer holds, and a connection that Redis refuses as the
    # consumer puts its messages back (a master that lost its replicas, say)
    pushed, taker, got = held_without_record(hermes_settings, redis_client, takers)

    class Refusing:
        def transaction(self, *_: Any, **__: Any) -> None:
            raise redis.ConnectionError("the master refuses writes: NOREPLICAS")

    # When it puts them back, Then its copy gets there all the same, from a new connection
    taker.channel.qos.restore_unacked(Refusing())
    assert wait_for(lambda: bool(redis_client.llen(hermes_settings.queue_name)), 5)
    [back] = [json.loads(m) for m in redis_client.lrange(hermes_settings.queue_name, 0, -1)]
    assert back["headers"]["id"] == pushed["headers"]["id"]
    assert redis_client.zscore(UNACKED_INDEX, got.delivery_tag) is None  # no sweep's copy


def test_items_in_a_burst_that_are_not_messages_are_dropped_and_the_rest_delivered(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    first = push(redis_client, hermes_settings)
    redis_client.lpush(hermes_settings.queue_name, b"\x00 not a kombu message \xff")
    # JSON that Redis's Lua parser reads, with a delivery tag that kombu reads otherwise
    # (invalid UTF-8, which kombu decodes with replacement characters).
    name, payload = build(hermes_settings)
    odd = json.loads(payload)
    tag = odd["properties"]["delivery_tag"]
    redis_client.lpush(name, payload.encode().replace(tag.encode(), b"bad-\xff-tag"))
    # A message in every field but its body, which is not base64: kombu cannot read it.
    name, payload = build(hermes_settings)
    unreadable = json.loads(payload)
    unreadable["body"] = "not base64!"
    redis_client.lpush(name, json.dumps(unreadable))
    # The start of one of our messages, then no JSON: recorded by the Lua call, which reads
    # the tag off the start alone, and kombu cannot read it.
    name, payload = build(hermes_settings)
    cut = json.loads(payload)["properties"]["delivery_tag"]
    redis_client.lpush(name, payload[: len(payload) // 2])
    last = push(redis_client, hermes_settings)
    taker = Taker(hermes_settings, prefetch=10)
    takers.append(taker)

    got = taker.drain_once()

    ids = [task_id(m) for m in got]
    assert ids == [first["headers"]["id"], odd["headers"]["id"], last["headers"]["id"]]
    assert redis_client.llen(hermes_settings.queue_name) == 0
    # The odd one is recorded under the tag kombu will ack, not the one Lua read.
    assert not redis_client.hexists(UNACKED, b"bad-\xff-tag")
    assert not redis_client.hexists(UNACKED, unreadable["properties"]["delivery_tag"])
    assert not redis_client.hexists(UNACKED, cut)
    assert all(redis_client.hexists(UNACKED, m.delivery_tag) for m in got)
    for message in got:
        message.ack()
    assert not any(redis_client.hexists(UNACKED, m.delivery_tag) for m in got)


def test_the_burst_call_reads_the_tag_off_the_start_of_our_messages_and_decodes_others(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    # Given, on one list: a message as our producers write it (the delivery tag and info
    # first), the same message with its properties last (as Celery's send_task orders it),
    # one whose routing key JSON escapes, and the start of one of ours followed by no JSON
    app = make_celery(hermes_settings)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    ours = job_message(app, body, "a", 0, "jobs")[1]
    parsed = json.loads(ours)
    properties = parsed.pop("properties")
    last = json.dumps({**parsed, "properties": {**properties, "delivery_tag": "tag-last"}})
    escaped = job_message(app, body, "b", 0, "jobs-\u00e9")[1]
    cut = job_message(app, body, "c", 0, "jobs")[1]
    cut = cut[: cut.index('"body"')] + "and no JSON after the head"
    items = [ours, last, escaped, cut]
    prefix = hermes_settings.key_prefix
    index, unacked, queue = f"{prefix}index", f"{prefix}unacked", f"{prefix}list"
    redis_client.rpush(queue, *reversed(items))  # RPOP takes them in this order
    # When the burst call takes them
    script = redis_client.register_script(scripts.TAKE_MORE)
    taken = script(keys=[index, unacked, unacked, queue], args=[10, time.time(), "0"])
    # Then each is recorded under its own tag, with its delivery info: the first, second and
    # third as kombu's QoS would record them, and the last one although Redis could not
    # have decoded it (Python finds it unreadable and forgets the record)
    tags = [tag.decode() for tag in taken[2::3]]
    expected = [json.loads(ours)["properties"]["delivery_tag"], "tag-last"]
    expected += [json.loads(escaped)["properties"]["delivery_tag"], tags[3]]
    assert tags == expected and tags[3]
    assert [item.decode() for item in taken[1::3]] == items
    for item, tag, route in zip(items[:3], tags[:3], ["jobs", "jobs", "jobs-\u00e9"], strict=True):
        assert json.loads(redis_client.hget(unacked, tag) or b"null") == [
            json.loads(item),
            "",
            route,
        ]
    assert (redis_client.hget(unacked, tags[3]) or b"").decode() == f'[{cut},"","jobs"]'
    assert redis_client.zcard(index) == 4
    redis_client.delete(index, unacked)


def test_a_server_that_refuses_the_burst_call_gets_one_message_per_wait(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    # An ACL written for stock kombu (no RPOP): the worker keeps consuming, one at a time.
    user, password = f"no-rpop-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis_client.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-rpop"],
    )
    try:
        for _ in range(4):
            push(redis_client, hermes_settings)
        url = hermes_settings.redis_url.replace("redis://", f"redis://{user}:{password}@")
        taker = Taker(hermes_settings, prefetch=10, url=url)
        takers.append(taker)

        assert len(taker.drain_once()) == 1
        assert len(taker.drain_once()) == 1
        assert redis_client.llen(hermes_settings.queue_name) == 2
        assert all(redis_client.hexists(UNACKED, m.delivery_tag) for m in taker.got)
        for message in taker.got:
            message.ack()  # while the user still exists
    finally:
        redis_client.acl_deluser(user)


def test_room_made_by_another_thread_wakes_a_full_consumers_event_loop(
    hermes_settings: Settings, redis_client: redis.Redis, takers: list[Taker]
) -> None:
    # Celery's threads pool acks from the job's thread while the consumer's event loop,
    # full (no room: no BRPOP sent), sleeps until its next timer: kombu's are 1 s apart
    # here, so the next message waited 0.5 s on average for the loop to look again.
    rounds = 7
    for _ in range(rounds + 1):
        push(redis_client, hermes_settings)
    taker = Taker(hermes_settings, prefetch=1)
    takers.append(taker)
    hub = Hub()
    taker.connection.transport.register_with_event_loop(taker.connection.connection, hub)
    loop = hub.create_loop()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            next(loop)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    waits = []
    try:
        for n in range(1, rounds + 1):
            assert wait_for(lambda n=n: len(taker.got) == n, 10)
            time.sleep(0.3)  # the loop sleeps, with no room for the next message
            assert len(taker.got) == n
            acked = time.monotonic()
            taker.got[-1].ack()
            assert wait_for(lambda n=n: len(taker.got) == n + 1, 10)
            waits.append(time.monotonic() - acked)
    finally:
        stop.set()
        taker.connection.transport.wake_event_loop()
        thread.join(12)
    assert not thread.is_alive()
    # Without the wake, each wait falls anywhere in the timer's second: a median under
    # 0.15 s then has odds of about 1 in 100.
    assert sorted(waits)[rounds // 2] < 0.15, waits


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
