"""Redis with passwords, ACL users and TLS: a real worker and real producers, each with only
the rights ``deploy/redis/users.acl`` gives it, run jobs end to end, and Redis denies them
nothing.

The server is started the way compose.yaml starts it (``deploy/redis/start.sh``: redis.conf,
the ACL file with the passwords filled in, a TLS port when a certificate is mounted), on free
ports of its own, with a CA and a server certificate made here with the ``openssl`` CLI. The
worker connects as user ``worker`` over TLS (``rediss://`` verified against that CA); the
producers connect as user ``producer``, over TLS and over the plain port.

"Denied nothing" is read from Redis itself: every refused command, key or channel lands in
``ACL LOG``, also the ones our code catches and retries (an ack the transport shrugs off, a
heartbeat that logs a warning), so each test that runs jobs ends with an empty ACL LOG.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from worker_fixtures import WorkerProcess, start_worker, stop_worker, wait_ready

from hermes_worker.cli.services import free_port
from hermes_worker.contract.jobs import JobResult, JobStatus
from hermes_worker.contract.queue import broker_ssl, make_celery
from hermes_worker.contract.store import Keys
from hermes_worker.settings import Settings
from producers.client import AsyncHermesClient, HermesClient

ROOT = Path(__file__).resolve().parent.parent
START_SH = ROOT / "deploy" / "redis" / "start.sh"
PASSWORDS = {
    "default": "admin-0123456789abcdef",
    "worker": "worker-0123456789abcdef",
    "producer": "producer-0123456789abcdef",
    "gateway": "gateway-0123456789abcdef",
}
PREFIX, QUEUE = "hermes:", "hermes"  # the names users.acl is written for
WORKER_NAME = "secure-worker-1"


# --- certificates and the server -----------------------------------------------------------


def make_certificates(directory: Path) -> None:
    """ca.crt / ca.key, a server certificate for 127.0.0.1 signed by it (redis.crt /
    redis.key), and an unrelated CA (other-ca.crt) that must not be trusted."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ("-newkey", "rsa:2048", "-nodes")
    for name in ("ca", "other-ca"):
        subject = f"/CN=hermes test {name}"
        openssl("req", "-x509", *key, "-days", "2", "-subj", subject,
                "-keyout", f"{name}.key", "-out", f"{name}.crt")  # fmt: skip
    openssl("req", *key, "-subj", "/CN=localhost", "-keyout", "redis.key", "-out", "redis.csr")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    signer = ("-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial")
    openssl("x509", "-req", "-in", "redis.csr", *signer, "-days", "2",
            "-extfile", "san.cnf", "-out", "redis.crt")  # fmt: skip


@dataclass
class SecureRedis:
    directory: Path
    tls_dir: Path
    port: int
    tls_port: int
    process: subprocess.Popen[bytes] | None = None

    def url(self, user: str, *, tls: bool = True, password: str | None = None) -> str:
        secret = PASSWORDS[user] if password is None else password
        if not tls:
            return f"redis://{user}:{secret}@127.0.0.1:{self.port}/0"
        ca = self.tls_dir / "ca.crt"
        return f"rediss://{user}:{secret}@127.0.0.1:{self.tls_port}/0?ssl_ca_certs={ca}"

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.url("default", tls=False))

    def start(self) -> None:
        env = {
            **os.environ,
            "REDIS_DEFAULT_PASSWORD": PASSWORDS["default"],
            "REDIS_WORKER_PASSWORD": PASSWORDS["worker"],
            "REDIS_PRODUCER_PASSWORD": PASSWORDS["producer"],
            "REDIS_GATEWAY_PASSWORD": PASSWORDS["gateway"],
            "REDIS_TLS_DIR": str(self.tls_dir),
            "REDIS_TLS_PORT": str(self.tls_port),
            "REDIS_ACL_OUT": str(self.directory / "users.acl"),
            "REDIS_DATA_DIR": str(self.directory),
        }
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            ["sh", str(START_SH), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.admin().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        log_text = (self.directory / "redis.log").read_text(errors="replace")
        raise RuntimeError(f"redis via start.sh did not come up:\n{log_text[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def denials(self) -> list[str]:
        """Everything Redis refused since the last reset, one line per kind of refusal."""
        entries = self.admin().acl_log()
        return [
            f"{e['username']}: {e['reason']} {e['object']} (context {e['context']}, {e['count']}x)"
            for e in entries
        ]

    def reset_denials(self) -> None:
        self.admin().acl_log_reset()


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI makes the test certificates")
    directory = tmp_path_factory.mktemp("secure-redis")
    tls_dir = directory / "tls"
    tls_dir.mkdir()
    make_certificates(tls_dir)
    server = SecureRedis(directory, tls_dir, free_port(), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secure_worker(
    secure_redis: SecureRedis, test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One worker for the module: user `worker` over TLS. One retry before the dead letters,
    and a short shutdown grace, so the last test sees a running job handed back."""
    settings = Settings(redis_url=secure_redis.url("worker"), key_prefix=PREFIX, queue_name=QUEUE)
    log_path = tmp_path_factory.mktemp("secure-worker") / "worker.log"
    worker = start_worker(
        settings,
        test_model_dir,
        log_path,
        HERMES_WORKER_NAME=WORKER_NAME,
        HERMES_MAX_RETRIES="1",
        HERMES_SHUTDOWN_GRACE_S="0.5",
    )
    try:
        wait_ready(worker, timeout=600)
        yield worker
    finally:
        stop_worker(worker)


def producer_settings(server: SecureRedis, *, tls: bool = True) -> Settings:
    return Settings(redis_url=server.url("producer", tls=tls), key_prefix=PREFIX, queue_name=QUEUE)


def assert_nothing_denied(server: SecureRedis) -> None:
    denials = server.denials()
    assert denials == [], "Redis refused these; deploy/redis/users.acl must grant them:\n" + (
        "\n".join(denials)
    )


SHORT_JOB = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
LONG_JOB = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1900, "ignore_eos": True}


# --- without a worker --------------------------------------------------------------------


def test_a_client_without_the_password_is_refused(secure_redis: SecureRedis) -> None:
    # Given the server, When a client comes without a password or with a wrong one
    anonymous = redis.Redis(host="127.0.0.1", port=secure_redis.port)
    # Then it cannot run a command
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(secure_redis.url("producer", password="wrong-password")).ping()
    # And a producer without the password cannot submit anything
    url = f"redis://127.0.0.1:{secure_redis.port}/0"
    settings = Settings(redis_url=url, key_prefix=PREFIX, queue_name=QUEUE)
    with HermesClient(settings) as client, pytest.raises(redis.AuthenticationError):
        client.submit(SHORT_JOB)
    assert secure_redis.admin().llen(QUEUE + ":5") == 0


def test_tls_verifies_the_server_against_the_given_ca(secure_redis: SecureRedis) -> None:
    tls = secure_redis.url("producer")
    # Given the right CA, both redis-py and Celery's broker connection get through
    assert redis.Redis.from_url(tls).ping()
    with make_celery(Settings(redis_url=tls)).connection_for_write() as conn:
        conn.ensure_connection(max_retries=0, timeout=5)
    # When the CA is another one, or none is given (the system's CAs do not know ours)
    other = tls.replace("ca.crt", "other-ca.crt")
    no_ca = tls.split("?")[0]
    for url in (other, no_ca):
        # Then both refuse the server: TLS verification is on, and Celery does not fall back
        # to plain TCP for a rediss:// URL
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            redis.Redis.from_url(url).ping()
        app = make_celery(Settings(redis_url=url))
        with app.connection_for_write() as conn, pytest.raises(Exception, match="CERTIFICATE"):
            conn.ensure_connection(max_retries=0, timeout=5)
    # And a plain-text client on the TLS port gets nothing
    plain_on_tls = f"redis://producer:{PASSWORDS['producer']}@127.0.0.1:{secure_redis.tls_port}/0"
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain_on_tls).ping()


def test_broker_tls_options_come_from_the_url() -> None:
    # Plain redis:// has none; rediss:// verifies the server unless the URL says otherwise
    assert broker_ssl("redis://u:p@h:6379/0") is None
    assert broker_ssl("rediss://u:p@h:6380/0") == {"ssl_cert_reqs": "required"}
    url = "rediss://u:p@h:6380/0?ssl_ca_certs=/ca.crt&ssl_check_hostname=false&ssl_cert_reqs=none"
    assert broker_ssl(url) == {
        "ssl_ca_certs": "/ca.crt",
        "ssl_check_hostname": False,
        "ssl_cert_reqs": "none",
    }


def test_each_user_is_held_to_its_rights(secure_redis: SecureRedis) -> None:
    producer = redis.Redis.from_url(secure_redis.url("producer", tls=False))
    worker = redis.Redis.from_url(secure_redis.url("worker", tls=False))
    try:
        # A producer touches no consumer state, worker vitals or keys outside the namespace,
        # and runs no administrative command
        for denied in (
            lambda: producer.hgetall("unacked"),
            lambda: producer.hset(f"{PREFIX}worker:w", "heartbeat_at", "0"),
            lambda: producer.set("elsewhere", "1"),
            lambda: producer.keys("*"),
            lambda: producer.flushall(),
            lambda: producer.config_get("*"),
            lambda: producer.brpop([QUEUE], timeout=1),
            lambda: producer.publish("hermes:other", "x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
        # A worker stays inside its keys and runs no administrative command either
        for denied in (
            lambda: worker.set("elsewhere", "1"),
            lambda: worker.keys("*"),
            lambda: worker.flushdb(),
            lambda: worker.config_set("appendonly", "no"),
            lambda: worker.acl_list(),
            lambda: worker.publish("hermes:cancel", "x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
        # What each needs is allowed
        assert producer.llen(QUEUE) == 0
        assert worker.hgetall(f"{PREFIX}worker:w") == {}
    finally:
        producer.close()
        worker.close()
        secure_redis.reset_denials()


# --- a real worker (engine) ----------------------------------------------------------------


@pytest.mark.engine
def test_a_job_runs_end_to_end_with_least_privilege(
    secure_redis: SecureRedis, secure_worker: WorkerProcess
) -> None:
    secure_redis.reset_denials()
    for tls in (True, False):
        # Given a producer as user `producer` (over TLS, then over the plain port)
        with HermesClient(producer_settings(secure_redis, tls=tls)) as client:
            # When it submits a job and follows its stream
            handle = client.submit({**SHORT_JOB, "thinking": True})
            kinds = [event.type for event in handle.stream(timeout=120)]
            result = handle.result(timeout=60)
            # Then the worker (user `worker`, over TLS) ran it to the end
            assert kinds[0] == "started" and kinds[-1] == "done", kinds
            assert result.job.status is JobStatus.SUCCEEDED
            assert result.job.worker == WORKER_NAME
            assert handle.status().status is JobStatus.SUCCEEDED
    # And the asyncio client (its own stream reader, over TLS) does the same
    result = asyncio.run(submit_async(producer_settings(secure_redis)))
    assert result.job.status is JobStatus.SUCCEEDED
    assert_nothing_denied(secure_redis)


async def submit_async(settings: Settings) -> JobResult:
    async with AsyncHermesClient(settings) as client:
        handle = await client.submit(SHORT_JOB)
        kinds = [event.type async for event in handle.stream(timeout=120)]
        assert kinds[0] == "started" and kinds[-1] == "done", kinds
        return await handle.result(timeout=60)


@pytest.mark.engine
def test_health_check_reads_the_heartbeat_as_the_worker_user(
    secure_redis: SecureRedis, secure_worker: WorkerProcess
) -> None:
    secure_redis.reset_denials()
    exe = shutil.which("hermes-worker", path=str(Path(sys.executable).parent))
    assert exe
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env |= {"HERMES_REDIS_URL": secure_redis.url("worker"), "HERMES_KEY_PREFIX": PREFIX}
    # When the health check runs with the worker's settings (its user, over TLS)
    alive = subprocess.run([exe, "health", "--worker", WORKER_NAME], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    # Then the worker's heartbeat is fresh
    assert alive.returncode == 0, alive.stderr
    assert f'"worker": "{WORKER_NAME}"' in alive.stdout
    # And a worker that does not heartbeat is reported unhealthy
    gone = subprocess.run([exe, "health", "--worker", "no-such-worker"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert gone.returncode == 1
    assert "unhealthy" in gone.stderr
    assert_nothing_denied(secure_redis)


@pytest.mark.engine
def test_cancel_works_with_least_privilege(
    secure_redis: SecureRedis, secure_worker: WorkerProcess
) -> None:
    secure_redis.reset_denials()
    with HermesClient(producer_settings(secure_redis)) as client:
        # Given a long job generating
        handle = client.submit(LONG_JOB)
        for event in handle.stream(timeout=120):
            if event.type in ("reasoning", "content"):
                break
        # When the producer cancels it (its script publishes on the cancel channel)
        assert handle.cancel() == "cancelling"
        # Then the worker, subscribed to that channel, stops it
        assert handle.result(timeout=60).job.status is JobStatus.CANCELLED
    assert_nothing_denied(secure_redis)


@pytest.mark.engine
def test_retries_and_dead_letters_work_with_least_privilege(
    secure_redis: SecureRedis, secure_worker: WorkerProcess
) -> None:
    secure_redis.reset_denials()
    with HermesClient(producer_settings(secure_redis)) as client:
        # Given a job whose first attempt fails: the worker sends it again (a Celery retry)
        flaky = client.submit({**SHORT_JOB, "metadata": {"hermes_fault": "transient:1"}})
        result = flaky.result(timeout=120)
        assert result.job.status is JobStatus.SUCCEEDED
        assert result.job.attempts == 2
        # Given a job that always fails: out of retries, the worker dead-letters it
        doomed = client.submit({**SHORT_JOB, "metadata": {"hermes_fault": "transient:99"}})
        assert doomed.result(timeout=120).job.status is JobStatus.FAILED
        wait_for_dead_letter(client, doomed.id)  # listed just after the failure is written
        # When the producer requeues it, it runs again (and fails again)
        client.requeue(doomed.id)
        assert client.dead_letters() == []
        wait_for_dead_letter(client, doomed.id)
        # And purging removes it with its keys
        assert client.purge_dead_letters() == 1
        assert client.dead_letters() == []
    assert secure_redis.admin().exists(Keys(PREFIX).job(doomed.id)) == 0
    assert_nothing_denied(secure_redis)


def wait_for_dead_letter(client: HermesClient, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while [letter.id for letter in client.dead_letters()] != [job_id]:
        assert time.monotonic() < deadline, f"{job_id} never reached the dead letters"
        time.sleep(0.1)


@pytest.mark.engine
def test_remote_control_reaches_the_worker(
    secure_redis: SecureRedis, secure_worker: WorkerProcess
) -> None:
    secure_redis.reset_denials()
    # Given an operator's Celery app (Flower's view: the default user)
    app = make_celery(Settings(redis_url=secure_redis.url("default", tls=False)))
    # When it pings the workers, Then ours answers (its reply queue is within its rights)
    replies = app.control.ping(timeout=5.0)
    assert any(f"hermes@{WORKER_NAME}" in reply for reply in replies), replies
    app.close()
    assert_nothing_denied(secure_redis)


@pytest.mark.engine
def test_sigterm_hands_a_running_job_back_with_least_privilege(
    secure_redis: SecureRedis, secure_worker: WorkerProcess
) -> None:
    """Runs last: it stops the module's worker."""
    secure_redis.reset_denials()
    admin = secure_redis.admin()
    with HermesClient(producer_settings(secure_redis)) as client:
        # Given a long job generating
        handle = client.submit(LONG_JOB)
        for event in handle.stream(timeout=120):
            if event.type in ("reasoning", "content"):
                break
        # When the worker gets SIGTERM (grace 0.5 s)
        assert stop_worker(secure_worker) == 0
        # Then the job is back on the queue (kombu's restore: WATCH/MULTI/EXEC as `worker`)
        assert handle.status().status is JobStatus.QUEUED
        waiting = sum(admin.llen(f"{QUEUE}:{step}" if step else QUEUE) for step in range(10))
        assert waiting == 1
        assert admin.hlen("unacked") == 0
    assert_nothing_denied(secure_redis)
