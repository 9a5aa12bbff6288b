"""Redis failover with Sentinel: real processes (a master, a replica, three sentinels, a
scripted worker), a producer submitting without pause, and a failover in the middle.

Redis replicates asynchronously, and a master that was replaced while it still ran takes
writes until the sentinels demote it: what it acknowledged in between is gone once it
syncs from the new master. What that costs jobs is measured here and printed (``-s`` shows
the report; docs/reliability.md, "Failover", has the figures). Asserted is what holds
whatever the timing: the worker and the producer go on against the new master, every job
submitted before the failover and every one after it completes, no acknowledged job hangs
(it completes or its record is gone: JobLost), and with HERMES_REDIS_WAIT_REPLICAS no
acknowledged submit is lost at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from lifecycle_fixtures import STORY, job
from worker_fixtures import start_worker, stop_worker, wait_ready

from hermes_worker.cli.services import SentinelGroup
from hermes_worker.contract.jobs import JobStatus
from hermes_worker.contract.queue import UNACKED_INDEX_KEY, UNACKED_KEY, celery_config
from hermes_worker.contract.store import (
    NotReplicated,
    SentinelURL,
    async_client,
    sync_client,
)
from hermes_worker.errors import JobLost
from hermes_worker.settings import Settings
from hermes_worker.worker.transport import SENTINEL_TRANSPORT
from producers.client import HermesClient

TOKENS_PER_S = "100"  # a job of STORY's ~30 tokens runs ~0.3 s
SUBMIT_EVERY_S = 0.02
LOAD_BEFORE_S = 2.0  # of submits before the failover
LOAD_AFTER_S = 2.0  # and after the old master is a replica again
RESULT_TIMEOUT_S = 30.0
VISIBILITY_TIMEOUT_S = 10
WAIT_TIMEOUT_MS = 500


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    started = SentinelGroup.start(tmp_path / "redis")
    yield started
    started.stop()


def settings_on(group: SentinelGroup, **fields: object) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        redis_url=group.url,
        key_prefix=f"hermes-test-{tag}:",
        queue_name=f"hermes-test-{tag}",
        **fields,  # type: ignore[arg-type]
    )


def test_a_sentinel_url_names_sentinels_master_and_database() -> None:
    url = SentinelURL.parse("sentinel://app:s%40cret@10.0.0.1,10.0.0.2:26380/3?master=jobs")
    assert url is not None
    assert url.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (url.master, url.db) == ("jobs", 3)
    assert url.master_kwargs() == {"db": 3, "username": "app", "password": "s@cret"}
    assert url.kombu_url() == "sentinel://app:s%40cret@10.0.0.1:26379/3;sentinel://10.0.0.2:26380"
    assert SentinelURL.parse("redis://127.0.0.1:6379/0") is None
    with pytest.raises(ValueError, match="master"):
        SentinelURL.parse("sentinel://10.0.0.1:26379/0")
    config = celery_config(Settings(redis_url="sentinel://h1,h2/3?master=jobs"))
    assert config["broker_url"] == "sentinel://h1:26379/3;sentinel://h2:26379"
    assert config["broker_transport"] == SENTINEL_TRANSPORT
    assert config["broker_transport_options"]["master_name"] == "jobs"


def test_clients_and_scripts_follow_a_failover(group: SentinelGroup) -> None:
    """Both clients find the new master; a script the new master lacks is loaded again."""
    sync = sync_client(group.url)
    script = sync.register_script("return redis.call('INCR', KEYS[1])")
    assert script(keys=["counter"]) == 1
    group.wait_synced(1)
    new_port = group.failover()
    assert sync.connection_pool.get_master_address()[1] == new_port  # type: ignore[attr-defined]
    redis.Redis(port=new_port).script_flush()  # as a master that never saw it
    assert script(keys=["counter"]) == 2  # NOSCRIPT, loaded, run: on the new master

    async def read() -> bytes:
        client = async_client(group.url)
        try:
            return bytes(await client.get("counter"))  # type: ignore[arg-type]
        finally:
            await client.aclose()

    assert asyncio.run(read()) == b"2"
    sync.close()


def test_submit_waits_for_a_replica_when_asked(group: SentinelGroup) -> None:
    """HERMES_REDIS_WAIT_REPLICAS: a submit returns once the replica holds the job, and
    fails with NotReplicated when no replica confirms it in time."""
    settings = settings_on(group, redis_wait_replicas=1, redis_wait_timeout_ms=2000)
    with HermesClient(settings) as client:
        handle = client.submit(job({"text": STORY}))
        replica = redis.Redis(port=group.servers[1].port)
        assert replica.exists(client.keys.job(handle.id))  # already there, not eventually
        waits = group_info(group, "cmdstat_wait")
        assert waits and int(waits["calls"]) >= 1
        replica.close()
    # A replica that has stopped taking the stream: the submit is refused, written all the same.
    stalled = settings_on(group, redis_wait_replicas=1, redis_wait_timeout_ms=300)
    replica_pid = group.servers[1].pid
    assert replica_pid is not None
    os.kill(replica_pid, signal.SIGSTOP)
    try:
        with HermesClient(stalled) as client:
            body = job({"text": STORY})
            started = time.monotonic()
            with pytest.raises(NotReplicated, match="0 of 1 replicas"):
                client.submit(body)
            assert time.monotonic() - started >= 0.3
    finally:
        os.kill(replica_pid, signal.SIGCONT)


def group_info(group: SentinelGroup, section_key: str) -> dict[str, str] | None:
    master = redis.Redis(port=group.master_port())
    stats = master.info("commandstats")
    master.close()
    value = stats.get(section_key.removeprefix("cmdstat_"), stats.get(section_key))
    return value if isinstance(value, dict) else None


@dataclass
class Load:
    """A producer submitting jobs one after another, each submit tried again (same id:
    idempotent) until Redis acknowledges it."""

    client: HermesClient
    acked: dict[str, float] = field(default_factory=dict)  # job id -> when acknowledged
    failed_tries: Counter[str] = field(default_factory=Counter)  # error type -> count
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            body = job({"text": STORY}, id=uuid.uuid4().hex)
            while True:
                try:
                    self.client.submit(body)
                    break
                except redis.RedisError as exc:
                    self.failed_tries[type(exc).__name__] += 1
                    time.sleep(0.05)
            self.acked[body["id"]] = time.monotonic()
            time.sleep(SUBMIT_EVERY_S)


SCENARIOS = {
    # name: (what happens to the master, HERMES_REDIS_WAIT_REPLICAS, min-replicas-to-write)
    "switch-over": ("sentinel-failover", 0, 0),
    "kill": ("kill-master", 0, 0),
    "freeze": ("freeze-master", 0, 0),
    "freeze-wait": ("freeze-master", 1, 0),
    "freeze-min-replicas": ("freeze-master", 0, 1),
}


@pytest.mark.long(50)
def test_worker_and_producer_go_on_after_a_failover_under_load(
    test_model_dir: Path, tmp_path: Path
) -> None:
    """Every scenario of SCENARIOS at once, each with servers, sentinels, a worker and a
    producer of its own (most of a scenario is waiting on the sentinels' timers: run one
    after another they took 3.5 minutes); each is then held to what it must show."""
    with concurrent.futures.ThreadPoolExecutor(len(SCENARIOS)) as pool:
        runs = {
            name: pool.submit(run_scenario, name, test_model_dir, tmp_path / name)
            for name in SCENARIOS
        }
        failed = {name: run.exception() for name, run in runs.items() if run.exception()}
    assert not failed, failed


def run_scenario(scenario: str, test_model_dir: Path, tmp_path: Path) -> None:
    """``sentinel-failover``: SENTINEL FAILOVER, the master demoted while it runs (an
    operator's switch-over). ``kill-master``: kill -9 of the master; the sentinels notice
    it after ``down_after_ms`` and elect the replica. ``freeze-master``: the master stops
    (SIGSTOP: a VM paused, a stalled disk) long enough to be failed over, then runs again:
    what its clients send it until the sentinels demote it (up to ~10 s: they look at a
    server they hold for a replica every 10 s) is executed and acknowledged there, then
    thrown away when it syncs from the new master. Two ways to refuse those writes instead:
    the producer's WAIT (HERMES_REDIS_WAIT_REPLICAS) and the servers'
    ``min-replicas-to-write``."""
    tmp_path.mkdir()
    group = SentinelGroup.start(tmp_path / "redis")
    try:
        check_scenario(scenario, group, test_model_dir, tmp_path)
    finally:
        group.stop()


def check_scenario(
    scenario: str, group: SentinelGroup, test_model_dir: Path, tmp_path: Path
) -> None:
    how, wait_replicas, min_replicas = SCENARIOS[scenario]
    for server in group.servers:  # each may be master at some point
        with redis.Redis(port=server.port) as admin:
            admin.config_set("min-replicas-to-write", min_replicas)
    settings = settings_on(
        group, redis_wait_replicas=wait_replicas, redis_wait_timeout_ms=WAIT_TIMEOUT_MS
    )
    worker = start_worker(
        settings,
        test_model_dir,
        tmp_path / "worker.log",
        cli_args=("--engine", "scripted", "--tokens-per-s", TOKENS_PER_S),
        HERMES_WORKER_NAME="w1",
        HERMES_STREAM_FLUSH_MS="20",
        HERMES_REDIS_CHECK="off",
        # A job whose end was written on a master that then lost it is still in kombu's
        # unacknowledged hash on the new one: it runs again after this long.
        HERMES_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
    )
    try:
        wait_ready(worker, timeout=120)
        with HermesClient(settings) as client:
            load = Load(client)
            thread = threading.Thread(target=load.run, daemon=True)
            thread.start()
            time.sleep(LOAD_BEFORE_S)
            old_port = group.master_port()
            old_pid = group.server(old_port).pid or 0
            failover_at = time.monotonic()
            if how == "kill-master":
                os.kill(old_pid, signal.SIGKILL)
                new_port = group.wait_new_master(old_port)
                named_at = settled_at = time.monotonic()
            elif how == "freeze-master":
                os.kill(old_pid, signal.SIGSTOP)
                try:
                    new_port = group.wait_new_master(old_port)
                finally:
                    os.kill(old_pid, signal.SIGCONT)
                named_at = time.monotonic()
                group.wait_replica(old_port)
                settled_at = time.monotonic()
            else:
                new_port = group.failover()
                named_at = time.monotonic()
                group.wait_replica(old_port)
                settled_at = time.monotonic()
            time.sleep(LOAD_AFTER_S)
            load.stop.set()
            thread.join(30)
            report = outcomes(client, load.acked)
            hung = {
                i: whereabouts(client, settings.queue_name, i)
                for i, o in report.items()
                if o == "hung"
            }
    finally:
        stop_worker(worker, grace=10)

    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    ended = Counter(line.get("job_id") for line in lines if line.get("msg") == "job ended")
    warnings = Counter(
        re.sub(r"[0-9a-f]{32}", "ID", line["msg"])[:60]
        for line in lines
        if line.get("level") in ("warning", "error")
    )
    phases = {
        "before": (float("-inf"), failover_at),
        "outage": (failover_at, named_at),  # until the sentinels name the new master
        "split": (named_at, settled_at),  # until the old master is a replica of it
        "after": (settled_at, float("inf")),
    }
    by_phase = {
        name: Counter(report[i] for i, t in load.acked.items() if low <= t < high)
        for name, (low, high) in phases.items()
    }
    lost = sorted(i for i, outcome in report.items() if outcome != "done")
    twice = sum(1 for n in ended.values() if n > 1)
    print(
        f"\n[{scenario}] master {old_port} -> {new_port}: named after "
        f"{named_at - failover_at:.1f} s, old one a replica after {settled_at - failover_at:.1f}"
        f" s; acknowledged submits by phase and outcome: "
        f"{ {name: dict(c) for name, c in by_phase.items()} }; submit tries refused: "
        f"{dict(load.failed_tries)}; jobs run to their end twice: {twice}; "
        f"worker warnings: {dict(warnings)}; hung jobs on the new master: {hung}"
    )
    assert by_phase["before"] and by_phase["after"], f"{scenario}: load on both sides"
    assert set(by_phase["after"]) == {"done"}, f"{scenario}: every job after it completes"
    assert not hung, f"{scenario}: every acknowledged job ends or is lost: {hung}"
    # What a failover loses was acknowledged while it ran (on a master about to be
    # superseded), never before it: the replica had everything older.
    assert set(by_phase["before"]) == {"done"}, f"{scenario}: {by_phase}"
    if wait_replicas:
        assert not lost, f"{scenario}: every acknowledged submit was on the new master"
    if min_replicas:
        # The frozen master still counts its replica as in sync (min-replicas-max-lag) for
        # the commands it runs as it wakes: the one submit in flight then (the producer
        # sends one at a time) can still be lost.
        assert len(lost) <= 1, (scenario, lost)


def whereabouts(client: HermesClient, queue: str, job_id: str) -> str:
    """What the master holds of a hung job, to tell where its message went: its record's
    status, deliveries and attempts; how many copies of its message the queue's list and
    kombu's unacked hash hold; of the latter's tags, how many are in kombu's index and in
    the worker's deliveries set."""
    r = client.redis
    fields = r.hmget(client.keys.job(job_id), "status", "deliveries", "attempts")
    record = dict(zip(("status", "deliveries", "attempts"), fields, strict=True))
    queued = sum(job_id.encode() in item for item in r.lrange(queue, 0, -1))
    tags = [tag for tag, entry in r.hgetall(UNACKED_KEY).items() if job_id.encode() in entry]
    indexed = sum(r.zscore(UNACKED_INDEX_KEY, tag) is not None for tag in tags)
    held = sum(bool(r.sismember(client.keys.deliveries("w1"), tag)) for tag in tags)
    return f"{record}, queued {queued}, unacked {len(tags)} (indexed {indexed}, held {held})"


def outcomes(client: HermesClient, acked: dict[str, float]) -> dict[str, str]:
    """Each acknowledged job's end: its final status, ``lost`` (its record vanished or never
    existed on the new master), or ``hung`` (no end in RESULT_TIMEOUT_S)."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    for job_id in acked:
        handle = client.job(job_id)
        try:
            if client.redis.exists(client.keys.job(job_id)) == 0:
                found[job_id] = "lost"
                continue
            result = handle.result(timeout=max(0.1, deadline - time.monotonic()))
            status = result.job.status
            found[job_id] = "done" if status == JobStatus.SUCCEEDED else status.value
        except JobLost:
            found[job_id] = "lost"
        except TimeoutError:
            found[job_id] = "hung"
    return found
