"""Notices: every script that writes a job's events stream names the job, in the same call, on
the notice stream of the client that submitted it (``Keys.notices`` beside its ends stream);
the asyncio client's hub blocks on that one stream instead of on every stream it follows,
then reads only the streams named. Real Redis; the worker is the scripted engine's in-process
runtime (tests/lifecycle_fixtures.py) where a whole job runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import pytest
import redis
from conftest import TEST_REDIS_URL as REDIS_URL
from lifecycle_fixtures import STORY, Harness, job
from redis.asyncio import Redis as AsyncRedis
from test_ends_streams import submit_as_another_producer

import producers.hub as hub_module
from hermes_worker.contract import scripts
from hermes_worker.contract.jobs import JobStatus
from hermes_worker.contract.store import (
    ENDS_TTL_S,
    NOTICE_CARRY_BYTES,
    Keys,
    encode_event,
)
from hermes_worker.settings import Settings
from producers.client import AsyncHermesClient, HermesClient
from producers.hub import StreamHub


def notices_on(r: redis.Redis, key: str) -> list[list[str]]:
    """The job ids each entry of a notice stream names, oldest first."""
    return [fields[b"ids"].decode().split() for _, fields in r.xrange(key)]


def write_call(
    keys: Keys, writes: list[tuple[str, str, str, list[Any]]]
) -> tuple[list[str], list[Any]]:
    """A WRITE call as a worker's flush makes it: (job id, lease token, notice stream, ops)
    per job."""
    call_keys: list[str] = [keys.ends]
    args: list[Any] = [60]
    for job_id, token, notices, ops in writes:
        call_keys += [keys.lease(job_id), keys.job(job_id), keys.events(job_id)]
        args += [token, notices, len(ops), *ops]
    return call_keys, args


def event(seq: int, text: str) -> list[Any]:
    fields = encode_event(seq, "content", {"text": text})
    return ["x", fields["seq"], fields["type"], fields["data"]]


# --- the scripts --------------------------------------------------------------------------------


def test_a_flush_names_each_clients_written_jobs_once_on_its_notice_stream(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    r, keys = redis_client, Keys(hermes_settings.key_prefix)
    with HermesClient(hermes_settings) as a, HermesClient(hermes_settings) as b:
        # Given two jobs of client A, one of client B, each running under its lease
        a1, a2, b1 = (c.submit(job({"text": STORY})).id for c in (a, a, b))
        fenced, quiet = a.submit(job({"text": STORY})).id, b.submit(job({"text": STORY})).id
        other = "another-producers-job"
        for job_id in (a1, a2, b1, fenced, quiet, other):
            r.set(keys.lease(job_id), "token")
        a_notices, b_notices = keys.notices(a.ends_key), keys.notices(b.ends_key)
        # When one flush writes events for the three, events for a fourth whose lease is
        # another's, only a record field for a fifth, and events of a job with no notice
        # stream (its record names no client's ends stream)
        call_keys, args = write_call(
            keys,
            [
                (a1, "token", a_notices, event(1, "a1")),
                (b1, "token", b_notices, event(1, "b1")),
                (fenced, "stolen", a_notices, event(1, "no")),
                (quiet, "token", b_notices, ["h", 1, "status", "running"]),
                (other, "token", "", event(1, "other")),
                (a2, "token", a_notices, [*event(1, "a2"), *event(2, "a2 again")]),
            ],
        )
        written = r.register_script(scripts.WRITE)(keys=call_keys, args=args)
        # Then each client's notice stream has one entry naming its jobs written, in order
        assert written == [1, 1, 0, 1, 1, 1]
        assert notices_on(r, a_notices) == [[a1, a2]]
        assert notices_on(r, b_notices) == [[b1]]
        # And the streams expire like the ends streams beside them; no other key was made
        assert ENDS_TTL_S - 60 < r.ttl(a_notices) <= ENDS_TTL_S
        assert sorted(k.decode() for k in r.scan_iter(f"{keys.prefix}ends*")) == sorted(
            [a_notices, b_notices]
        )


def test_a_cancel_names_the_job_and_another_producers_job_gets_no_notice(
    harness: Harness,
) -> None:
    r, keys = harness.redis, harness.keys
    with HermesClient(harness.settings) as client:
        # Given a queued job of a client and one of a producer that names no ends stream
        mine = client.submit(job({"text": STORY}))
        theirs = submit_as_another_producer(harness)
        # When both are cancelled while queued (CANCEL writes their terminal events)
        assert mine.cancel() == "cancelled"
        assert harness.client.job(theirs).cancel() == "cancelled"
        # Then the client's job is named on its notice stream, the other job nowhere
        assert notices_on(r, keys.notices(client.ends_key)) == [[mine.id]]
        written = [k.decode() for k in r.scan_iter(f"{keys.prefix}ends:*:written")]
        assert written == [keys.notices(client.ends_key)]


def test_a_flushs_notice_carries_the_events_it_announces_unless_they_are_large(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    r, keys = redis_client, Keys(hermes_settings.key_prefix)
    notices = keys.notices(keys.ends_for("client"))
    for job_id in ("small", "large"):
        r.set(keys.lease(job_id), "token")
    # When one flush writes two events of one job and a large one of another
    large = "x" * (NOTICE_CARRY_BYTES + 1)
    call_keys, args = write_call(
        keys,
        [
            ("small", "token", notices, [*event(1, "one"), *event(2, "two")]),
            ("large", "token", notices, event(1, large)),
        ],
    )
    assert r.register_script(scripts.WRITE)(keys=call_keys, args=args) == [1, 1]
    # Then the notice names both, and carries the small job's events as its stream holds
    # them: a field each, '<job id> <entry id> <seq> <type>', the data as value
    [(_, fields)] = r.xrange(notices)
    assert fields.pop(b"ids").decode() == "small large"
    held = r.xrange(keys.events("small"))
    assert {k.decode(): v for k, v in fields.items()} == {
        f"small {entry_id.decode()} {f[b'seq'].decode()} content": f[b"data"]
        for entry_id, f in held
    }
    assert len(held) == 2
    # And the large job's event is in its stream only
    assert [f[b"data"].decode() for _, f in r.xrange(keys.events("large"))] == [
        encode_event(1, "content", {"text": large})["data"]
    ]


# --- the hub ------------------------------------------------------------------------------------


class RecordingRedis(AsyncRedis):
    """A real client that records the keys of each XREAD it sends, and whether it blocked."""

    sent: ClassVar[list[tuple[list[str], bool]]] = []

    async def xread(self, streams: Any, *args: Any, **kwargs: Any) -> Any:
        type(self).sent.append(([str(k) for k in streams], kwargs.get("block") is not None))
        return await super().xread(streams, *args, **kwargs)


def notice(keys: Keys, ends: str, job_ids: list[str], texts: dict[str, str]) -> None:
    """Events for these jobs and their notice, in one pipeline, as a worker's flush does."""
    client = redis.Redis.from_url(REDIS_URL)
    with client.pipeline(transaction=True) as pipe:
        for job_id in job_ids:
            seq = 1 + client.xlen(keys.events(job_id))
            pipe.xadd(keys.events(job_id), encode_event(seq, "content", {"text": texts[job_id]}))
        pipe.xadd(keys.notices(ends), {"ids": " ".join(job_ids)})
        pipe.execute()


def test_the_hub_blocks_on_the_notice_stream_and_reads_only_the_streams_named(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "NOTICE_SWEEP_S", 60.0)
    ends = keys.ends_for("client")
    jobs = [f"j{i}" for i in range(40)]

    async def scenario() -> dict[str, Any]:
        client = RecordingRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=5.0, count=256)
        # Given a hub following 40 streams by notice, the first with an event already
        await asyncio.to_thread(notice, keys, "elsewhere", ["j0"], {"j0": "before"})
        subs = {
            j: await hub.follow(keys.events(j), "0-0", notices=keys.notices(ends), job_id=j)
            for j in jobs
        }
        early = [e.data["text"] for e in await subs["j0"].get(2.0)]
        await asyncio.sleep(0.2)
        RecordingRedis.sent = []
        # When a flush writes 2 of them and names them, and another writes one unnamed
        await asyncio.to_thread(notice, keys, ends, ["j3", "j7"], {"j3": "three", "j7": "seven"})
        got = {j: [e.data["text"] for e in await subs[j].get(2.0)] for j in ("j3", "j7")}
        await asyncio.to_thread(notice, keys, "elsewhere", ["j9"], {"j9": "unnamed"})
        unnamed = await subs["j9"].get(0.5)
        sent = list(RecordingRedis.sent)
        await hub.aclose()
        await client.aclose()
        return {"early": early, "got": got, "unnamed": unnamed, "sent": sent}

    seen = asyncio.run(scenario())
    # Then what the stream held when followed came at once
    assert seen["early"] == ["before"]
    # And the named streams got their events
    assert seen["got"] == {"j3": ["three"], "j7": ["seven"]}
    # And no XREAD blocked on a job's stream: the blocking ones named the notice stream and
    # the wake stream; the one that read the jobs named those two only, without blocking
    blocking = [names for names, blocked in seen["sent"] if blocked]
    plain = [names for names, blocked in seen["sent"] if not blocked]
    assert blocking and all(
        set(names) <= {keys.notices(ends)} | {n for n in names if ":hub:" in n}
        for names in blocking
    ), blocking
    assert plain == [[keys.events("j3"), keys.events("j7")]] or sorted(plain[0]) == sorted(
        [keys.events("j3"), keys.events("j7")]
    ), plain
    # And an event no notice named was not read (the sweep is a minute away here)
    assert seen["unnamed"] == []


def test_a_stream_no_notice_names_is_still_read_within_the_sweep(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "NOTICE_SWEEP_S", 0.3)
    ends = keys.ends_for("client")

    async def scenario() -> tuple[list[str], float]:
        client = AsyncRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=5.0, count=256)
        sub = await hub.follow(keys.events("old"), "0-0", notices=keys.notices(ends), job_id="old")
        await asyncio.sleep(0.1)
        # Given a worker that sends no notice (older than notices, or one Redis refused)
        start = time.monotonic()
        await asyncio.to_thread(notice, keys, "elsewhere", ["old"], {"old": "late"})
        got = [e.data["text"] for e in await sub.get(3.0)]
        took = time.monotonic() - start
        await hub.aclose()
        await client.aclose()
        return got, took

    got, took = asyncio.run(scenario())
    # Then the hub read it all the same, within about two sweeps, not at its 5 s block's end
    assert got == ["late"]
    assert took < 2.0


def test_a_stream_longer_than_a_read_is_read_whole_in_order(keys: Keys) -> None:
    ends = keys.ends_for("client")

    async def scenario() -> list[str]:
        for n in range(10):
            await asyncio.to_thread(notice, keys, "elsewhere", ["long"], {"long": f"t{n}"})
        client = AsyncRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=5.0, count=4)
        sub = await hub.follow(
            keys.events("long"), "0-0", notices=keys.notices(ends), job_id="long"
        )
        texts: list[str] = []
        deadline = time.monotonic() + 3.0
        while len(texts) < 10 and time.monotonic() < deadline:
            texts += [e.data["text"] for e in await sub.get(1.0)]
        await hub.aclose()
        await client.aclose()
        return texts

    # Then the 10 entries came in order, 4 a read, without waiting for a notice or a sweep
    assert asyncio.run(scenario()) == [f"t{n}" for n in range(10)]


def carrying_notice(keys: Keys, ends: str, job_id: str, texts: list[str]) -> None:
    """A worker's flush of events for one job (the next seqs of its stream), through the
    WRITE script: the notice it writes carries them."""
    client = redis.Redis.from_url(REDIS_URL)
    client.set(keys.lease(job_id), "token", ex=60)
    seq = 1 + client.xlen(keys.events(job_id))
    ops = [op for n, text in enumerate(texts) for op in event(seq + n, text)]
    call_keys, args = write_call(keys, [(job_id, "token", keys.notices(ends), ops)])
    client.register_script(scripts.WRITE)(keys=call_keys, args=args)
    client.close()


def test_the_hub_takes_the_events_a_notice_carries_without_reading_the_stream(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "NOTICE_SWEEP_S", 60.0)
    ends = keys.ends_for("client")

    async def scenario() -> dict[str, Any]:
        client = RecordingRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=5.0, count=256)
        # Given a hub following two jobs by notice from the start of their (empty) streams
        subs = {
            j: await hub.follow(keys.events(j), "0-0", notices=keys.notices(ends), job_id=j)
            for j in ("a", "b")
        }
        await asyncio.sleep(0.2)
        RecordingRedis.sent = []
        # When flushes write their events, two and then one for a, one for b
        got: dict[str, list[str]] = {"a": [], "b": []}
        await asyncio.to_thread(carrying_notice, keys, ends, "a", ["a1", "a2"])
        await asyncio.to_thread(carrying_notice, keys, ends, "b", ["b1"])
        await asyncio.to_thread(carrying_notice, keys, ends, "a", ["a3"])
        for j, n in (("a", 3), ("b", 1)):
            while len(got[j]) < n:
                batch = await subs[j].get(2.0)
                assert batch, got
                got[j] += [e.data["text"] for e in batch]
        # And the followers go on from there when the stream is read later (a sweep)
        cursor = subs["a"].cursor
        sent = list(RecordingRedis.sent)
        await hub.aclose()
        await client.aclose()
        return {"got": got, "sent": sent, "cursor": cursor}

    seen = asyncio.run(scenario())
    # Then each follower got its events, in order, once
    assert seen["got"] == {"a": ["a1", "a2", "a3"], "b": ["b1"]}
    # And no XREAD named a job's stream: every one was the hub's blocking read
    assert seen["sent"] and all(blocked for _, blocked in seen["sent"]), seen["sent"]
    assert not any(keys.events(j) in names for names, _ in seen["sent"] for j in ("a", "b"))
    # And the cursor is the stream's last entry id
    last = redis.Redis.from_url(REDIS_URL).xrevrange(keys.events("a"), count=1)
    assert seen["cursor"] == last[0][0].decode()


def test_carried_events_after_a_gap_send_the_hub_to_the_stream(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "NOTICE_SWEEP_S", 60.0)
    ends = keys.ends_for("client")

    async def scenario() -> tuple[list[int], list[tuple[list[str], bool]]]:
        client = RecordingRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=5.0, count=256)
        sub = await hub.follow(keys.events("g"), "0-0", notices=keys.notices(ends), job_id="g")
        await asyncio.sleep(0.2)
        RecordingRedis.sent = []
        # Given an event written with no notice (a worker older than notices, a notice
        # Redis refused), then a flush whose notice carries the next one
        await asyncio.to_thread(notice, keys, "elsewhere", ["g"], {"g": "unnamed"})
        await asyncio.to_thread(carrying_notice, keys, ends, "g", ["carried"])
        seqs: list[int] = []
        while len(seqs) < 2:
            batch = await sub.get(2.0)
            assert batch, seqs
            seqs += [e.seq for e in batch]
        sent = list(RecordingRedis.sent)
        await hub.aclose()
        await client.aclose()
        return seqs, sent

    seqs, sent = asyncio.run(scenario())
    # Then the carried event did not follow the last one it had (seq 2 after 0): the hub
    # read the stream instead, and the follower got both, in order, once
    assert seqs == [1, 2]
    assert [names for names, blocked in sent if not blocked] == [[keys.events("g")]]


def flushes(keys: Keys, ends: str, jobs: list[str], count: int, gap_s: float) -> None:
    """``count`` flushes through WRITE, ``gap_s`` apart, each one event of the next job in
    turn, as workers' flushes reach a client whose jobs run on many workers."""
    client = redis.Redis.from_url(REDIS_URL)
    write = client.register_script(scripts.WRITE)
    for job_id in jobs:
        client.set(keys.lease(job_id), "token", ex=60)
    for n in range(count):
        job_id = jobs[n % len(jobs)]
        ops = event(1 + n // len(jobs), f"{job_id}-{n // len(jobs)}")
        write(*write_call(keys, [(job_id, "token", keys.notices(ends), ops)]))
        time.sleep(gap_s)
    client.close()


@pytest.mark.parametrize("interval_s", [0.0, 0.1])
def test_a_hub_woken_faster_than_its_read_interval_takes_the_notices_a_few_at_a_time(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, interval_s: float
) -> None:
    monkeypatch.setattr(hub_module, "NOTICE_SWEEP_S", 60.0)
    ends = keys.ends_for(f"client-{interval_s}")
    jobs = [f"p{interval_s}-{i}" for i in range(8)]

    async def scenario() -> tuple[dict[str, list[str]], int, float]:
        client = RecordingRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=5.0, count=256, interval_s=interval_s)
        subs = {
            j: await hub.follow(keys.events(j), "0-0", notices=keys.notices(ends), job_id=j)
            for j in jobs
        }
        await asyncio.sleep(0.2)
        RecordingRedis.sent = []
        # When 160 flushes come 5 ms apart (a client's notices from a fleet's workers)
        start = time.monotonic()
        writer = asyncio.create_task(asyncio.to_thread(flushes, keys, ends, jobs, 160, 0.005))
        got: dict[str, list[str]] = {j: [] for j in jobs}
        while sum(map(len, got.values())) < 160:
            for j, sub in subs.items():
                got[j] += [e.data["text"] for e in await sub.get(0.01)]
            assert time.monotonic() - start < 20, got
        await writer
        took = time.monotonic() - start
        reads = sum(blocked for _, blocked in RecordingRedis.sent)
        await hub.aclose()
        await client.aclose()
        return got, reads, took

    got, reads, took = asyncio.run(scenario())
    # Then every follower got its events, in order, once
    assert got == {j: [f"{j}-{n}" for n in range(20)] for j in jobs}
    if interval_s:
        # And the hub's blocking reads started at most one an interval (plus the first)
        assert reads <= took / interval_s + 2, (reads, took)
    else:
        # And without an interval the hub reads about as often as notices come: more than
        # twice as often as an interval of 0.1 s would let it
        assert reads > 2 * (took / 0.1 + 2), (reads, took)


def test_a_paced_hub_that_waited_longer_than_its_interval_reads_at_once(keys: Keys) -> None:
    ends = keys.ends_for("idle-client")

    async def scenario() -> float:
        client = AsyncRedis.from_url(REDIS_URL)
        hub = StreamHub(client, keys.prefix, block_s=5.0, count=256, interval_s=2.0)
        sub = await hub.follow(
            keys.events("idle"), "0-0", notices=keys.notices(ends), job_id="idle"
        )
        # Given a hub with a 2 s interval, blocked on its notices for longer than that
        await asyncio.sleep(2.5)
        # When a flush writes its job's first event
        start = time.monotonic()
        await asyncio.to_thread(carrying_notice, keys, ends, "idle", ["now"])
        assert [e.data["text"] for e in await sub.get(5.0)] == ["now"]
        took = time.monotonic() - start
        await hub.aclose()
        await client.aclose()
        return took

    # Then it came at once, not at the end of an interval
    assert asyncio.run(scenario()) < 1.0


def test_a_job_just_submitted_is_followed_without_a_first_read_of_its_stream(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "NOTICE_SWEEP_S", 60.0)
    keys = harness.keys

    async def texts(handle: Any, n: int) -> list[str]:
        got: list[str] = []
        async for event in handle.stream(timeout=10):
            got.append(event.data["text"])
            if len(got) == n:
                return got
        return got

    async def scenario() -> dict[str, Any]:
        counting = RecordingRedis.from_url(REDIS_URL)
        async with AsyncHermesClient(harness.settings, redis=counting) as client:
            ends = client.ends_key
            # Given a client whose hub reads its notice stream (it follows a queued job)
            first = await client.submit(job({"text": STORY}))
            keep = asyncio.create_task(texts(first, 1))
            await asyncio.sleep(0.3)
            # When it submits a job, follows it, and a worker writes it (notice and all)
            RecordingRedis.sent = []
            quiet = await client.submit(job({"text": STORY}))
            following = asyncio.create_task(texts(quiet, 2))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(carrying_notice, keys, ends, quiet.id, ["q1", "q2"])
            got = await asyncio.wait_for(following, 5)
            quiet_reads = [names for names, _ in RecordingRedis.sent]
            # And submits one that is written before it is followed (its notice read by
            # the hub with no follower yet)
            early = await client.submit(job({"text": STORY}))
            await asyncio.to_thread(carrying_notice, keys, ends, early.id, ["e1"])
            await asyncio.sleep(0.3)
            RecordingRedis.sent = []
            early_got = await asyncio.wait_for(texts(early, 1), 5)
            early_reads = [names for names, _ in RecordingRedis.sent]
            keep.cancel()
        await counting.aclose()
        return {
            "got": got,
            "quiet": quiet_reads,
            "early": (early_got, early_reads),
            "ids": (quiet.id, early.id),
        }

    seen = asyncio.run(scenario())
    quiet_id, early_id = seen["ids"]
    # Then the job followed at once got its events from the notice, its stream never read
    assert seen["got"] == ["q1", "q2"]
    assert not any(keys.events(quiet_id) in names for names in seen["quiet"]), seen["quiet"]
    # And the job written before it was followed was read at its follow, and got its event
    early_got, early_reads = seen["early"]
    assert early_got == ["e1"]
    assert any(keys.events(early_id) in names for names in early_reads), early_reads


# --- the client ---------------------------------------------------------------------------------


def test_an_async_client_streams_its_jobs_and_others_by_notice_and_blocking(
    harness: Harness,
) -> None:
    harness.start()

    async def scenario() -> dict[str, Any]:
        async with AsyncHermesClient(harness.settings) as client:
            # Given a job this client submitted, one submitted by another producer, and the
            # first again through a handle that has to read its record
            mine = await client.submit(job({"text": STORY}))
            theirs = client.job(submit_as_another_producer(harness))
            again = client.job(mine.id)

            async def follow(handle: Any) -> list[str]:
                return [e.type async for e in handle.stream(timeout=20)]

            tasks = [asyncio.create_task(follow(h)) for h in (mine, theirs, again)]
            # When both run
            for job_id in (mine.id, theirs.id):
                status = await asyncio.to_thread(
                    lambda j=job_id: harness.deliver(harness.runtimes[0], j).result(timeout=20)
                )
                assert status is JobStatus.SUCCEEDED
            types = await asyncio.wait_for(asyncio.gather(*tasks), 20)
            pattern = f"{harness.keys.prefix}ends:*:written"
            return {
                "types": types,
                "named": [
                    fields[b"ids"].decode()
                    for _, fields in await client.redis.xrange(
                        harness.keys.notices(client.ends_key)
                    )
                ],
                "streams": [k.decode() async for k in client.redis.scan_iter(pattern)],
                "mine": mine.id,
                "notices": harness.keys.notices(client.ends_key),
            }

    seen = asyncio.run(scenario())
    # Then every follower read its job's whole stream, up to its end
    for types in seen["types"]:
        assert types[0] == "started" and types[-1] == "done", types
        assert "content" in types
    assert seen["types"][0] == seen["types"][2]
    # And the worker named the client's job on its notice stream, whenever it wrote its
    # stream (started, the text, the end), and named the other producer's job nowhere
    assert seen["named"] and set(" ".join(seen["named"]).split()) == {seen["mine"]}
    assert seen["streams"] == [seen["notices"]]


def test_a_client_with_a_read_interval_streams_every_job_whole_through_a_worker(
    harness: Harness,
) -> None:
    harness.start()
    settings = harness.settings.model_copy(update={"client_read_interval_ms": 100.0})

    async def scenario() -> tuple[float, list[list[int]], list[str]]:
        async with AsyncHermesClient(settings) as client:
            # Given a client whose hub reads at most every 100 ms, following 6 jobs
            handles = [await client.submit(job({"text": STORY})) for _ in range(6)]

            async def follow(handle: Any) -> list[int]:
                return [e.seq async for e in handle.stream(timeout=30)]

            tasks = [asyncio.create_task(follow(h)) for h in handles]
            # When a worker runs them all
            for handle in handles:
                status = await asyncio.to_thread(
                    lambda j=handle.id: harness.deliver(harness.runtimes[0], j).result(timeout=30)
                )
                assert status is JobStatus.SUCCEEDED
            seqs = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            results = [(await h.result(timeout=10)).job.status for h in handles]
            return client.hub.interval_s, seqs, results

    interval_s, seqs, results = asyncio.run(scenario())
    # Then the setting reached the hub
    assert interval_s == 0.1
    # And every follower read its job's whole stream, each event once, in order
    for got in seqs:
        assert got == list(range(1, len(got) + 1)) and len(got) >= 3, got
    assert results == ["succeeded"] * 6
