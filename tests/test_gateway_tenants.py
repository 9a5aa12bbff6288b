"""Tenants of the HTTP gateway (docs/gateway.md#tenants): API keys made and revoked with the
``hermes-worker keys`` console script, and a real gateway process (``HERMES_GATEWAY_AUTH=keys``,
the default) in front of a real scripted worker on real Redis, driven by the official
``openai`` SDK and httpx.

As in test_gateway.py, ``tiny`` is the worker's queue and ``backlog`` a queue whose only
"worker" is a vitals hash written here (live, taking nothing: its jobs stay queued, which is
what the jobs-waiting quota counts)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_gateway import USER, script, sse_events, wait_gateway
from test_redis_security import SecureRedis, assert_nothing_denied
from worker_fixtures import (
    WORKER_REDIS_URL,
    clean_redis,
    patient_redis,
    scripted_args,
    start_worker,
    stop_worker,
    unique_settings,
    wait_ready,
)

from hermes_worker.cli.services import (
    ServiceProcess,
    free_port,
    process_env,
    settings_env,
    worker_command,
)
from hermes_worker.contract.store import Keys, as_text
from hermes_worker.settings import Settings
from producers.control import queue_lists

# Roomy defaults: each test sets the quotas it tests on a tenant of its own.
DEFAULT_RPM = 10_000
DEFAULT_WAITING = 1_000


@dataclass
class Tenants:
    url: str
    settings: Settings  # the gateway's
    gateway: ServiceProcess
    log_path: Path
    worker_log: Path | None = None

    def keys(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``hermes-worker keys ARGS`` on the gateway's Redis and key prefix."""
        env = process_env(
            {
                "HERMES_REDIS_URL": self.settings.redis_url,
                "HERMES_GATEWAY_KEY_PREFIX": self.settings.gateway_key_prefix,
            }
        )
        return subprocess.run(
            [*worker_command(), "keys", *args], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

    def new_key(self, tenant: str, *options: str) -> str:
        made = self.keys("create", "--tenant", tenant, *options)
        assert made.returncode == 0, made.stderr
        return made.stdout.strip()

    def sdk(self, key: str) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def get(self, path: str, key: str | None, **options: Any) -> httpx.Response:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30, **options)

    def post(self, path: str, key: str, body: Any = None, **headers: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", **headers}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30)


def tenant_name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def backlog_job(**fields: Any) -> dict[str, Any]:
    """A background job that stays queued (no worker takes the backlog queue)."""
    return {"model": "backlog", "messages": USER, "background": True, **fields}


@pytest.fixture(scope="module")
def tenants(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    settings = unique_settings()
    logs = tmp_path_factory.mktemp("gateway-tenants")
    backlog = f"{settings.queue_name}-backlog"
    worker = start_worker(settings, test_model_dir, logs / "worker.log", scripted_args(200))
    served = settings.model_copy(
        update={
            "gateway_port": free_port(),
            "gateway_routes": json.dumps({"tiny": settings.queue_name, "backlog": backlog}),
            "gateway_key_prefix": f"{settings.key_prefix}gw:",
            "gateway_tenant_rpm": DEFAULT_RPM,
            "gateway_tenant_max_waiting": DEFAULT_WAITING,
            "gateway_retry_after_s": 1,
            "files_dir": str(logs / "files"),
        }
    )
    assert served.gateway_auth == "keys"  # the default
    log_path = logs / "gateway.log"
    env = process_env({**settings_env(served), "HERMES_LOG_FORMAT": "json"})
    command = [*worker_command(), "gateway", "--log-level", "info"]
    gateway = ServiceProcess.spawn(command, env, log_path, own_session=False)
    url = f"http://127.0.0.1:{served.gateway_port}"
    keys = Keys(settings.key_prefix)
    r = patient_redis(WORKER_REDIS_URL)
    r.hset(keys.worker("backlog-worker"), mapping={"model": "none", "queue": backlog})
    r.zadd(keys.workers, {"backlog-worker": time.time()})
    try:
        wait_ready(worker, timeout=60)
        wait_gateway(gateway, url)
        yield Tenants(url, served, gateway, log_path, logs / "worker.log")
    finally:
        gateway.stop(10)
        stop_worker(worker)
        clean_redis(settings)
        r.delete(*queue_lists(settings.model_copy(update={"queue_name": backlog})))
        gateway_keys = list(r.scan_iter(f"{served.gateway_key_prefix}*"))
        if gateway_keys:
            r.delete(*gateway_keys)


def assert_error(reply: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    return error


# --- keys -------------------------------------------------------------------------------------


def test_a_key_made_by_the_cli_works_until_revoked(tenants: Tenants) -> None:
    # Given a key made with the console script (shown once, on stdout)
    tenant = tenant_name()
    made = tenants.keys("create", "--tenant", tenant, "--name", "ci", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    secret, key_id = created["key"], created["id"]
    assert secret.startswith(f"hwk_{key_id}_") and len(secret) > 40
    # When the openai SDK uses it, Then a chat runs
    reply = tenants.sdk(secret).chat.completions.create(model="tiny", messages=USER)
    assert reply.choices[0].message.content
    # And keys list shows it, used, without the key or its hash
    listed = tenants.keys("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert secret not in listed.stdout and secret[20:] not in listed.stdout
    (mine,) = [k for k in json.loads(listed.stdout) if k["id"] == key_id]
    assert (mine["tenant"], mine["name"]) == (tenant, "ci")
    assert mine["prefix"] == f"hwk_{key_id}_…"
    assert mine["last_used"] is not None and mine["last_used"] >= int(mine["created"])
    table = tenants.keys("list")
    assert table.returncode == 0 and key_id in table.stdout and secret not in table.stdout
    # When it is revoked, Then the next request with it is a 401
    gone = tenants.keys("revoke", key_id)
    assert gone.returncode == 0 and key_id in gone.stdout, gone.stderr
    with pytest.raises(openai.AuthenticationError) as refused:
        tenants.sdk(secret).chat.completions.create(model="tiny", messages=USER)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    # And revoking it again, or a key that never was, is an error line
    again = tenants.keys("revoke", key_id)
    assert again.returncode == 1 and "not_found" in again.stderr
    assert "Traceback" not in again.stderr


def test_no_key_or_a_bad_one_is_401(tenants: Tenants) -> None:
    # When a request comes without a key, with an unknown one, or not as a bearer token
    bad = ["Bearer hwk_000000000000_nope", "Basic dXNlcjpwYXNz", "Bearer"]
    for headers in [{}, *({"Authorization": value} for value in bad)]:
        reply = httpx.post(f"{tenants.url}/v1/chat/completions", headers=headers, timeout=30,
                           json={"model": "tiny", "messages": USER})  # fmt: skip
        # Then it is a 401 in OpenAI's shape, and nothing was queued
        error = assert_error(reply, 401, "invalid_api_key")
        assert error["type"] == "invalid_request_error"
        assert reply.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/v1/jobs/anything", "/v1/jobs/anything/events"):
        assert_error(tenants.get(path, None), 401, "invalid_api_key")
    # And the SDK raises its AuthenticationError for a bad key
    with pytest.raises(openai.AuthenticationError):
        tenants.sdk("hwk_not_a_key").models.list()
    # While health and metrics need no key (operators' endpoints)
    assert tenants.get("/healthz", None).status_code == 200
    assert tenants.get("/metrics", None).status_code == 200


# --- who sees what ----------------------------------------------------------------------------


def test_a_body_id_that_would_name_a_jobs_lease_or_stream_is_a_400(tenants: Tenants) -> None:
    key = tenants.new_key(tenant_name())
    # Given a tenant's job that waits in the queue
    made = tenants.post("/v1/chat/completions", key, backlog_job(id="mine"))
    assert made.status_code == 202, made.text
    # When the tenant sends a body whose id would put a record at that job's lease or stream
    for job_id in ("mine:lease", "mine:events"):
        reply = tenants.post("/v1/chat/completions", key, backlog_job(id=job_id))
        # Then it is refused, naming the id
        error = assert_error(reply, 400, None)
        assert error["param"] == "id" and "':lease'" in error["message"], error
    # And the first job is untouched: queued, no lease
    keys = Keys(tenants.settings.key_prefix)
    r = patient_redis(WORKER_REDIS_URL)
    assert as_text(r.hget(keys.job(made.json()["id"]), "status")) == "queued"
    assert not r.exists(keys.lease(made.json()["id"]))


def test_a_tenant_cannot_see_or_touch_another_tenants_job(tenants: Tenants) -> None:
    alpha, beta = tenant_name(), tenant_name()
    a_key, b_key = tenants.new_key(alpha), tenants.new_key(beta)
    # Given a job of tenant A that waits in the queue (its id chosen in the body)
    made = tenants.post("/v1/chat/completions", a_key, backlog_job(id="shared-id"))
    assert made.status_code == 202, made.text
    a_job = made.json()["id"]
    assert a_job == f"{alpha}:shared-id"  # scoped to its tenant
    record = patient_redis(WORKER_REDIS_URL).hgetall(Keys(tenants.settings.key_prefix).job(a_job))
    assert as_text(record[b"tenant"]) == alpha  # the record says whose it is
    # When tenant B asks for it, by the id A's answers show or the one A chose
    for job_id in (a_job, "shared-id"):
        # Then it is a 404 for B, as for a job that does not exist
        assert_error(tenants.get(f"/v1/jobs/{job_id}", b_key), 404, "job_not_found")
        assert_error(tenants.post(f"/v1/jobs/{job_id}/cancel", b_key), 404, "job_not_found")
        events = tenants.get(f"/v1/jobs/{job_id}/events", b_key)
        assert_error(events, 404, "job_not_found")
    with pytest.raises(openai.NotFoundError):
        tenants.sdk(b_key).get(f"/jobs/{a_job}", cast_to=httpx.Response)
    # And B's own job with the same body id is another job
    mine = tenants.post("/v1/chat/completions", b_key, backlog_job(id="shared-id"))
    assert mine.status_code == 202 and mine.json()["id"] == f"{beta}:shared-id"
    # And the same Idempotency-Key names two jobs for two tenants
    key = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    a_idem = tenants.post("/v1/chat/completions", a_key, backlog_job(), **key).json()["id"]
    b_idem = tenants.post("/v1/chat/completions", b_key, backlog_job(), **key).json()["id"]
    assert a_idem != b_idem
    assert_error(tenants.get(f"/v1/jobs/{a_idem}", b_key), 404, "job_not_found")
    # While A reaches its job by either id, reads its events and cancels it
    assert tenants.get("/v1/jobs/shared-id", a_key).json()["id"] == a_job
    assert tenants.get(f"/v1/jobs/{a_job}", a_key).json()["status"] == "queued"
    cancelled = tenants.post(f"/v1/jobs/{a_job}/cancel", a_key)
    assert cancelled.status_code == 200 and cancelled.json()["cancel"] == "cancelled"
    with httpx.stream("GET", f"{tenants.url}/v1/jobs/shared-id/events", timeout=30,
                      headers={"Authorization": f"Bearer {a_key}"}) as reply:  # fmt: skip
        assert reply.status_code == 200
        kinds = [e["event"] for e in sse_events(reply) if "event" in e]
    assert kinds[-1] == "cancelled"
    for job_id in (b_idem, f"{beta}:shared-id", a_idem):
        owner = b_key if job_id != a_idem else a_key
        assert tenants.post(f"/v1/jobs/{job_id}/cancel", owner).status_code == 200


def test_tenants_may_not_set_hermes_metadata(tenants: Tenants) -> None:
    client = tenants.sdk(tenants.new_key(tenant_name()))
    # When a tenant sends a hermes_* metadata key (the scripted engine's, fault injection's)
    for metadata in (script("forged"), {"hermes_fault": "transient:1", "team": "x"}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=USER, metadata=metadata)
        # Then it is a 400 naming the key, and nothing ran
        name = next(k for k in metadata if k.startswith("hermes_"))
        assert refused.value.body["param"] == f"metadata.{name}"  # type: ignore[index]
        assert "reserved" in refused.value.message
    # And other metadata passes
    reply = client.chat.completions.create(model="tiny", messages=USER, metadata={"team": "x"})
    assert reply.choices[0].message.content


# --- quotas -----------------------------------------------------------------------------------


def test_requests_per_minute_answer_429_with_retry_after_then_recover(tenants: Tenants) -> None:
    # Given a tenant allowed 60 requests a minute (a bucket of 60, one more each second)
    tenant = tenant_name()
    key = tenants.new_key(tenant)
    set_quota = tenants.keys("quota", tenant, "--rpm", "60", "--json")
    assert set_quota.returncode == 0, set_quota.stderr
    assert json.loads(set_quota.stdout) == {"tenant": tenant, "rpm": 60, "max_waiting": None}
    # When it sends more than that at once
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        start = time.monotonic()
        statuses = []
        while 429 not in statuses and len(statuses) < 200:
            refused = http.get(f"{tenants.url}/v1/models")
            statuses.append(refused.status_code)
        took = time.monotonic() - start
    # Then the first 60 pass (plus one a second while they were sent), then a 429
    # rate_limit_error with a Retry-After
    assert set(statuses[:-1]) == {200}
    assert 60 <= len(statuses) - 1 <= 60 + took + 1
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 2
    # And the SDK sees a RateLimitError
    with pytest.raises(openai.RateLimitError):
        tenants.sdk(key).models.list()
    # And another tenant is not held back by it
    assert tenants.get("/v1/models", tenants.new_key(tenant_name())).status_code == 200
    # When it waits as told, Then it is served again
    time.sleep(retry_after + 0.1)
    assert tenants.get("/v1/models", key).status_code == 200


def test_jobs_waiting_answer_429_and_free_up_as_jobs_start_or_end(tenants: Tenants) -> None:
    # Given a tenant allowed 2 jobs waiting, made with its key
    tenant = tenant_name()
    key = tenants.new_key(tenant, "--max-waiting", "2")
    assert json.loads(tenants.keys("quota", tenant, "--json").stdout)["max_waiting"] == 2
    first = tenants.post("/v1/chat/completions", key, backlog_job())
    retry = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    second = tenants.post("/v1/chat/completions", key, backlog_job(), **retry)
    assert first.status_code == second.status_code == 202
    # When a third job comes while both wait
    third = tenants.post("/v1/chat/completions", key, backlog_job())
    # Then it is a 429 tenant_quota_exceeded with a Retry-After, and nothing was queued
    error = assert_error(third, 429, "tenant_quota_exceeded")
    assert error["type"] == "rate_limit_error" and "2 jobs waiting" in error["message"]
    assert int(third.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        tenants.sdk(key).chat.completions.create(model="tiny", messages=USER)
    # And a retry of a job already there joins it (no new place taken)
    joined = tenants.post("/v1/chat/completions", key, backlog_job(), **retry)
    assert joined.status_code == 202 and joined.json()["id"] == second.json()["id"]
    # When one of them ends (cancelled), Then its place is free again: a job that runs
    assert tenants.post(f"/v1/jobs/{first.json()['id']}/cancel", key).status_code == 200
    reply = tenants.sdk(key).chat.completions.create(model="tiny", messages=USER)
    assert reply.choices[0].message.content
    # And that job, having started and ended, holds no place either
    fourth = tenants.post("/v1/chat/completions", key, backlog_job())
    assert fourth.status_code == 202, fourth.text
    assert_error(tenants.post("/v1/chat/completions", key, backlog_job()), 429,
                 "tenant_quota_exceeded")  # fmt: skip
    for job in (second, fourth):
        tenants.post(f"/v1/jobs/{job.json()['id']}/cancel", key)


# --- metrics and logs -------------------------------------------------------------------------


def test_metrics_and_logs_name_the_tenant(tenants: Tenants) -> None:
    tenant = tenant_name()
    client = tenants.sdk(tenants.new_key(tenant))
    # Given a plain chat and a stream of the tenant
    job_id = client.chat.completions.create(model="tiny", messages=USER).id
    list(client.chat.completions.create(model="tiny", messages=USER, stream=True))
    assert tenants.get("/v1/models", None).status_code == 401
    # Then the requests, the jobs and the streams are counted under its name
    closed = (
        f'hermes_gateway_open_streams{{model="tiny",route="/v1/chat/completions",'
        f'tenant="{tenant}"}} 0.0'
    )
    end = time.monotonic() + 5
    while closed not in (text := tenants.get("/metrics", None).text):
        assert time.monotonic() < end, text
        time.sleep(0.05)
    jobs = f'hermes_gateway_jobs_total{{created="true",mode="wait",model="tiny",tenant="{tenant}"}}'
    assert f"{jobs} 1.0" in text
    chat_ok = f'method="POST",route="/v1/chat/completions",status="200",tenant="{tenant}"'
    assert f"hermes_gateway_requests_total{{{chat_ok}}} 2.0" in text
    assert 'status="401",tenant="-"' in text  # no key: no tenant
    # And the gateway's log line for the chat names it
    lines = [json.loads(line) for line in tenants.log_path.read_text().splitlines()
             if line.startswith("{")]  # fmt: skip
    (chat,) = [line for line in lines if line.get("job_id") == job_id and line["msg"] == "chat"]
    assert chat["tenant"] == tenant
    # And so do the worker's lines of its job (the tenant is in the job's record)
    assert tenants.worker_log is not None
    end = time.monotonic() + 10
    while True:
        worker_lines = [json.loads(line) for line in tenants.worker_log.read_text().splitlines()
                        if line.startswith("{")]  # fmt: skip
        ended = [x for x in worker_lines if x.get("job_id") == job_id and x["msg"] == "job ended"]
        if ended or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert [x.get("tenant") for x in ended] == [tenant], ended


# --- least privilege ----------------------------------------------------------------------------


def test_the_gateway_and_keys_need_no_more_than_the_gateway_user(
    test_model_dir: Path, tmp_path: Path
) -> None:
    # Given Redis as compose starts it (deploy/redis: ACL users), a scripted worker as user
    # worker, and the gateway and the keys CLI as user gateway, on the names users.acl knows
    no_tls = tmp_path / "no-tls"
    no_tls.mkdir()
    server = SecureRedis(tmp_path, no_tls, free_port(), free_port())
    server.start()
    server.reset_denials()
    deployment = Settings(redis_url=server.url("worker", tls=False), key_prefix="hermes:",
                          queue_name="hermes")  # fmt: skip
    worker = start_worker(deployment, test_model_dir, tmp_path / "worker.log", scripted_args(200))
    served = Settings(redis_url=server.url("gateway", tls=False), gateway_port=free_port(),
                      files_dir=str(tmp_path / "files"))  # fmt: skip
    gateway = ServiceProcess.spawn(
        [*worker_command(), "gateway", "--log-level", "warning"],
        process_env(settings_env(served)), tmp_path / "gateway.log", own_session=False,
    )  # fmt: skip
    cli = Tenants(f"http://127.0.0.1:{served.gateway_port}", served, gateway, tmp_path)
    try:
        wait_ready(worker, timeout=60)
        wait_gateway(gateway, cli.url)
        # When a tenant (1 job waiting at most) runs jobs every way, and keys are managed
        key = cli.new_key("acme", "--max-waiting", "1", "--rpm", "1000")
        client = cli.sdk(key)
        assert [m.id for m in client.models.list()] == [str(test_model_dir)]
        assert client.chat.completions.create(messages=USER, model="x").choices[0].message
        assert list(client.chat.completions.create(messages=USER, model="x", stream=True))
        background = cli.post("/v1/chat/completions", key, {"messages": USER, "background": True,
                                                            "id": "mine"})  # fmt: skip
        assert background.status_code == 202
        assert cli.get("/v1/jobs/mine", key).status_code == 200
        with httpx.stream("GET", f"{cli.url}/v1/jobs/mine/events", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as reply:  # fmt: skip
            assert [e for e in sse_events(reply) if e.get("event") == "done"]
        assert cli.post("/v1/jobs/acme:mine/cancel", key).status_code == 409  # it ended
        listed = cli.keys("list", "--json")
        (key_id,) = [k["id"] for k in json.loads(listed.stdout)]
        assert cli.keys("quota", "acme", "--rpm", "100").returncode == 0
        assert cli.keys("revoke", key_id).returncode == 0
        assert cli.get("/v1/models", key).status_code == 401
        # Then Redis refused none of it
        assert_nothing_denied(server)
    finally:
        gateway.stop(10)
        stop_worker(worker)
        server.stop()
