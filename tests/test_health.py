"""``hermes-worker health``: exit 0 on a fresh heartbeat, 1 on a stale or missing one.

The vitals hash is written here as the heartbeat writes it (field ``heartbeat_at``, unix
seconds), on the tests' Redis database; tests/test_redis_security.py runs the same check
against a live worker as the ACL user ``worker``."""

from __future__ import annotations

import json
import socket
import time

import redis
from click.testing import CliRunner

from hermes_worker.cli.commands import main
from hermes_worker.cli.services import free_port
from hermes_worker.settings import Settings
from hermes_worker.worker.vitals import worker_name


def run_health(settings: Settings, *args: str) -> tuple[int, str]:
    env = {"HERMES_REDIS_URL": settings.redis_url, "HERMES_KEY_PREFIX": settings.key_prefix}
    result = CliRunner().invoke(main, ["health", *args], env=env)
    return result.exit_code, result.output


def beat(client: redis.Redis, settings: Settings, name: str, age_s: float) -> None:
    key = f"{settings.key_prefix}worker:{name}"
    client.hset(key, mapping={"heartbeat_at": time.time() - age_s, "running": 2})


def test_a_fresh_heartbeat_is_healthy(hermes_settings: Settings, redis_client: redis.Redis) -> None:
    beat(redis_client, hermes_settings, "w1", age_s=1)
    code, output = run_health(hermes_settings, "--worker", "w1")
    assert code == 0, output
    vitals = json.loads(output)
    assert vitals["worker"] == "w1" and vitals["running"] == "2"


def test_a_stale_or_missing_heartbeat_is_unhealthy(
    hermes_settings: Settings, redis_client: redis.Redis
) -> None:
    beat(redis_client, hermes_settings, "w1", age_s=45)
    code, output = run_health(hermes_settings, "--worker", "w1")  # default limit: the lease TTL
    assert code == 1 and "45." in output and "over the 30 s limit" in output
    assert run_health(hermes_settings, "--worker", "w1", "--max-age", "60")[0] == 0
    code, output = run_health(hermes_settings, "--worker", "nobody")
    assert code == 1 and "no vitals" in output


def test_an_unreachable_redis_is_unhealthy(hermes_settings: Settings) -> None:
    port = free_port()  # nothing listens on it
    gone = hermes_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    code, output = run_health(gone, "--worker", "w1", "--timeout", "1")
    assert code == 1 and "redis_error" in output


def test_the_default_name_is_the_containers_pid_1() -> None:
    assert worker_name(Settings(worker_name="w9"), pid=1) == "w9"
    assert worker_name(Settings(worker_name=None), pid=1) == f"{socket.gethostname()}:1"
