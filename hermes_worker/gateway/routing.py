"""Which deployment a request's ``model`` goes to, and which models live workers serve.

A deployment is a queue and a key prefix (one model's workers, e.g. compose.yaml's 405B on
``hermes`` / ``hermes:`` and 70B on ``hermes-70b`` / ``hermes-70b:``). The routes
(``HERMES_GATEWAY_ROUTES``) map model names to deployments, either as JSON::

    {"hermes-405b": "hermes", "hermes-70b": {"queue": "hermes-70b", "key_prefix": "hermes-70b:"}}

or as ``name=queue[@key_prefix],...`` (``hermes-405b=hermes,hermes-70b=hermes-70b@hermes-70b:``);
a route without a key prefix uses ``HERMES_KEY_PREFIX``. With routes, a request's ``model``
must be one of their names (else 404 ``model_not_found``) and a request without one goes to
the default deployment (``HERMES_QUEUE_NAME`` under ``HERMES_KEY_PREFIX``). Without routes,
every request goes to the default deployment and ``model`` is informational, as in a job.

Live workers are read from their vitals (``hermes_worker/worker/vitals.py``): the
``{prefix}workers`` index, then each one's ``{prefix}worker:{name}`` hash, which expires
after three missed heartbeats. A deployment with no live worker on its queue answers 503.
The lookup is cached for ``HERMES_GATEWAY_WORKERS_CACHE_S`` (1 s) per key prefix, so its cost
does not grow with the request rate.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from hermes_worker.contract.store import Keys, as_text
from hermes_worker.errors import ConfigurationError
from hermes_worker.gateway.errors import GatewayError, not_found

DEFAULT_LABEL = "default"  # the metrics label of the default deployment
NO_WORKER_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Deployment:
    """One model's workers: the queue they take jobs from and the prefix of their keys."""

    queue: str
    key_prefix: str


@dataclass(frozen=True)
class Target:
    """Where a request goes: ``label`` names it in metrics (a route's name, or "default")."""

    deployment: Deployment
    label: str


@dataclass(frozen=True)
class LiveWorker:
    """A worker whose vitals hash is alive."""

    name: str
    model: str
    queue: str
    started_at: float | None


def _routes_error(problem: str) -> ConfigurationError:
    return ConfigurationError(f"HERMES_GATEWAY_ROUTES: {problem}")


def _deployment(name: str, value: Any, default: Deployment) -> Deployment:
    if isinstance(value, str) and value:
        return Deployment(value, default.key_prefix)
    if isinstance(value, Mapping):
        unknown = set(value) - {"queue", "key_prefix"}
        if unknown:
            raise _routes_error(f"route {name!r}: unknown field(s) {sorted(unknown)}")
        queue, prefix = value.get("queue"), value.get("key_prefix", default.key_prefix)
        if isinstance(queue, str) and queue and isinstance(prefix, str) and prefix:
            return Deployment(queue, prefix)
    raise _routes_error(
        f'route {name!r} must be a queue name or {{"queue": ..., "key_prefix": ...}}'
    )


def parse_routes(text: str | None, default: Deployment) -> dict[str, Deployment]:
    """The routes of ``HERMES_GATEWAY_ROUTES`` (JSON, or ``name=queue[@prefix],...``); an
    empty map when unset. :class:`ConfigurationError` names what is wrong."""
    if text is None or not text.strip():
        return {}
    text = text.strip()
    routes: dict[str, Deployment] = {}
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise _routes_error(f"not valid JSON ({exc})") from exc
        for name, value in raw.items():
            if not name:
                raise _routes_error("a route needs a model name")
            routes[name] = _deployment(name, value, default)
        return routes
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, target = item.strip().partition("=")
        queue, _, prefix = target.strip().partition("@")
        if not sep or not name.strip() or not queue.strip():
            raise _routes_error(f"{item.strip()!r} is not name=queue or name=queue@key_prefix")
        if name.strip() in routes:
            raise _routes_error(f"model {name.strip()!r} is routed twice")
        routes[name.strip()] = Deployment(queue.strip(), prefix.strip() or default.key_prefix)
    return routes


class WorkerDirectory:
    """The live workers under each key prefix, read from their vitals, cached for ``cache_s``."""

    def __init__(self, redis: Redis, cache_s: float) -> None:
        self._redis = redis
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, list[LiveWorker]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def workers(self, prefix: str) -> list[LiveWorker]:
        """The live workers under ``prefix`` (any queue), by name."""
        cached = self._cache.get(prefix)
        if cached is not None and time.monotonic() - cached[0] < self._cache_s:
            return cached[1]
        lock = self._locks.setdefault(prefix, asyncio.Lock())
        async with lock:  # one read per prefix at a time; the others take its answer
            cached = self._cache.get(prefix)
            if cached is not None and time.monotonic() - cached[0] < self._cache_s:
                return cached[1]
            found = await self._read(prefix)
            self._cache[prefix] = (time.monotonic(), found)
            return found

    async def _read(self, prefix: str) -> list[LiveWorker]:
        keys = Keys(prefix)
        members = await self._redis.zrange(keys.workers, 0, -1)
        names = [as_text(n) for n in members if isinstance(n, bytes | str)]
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(keys.worker(name), ["model", "queue", "started_at"])
            replies = await pipe.execute()
        found = []
        for name, (model, queue, started_at) in zip(names, replies, strict=True):
            if model is None and queue is None:
                continue  # its vitals expired: a dead worker
            started = float(as_text(started_at)) if started_at else None
            found.append(LiveWorker(name, as_text(model or b""), as_text(queue or b""), started))
        return sorted(found, key=lambda w: w.name)


class Router:
    """Resolves a request's model to a :class:`Target` and checks that workers serve it."""

    def __init__(
        self, routes: Mapping[str, Deployment], default: Deployment, directory: WorkerDirectory
    ) -> None:
        self.routes = dict(routes)
        self.default = default
        self.directory = directory

    def deployments(self) -> list[Deployment]:
        """Every deployment the gateway may send jobs to, the default first, each once."""
        return list(dict.fromkeys([self.default, *self.routes.values()]))

    def resolve(self, model: str | None) -> Target:
        """The target of a request naming ``model`` (None: the default deployment)."""
        if model is None or not self.routes:
            return Target(self.default, DEFAULT_LABEL)
        deployment = self.routes.get(model)
        if deployment is None:
            raise not_found(
                f"The model {model!r} does not exist; GET /v1/models lists those served",
                "model_not_found",
            )
        return Target(deployment, model)

    async def serving(self, deployment: Deployment) -> list[LiveWorker]:
        """The live workers taking jobs from ``deployment``'s queue."""
        workers = await self.directory.workers(deployment.key_prefix)
        return [w for w in workers if w.queue == deployment.queue]

    async def require_workers(self, target: Target) -> list[LiveWorker]:
        """:meth:`serving`, or a 503 when there is none."""
        workers = await self.serving(target.deployment)
        if not workers:
            name = "the default deployment" if target.label == DEFAULT_LABEL else target.label
            raise GatewayError(
                503,
                f"no live worker serves {name} (queue {target.deployment.queue!r}); "
                "try again once one has started",
                type="server_error",
                code="no_live_worker",
                headers={"Retry-After": str(NO_WORKER_RETRY_AFTER_S)},
            )
        return workers

    async def models(self) -> list[dict[str, Any]]:
        """OpenAI model objects for what live workers serve: each route's name that has
        live workers (with routes), else each model the default deployment's workers run."""
        served: dict[str, list[LiveWorker]] = {}
        if self.routes:
            for name, deployment in self.routes.items():
                workers = await self.serving(deployment)
                if workers:
                    served[name] = workers
        else:
            for worker in await self.serving(self.default):
                served.setdefault(worker.model, []).append(worker)
        return [model_object(name, workers) for name, workers in served.items()]


def model_object(name: str, workers: list[LiveWorker]) -> dict[str, Any]:
    """OpenAI's model object, with what serves it beside the standard fields."""
    starts = [w.started_at for w in workers if w.started_at is not None]
    return {
        "id": name,
        "object": "model",
        "created": int(min(starts)) if starts else 0,
        "owned_by": "hermes-worker",
        "served_by": sorted({w.model for w in workers}),
        "queue": workers[0].queue,
        "workers": len(workers),
    }
