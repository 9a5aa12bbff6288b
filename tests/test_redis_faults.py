"""Redis going away mid-job: the worker reconnects, keeps serving, and no job ends twice.

The test runs a Redis server of its own (append-only file, so a restart keeps the data) on a
free port, so restarting it touches nothing else on the machine."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from worker_fixtures import start_worker, stop_worker, wait_ready

from hermes_worker.cli.services import LocalRedis
from hermes_worker.contract.jobs import JobStatus
from hermes_worker.contract.queue import UNACKED_MUTEX_EXPIRE_S
from hermes_worker.contract.store import Keys, decode_event
from hermes_worker.settings import Settings
from producers.client import HermesClient

pytestmark = pytest.mark.engine


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis.start(tmp_path, append_only=True)
    yield server
    server.stop()


def test_a_redis_restart_mid_job_is_survived(
    private_redis: LocalRedis, test_model_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(redis_url=private_redis.url, key_prefix="rf:", queue_name="rf")
    worker = start_worker(settings, test_model_dir, tmp_path / "worker.log")
    try:
        wait_ready(worker)
        with HermesClient(settings) as client:
            # Given a long job generating
            body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1900,
                    "ignore_eos": True}  # fmt: skip
            handle = client.submit(body)
            keys = Keys(settings.key_prefix)
            server = redis.Redis.from_url(settings.redis_url)
            deadline = time.monotonic() + 60
            while not server.xlen(keys.events(handle.id)) and time.monotonic() < deadline:
                time.sleep(0.02)
            # When Redis restarts under it
            private_redis.stop()
            time.sleep(2)
            private_redis.run()
            # Then the job still ends, once, and the worker serves the next job
            result = handle.result(timeout=180)
            assert result.job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED)
            entries = redis.Redis.from_url(settings.redis_url).xrange(keys.events(handle.id))
            kinds = [decode_event(i, f).type for i, f in entries]
            assert sum(kinds.count(t) for t in ("done", "error", "cancelled")) == 1
            assert kinds[-1] in ("done", "error")
            follow_up = {"messages": [{"role": "user", "content": "again"}], "max_tokens": 4}
            assert client.submit(follow_up).result(timeout=120).job.status is JobStatus.SUCCEEDED
    finally:
        stop_worker(worker)


HOLD_THE_SWEEP_MUTEX = """
import sys, time
from kombu.transport.redis import Mutex
from hermes_worker.contract.queue import make_celery
from hermes_worker.settings import Settings

app = make_celery(Settings(redis_url=sys.argv[1]))
with app.connection_for_write() as connection:
    channel = connection.default_channel
    # What a worker's visibility sweep takes while it restores messages
    with Mutex(channel.client, channel.unacked_mutex_key, channel.unacked_mutex_expire):
        print(channel.unacked_mutex_key, flush=True)
        time.sleep(300)
"""


def test_a_worker_killed_mid_sweep_blocks_redelivery_for_seconds_not_minutes(
    private_redis: LocalRedis,
) -> None:
    # Given a worker process killed while its visibility sweep held kombu's mutex
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_SWEEP_MUTEX, private_redis.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    key = holder.stdout.readline().strip()
    holder.kill()
    holder.wait(10)
    # Then the mutex it left behind (which stops every other worker's sweep, and so every
    # redelivery on this database) expires within seconds; kombu's default is 300 s
    client = redis.Redis.from_url(private_redis.url)
    assert client.exists(key)
    assert 0 < client.ttl(key) <= UNACKED_MUTEX_EXPIRE_S <= 10
