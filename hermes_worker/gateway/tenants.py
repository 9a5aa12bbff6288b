"""Tenants: API keys, who may see which job, and quotas (docs/gateway.md#tenants).

An API key (``Authorization: Bearer hwk_…``) belongs to one tenant. Keys are stored only as
the SHA-256 of the key (random, 256 bits: a hash suffices, no salt or slow hash needed), in
the gateway's own key space (``HERMES_GATEWAY_KEY_PREFIX``, default ``hermes-gateway:``),
shared by every deployment the gateway fronts:

* ``{gw}key:{sha256}``: a hash, the key's record: ``id``, ``tenant``, ``name``, ``created``,
  ``last_used`` (unix seconds);
* ``{gw}keys``: a hash, key id -> its SHA-256 (to list and revoke keys by id);
* ``{gw}tenant:{name}``: a hash, the tenant's own quotas (``rpm``, ``max_waiting``; an
  absent field takes the gateway's default);
* ``{gw}tenant:{name}:rpm``: its request bucket; ``{gw}tenant:{name}:waiting``: the record
  keys of its jobs that may still be waiting (:data:`~hermes_worker.contract.scripts.ADMIT_JOB`).

A job the gateway submits for a tenant carries the tenant in its record (``tenant``); a
tenant sees only such jobs (another's is a 404, as if it did not exist). A job id a tenant
writes in a body is scoped as ``{tenant}:{id}`` (tenant names hold no ``:``), an
``Idempotency-Key`` by hashing it with the tenant, so two tenants' ids never meet.

:class:`KeyStore` is the operator's side (``hermes-worker keys``, blocking); :class:`Tenants`
the gateway's (asyncio). Neither imports FastAPI.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from hermes_worker.contract import scripts
from hermes_worker.contract.jobs import RESERVED_ID_ENDINGS_TEXT, usable_job_id
from hermes_worker.contract.store import ALIVE_TTL_S, as_text
from hermes_worker.gateway.errors import GatewayError, invalid
from hermes_worker.settings import Settings

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
KEY_PREFIX = "hwk_"  # what every API key starts with (as OpenAI's start with sk-)
ANONYMOUS = "anonymous"  # the one tenant of HERMES_GATEWAY_AUTH=none
RESERVED_METADATA = "hermes_"  # the scripted engine's and fault injection's keys
# An admitted job's place is kept this long without its record: its submit is on its way.
SUBMIT_GRACE_S = 10
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")


def key_digest(secret: str) -> str:
    """What is stored of an API key: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def check_tenant(name: str) -> str:
    if not TENANT_PATTERN.match(name):
        raise ValueError(
            f"tenant {name!r}: 1 to 32 of A-Z a-z 0-9 _ -, starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class GatewayKeys:
    """Key names of the gateway's own key space (``HERMES_GATEWAY_KEY_PREFIX``)."""

    prefix: str = "hermes-gateway:"

    def api_key(self, digest: str) -> str:
        return f"{self.prefix}key:{digest}"

    @property
    def key_index(self) -> str:
        return f"{self.prefix}keys"

    def tenant(self, name: str) -> str:
        return f"{self.prefix}tenant:{name}"

    def bucket(self, name: str) -> str:
        return f"{self.prefix}tenant:{name}:rpm"

    def waiting(self, name: str) -> str:
        return f"{self.prefix}tenant:{name}:waiting"


@dataclass(frozen=True)
class ApiKey:
    """An API key as ``keys list`` shows it: never the secret."""

    id: str
    tenant: str
    name: str
    created: float
    last_used: float | None

    @property
    def prefix(self) -> str:
        """The start of the key itself, enough to tell which key a client holds."""
        return f"{KEY_PREFIX}{self.id}_…"


@dataclass(frozen=True)
class Quota:
    """A tenant's quotas: requests per minute and jobs waiting (None: the default; 0: none)."""

    rpm: int | None = None
    max_waiting: int | None = None


def _text(record: Mapping[Any, Any], name: str) -> str | None:
    value = record.get(name, record.get(name.encode()))
    return None if value is None else as_text(value)


def _api_key(record: Mapping[Any, Any]) -> ApiKey:
    used = _text(record, "last_used")
    return ApiKey(
        id=_text(record, "id") or "",
        tenant=_text(record, "tenant") or "",
        name=_text(record, "name") or "",
        created=float(_text(record, "created") or 0),
        last_used=float(used) if used else None,
    )


def _quota(record: Mapping[Any, Any]) -> Quota:
    rpm, waiting = _text(record, "rpm"), _text(record, "max_waiting")
    return Quota(int(rpm) if rpm else None, int(waiting) if waiting else None)


# --- the operator's side: hermes-worker keys ------------------------------------------------


class KeyStore:
    """Creates, lists and revokes API keys and sets tenants' quotas (blocking)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.keys = GatewayKeys(prefix)

    def create(self, tenant: str, name: str = "", quota: Quota | None = None) -> tuple[ApiKey, str]:
        """A new key for ``tenant`` (and its quotas, when given): the key and its secret,
        which is not stored and cannot be shown again."""
        check_tenant(tenant)
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        digest = key_digest(secret)
        created = time.time()
        record: dict[Any, str] = {
            "id": key_id,
            "tenant": tenant,
            "name": name,
            "created": repr(created),
        }
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.api_key(digest), mapping=record)
            pipe.hset(self.keys.key_index, key_id, digest)
            pipe.execute()
        if quota is not None:
            self.set_quota(tenant, quota)
        return ApiKey(key_id, tenant, name, created, None), secret

    def list(self) -> list[ApiKey]:
        """Every key, oldest first."""
        digests = [as_text(d) for d in self.redis.hvals(self.keys.key_index)]
        with self.redis.pipeline(transaction=False) as pipe:
            for digest in digests:
                pipe.hgetall(self.keys.api_key(digest))
            records = pipe.execute()
        found = [_api_key(record) for record in records if record]
        return sorted(found, key=lambda key: key.created)

    def revoke(self, key_id: str) -> ApiKey | None:
        """Delete key ``key_id`` (or ``hwk_<id>…``, the key itself): it stops working at
        once. None when there is no such key."""
        key_id = key_id.removeprefix(KEY_PREFIX)[:12]
        if not _KEY_ID.match(key_id):
            return None
        digest = self.redis.hget(self.keys.key_index, key_id)
        if digest is None:
            return None
        record_key = self.keys.api_key(as_text(digest))
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(record_key)
            pipe.delete(record_key)
            pipe.hdel(self.keys.key_index, key_id)
            record, _, _ = pipe.execute()
        return _api_key(record) if record else ApiKey(key_id, "", "", 0, None)

    def quota(self, tenant: str) -> Quota:
        return _quota(self.redis.hgetall(self.keys.tenant(check_tenant(tenant))))

    def set_quota(self, tenant: str, quota: Quota, *, reset: bool = False) -> Quota:
        """Set the given quotas of ``tenant`` (``reset``: drop them all first: defaults)."""
        key = self.keys.tenant(check_tenant(tenant))
        fields: dict[Any, str] = {
            name: str(value) for name, value in vars(quota).items() if value is not None
        }
        with self.redis.pipeline(transaction=True) as pipe:
            if reset:
                pipe.delete(key)
            if fields:
                pipe.hset(key, mapping=fields)
            pipe.execute()
        return self.quota(tenant)


# --- the gateway's side -------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a tenant (through one of its keys), or the anonymous one."""

    tenant: str
    key_id: str | None = None
    max_waiting: int = 0  # the tenant's jobs-waiting limit (0: none)

    @property
    def scoped(self) -> bool:
        """Whether the caller sees only its own jobs (there are tenants)."""
        return self.key_id is not None

    @property
    def scope(self) -> str:
        """What scopes its Idempotency-Keys (nothing without tenants: ids as before)."""
        return self.tenant if self.scoped else ""

    def job_id(self, client_id: str) -> str:
        """The id of the job a client names ``client_id`` in a body: ``{tenant}:{id}``."""
        if not self.scoped:
            return client_id
        scoped = f"{self.tenant}:{client_id}"
        if not usable_job_id(scoped):
            most = 128 - len(self.tenant) - 1
            raise invalid(
                f"id: a job id is 1 to {most} of A-Z a-z 0-9 . _ : - here (it is kept as "
                f"{self.tenant}:<id>), starting with a letter or digit, not ending in "
                f"{RESERVED_ID_ENDINGS_TEXT}",
                param="id",
            )
        return scoped

    def candidates(self, job_id: str) -> list[str]:
        """The ids a path's job id may name for this caller: the id itself (as answers
        show it), and the one it chose in a body (``{tenant}:{id}``)."""
        ids = [job_id]
        if self.scoped and not job_id.startswith(f"{self.tenant}:"):
            ids.append(f"{self.tenant}:{job_id}")
        return [one for one in ids if usable_job_id(one)]

    def sees(self, record: Mapping[Any, Any]) -> bool:
        """Whether the job of ``record`` is this caller's to see."""
        return not self.scoped or _text(record, "tenant") == self.tenant


def unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def over_quota(message: str, code: str, retry_after_s: float) -> GatewayError:
    return GatewayError(
        429, message, type="rate_limit_error", code=code,
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )  # fmt: skip


def refuse_reserved_metadata(body: Mapping[str, Any]) -> None:
    """A 400 for ``hermes_*`` metadata keys: they drive the scripted engine and fault
    injection, which are the operator's, not a tenant's."""
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        return
    for name in metadata:
        if isinstance(name, str) and name.startswith(RESERVED_METADATA):
            raise invalid(
                f"metadata.{name}: keys starting with {RESERVED_METADATA} are reserved",
                param=f"metadata.{name}",
            )


class Tenants:
    """The gateway's tenants: who a request comes from, and whether its quotas admit it."""

    def __init__(self, redis: AsyncRedis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = GatewayKeys(settings.gateway_key_prefix)
        self.enabled = settings.gateway_auth == "keys"
        self._admit_request = redis.register_script(scripts.ADMIT_REQUEST)
        self._admit_job = redis.register_script(scripts.ADMIT_JOB)

    async def admit(self, authorization: str | None) -> Caller:
        """The caller of a request with this ``Authorization`` header, once its requests
        per minute admit it: 401 without a valid key, 429 over the quota."""
        if not self.enabled:
            return Caller(ANONYMOUS)
        secret = _bearer(authorization)
        record_key = self.keys.api_key(key_digest(secret))
        tenant, key_id = await self.redis.hmget(record_key, ["tenant", "id"])
        if tenant is None or key_id is None:
            raise unauthorized("Incorrect API key provided (unknown or revoked)")
        name = as_text(tenant)
        admitted, wait_s, max_waiting = await self._admit_request(
            keys=[self.keys.bucket(name), self.keys.tenant(name), record_key],
            args=[self.settings.gateway_tenant_rpm, self.settings.gateway_tenant_max_waiting],
        )
        if not int(admitted):
            raise over_quota(
                f"tenant {name} is over its requests per minute; retry later",
                "rate_limit_exceeded",
                float(as_text(wait_s)),
            )
        return Caller(name, as_text(key_id), int(as_text(max_waiting)))

    async def admit_job(self, caller: Caller, record_key: str) -> None:
        """Count a new job of ``caller`` as waiting: 429 when its tenant already has as
        many waiting as its quota allows (a known job joins at no cost)."""
        if not caller.scoped or caller.max_waiting <= 0:
            return
        admitted, waiting = await self._admit_job(
            keys=[self.keys.waiting(caller.tenant), record_key],
            args=[caller.max_waiting, SUBMIT_GRACE_S, ALIVE_TTL_S],
        )
        if not int(admitted):
            raise over_quota(
                f"tenant {caller.tenant} has {int(waiting)} jobs waiting, at its limit of "
                f"{caller.max_waiting}; retry once some have started",
                "tenant_quota_exceeded",
                self.settings.gateway_retry_after_s,
            )

    async def release_job(self, caller: Caller, record_key: str) -> None:
        """A job admitted but not submitted (its submit failed) gives its place back."""
        if caller.scoped and caller.max_waiting > 0:
            await self.redis.zrem(self.keys.waiting(caller.tenant), record_key)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise unauthorized(
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>' "
            "(hermes-worker keys create makes one)"
        )
    scheme, _, secret = authorization.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise unauthorized("The Authorization header must be 'Bearer <key>'")
    return secret
