"""``hermes-worker doctor`` and the check at worker start (``HERMES_REDIS_CHECK``): what a
Redis that would lose jobs looks like, read from private ``redis-server``s configured badly
and well, and from one started the way compose.yaml starts it (``deploy/redis/start.sh``:
the ACL users of ``deploy/redis/users.acl``)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from test_redis_security import SecureRedis
from worker_fixtures import start_worker, stop_worker

from hermes_worker.cli.commands import main
from hermes_worker.cli.doctor import (
    ROLES,
    Finding,
    check_at_start,
    clock_finding,
    diagnose,
    memory_finding,
    persistence_finding,
    policy_finding,
    redact,
    role_commands,
    version_finding,
)
from hermes_worker.cli.services import LocalRedis, free_port
from hermes_worker.errors import UnsafeRedis
from hermes_worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


# --- each check's verdict --------------------------------------------------------------------


def test_only_noeviction_keeps_every_key() -> None:
    assert policy_finding("noeviction", 100 << 20).level == "ok"
    # Every other policy evicts once memory is full: the volatile ones the job records
    evicting = policy_finding("volatile-lru", 100 << 20)
    assert evicting.level == "fail" and "job records" in evicting.message
    assert policy_finding("allkeys-lru", 100 << 20).level == "fail"
    # Without a limit nothing is evicted yet
    assert policy_finding("allkeys-lru", 0).level == "warn"


def test_a_restart_without_persistence_loses_every_job() -> None:
    assert persistence_finding(True, "", fsync="everysec").level == "ok"
    assert persistence_finding(True, "", fsync="no").level == "warn"
    none = persistence_finding(False, "")
    assert none.level == "fail" and "loses every job" in none.message
    assert persistence_finding(False, "3600 1 300 100").level == "warn"
    assert persistence_finding(False, None).level == "warn"  # snapshots could not be read
    assert persistence_finding(True, "", aof_status="err").level == "warn"
    assert persistence_finding(None, None, why_unknown="refused").level == "unknown"


def test_the_version_memory_and_clock_verdicts() -> None:
    assert version_finding("6.0.16").level == "fail"
    assert version_finding("6.2.14").level == "warn"
    assert version_finding("7.2.4").level == "ok"
    assert memory_finding(90, 100).level == "warn"
    assert memory_finding(10, 100).level == "ok"
    assert memory_finding(10 << 20, 0).level == "ok"
    assert clock_finding(0.2, 0.01).level == "ok"
    late = clock_finding(-5.0, 0.01)
    assert late.level == "warn" and "5.0 s behind" in late.message


def test_a_password_never_shows() -> None:
    assert redact("redis://worker:s3cret@redis:6379/0") == "redis://worker:***@redis:6379/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_roles_send_what_users_acl_grants() -> None:
    """Each role's command list is held against deploy/redis/users.acl: a command added to
    the code and the ACL, but not here, would go unchecked by the doctor."""
    text = (ROOT / "deploy" / "redis" / "users.acl").read_text()
    for role in ("worker", "producer", "gateway"):
        line = next(row for row in text.splitlines() if row.startswith(f"user {role} "))
        granted = {t[1:] for t in line.split() if t.startswith("+") and not t.startswith("+@")}
        assert role_commands(role) == granted, role  # type: ignore[arg-type]


# --- private servers configured badly and well ----------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalRedis]:
    """A private redis-server without persistence (LocalRedis's default)."""
    local = LocalRedis.start(tmp_path / "redis")
    yield local
    local.stop()


def doctor(url: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["doctor", "--json", *args], env={"HERMES_REDIS_URL": url})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output)


def levels(report: dict[str, Any]) -> dict[str, str]:
    return {f["check"]: f["level"] for f in report["findings"]}


def test_a_redis_that_would_lose_jobs_fails_the_doctor(server: LocalRedis) -> None:
    # Given a Redis without persistence that evicts keys once 64 MiB are used
    admin = redis.Redis.from_url(server.url)
    admin.config_set("maxmemory", 64 << 20)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    # When the doctor looks at it
    code, report = doctor(server.url)
    # Then both problems are named, and the exit status says jobs would be lost
    assert code == 1
    assert report["loses_jobs"] is True
    found = levels(report)
    assert found["maxmemory-policy"] == "fail" and found["persistence"] == "fail"
    assert (found["version"], found["acl worker"], found["clock"]) == ("ok", "ok", "ok")
    # And the human report says the same in lines
    result = CliRunner().invoke(main, ["doctor"], env={"HERMES_REDIS_URL": server.url})
    assert result.exit_code == 1
    assert "FAIL    persistence" in result.output and "allkeys-lru" in result.output
    assert "2 problem(s) would lose or break jobs." in result.output


def test_a_redis_with_snapshots_only_passes_with_a_warning(server: LocalRedis) -> None:
    # Given RDB snapshots but no append-only file, and memory nearly full under noeviction
    admin = redis.Redis.from_url(server.url)
    admin.config_set("save", "3600 1")
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", int(used * 1.1))
    # When the doctor looks at it, Then it warns about both and passes
    code, report = doctor(server.url)
    assert code == 0 and report["loses_jobs"] is False
    found = levels(report)
    assert (found["persistence"], found["memory"], found["maxmemory-policy"]) == (
        "warn", "warn", "ok",
    )  # fmt: skip


def test_a_well_configured_redis_passes(tmp_path: Path) -> None:
    # Given the append-only file and noeviction
    local = LocalRedis.start(tmp_path / "redis", append_only=True)
    try:
        roles = ("--role", "worker", "--role", "producer", "--role", "admin")
        code, report = doctor(local.url, *roles)
    finally:
        local.stop()
    # Then every check passes
    assert code == 0
    assert set(levels(report).values()) == {"ok"}, report
    assert {"acl worker", "acl producer", "acl admin"} <= set(levels(report))


def test_a_clock_far_from_redis_is_reported(server: LocalRedis) -> None:
    client = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url)
    report = diagnose(client, settings, clock=lambda: time.time() - 30)
    clock = next(f for f in report.findings if f.check == "clock")
    assert clock.level == "warn" and "ahead of this host's" in clock.message
    client.close()


def test_a_redis_out_of_reach_is_an_error_line() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(main, ["doctor", "--timeout", "1"], env={"HERMES_REDIS_URL": url})
    assert result.exit_code == 1 and "redis_error" in result.output


# --- the ACL users of deploy/redis/users.acl ---------------------------------------------------


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    """Redis as compose.yaml starts it (no certificate: no TLS port)."""
    directory = tmp_path_factory.mktemp("acl-redis")
    no_tls = directory / "no-tls"
    no_tls.mkdir()
    server = SecureRedis(directory, no_tls, free_port(), free_port())
    server.start()
    yield server
    server.stop()


def acl_levels(report: dict[str, Any]) -> dict[str, Finding]:
    return {f["check"]: f for f in report["findings"] if f["check"].startswith("acl ")}


def test_the_admin_checks_each_user_against_its_role(acl_redis: SecureRedis) -> None:
    # Given the compose Redis, as the admin (default) user
    url = acl_redis.url("default", tls=False)
    # When each user is checked against its own role, Then each may do what it must
    args = ["--role", "worker=worker", "--role", "producer=producer", "--role", "admin",
            "--role", "gateway=gateway"]  # fmt: skip
    code, report = doctor(url, *args)
    assert code == 0, report
    found = levels(report)
    assert [found[f"acl {role}"] for role in ROLES] == ["ok", "ok", "ok", "ok"]
    assert (found["persistence"], found["maxmemory-policy"]) == ("ok", "ok")  # redis.conf
    # When the producer user is checked as a worker, Then what it lacks is named
    code, report = doctor(url, "--role", "worker=producer")
    assert code == 1
    worker = acl_levels(report)["acl worker"]
    assert worker["level"] == "fail"
    denied = {d["command"].split()[0] for d in worker["facts"]["denied"]}
    assert {"BRPOP", "PEXPIRE", "HSETNX"} <= denied
    # And a user that does not exist is a failure too
    code, report = doctor(url, "--role", "worker=nobody")
    assert code == 1 and "no Redis user 'nobody'" in acl_levels(report)["acl worker"]["message"]


def test_a_service_user_says_what_it_cannot_tell(acl_redis: SecureRedis) -> None:
    # Given the doctor run as the producer user, who may not read the server's settings
    code, report = doctor(acl_redis.url("producer", tls=False), "--role", "producer")
    # Then it passes on what it can read, and says which checks it could not make and why
    found = levels(report)
    assert code == 0 and found["version"] == "ok"
    assert found["persistence"] == found["maxmemory-policy"] == found["acl producer"] == "unknown"
    message = acl_levels(report)["acl producer"]["message"]
    assert "may not run" in message and "admin" in message
    acl_redis.reset_denials()


def test_the_start_up_check_as_the_worker_user_leaves_no_refusal(acl_redis: SecureRedis) -> None:
    # Given the worker's own settings (user worker, as in compose.yaml)
    acl_redis.reset_denials()
    settings = Settings(redis_url=acl_redis.url("worker", tls=False), redis_check="refuse")
    # When the worker's start-up check runs, even under refuse
    report = check_at_start(settings)
    # Then it reads what the worker's ACL allows (version, clock), says the rest is for the
    # admin's doctor, refuses nothing, and Redis logged no refusal (tests/test_redis_security
    # checks ACL LOG stays empty with a real worker)
    assert report is not None
    found = {f.check: f for f in report.findings}
    assert (found["version"].level, found["clock"].level) == ("ok", "ok")
    assert found["persistence"].level == "unknown"
    assert "hermes-worker doctor" in found["persistence"].message
    assert acl_redis.denials() == []


# --- the check at worker start --------------------------------------------------------------


def test_refuse_stops_a_worker_before_it_loads_its_model(
    server: LocalRedis, test_model_dir: Path, tmp_path: Path
) -> None:
    # Given a Redis that evicts keys and keeps nothing across a restart
    redis.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")
    settings = Settings(redis_url=server.url, key_prefix="dr:", queue_name="dr")
    # When a worker starts with HERMES_REDIS_CHECK=refuse
    worker = start_worker(
        settings, test_model_dir, tmp_path / "worker.log",
        cli_args=("--engine", "scripted"), HERMES_REDIS_CHECK="refuse",
    )  # fmt: skip
    try:
        code = worker.process.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop_worker(worker)
    # Then it exits 1 at once, naming what would lose jobs, without starting an engine
    log = worker.log()
    assert code == 1, log[-3000:]
    assert "Error: unsafe_redis:" in log and "persistence" in log and "allkeys-lru" in log
    assert "runtime ready" not in log


def test_warn_logs_and_off_skips(server: LocalRedis) -> None:
    settings = Settings(redis_url=server.url)
    report = check_at_start(settings)  # warn, the default: a report, no exception
    assert report is not None and report.loses_jobs
    with pytest.raises(UnsafeRedis, match="persistence"):
        check_at_start(settings.model_copy(update={"redis_check": "refuse"}))
    assert check_at_start(settings.model_copy(update={"redis_check": "off"})) is None
    # A Redis out of reach is left to the worker, which waits for it as it always has
    gone = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    assert check_at_start(gone.model_copy(update={"redis_check": "refuse"})) is None
