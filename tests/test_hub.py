"""The asyncio client's stream hub on a real Redis: many job streams, one XREAD loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis
from conftest import TEST_REDIS_URL as REDIS_URL
from redis.asyncio import Redis as AsyncRedis

from hermes_worker.contract.store import Keys, encode_event
from producers.hub import READ_MEMORY, ReadSince, StreamHub, entries_by_stream


class CountingRedis(AsyncRedis):
    """A real client that counts the XREADs it sends (to show they are shared)."""

    xreads = 0

    async def xread(self, *args: Any, **kwargs: Any) -> Any:
        type(self).xreads += 1
        return await super().xread(*args, **kwargs)


def write(key: str, seq: int, text: str) -> str:
    client = redis.Redis.from_url(REDIS_URL)
    return client.xadd(key, encode_event(seq, "content", {"text": text})).decode()


def write_all(keys: Keys, jobs: list[str], n: int) -> None:
    """One event for each job in one pipeline, as a worker's flush writes them."""
    with redis.Redis.from_url(REDIS_URL).pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.xadd(keys.events(job), encode_event(n + 1, "content", {"text": f"{job}-{n}"}))
        pipe.execute()


def test_many_streams_are_read_by_shared_xreads_each_in_order(keys: Keys) -> None:
    async def scenario() -> tuple[dict[str, list[str]], int]:
        client = CountingRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=2.0, count=256)
        jobs = [f"j{i}" for i in range(8)]
        subs = {job: await hub.follow(keys.events(job), "0-0") for job in jobs}
        CountingRedis.xreads = 0
        seen: dict[str, list[str]] = {job: [] for job in jobs}
        # Given 5 rounds in which every one of 8 jobs gets an event (as one worker flush)
        for n in range(5):
            await asyncio.to_thread(write_all, keys, jobs, n)
            for job, sub in subs.items():
                while len(seen[job]) < n + 1:
                    seen[job] += [e.data["text"] for e in await sub.get(5.0)]
        await hub.aclose()
        await client.aclose()
        return seen, CountingRedis.xreads

    seen, xreads = asyncio.run(scenario())
    # Then each job got exactly its own events, in order ...
    assert seen == {f"j{i}": [f"j{i}-{n}" for n in range(5)] for i in range(8)}
    # ... through far fewer reads than the 40 one-stream reads a per-job reader would make
    assert xreads <= 20


def test_a_stream_followed_while_the_hub_blocks_is_read_at_once(keys: Keys) -> None:
    async def scenario() -> float:
        client = AsyncRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=4.0, count=256)
        await hub.follow(keys.events("quiet"), "0-0")
        await asyncio.sleep(0.2)  # the hub is now blocked in a 4 s XREAD on "quiet"
        start = time.monotonic()
        sub = await hub.follow(keys.events("new"), "0-0")
        await asyncio.to_thread(write, keys.events("new"), 1, "hello")
        events = await sub.get(3.0)
        took = time.monotonic() - start
        assert [e.data["text"] for e in events] == ["hello"]
        await hub.aclose()
        await client.aclose()
        return took

    # Then the new stream's event came well before the blocked read would have ended
    assert asyncio.run(scenario()) < 3.0


def test_a_follower_starts_after_its_cursor_and_unfollowing_stops_delivery(keys: Keys) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        first = await asyncio.to_thread(write, keys.events("j"), 1, "old")
        client = AsyncRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=1.0, count=256)
        late = await hub.follow(keys.events("j"), first)  # resumes after "old"
        gone = await hub.follow(keys.events("j"), "0-0")
        hub.unfollow(gone)
        await asyncio.to_thread(write, keys.events("j"), 2, "new")
        got = [e.data["text"] for e in await late.get(3.0)]
        missed = [e.data["text"] for e in await gone.get(0.3)]
        await hub.aclose()
        await client.aclose()
        return got, missed

    got, missed = asyncio.run(scenario())
    assert got == ["new"]
    assert missed == []


def test_the_wake_key_expires_and_goes_when_the_hub_closes(keys: Keys) -> None:
    async def scenario() -> tuple[int, int]:
        client = AsyncRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=2.0, count=256)
        await hub.follow(keys.events("a"), "0-0")
        await asyncio.sleep(0.2)
        await hub.follow(keys.events("b"), "0-0")  # wakes the blocked read
        wake = [k async for k in client.scan_iter(f"{keys.prefix}hub:*")]
        ttl = await client.ttl(wake[0]) if wake else -2
        await hub.aclose()
        left = len([k async for k in client.scan_iter(f"{keys.prefix}hub:*")])
        await client.aclose()
        return ttl, left

    ttl, left = asyncio.run(scenario())
    assert 0 < ttl <= 3600
    assert left == 0


def test_xread_replies_of_both_protocols_are_split_by_stream() -> None:
    resp2 = [[b"k1", [(b"1-0", {b"a": b"1"})]], [b"k2", [(b"2-0", {b"b": b"2"})]]]
    resp3 = {b"k1": [[(b"1-0", {b"a": b"1"})]], b"k2": [[(b"2-0", {b"b": b"2"})]]}
    expected = {"k1": [(b"1-0", {b"a": b"1"})], "k2": [(b"2-0", {b"b": b"2"})]}
    assert entries_by_stream(resp2) == expected
    assert entries_by_stream(resp3) == expected
    assert entries_by_stream(None) == {}


def test_a_read_since_vouches_only_for_ids_it_still_remembers() -> None:
    since = ReadSince()
    since.add(["before"])
    mark = since.mark()
    # An id read after the mark is read; one never read is unread
    since.add(["a", "b", "a"])
    assert not since.unread(mark, "a") and since.unread(mark, "c")
    # Once more ids were read since the mark than it remembers, it vouches for none
    since.add([f"x{n}" for n in range(READ_MEMORY)])
    assert not since.unread(mark, "c")
    # While a later mark, within its memory, still works, and forgotten ids are gone
    later = since.mark()
    since.add(["d"])
    assert since.unread(later, "c") and not since.unread(later, "d")
    assert since.unread(later, "b")  # read before this mark and forgotten since
