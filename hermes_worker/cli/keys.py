"""``hermes-worker keys``: the gateway's API keys and tenants' quotas (docs/gateway.md#tenants).

``keys create --tenant NAME`` prints a new key once (only its SHA-256 is stored); ``keys
list`` shows ids, tenants, labels and when each was created and last used, never a key;
``keys revoke ID`` ends a key at once; ``keys quota TENANT`` shows or sets a tenant's
requests per minute and jobs waiting. They work on ``HERMES_REDIS_URL`` under
``HERMES_GATEWAY_KEY_PREFIX``, as the admin user or the gateway's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from hermes_worker.cli.errors import OneLine, one_line_errors
from hermes_worker.settings import Settings

if TYPE_CHECKING:
    from hermes_worker.gateway.tenants import ApiKey, KeyStore, Quota

QUOTA_HELP = "0: no limit; default: the gateway's"


def _store() -> KeyStore:
    from hermes_worker.contract.store import sync_client
    from hermes_worker.gateway.tenants import KeyStore

    settings = Settings()
    return KeyStore(sync_client(settings.redis_url), settings.gateway_key_prefix)


def _quota(rpm: int | None, max_waiting: int | None) -> Quota:
    from hermes_worker.gateway.tenants import Quota

    return Quota(rpm=rpm, max_waiting=max_waiting)


def _when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {**asdict(key), "prefix": key.prefix}


def _quota_text(quota: Quota) -> str:
    def one(value: int | None) -> str:
        return "default" if value is None else "none" if value == 0 else str(value)

    return f"rpm {one(quota.rpm)}, max waiting {one(quota.max_waiting)}"


def _tenant(name: str) -> str:
    from hermes_worker.gateway.tenants import check_tenant

    try:
        return check_tenant(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


rpm_option = click.option(
    "--rpm", type=click.IntRange(min=0), default=None, help=f"Requests per minute ({QUOTA_HELP})."
)
waiting_option = click.option(
    "--max-waiting",
    type=click.IntRange(min=0),
    default=None,
    help=f"Jobs waiting to start at once ({QUOTA_HELP}).",
)


@click.group("keys")
def keys() -> None:
    """The gateway's API keys and tenants' quotas."""


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key belongs to.")
@click.option("--name", default="", help="A label for the key (who holds it, what for).")
@rpm_option
@waiting_option
@click.option("--json", "as_json", is_flag=True, help="Print the key as JSON.")
@one_line_errors
def create(tenant: str, name: str, rpm: int | None, max_waiting: int | None, as_json: bool) -> None:
    """Make an API key for TENANT and print it, once: only its hash is kept. --rpm and
    --max-waiting set the tenant's quotas (for all its keys)."""
    tenant = _tenant(tenant)
    store = _store()
    given = rpm is not None or max_waiting is not None
    key, secret = store.create(tenant, name, _quota(rpm, max_waiting) if given else None)
    quota = store.quota(tenant)
    if as_json:
        click.echo(json.dumps({**_key_json(key), "key": secret, "quota": asdict(quota)}))
        return
    click.echo(secret)
    click.echo(
        f"key {key.id} for tenant {tenant} ({_quota_text(quota)}); it is not shown again",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def list_keys(as_json: bool) -> None:
    """Every key: id, key prefix, tenant, label, created, last used (never the key)."""
    found = _store().list()
    if as_json:
        click.echo(json.dumps([_key_json(key) for key in found], ensure_ascii=False, indent=2))
        return
    from hermes_worker.cli.admin import _print, _table

    table = _table("API keys", "id", "key", "tenant", "name", "created", "last used")
    for key in found:
        table.add_row(
            key.id, key.prefix, key.tenant, key.name, _when(key.created), _when(key.last_used)
        )
    _print(table)


@keys.command("revoke")
@click.argument("key_id")
@one_line_errors
def revoke(key_id: str) -> None:
    """Delete key KEY_ID (as keys list shows it): requests with it are refused at once."""
    gone = _store().revoke(key_id)
    if gone is None:
        raise OneLine(f"not_found: no API key {key_id!r}")
    click.echo(f"revoked key {gone.id}" + (f" of tenant {gone.tenant}" if gone.tenant else ""))


@keys.command("quota")
@click.argument("tenant")
@rpm_option
@waiting_option
@click.option("--reset", is_flag=True, help="Back to the gateway's defaults first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def quota(
    tenant: str, rpm: int | None, max_waiting: int | None, reset: bool, as_json: bool
) -> None:
    """Show TENANT's quotas, or set them (--rpm, --max-waiting, --reset)."""
    tenant = _tenant(tenant)
    store = _store()
    if reset or rpm is not None or max_waiting is not None:
        found = store.set_quota(tenant, _quota(rpm, max_waiting), reset=reset)
    else:
        found = store.quota(tenant)
    if as_json:
        click.echo(json.dumps({"tenant": tenant, **asdict(found)}))
    else:
        click.echo(f"{tenant}: {_quota_text(found)}")
