"""compose.yaml, the Dockerfile and deploy/redis, checked for wiring (no Docker engine here).

Each worker service must get only real settings, reach Redis as the ACL user `worker` on the
compose network, wait for a healthy Redis, reserve as many GPUs as its engine spans, give its
running jobs time to finish on a stop, and be health-checked by a real CLI command. The ACL
file must cover the keys and channels of every deployment compose.yaml defines (what each
user needs at all is proven by tests/test_redis_security.py, which runs on the same file).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner

from hermes_worker.cli.commands import main
from hermes_worker.contract.store import Keys
from hermes_worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
WORKERS = ["worker", "worker-70b"]
# What an operator puts in .env (deploy/env.example names the same variables).
DOT_ENV = {
    "REDIS_DEFAULT_PASSWORD": "d" * 24,
    "REDIS_WORKER_PASSWORD": "w" * 24,
    "REDIS_GATEWAY_PASSWORD": "g" * 24,
    "REDIS_PRODUCER_PASSWORD": "p" * 24,
    "FLOWER_BASIC_AUTH": "ops:secret",
}

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value: Any, env: Mapping[str, str] = DOT_ENV) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, as `docker compose` applies them."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        found = env.get(name)
        if op in (":-", "-"):
            return found if (found if op == ":-" else found is not None) else arg
        if op in (":?", "?") and not found:
            raise KeyError(f"{name}: {arg}")
        return found or ""

    return _VARIABLE.sub(one, str(value))


def environment(service: str) -> dict[str, str]:
    return {k: interpolate(v) for k, v in SERVICES[service].get("environment", {}).items()}


def worker_settings(service: str) -> Settings:
    """The worker's settings from its HERMES_* variables alone (validated by pydantic)."""
    env = environment(service)
    given = {
        k.removeprefix("HERMES_").lower(): v for k, v in env.items() if k.startswith("HERMES_")
    }
    return Settings(**given)


def seconds(duration: str) -> float:
    """A compose duration (1h, 16m, 1m30s, 90s, 500ms) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def acl_users() -> dict[str, list[str]]:
    """deploy/redis/users.acl as start.sh loads it: comments dropped; user -> its rules."""
    users = {}
    for line in (ROOT / "deploy" / "redis" / "users.acl").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, name, *rules = line.split()
            assert keyword == "user", line
            users[name] = rules
    return users


def key_patterns(rules: list[str]) -> list[str]:
    """Key patterns a user may read and write (``~pattern``)."""
    return [rule[1:] for rule in rules if rule.startswith("~")]


def read_only_patterns(rules: list[str]) -> list[str]:
    """Key patterns a user may only read (``%R~pattern``)."""
    return [rule[3:] for rule in rules if rule.startswith("%R~")]


def channel_patterns(rules: list[str]) -> list[str]:
    return [rule[1:] for rule in rules if rule.startswith("&")]


def covered(name: str, patterns: list[str]) -> bool:
    # Redis globs (*, ?, [a-z]) read like fnmatch's for the patterns used here.
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions per stage (continuation lines joined), keyed by stage name."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("FROM "):
            name = line.split(" AS ")[-1].strip() if " AS " in line else f"#{len(stages)}"
            current = stages.setdefault(name, [])
        current.append(line.strip())
    return stages


# --- workers -----------------------------------------------------------------------------


@pytest.mark.parametrize("service", WORKERS)
def test_every_hermes_variable_a_worker_gets_is_a_setting(service: str) -> None:
    fields = {f"HERMES_{name.upper()}" for name in Settings.model_fields}
    given = [name for name in environment(service) if name.startswith("HERMES_")]
    assert sorted(set(given) - fields) == []
    settings = worker_settings(service)  # and each value is valid for its field
    assert settings.model is not None and settings.model.startswith("NousResearch/Hermes-4-")
    assert settings.model.endswith("-FP8")
    assert settings.kv_cache_dtype == "fp8"


def test_405b_spans_all_eight_gpus_and_70b_fewer() -> None:
    big, small = worker_settings("worker"), worker_settings("worker-70b")
    assert big.model == "NousResearch/Hermes-4-405B-FP8"
    assert big.tensor_parallel_size == 8
    assert small.model == "NousResearch/Hermes-4-70B-FP8"
    assert small.tensor_parallel_size in (2, 4)
    # Different models never share a queue (a 405B job must not reach a 70B engine)
    assert (big.queue_name, big.key_prefix) != (small.queue_name, small.key_prefix)
    assert big.queue_name != small.queue_name


@pytest.mark.parametrize("service", WORKERS)
def test_gpus_reserved_match_the_engines_parallelism(service: str) -> None:
    settings = worker_settings(service)
    (device,) = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device["count"] == settings.tensor_parallel_size * settings.pipeline_parallel_size


@pytest.mark.parametrize("service", WORKERS)
def test_workers_reach_redis_as_the_worker_user(service: str) -> None:
    url = urlsplit(worker_settings(service).redis_url)
    redis_env = environment("redis")
    assert url.scheme in ("redis", "rediss")
    assert url.username == "worker"
    assert url.hostname == "redis" and "redis" in SERVICES
    assert url.port == 6379
    # The password is the one the redis service fills into the ACL file for `worker`
    assert url.password == redis_env["REDIS_WORKER_PASSWORD"] == DOT_ENV["REDIS_WORKER_PASSWORD"]
    assert SERVICES[service]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_is_health_checked_with_a_password() -> None:
    check = SERVICES["redis"]["healthcheck"]
    assert "ping" in " ".join(check["test"])
    assert "REDISCLI_AUTH" in " ".join(check["test"])  # PING needs the password too
    # Without the passwords compose refuses to start (no empty-password Redis by accident)
    with pytest.raises(KeyError, match="REDIS_WORKER_PASSWORD"):
        interpolate(SERVICES["redis"]["environment"]["REDIS_WORKER_PASSWORD"], {})


@pytest.mark.parametrize("service", WORKERS)
def test_a_stop_lets_running_jobs_finish(service: str) -> None:
    spec, settings = SERVICES[service], worker_settings(service)
    grace = seconds(spec["stop_grace_period"])
    assert spec["stop_signal"] == "SIGTERM"
    assert spec["restart"] == "unless-stopped"
    # Docker's SIGKILL comes after the worker's own grace, with time to hand back the rest
    # of the jobs and close the engine; and a job at the generation limit can finish
    assert grace >= settings.shutdown_grace_s + 30
    assert grace > settings.max_generation_s
    # The visibility timeout does not hand a running job to another worker before it ends
    assert settings.visibility_timeout_s > settings.max_generation_s


@pytest.mark.parametrize("service", WORKERS)
def test_worker_health_check_is_a_real_command(service: str) -> None:
    spec = SERVICES[service]
    check = spec["healthcheck"]
    assert check["test"][:2] == ["CMD", "hermes-worker"]
    command = check["test"][2]
    assert command in main.commands
    assert CliRunner().invoke(main, [*check["test"][2:], "--help"]).exit_code == 0
    # The check's default worker name is "<host>:1": the worker must stay PID 1
    assert spec["init"] is False
    assert seconds(check["start_period"]) >= 10 * 60  # loading the checkpoint takes minutes
    assert seconds(check["timeout"]) < seconds(check["interval"])


@pytest.mark.parametrize("service", WORKERS)
def test_workers_share_the_model_cache_and_ipc_room(service: str) -> None:
    spec, env = SERVICES[service], environment(service)
    assert f"hf-cache:{env['HF_HOME']}" in spec["volumes"]
    assert env["HF_HUB_OFFLINE"] == "1"  # weights come from the cache the download fills
    assert "hf-cache:/models/hf" in SERVICES["model-download"]["volumes"]
    assert spec.get("ipc") == "host" or spec["shm_size"]


# --- redis, volumes, profiles, images ---------------------------------------------------------


def test_redis_persists_to_its_volume_with_the_acl_file() -> None:
    redis = SERVICES["redis"]
    assert set(COMPOSE["volumes"]) >= {"redis-data", "hf-cache"}
    assert "redis-data:/data" in redis["volumes"]
    conf = (ROOT / "deploy" / "redis" / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    start = (ROOT / "deploy" / "redis" / "start.sh").read_text()
    assert "REDIS_DATA_DIR:-/data" in start and "--aclfile" in start
    mount = next(v for v in redis["volumes"] if v.startswith("./deploy/redis:"))
    inside = mount.split(":")[1]
    assert redis["command"] == ["sh", f"{inside}/start.sh"]


def test_optional_services_sit_behind_profiles() -> None:
    profiles = {name: spec.get("profiles", []) for name, spec in SERVICES.items()}
    assert profiles["redis"] == [] and profiles["worker"] == [] and profiles["gateway"] == []
    assert profiles["worker-70b"] == ["70b"]
    assert profiles["flower"] == ["flower"]
    assert profiles["chat-example"] == ["example"]
    assert profiles["model-download"] == ["download"]
    assert SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]  # not on the network


def test_the_producer_example_runs_a_real_script_as_the_producer_user() -> None:
    spec = SERVICES["chat-example"]
    script = spec["entrypoint"][1]
    assert (ROOT / script).is_file()
    env = environment("chat-example")
    url = urlsplit(env["HERMES_REDIS_URL"])
    assert (url.username, url.hostname) == ("producer", "redis")
    assert url.password == environment("redis")["REDIS_PRODUCER_PASSWORD"]
    assert env["HERMES_QUEUE_NAME"] == worker_settings("worker").queue_name
    assert env["HERMES_KEY_PREFIX"] == worker_settings("worker").key_prefix
    assert spec["build"]["target"] in dockerfile_stages()


def test_the_dockerfile_entrypoint_is_a_real_cli_command() -> None:
    stages = dockerfile_stages()
    final_name, final = list(stages.items())[-1]
    assert SERVICES["worker"]["build"]["target"] == final_name
    (entrypoint,) = [line for line in final if line.startswith("ENTRYPOINT ")]
    program, command = json.loads(entrypoint.removeprefix("ENTRYPOINT "))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[program] == "hermes_worker.cli.commands:main"
    assert command in main.commands
    assert any('".[gpu]"' in line for line in final if line.startswith("RUN "))
    (health,) = [line for line in final if line.startswith("HEALTHCHECK ")]
    assert '["hermes-worker", "health"]' in health
    # Everything the image copies passes .dockerignore
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    for line in final:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert f"!{source.rstrip('/')}" in [a.rstrip("/") for a in allowed], source


# --- the ACL file against what compose deploys ------------------------------------------------


def deployments() -> list[Settings]:
    return [worker_settings(name) for name in WORKERS]


def test_the_worker_user_reaches_every_key_and_channel_it_uses() -> None:
    rules = acl_users()["worker"]
    keys, channels = key_patterns(rules), channel_patterns(rules)
    for settings in deployments():
        prefix, queue = settings.key_prefix, settings.queue_name
        used = [
            queue, f"{queue}:9",  # the queue's lists, one per priority step
            f"{prefix}job:j1", f"{prefix}job:j1:events", f"{prefix}job:j1:lease",
            f"{prefix}worker:host:1", f"{prefix}workers", f"{prefix}dlq",
            f"{prefix}ends", f"{prefix}ends:0a1b",  # job ends: shared, a client's own
            "unacked", "unacked_index", "unacked_mutex",  # kombu's ack emulation
            f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}",
            "_kombu.binding_deadlines", "_kombu.binding.celery.pidbox",
            "_kombu.binding.reply.celery.pidbox", "hermes@host:1.celery.pidbox",
            "4f1c0a9e-1b2c.reply.celery.pidbox",
        ]  # fmt: skip
        assert [key for key in used if not covered(key, keys)] == []
        assert covered(f"{prefix}cancel", channels)
    # PSUBSCRIBE patterns are compared literally with the ACL's
    assert "/0.celery.pidbox" in channels


def test_the_producer_user_reaches_its_keys_and_nothing_of_the_consumers() -> None:
    rules = acl_users()["producer"]
    keys, channels = key_patterns(rules), channel_patterns(rules)
    for settings in deployments():
        prefix, queue = settings.key_prefix, settings.queue_name
        used = [
            queue, f"{queue}:5", f"{queue}:9",
            f"{prefix}job:j1", f"{prefix}job:j1:events", f"{prefix}job:j1:lease",
            f"{prefix}dlq", f"{prefix}hub:0a1b", f"_kombu.binding.{queue}",
            f"_kombu.binding_permanent.{queue}", f"{prefix}ends", f"{prefix}ends:0a1b",
        ]  # fmt: skip
        assert [key for key in used if not covered(key, keys)] == []
        assert covered(f"{prefix}cancel", channels)
        not_theirs = ["unacked", "unacked_index", f"{prefix}worker:host:1", f"{prefix}workers"]
        assert [key for key in not_theirs if covered(key, keys)] == []
    assert "+brpop" not in rules and "+psubscribe" not in rules


@pytest.mark.parametrize("user", ["worker", "producer", "gateway"])
def test_service_users_start_from_nothing(user: str) -> None:
    rules = acl_users()[user]
    assert rules[0] == "on" and f">@{user.upper()}_PASSWORD@" in rules
    assert {"resetkeys", "resetchannels", "-@all"} <= set(rules)
    broad = {"~*", "&*", "allkeys", "allchannels", "allcommands", "+@all", "nopass"}
    assert broad.isdisjoint(rules)
    # Only named commands: no category grants, so a new command is a conscious ACL change
    assert [rule for rule in rules if rule.startswith("+@")] == []
    start = (ROOT / "deploy" / "redis" / "start.sh").read_text()
    assert f"@{user.upper()}_PASSWORD@" in start


# --- the gateway ---------------------------------------------------------------------------------


def test_the_gateway_fronts_every_deployment_as_the_gateway_user() -> None:
    from hermes_worker.gateway.routing import parse_routes

    spec, settings = SERVICES["gateway"], worker_settings("gateway")
    fields = {f"HERMES_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in environment("gateway") if name.startswith("HERMES_")} <= fields
    # It reaches Redis as user gateway with the password the redis service fills in
    url = urlsplit(settings.redis_url)
    assert (url.username, url.hostname, url.port) == ("gateway", "redis", 6379)
    assert url.password == environment("redis")["REDIS_GATEWAY_PASSWORD"]
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    # API keys are on, and its routes name the deployments of both worker services
    assert settings.gateway_auth == "keys"
    routes = parse_routes(settings.gateway_routes, worker_settings("worker"))
    served = {(r.queue, r.key_prefix) for r in routes.values()}
    assert served == {(w.queue_name, w.key_prefix) for w in deployments()}
    # It listens on the port compose publishes, on this host unless told otherwise
    (published,) = spec["ports"]
    assert interpolate(published) == f"127.0.0.1:{settings.gateway_port}:{settings.gateway_port}"
    assert settings.gateway_host == "0.0.0.0"
    # Its image has the gateway extra and a real command; a stop lets streams finish
    stage = dockerfile_stages()[spec["build"]["target"]]
    assert any('".[gateway]"' in line for line in stage if line.startswith("RUN "))
    assert spec["entrypoint"][0] == "hermes-worker" and spec["entrypoint"][1] in main.commands
    assert "/healthz" in " ".join(spec["healthcheck"]["test"])
    assert spec["stop_signal"] == "SIGTERM"
    assert seconds(spec["stop_grace_period"]) > settings.gateway_shutdown_grace_s


def test_no_service_but_the_example_gets_a_producer_user() -> None:
    # Redis starts without a producer password (start.sh then leaves that user out)
    without = {k: v for k, v in DOT_ENV.items() if k != "REDIS_PRODUCER_PASSWORD"}
    redis_env = SERVICES["redis"]["environment"]
    assert interpolate(redis_env["REDIS_PRODUCER_PASSWORD"], without) == ""
    assert "without_producer" in (ROOT / "deploy" / "redis" / "start.sh").read_text()
    # And only the example producer (a profile of its own) uses one
    users = {
        name: urlsplit(interpolate(spec["environment"]["HERMES_REDIS_URL"])).username
        for name, spec in SERVICES.items()
        if "HERMES_REDIS_URL" in spec.get("environment", {})
    }
    assert [name for name, user in users.items() if user == "producer"] == ["chat-example"]
    assert SERVICES["chat-example"]["profiles"] == ["example"]


def test_the_gateway_user_reaches_what_a_producer_does_its_keys_and_the_vitals() -> None:
    from hermes_worker.gateway.tenants import GatewayKeys

    users = acl_users()
    rules, producer = users["gateway"], users["producer"]
    keys, read_only = key_patterns(rules), read_only_patterns(rules)
    # Everything the producer user may do, and more commands (quotas, keys, vitals)
    assert set(producer) - {">@PRODUCER_PASSWORD@"} <= set(rules)
    gateway = GatewayKeys(worker_settings("gateway").gateway_key_prefix)
    own = [gateway.api_key("ab"), gateway.key_index, gateway.tenant("acme"),
           gateway.bucket("acme"), gateway.waiting("acme")]  # fmt: skip
    assert [key for key in own if not covered(key, keys)] == []
    for settings in deployments():
        prefix = settings.key_prefix
        # Workers' vitals: read only; their deliveries and kombu's state: not at all
        assert covered(f"{prefix}workers", read_only)
        assert covered(f"{prefix}worker:host:1", read_only)
        assert not covered(f"{prefix}worker:host:1", keys)
        assert not covered("unacked", keys + read_only)
    # The gateway's keys are no worker's or producer's business
    for user in ("worker", "producer"):
        assert not covered(gateway.api_key("ab"), key_patterns(users[user]))


# --- batches -------------------------------------------------------------------------------------


def test_the_batch_runner_shares_the_gateways_file_store_and_user() -> None:
    batch, gateway = SERVICES["batch"], SERVICES["gateway"]
    assert batch["entrypoint"] == ["hermes-worker", "batch", "run"]
    assert batch.get("profiles", []) == []
    settings, served = worker_settings("batch"), worker_settings("gateway")
    # Both see the same files, on one volume
    assert settings.files_dir == served.files_dir
    mount = f"batch-files:{settings.files_dir}"
    assert mount in batch["volumes"] and mount in gateway["volumes"]
    assert "batch-files" in COMPOSE["volumes"]
    # It reaches Redis as the gateway user, which may touch every batch key it uses
    url = urlsplit(interpolate(batch["environment"]["HERMES_REDIS_URL"]))
    assert url.username == "gateway"
    keys = key_patterns(acl_users()["gateway"])
    for deployment in deployments():
        names = Keys(deployment.key_prefix)
        for key in (names.batch("batch_1"), names.batch_runner("batch_1"), names.batches):
            assert covered(key, keys), key
