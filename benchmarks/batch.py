"""Batches at scale (docs/batches.md): a file of N requests through a real worker, against the
same N jobs submitted one by one; then again with the batch runner and a worker killed.

    python benchmarks/batch.py --lines 10000 --max-tokens 16 --out docs/benchmarks/batch

Three runs on one checkpoint (the tiny test checkpoint by default) and one Redis:

* ``one-by-one``: an asyncio producer submits the jobs and awaits their results, keeping
  ``--window`` in flight (what a producer without batches does);
* ``batch``: the same requests as an OpenAI Batch JSONL file, run by ``hermes-worker batch
  run`` in a process of its own whose RSS is sampled every 0.5 s;
* ``batch-killed`` (``--kill``): the same, with the batch runner killed (kill -9) at a third
  and another one started, and the worker killed (kill -9) at two thirds and another
  started.

Each batch run checks that every line is in the output file exactly once. The report: lines
per second, batch/one-by-one, the runner's RSS (start, peak, end), as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving

from hermes_worker.batch.store import ENDED
from hermes_worker.cli.services import WorkerProcess, process_env, settings_env
from hermes_worker.inference.kv_cache import size_kv_cache
from hermes_worker.settings import Settings
from producers.batches import Batches
from producers.client import AsyncHermesClient, HermesClient

Body = dict[str, Any]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--window", type=int, default=256, help="Jobs in flight, both ways.")
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a checkpoint.")
    parser.add_argument("--kill", action="store_true", help="Also run batch-killed.")
    parser.add_argument("--out", type=Path, help="Write OUT.json and OUT.md.")
    return parser.parse_args(argv)


def requests(count: int, max_tokens: int) -> list[Body]:
    """Chat-completions bodies, different prompts, a fixed length (ignore_eos)."""
    return [
        {
            "model": "bench",
            "messages": [{"role": "user", "content": f"Request {i}: tell me about queues."}],
            "max_completion_tokens": max_tokens,
            "ignore_eos": True,
        }
        for i in range(count)
    ]


async def one_by_one(settings: Settings, bodies: list[Body], window: int) -> dict[str, Any]:
    """Submit every body and await its result, ``window`` at a time."""
    tag = uuid.uuid4().hex[:6]
    gate = asyncio.Semaphore(window)
    tokens = 0
    async with AsyncHermesClient(settings) as client:

        async def one(i: int, body: Body) -> None:
            nonlocal tokens
            async with gate:
                job = {k: v for k, v in body.items() if k not in ("model",)}
                job["max_tokens"] = job.pop("max_completion_tokens")
                handle = await client.submit({**job, "id": f"one-{tag}-{i}"})
                result = await handle.result(timeout=600)
                assert result.job.status.value == "succeeded", result.error
                tokens += result.usage.completion_tokens if result.usage else 0

        started = time.monotonic()
        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        wall = time.monotonic() - started
    return {"way": "one-by-one", "lines": len(bodies), "wall_s": wall, "tokens": tokens}


class Runner:
    """``hermes-worker batch run`` in a process of its own, its RSS sampled."""

    def __init__(self, settings: Settings, log: Path) -> None:
        env = process_env(settings_env(settings))
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hermes_worker.cli", "batch", "run"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.rss: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        proc = psutil.Process(self.process.pid)
        while not self._stop.wait(0.5):
            try:
                self.rss.append(proc.memory_info().rss / 2**20)
            except psutil.Error:
                return

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)
        self._stop.set()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self._stop.set()


def start_worker(settings: Settings, logs: Path, name: str) -> WorkerProcess:
    worker = serving.start_worker(settings.model_copy(update={"worker_name": name}), logs)
    worker.wait_ready(serving.READY_TIMEOUT_S)
    return worker


def batch_run(
    settings: Settings,
    bodies: list[Body],
    tmp: Path,
    worker: WorkerProcess,
    *,
    kill: bool,
) -> tuple[dict[str, Any], WorkerProcess]:
    """One batch of ``bodies``: its figures, and the worker serving at its end."""
    name = "batch-killed" if kill else "batch"
    path = tmp / f"{name}.jsonl"
    with path.open("w") as f:
        for i, body in enumerate(bodies):
            line = {"custom_id": f"{name}-{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    client = HermesClient(settings)
    batches = Batches(client)
    started = time.monotonic()
    made = batches.create(path)
    runners = [Runner(settings, tmp / f"{name}-runner.log")]
    events: list[str] = []
    total = len(bodies)
    while True:
        batch = batches.retrieve(made["id"])
        counts = batch["request_counts"]
        done = counts["completed"] + counts["failed"]
        if kill and len(runners) == 1 and done >= total // 3:
            runners[0].kill()
            events.append(f"runner killed at {done} lines")
            runners.append(Runner(settings, tmp / f"{name}-runner2.log"))
        if kill and not any("worker" in e for e in events) and done >= 2 * total // 3:
            os.killpg(worker.pid, signal.SIGKILL)
            events.append(f"worker killed at {done} lines")
            worker = start_worker(settings, tmp / "worker-2.log", "bench-worker-2")
            events.append("second worker ready")
        if batch["status"] in ENDED:
            break
        time.sleep(0.5)
    wall = time.monotonic() - started
    runners[-1].stop()
    out = [json.loads(line) for line in batches.files.lines(batch["output_file_id"])]
    errors = list(batches.files.lines(batch["error_file_id"]))
    ids = [o["custom_id"] for o in out]
    rss = [r for runner in runners for r in runner.rss] or [0.0]
    client.close()
    return {
        "way": name,
        "lines": total,
        "status": batch["status"],
        "wall_s": wall,
        "tokens": batch["usage"]["output_tokens"],
        "output_lines": len(out),
        "error_lines": len(errors),
        "unique": len(set(ids)) == len(ids) == total,
        "runner_rss_mib": {"start": rss[0], "peak": max(rss), "end": rss[-1]},
        "events": events,
    }, worker


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = next(r for r in rows if r["way"] == "one-by-one")
    lines = [
        f"Batches: {args.lines} requests of {args.max_tokens} tokens, "
        f"{args.window} in flight, model {args.model}",
        "",
        "| way | lines/s | vs one-by-one | wall s | output / error lines | once each "
        "| runner RSS MiB (start / peak / end) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        rate = row["lines"] / row["wall_s"]
        ratio = rate / (base["lines"] / base["wall_s"])
        rss = row.get("runner_rss_mib")
        lines.append(
            f"| {row['way']} | {rate:.1f} | {ratio:.2f}x | {row['wall_s']:.1f} | "
            + (f"{row['output_lines']} / {row['error_lines']}" if "output_lines" in row else "-")
            + f" | {row.get('unique', '-')} | "
            + (f"{rss['start']:.0f} / {rss['peak']:.0f} / {rss['end']:.0f}" if rss else "-")
            + " |"
        )
    for row in rows:
        if row.get("events"):
            lines.append(f"\n{row['way']}: " + "; ".join(row["events"]))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tag = uuid.uuid4().hex[:8]
    serving_args = serving.parse_args(["--concurrency", str(args.window)])
    with tempfile.TemporaryDirectory(prefix="hermes-batch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = serving.resolve_model(args.model, tmp)
        settings = size_kv_cache(serving.engine_settings(serving_args, model, tag))
        settings = settings.model_copy(
            update={"files_dir": str(tmp / "files"), "batch_window": args.window}
        )
        bodies = requests(args.lines, args.max_tokens)
        worker = start_worker(settings, tmp / "worker.log", "bench-worker-1")
        rows: list[dict[str, Any]] = []
        try:
            serving.progress("one-by-one")
            rows.append(asyncio.run(one_by_one(settings, bodies, args.window)))
            serving.progress("batch")
            row, worker = batch_run(settings, bodies, tmp, worker, kill=False)
            rows.append(row)
            if args.kill:
                serving.progress("batch-killed")
                row, worker = batch_run(settings, bodies, tmp, worker, kill=True)
                rows.append(row)
        finally:
            worker.stop(60)
            serving.clean_redis(settings)
    text = report(rows, args)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0 if all(r.get("unique", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
