"""Local processes the demo starts for itself: a throwaway ``redis-server`` and a worker.

Both run in sessions of their own, so a Ctrl-C in the terminal reaches only the demo, which
then stops them in order (worker first, with SIGTERM, then Redis) instead of every process
dying at once half-way through a job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from hermes_worker.errors import ServiceError

READY_MARK = " ready."  # Celery's banner line once the consumer takes jobs


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING at ``url``."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalRedis:
    """A ``redis-server`` this process started on a loopback port of its own; without
    ``append_only`` nothing persists. :meth:`stop` then :meth:`run` restarts it in place."""

    directory: Path
    port: int
    append_only: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @classmethod
    def start(cls, directory: Path, *, append_only: bool = False) -> LocalRedis:
        """A server on a free port, answering; ServiceError when it cannot be started."""
        server = cls(directory, free_port(), append_only)
        server.run()
        return server

    def run(self, timeout: float = 10.0) -> None:
        """Start the server (again), with the same port, directory and persistence."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServiceError("no Redis answers and redis-server is not installed (scripts/setup)")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        args += ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        # Every write on disk before its reply, so a restart loses nothing acknowledged.
        aof = ["yes", "--appendfsync", "always"] if self.append_only else ["no"]
        args += ["--appendonly", *aof]
        self.process = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url, timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"redis-server on port {self.port} did not come up ({self.directory})"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            _terminate(self.process, timeout)
            self.process = None


@dataclass
class WorkerProcess:
    """A ``hermes-worker run`` subprocess configured entirely through ``HERMES_*`` env vars."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, env: Mapping[str, str], log_path: Path) -> WorkerProcess:
        exe = shutil.which("hermes-worker", path=str(Path(sys.executable).parent))
        command = [exe] if exe else [sys.executable, "-m", "hermes_worker.cli.commands"]
        base = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*command, "run", "--loglevel", "INFO"],
                env={**base, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() reaches vLLM's processes too
            )
        return cls(process, log_path)

    def log_tail(self, lines: int = 1) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_ready(self, timeout: float, on_wait: Callable[[float], None] | None = None) -> None:
        """Return once the worker takes jobs; ServiceError if it exits or takes too long."""
        start = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServiceError(
                    f"the worker exited with status {code} before it was ready (log: "
                    f"{self.log_path}): {self.log_tail()}"
                )
            if READY_MARK in self.log_path.read_text(errors="replace"):
                return
            waited = time.monotonic() - start
            if waited > timeout:
                raise ServiceError(
                    f"the worker was not ready after {timeout:g} s ({self.log_path})"
                )
            if on_wait is not None:
                on_wait(waited)
            time.sleep(0.5)

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (the worker hands back what runs and closes its engine), then SIGKILL
        whatever is left of its process group."""
        code = _terminate(self.process, grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # vLLM's engine core, if orphaned
        return code


def _terminate(process: subprocess.Popen[bytes], grace: float) -> int | None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def is_loopback(url: str) -> bool:
    """True when ``url`` names this machine (only then may the demo stand in a server)."""
    host = urlsplit(url).hostname or "127.0.0.1"
    return host in ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def redis_for(url: str, directory: Path) -> Iterator[tuple[str, LocalRedis | None]]:
    """The Redis URL to use: ``url`` if a server answers there, else a fresh local server
    (stopped on exit). Only a loopback URL is stood in for: a remote one that does not
    answer is a configuration error, reported as such."""
    if redis_answers(url):
        yield url, None
        return
    if not is_loopback(url):
        raise ServiceError(f"no Redis answers at {url}")
    server = LocalRedis.start(directory)
    try:
        yield server.url, server
    finally:
        with shielded():
            server.stop()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while stopping what was started: a second Ctrl-C must
    not leave a worker or a server behind half-stopped. Main thread only."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
