"""``hermes-worker health``: is this worker alive? For container healthchecks and supervisors.

A worker's runtime publishes its vitals hash ``{prefix}worker:{name}`` every third of
``HERMES_LEASE_TTL_S`` (``heartbeat.py``), and only once its engine is up. The check reads
that hash with the worker's own settings (so with the worker's Redis user) and passes when
the last heartbeat is younger than ``--max-age``: the engine was built, the runtime loop is
turning, and Redis is reachable with the worker's credentials. A dead engine ends the
worker process itself (exit 70), so a stale or missing hash is what a hung or gone worker
looks like.

The worker's name is ``HERMES_WORKER_NAME`` when set, else ``host:pid``. In a container the
worker is PID 1 (the image's exec-form entrypoint) and the container id is the host name, so
the default name checked here is ``<this host>:1``.
"""

from __future__ import annotations

import json

import click

from hermes_worker.contract.store import Keys, as_text
from hermes_worker.settings import Settings
from hermes_worker.worker.vitals import worker_name

EXIT_UNHEALTHY = 1


def check(vitals: dict[str, str], now: float, max_age_s: float) -> str | None:
    """Why these vitals are unhealthy, or None when the last heartbeat is fresh."""
    if not vitals:
        return "no vitals: the worker has not started its engine, or stopped heartbeating"
    try:
        age = now - float(vitals["heartbeat_at"])
    except (KeyError, ValueError):
        return f"vitals without a usable heartbeat_at: {vitals}"
    if age > max_age_s:
        return f"last heartbeat {age:.1f} s ago, over the {max_age_s:g} s limit"
    return None


def read_vitals(settings: Settings, worker: str, timeout_s: float) -> tuple[dict[str, str], float]:
    """The worker's vitals hash, and Redis's now: the heartbeat is on Redis's clock
    (``worker/heartbeat.py``), so this host's own clock must not age it."""
    from hermes_worker.contract.clock import redis_time
    from hermes_worker.contract.store import sync_client

    client = sync_client(
        settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(Keys(settings.key_prefix).worker(worker))
        pipe.time()
        raw, now = pipe.execute()
    finally:
        client.close()
    return {as_text(k): as_text(v) for k, v in raw.items()}, redis_time(now)


@click.command("health")
@click.option(
    "--worker",
    "worker",
    default=None,
    metavar="NAME",
    help="Worker to check [default: HERMES_WORKER_NAME, else <this host>:1].",
)
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="S",
    help="Oldest acceptable heartbeat, in seconds [default: HERMES_LEASE_TTL_S].",
)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, metavar="S")
def health(worker: str | None, max_age: float | None, timeout: float) -> None:
    """Exit 0 if the worker's heartbeat in Redis is fresh (print its vitals), else 1."""
    from redis.exceptions import RedisError

    settings = Settings()
    name = worker or worker_name(settings, pid=1)  # the worker sharing this container
    limit = max_age if max_age is not None else settings.lease_ttl_s
    try:
        vitals, now = read_vitals(settings, name, timeout)
    except RedisError as exc:
        raise _Unhealthy(f"worker {name}: redis_error: {type(exc).__name__}: {exc}") from exc
    problem = check(vitals, now, limit)
    if problem is not None:
        raise _Unhealthy(f"worker {name}: {problem}")
    click.echo(json.dumps({"worker": name, **vitals}))


class _Unhealthy(click.ClickException):
    """``Error: unhealthy: …`` on one line; exit status 1."""

    exit_code = EXIT_UNHEALTHY

    def __init__(self, message: str) -> None:
        super().__init__("unhealthy: " + " ".join(message.split()))
