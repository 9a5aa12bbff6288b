"""``hermes-worker batch``: OpenAI Batch API files on the queue (hermes_worker/batch/).

``create FILE [--wait]`` stores the file and makes the batch (with ``--wait``, runs it here
with a live progress line); ``status``, ``list``, ``cancel``; ``results ID -o out.jsonl
[--errors err.jsonl]`` writes the output and error lines; ``run`` is the service that runs
every batch (compose's ``batch`` service). Exit status: 0, or 1 with one ``Error:`` line; a
``create --wait`` whose batch did not complete (failed, expired, cancelled) exits 1 too.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hermes_worker.cli.errors import OneLine, one_line_errors

if TYPE_CHECKING:
    from collections.abc import Iterator

    from producers.batches import Batches


@contextmanager
def _batches() -> Iterator[Batches]:
    from producers.batches import Batches
    from producers.client import HermesClient

    with HermesClient() as client:
        yield Batches(client)


def _metadata(pairs: tuple[str, ...]) -> dict[str, str] | None:
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        found[key] = value
    return found or None


def _echo(batch: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(batch, ensure_ascii=False))
        return
    counts = batch["request_counts"]
    click.echo(
        f"{batch['id']}  {batch['status']}  {counts['completed']} done, "
        f"{counts['failed']} failed of {counts['total']}"
    )


@click.group()
def batch() -> None:
    """Batches: OpenAI Batch API JSONL files run on the queue."""


@batch.command("create")
@click.argument("path", metavar="FILE.jsonl", type=click.Path(exists=True, dir_okay=False))
@click.option("--completion-window", default="24h", show_default=True, help="e.g. 24h, 90m.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="May be repeated.")
@click.option("--wait", is_flag=True, help="Run the batch here and wait for it to end.")
@click.option("--json", "as_json", is_flag=True, help="Print the batch object as JSON.")
@one_line_errors
def create(
    path: str, completion_window: str, metadata: tuple[str, ...], wait: bool, as_json: bool
) -> None:
    """Store FILE and make a batch of it; print its id (or, with --wait, how it ended)."""
    with _batches() as batches:
        made = batches.create(
            path, completion_window=completion_window, metadata=_metadata(metadata)
        )
        if not wait:
            click.echo(json.dumps(made) if as_json else made["id"])
            return
        ended = _run_with_progress(batches, made["id"])
        _echo(ended, as_json)
        if ended["status"] != "completed":
            raise OneLine(_how_it_ended(ended))


def _how_it_ended(batch: dict[str, Any]) -> str:
    errors = (batch.get("errors") or {}).get("data") or []
    lines = "; ".join(f"line {e['line']}: {e['message']}" for e in errors[:5])
    return f"batch {batch['id']} {batch['status']}" + (f": {lines}" if lines else "")


def _run_with_progress(batches: Batches, batch_id: str) -> dict[str, Any]:
    """Run the batch in this process, one progress line on stderr, until it ends. Ctrl-C
    (or SIGTERM) stops running it here; the batch stays as it is for any runner to resume."""
    from hermes_worker.batch.runner import BatchService
    from hermes_worker.batch.store import ENDED
    from hermes_worker.worker.logs import configure_logging

    configure_logging("WARNING")  # on stderr, and only what goes wrong: stdout is the answer
    started = time.monotonic()
    interactive = sys.stderr.isatty()
    with BatchService(batches.client, batches.files).in_background(batch_id) as stop:
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while True:
                current = batches.retrieve(batch_id)
                _progress(current, time.monotonic() - started, interactive)
                if current["status"] in ENDED or stop.is_set():
                    break
                stop.wait(0.5 if interactive else 5.0)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            click.echo("", err=True)
    current = batches.retrieve(batch_id)
    if current["status"] not in ENDED:
        raise OneLine(
            f"stopped: batch {batch_id} is {current['status']}; any runner resumes it "
            "(hermes-worker batch run)"
        )
    return current


def _progress(batch: dict[str, Any], elapsed: float, interactive: bool) -> None:
    counts = batch["request_counts"]
    total, done = counts["total"], counts["completed"] + counts["failed"]
    tokens = batch["usage"]["output_tokens"]
    rate = tokens / elapsed if elapsed > 0 else 0.0
    eta = "-"
    if 0 < done < total:
        eta = f"{elapsed / done * (total - done):.0f} s"
    width = 24
    filled = int(width * done / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    line = (
        f"{batch['status']:<11} [{bar}] {counts['completed']} done, {counts['failed']} failed"
        f" / {total}  {rate:.0f} tok/s  ETA {eta}"
    )
    click.echo(("\r" + line) if interactive else line, err=True, nl=not interactive)


@batch.command("status")
@click.argument("batch_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the batch object as JSON.")
@one_line_errors
def status(batch_id: str, as_json: bool) -> None:
    """Print a batch's status and counts."""
    with _batches() as batches:
        _echo(batches.retrieve(batch_id), as_json)


@batch.command("list")
@click.option("--limit", default=20, show_default=True, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="One batch object per line.")
@one_line_errors
def list_batches(limit: int, as_json: bool) -> None:
    """List batches, newest first."""
    with _batches() as batches:
        for found in batches.list(limit):
            _echo(found, as_json)


@batch.command("cancel")
@click.argument("batch_id", metavar="ID")
@one_line_errors
def cancel(batch_id: str) -> None:
    """Cancel a batch: print its status (cancelling, until its runner has ended it)."""
    with _batches() as batches:
        click.echo(batches.cancel(batch_id)["status"])


@batch.command("results")
@click.argument("batch_id", metavar="ID")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="Default: stdout."
)
@click.option(
    "--errors",
    "errors_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the error lines here (else they follow the output lines).",
)
@one_line_errors
def results(batch_id: str, output: str | None, errors_path: str | None) -> None:
    """Write a batch's output lines (and its error lines) as JSONL, as far as written."""
    with _batches() as batches:
        found = batches.retrieve(batch_id)
        targets = [(found["output_file_id"], output)]
        targets.append((found["error_file_id"], errors_path if errors_path else output))
        for file_id, target in targets:
            lines = batches.files.lines(file_id)
            if target is None:
                for raw in lines:
                    click.echo(raw.decode().rstrip("\n"))
                continue
            mode = "ab" if target == output and file_id == found["error_file_id"] else "wb"
            with Path(target).open(mode) as out:
                for raw in lines:
                    out.write(raw)


@batch.command("run")
@one_line_errors
def run() -> None:
    """Run every batch of the deployment until SIGTERM or Ctrl-C (any number of these may
    run: each batch has one runner at a time, and the others take over if it dies)."""
    from hermes_worker.batch.files import FileStore
    from hermes_worker.batch.runner import BatchService
    from hermes_worker.worker.logs import configure_logging
    from producers.client import HermesClient

    configure_logging("INFO")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with HermesClient() as client:
        service = BatchService(client, FileStore(client.settings.files_dir))
        click.echo("batch runner: running batches (Ctrl-C to stop)", err=True)
        try:
            service.run(stop)
        except KeyboardInterrupt:
            stop.set()
