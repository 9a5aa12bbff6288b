"""Local processes: a throwaway ``redis-server`` and workers (``hermes-worker run``), the one
home of starting a worker, waiting until it takes jobs and stopping it with its whole process
group. The demo, the benchmarks and the test suite all start theirs here.

The demo's run in sessions of their own, so a Ctrl-C in the terminal reaches only the demo,
which then stops them in order (worker first, with SIGTERM, then Redis) instead of every
process dying at once half-way through a job. The benchmarks' and the tests' run in the
caller's session, in a process group of their own (``own_session=False``): see
:meth:`ServiceProcess.spawn`.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import redis

from hermes_worker.cli.options import env_var
from hermes_worker.contract.store import sync_client
from hermes_worker.errors import ServiceError
from hermes_worker.settings import Settings

READY_MARK = " ready."  # Celery's banner line once the consumer takes jobs


def process_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment less its ``HERMES_*`` variables, with ``env`` on top: what
    a child configured entirely by ``env`` sees (no setting leaks in from the caller)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    return {**base, **(env or {})}


def settings_env(settings: Settings) -> dict[str, str]:
    """Every field of ``settings`` that is set, as the ``HERMES_*`` variable a worker reads
    it back from: a worker started with these runs on exactly ``settings``."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[env_var(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING at ``url``."""
    client = sync_client(url, socket_timeout=timeout, socket_connect_timeout=timeout)
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
    extra_args: tuple[str, ...] = ()  # more redis-server arguments (``--replicaof``, ...)

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
        args += ["--appendonly", *aof, *self.extra_args]
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


SENTINEL_MASTER = "hermes"  # the name a SentinelGroup's sentinels monitor their master under


@dataclass
class SentinelGroup:
    """A master, its replicas and sentinels watching them, each a ``redis-server`` this
    process started on a free loopback port (nothing persists): a Redis that fails over,
    for the tests (tests/test_sentinel.py) and to try ``sentinel://`` URLs
    (docs/reliability.md, "Failover"). ``servers[0]`` is the first master.

    The sentinels take a master for down after ``down_after_ms`` without an answer and
    need two of them to agree (a quorum of 2 of 3), as a production setup would."""

    directory: Path
    servers: list[LocalRedis]
    sentinels: list[LocalRedis]
    master_name: str = SENTINEL_MASTER

    @property
    def url(self) -> str:
        """The ``sentinel://`` URL of the group's master (database 0)."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"sentinel://{hosts}/0?master={self.master_name}"

    @classmethod
    def start(
        cls, directory: Path, *, replicas: int = 1, sentinels: int = 3,
        down_after_ms: int = 1000, master_name: str = SENTINEL_MASTER,
    ) -> SentinelGroup:  # fmt: skip
        """Start the servers, wait until each replica is in sync and every sentinel knows
        the master and its replicas; ServiceError when that does not happen in time."""
        group = cls(directory, [], [], master_name)
        try:
            group.servers.append(LocalRedis.start(directory / "master"))
            master_port = group.servers[0].port
            for number in range(1, replicas + 1):
                replica = LocalRedis(
                    directory / f"replica{number}",
                    free_port(),
                    extra_args=("--replicaof", "127.0.0.1", str(master_port)),
                )
                replica.run()
                group.servers.append(replica)
            group.wait_synced(replicas)
            for number in range(1, sentinels + 1):
                quorum = min(2, sentinels)
                where = directory / f"sentinel{number}"
                group.sentinels.append(
                    _start_sentinel(where, master_name, master_port, quorum, down_after_ms)
                )
            group.wait_watched(replicas, sentinels)
        except BaseException:
            group.stop()
            raise
        return group

    def sentinel_client(self, number: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinels[number].port, socket_timeout=5)

    def master_port(self) -> int:
        """The port of the server the first sentinel names master now."""
        client = self.sentinel_client()
        try:
            return _master_port(client, self.master_name)
        finally:
            client.close()

    def server(self, port: int) -> LocalRedis:
        return next(server for server in self.servers if server.port == port)

    def wait_synced(self, replicas: int, timeout: float = 20.0) -> None:
        """Until the master has ``replicas`` replicas online."""
        port = self.servers[0].port

        def synced() -> bool:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                info = client.info("replication")
                return int(info.get("connected_slaves", 0)) >= replicas and all(
                    info[f"slave{i}"]["state"] == "online" for i in range(replicas)
                )
            finally:
                client.close()

        _wait_for(synced, timeout, "the replicas did not sync with the master")

    def wait_watched(self, replicas: int, sentinels: int, timeout: float = 20.0) -> None:
        """Until every sentinel knows the master, its replicas and the other sentinels."""

        def watched() -> bool:
            for number in range(len(self.sentinels)):
                client = self.sentinel_client(number)
                try:
                    state: Any = client.sentinel_master(self.master_name)
                finally:
                    client.close()
                known_replicas = int(state.get("num-slaves", 0))
                known_sentinels = int(state.get("num-other-sentinels", 0)) + 1
                if known_replicas < replicas or known_sentinels < sentinels:
                    return False
            return True

        _wait_for(watched, timeout, "the sentinels did not find each other and the replicas")

    def failover(self, timeout: float = 20.0) -> int:
        """``SENTINEL FAILOVER``: a replica is promoted (the master is demoted to a replica
        of it) without waiting for the master to fail; returns once every sentinel names
        the new master and it takes writes. The new master's port."""
        old = self.master_port()
        client = self.sentinel_client()
        try:
            client.execute_command("SENTINEL", "FAILOVER", self.master_name)  # type: ignore[no-untyped-call]
        finally:
            client.close()
        return self.wait_new_master(old, timeout)

    def wait_new_master(self, old_port: int, timeout: float = 30.0) -> int:
        """Until every sentinel names a master other than ``old_port`` and it answers as
        master; its port."""
        found: list[int] = []

        def promoted() -> bool:
            ports = set()
            for number, sentinel in enumerate(self.sentinels):
                if sentinel.process is None:
                    continue
                client = self.sentinel_client(number)
                try:
                    ports.add(_master_port(client, self.master_name))
                finally:
                    client.close()
            if len(ports) != 1 or old_port in ports:
                return False
            port = ports.pop()
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                if client.info("replication")["role"] != "master":
                    return False
            finally:
                client.close()
            found.append(port)
            return True

        _wait_for(promoted, timeout, "no new master was named")
        return found[-1]

    def wait_replica(self, port: int, timeout: float = 30.0) -> None:
        """Until the server on ``port`` (a former master, back) is a replica in sync."""

        def demoted() -> bool:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                info = client.info("replication")
            finally:
                client.close()
            return bool(info["role"] == "slave" and info["master_link_status"] == "up")

        _wait_for(demoted, timeout, f"the server on port {port} did not become a replica")

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()


def _master_port(sentinel: redis.Redis, master_name: str) -> int:
    """The port of the master a sentinel names for ``master_name``."""
    address: Any = sentinel.sentinel_get_master_addr_by_name(master_name)
    return int(address[1])


def _start_sentinel(
    directory: Path, master_name: str, master_port: int, quorum: int, down_after_ms: int
) -> LocalRedis:
    """``redis-server sentinel.conf --sentinel`` on a free port (a sentinel rewrites its
    configuration file: each has one of its own)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"logfile {directory / 'sentinel.log'}\n"
        f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n"
        f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
        f"sentinel failover-timeout {master_name} 10000\n"
        f"sentinel parallel-syncs {master_name} 1\n"
    )
    sentinel = _SentinelProcess(directory, port, config=config)
    sentinel.run()
    return sentinel


@dataclass
class _SentinelProcess(LocalRedis):
    """A sentinel: ``redis-server CONFIG --sentinel``, started and stopped as a LocalRedis."""

    config: Path | None = None

    def run(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None or self.config is None:
            raise ServiceError("redis-server is not installed (scripts/setup)")
        args = [exe, str(self.config), "--sentinel"]
        self.process = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url, timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"redis-sentinel on port {self.port} did not come up")
            time.sleep(0.05)


def _wait_for(check: Callable[[], bool], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise ServiceError(f"{failure} within {timeout:g} s")
        time.sleep(0.1)


@dataclass
class ServiceProcess:
    """A server subprocess (a worker, ``vllm serve``) writing its output to ``log_path``,
    stopped with its whole process group: what it started (vLLM's engine core) goes too."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def spawn(
        cls, command: Sequence[str], env: Mapping[str, str], log_path: Path, *,
        own_session: bool = True,
    ) -> Self:  # fmt: skip
        """Start ``command`` with exactly ``env``. ``own_session``: in a session of its own,
        out of reach of the terminal's Ctrl-C (the demo stops it itself). Otherwise in the
        caller's session, in a process group of its own: the kernel gives each session
        (autogroup) an equal share of the CPU and applies niceness only within a session,
        so a server in a session of its own, its engine core spinning, outranked the caller
        (a benchmark's clients, a test) and redis-server (measured on a 2-core VM: the
        benchmark's event loop stalled 0.8-3.4 s, Redis waited 6.6 s to run in 8.9 s)."""
        return cls(_spawn(command, env, log_path, own_session), log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything it has written so far ("" when the log cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 1) -> str:
        return "\n".join(self.log().strip().splitlines()[-lines:])

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (a worker hands back what runs and closes its engine), then SIGKILL
        whatever is left of its process group; its exit status."""
        code = _terminate(self.process, grace)
        self.kill()  # vLLM's engine core, if orphaned
        return code

    def kill(self) -> None:
        """SIGKILL to its whole process group at once, no grace (:meth:`stop` may be
        waiting on it in another frame: it then returns)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def _spawn(
    command: Sequence[str], env: Mapping[str, str], log_path: Path, own_session: bool
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
            process_group=None if own_session else 0,
        )


def worker_command() -> list[str]:
    """``hermes-worker``: the console script beside this interpreter, else the module."""
    exe = shutil.which("hermes-worker", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "hermes_worker.cli.commands"]


@dataclass
class WorkerProcess(ServiceProcess):
    """A ``hermes-worker run`` subprocess configured entirely through ``HERMES_*`` env vars;
    ``settings``, when given to :meth:`start`, are the ones it was started with."""

    settings: Settings | None = None

    @classmethod
    def start(
        cls, env: Mapping[str, str], log_path: Path, *, args: Sequence[str] = (),
        own_session: bool = True, niceness: int = 0, settings: Settings | None = None,
    ) -> WorkerProcess:  # fmt: skip
        """``hermes-worker run --loglevel INFO [args]`` with this process's environment less
        its ``HERMES_*`` variables, plus ``env``. ``niceness``: run under ``nice -n`` (which
        execs it: the pid and the process group are the worker's). ``own_session``: see
        :meth:`ServiceProcess.spawn`."""
        nice = ["nice", "-n", str(niceness)] if niceness else []
        command = [*nice, *worker_command(), "run", "--loglevel", "INFO", *args]
        return cls(_spawn(command, process_env(env), log_path, own_session), log_path, settings)

    @classmethod
    def start_with(
        cls, settings: Settings, log_path: Path, *, own_session: bool = True
    ) -> WorkerProcess:
        """A worker on exactly ``settings`` (every field set passed as its variable)."""
        return cls.start(
            settings_env(settings), log_path, own_session=own_session, settings=settings
        )

    def wait_ready(
        self, timeout: float, on_wait: Callable[[float], None] | None = None, *,
        tail: int = 1, poll_s: float = 0.5,
    ) -> None:  # fmt: skip
        """Return once the worker takes jobs; ServiceError if it exits or takes too long,
        with the last ``tail`` lines of its log. ``on_wait`` gets the seconds waited, every
        ``poll_s``."""
        start = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServiceError(
                    f"the worker exited with status {code} before it was ready (log: "
                    f"{self.log_path}): {self.log_tail(tail)}"
                )
            if READY_MARK in self.log():
                return
            waited = time.monotonic() - start
            if waited > timeout:
                raise ServiceError(
                    f"the worker was not ready after {timeout:g} s (log: {self.log_path}): "
                    f"{self.log_tail(tail)}"
                )
            if on_wait is not None:
                on_wait(waited)
            time.sleep(poll_s)


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
