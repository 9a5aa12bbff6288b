"""Operator commands: ``stats``, ``workers``, ``jobs --status S``, ``purge``.

They look at Redis under the settings' prefix and queue (``HERMES_REDIS_URL``,
``HERMES_KEY_PREFIX``, ``HERMES_QUEUE_NAME``; ``--queue`` picks another queue) and print
tables, or JSON with ``--json``. Where each answer comes from, and what it costs in Redis,
is in :mod:`hermes_worker.cli.fleet`. Imports are deferred, as in
:mod:`hermes_worker.cli.commands`, so ``hermes-worker --help`` stays quick.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from hermes_worker.cli.errors import one_line_errors
from hermes_worker.settings import Settings

if TYPE_CHECKING:
    from redis import Redis
    from rich.table import Table

    from hermes_worker.worker.vitals import WorkerVitals

# JobStatus's values and vitals.WINDOWS, spelled out so that the command line need not
# import the wire models (a test checks that they agree).
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
WINDOWS = ("1m", "5m", "15m")


def _settings(queue: str | None = None) -> Settings:
    settings = Settings()
    return settings if queue is None else settings.model_copy(update={"queue_name": queue})


def _redis(settings: Settings) -> Redis:
    from hermes_worker.contract.store import sync_client

    return sync_client(settings.redis_url)


# --- output ------------------------------------------------------------------------------------


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2))


def _print(*renderables: Any) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a pipe or a log: one line per row rather than 80 columns
        console.width = max(console.width, 200)
    console.print(*renderables)


def _table(title: str, *columns: str, fold: tuple[str, ...] = ()) -> Table:
    """A table whose cells stay on one line, except in the ``fold`` columns (long text)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        if column in fold:
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, no_wrap=True)
    return table


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _when(moment: float | None) -> str:
    return "-" if moment is None else time.strftime("%m-%d %H:%M:%S", time.localtime(moment))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _per_window(counts: dict[str, int]) -> str:
    return " / ".join(str(counts[label]) for label in WINDOWS)


def _workers_table(workers: list[WorkerVitals], now: float) -> Table:
    windows = "/".join(WINDOWS)
    table = _table(
        f"Workers: {len(workers)} live",
        "worker",
        "model",
        "queue",
        "uptime",
        "jobs",
        "engine run/wait",
        f"finished {windows}",
        f"failed {windows}",
        "tok/s 1m",
        "heartbeat",
        fold=("worker", "model", "queue"),
    )
    for w in workers:
        beat = None if w.heartbeat_at is None else max(0.0, now - w.heartbeat_at)
        table.add_row(
            w.name,
            w.model,
            w.queue,
            _age(w.uptime_s),
            str(w.running),
            f"{w.engine_running} / {w.engine_waiting}",
            _per_window(w.finished),
            _per_window(w.failed),
            f"{w.tokens['1m'] / 60:.1f}",
            f"{_age(beat)} ago",
        )
    return table


# --- commands ------------------------------------------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
queue_option = click.option(
    "--queue", default=None, metavar="NAME", help="The queue to look at [HERMES_QUEUE_NAME]."
)


@click.command()
@queue_option
@json_option
@one_line_errors
def stats(queue: str | None, as_json: bool) -> None:
    """Queue depth per priority, running jobs, live workers, jobs finished / failed lately."""
    from hermes_worker.cli import fleet
    from hermes_worker.contract.clock import redis_time

    settings = _settings(queue)
    with _redis(settings) as r:
        depth = fleet.queue_depth(r, settings)
        workers = fleet.live_workers(r, settings.key_prefix)
        now = redis_time(r.time())  # heartbeats are on Redis's clock, not this host's
    data = fleet.stats_json(depth, workers, settings.queue_name)
    if as_json:
        _echo_json(data)
        return
    table = _table(
        f"Queue {settings.queue_name!r}: {sum(depth)} waiting",
        "priority",
        *(str(p) for p in range(len(depth))),
    )
    table.add_row("waiting", *(str(n) for n in depth))
    jobs = data["jobs"]
    summary = (
        f"Jobs: {jobs['running']} running; finished {_per_window(jobs['finished'])}, "
        f"failed {_per_window(jobs['failed'])} in the last {', '.join(WINDOWS)}; "
        f"{jobs['tokens_per_s_1m']:.1f} tokens/s over the last minute"
    )
    _print(table, summary, _workers_table(workers, now))


@click.command()
@json_option
@one_line_errors
def workers(as_json: bool) -> None:
    """Live workers (a heartbeat within three intervals): model, load, uptime, recent jobs."""
    from hermes_worker.cli import fleet
    from hermes_worker.contract.clock import redis_time

    settings = _settings()
    with _redis(settings) as r:
        found = fleet.live_workers(r, settings.key_prefix)
        now = redis_time(r.time())  # heartbeats are on Redis's clock, not this host's
    if as_json:
        _echo_json([w.to_json() for w in found])
    else:
        _print(_workers_table(found, now))


@click.command()
@click.option(
    "--status",
    "status",
    required=True,
    type=click.Choice(STATUSES),
    help="List the jobs with this status.",
)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@json_option
@one_line_errors
def jobs(status: str, limit: int, as_json: bool) -> None:
    """Jobs by status, newest first (a SCAN over the job records: slow on a huge database)."""
    from hermes_worker.cli import fleet
    from hermes_worker.contract.jobs import JobStatus

    settings = _settings()
    with _redis(settings) as r:
        found = fleet.find_jobs(r, settings.key_prefix, JobStatus(status), limit)
    if as_json:
        _echo_json([info.model_dump(mode="json") for info in found])
        return
    title = f"Jobs {status}: {len(found)} shown (newest first, at most {limit})"
    columns = ("id", "tries", "worker", "queued", "finished", "wait s", "ttft s", "gen s")
    table = _table(title, *columns, fold=("worker",))
    table.columns[0].min_width = max((len(info.id) for info in found), default=2)  # never cut
    for info in found:
        table.add_row(
            info.id,
            str(info.attempts),
            info.worker or "-",
            _when(info.queued_at),
            _when(info.finished_at),
            _seconds(info.queue_wait_s),
            _seconds(info.time_to_first_token_s),
            _seconds(info.generation_s),
        )
    _print(table)


@click.command()
@queue_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@one_line_errors
def purge(queue: str | None, yes: bool, as_json: bool) -> None:
    """Remove every waiting job from the queue and cancel it (running jobs are untouched)."""
    from hermes_worker.cli import fleet
    from producers.client import HermesClient

    settings = _settings(queue)
    with HermesClient(settings) as client:
        waiting = sum(fleet.queue_depth(client.redis, settings))
        if waiting and not yes:
            question = (
                f"{waiting} message(s) wait in queue {settings.queue_name!r}: remove them and "
                "cancel their jobs?"
            )
            click.confirm(question, abort=True, err=True)
        report = fleet.purge_queue(client) if waiting else fleet.PurgeReport(settings.queue_name)
    if as_json:
        _echo_json(asdict(report))
        return
    click.echo(
        f"removed {report.removed} job(s) from queue {report.queue!r}: "
        f"{report.cancelled} cancelled, {report.already_ended} had already ended, "
        f"{report.no_record} without a record, {report.undecodable} undecodable; "
        f"{report.kept_running} copies of running jobs kept"
    )
