"""The Celery app: Redis as broker, JSON only, one task name (``hermes.chat``).

Celery is the transport and nothing more. Results and streams are written under our own
Redis keys (``store.py``), so no result backend is configured. Producers in any language can
submit by sending a Celery message for ``hermes.chat`` whose single argument is the job body.

``HERMES_REDIS_URL`` is the one source of Redis credentials and TLS for Celery and for our own
clients: ``redis://user:password@host:6379/0``, or ``rediss://…?ssl_ca_certs=/path/ca.crt``
for TLS (the ``ssl_*`` query parameters are redis-py's, see :func:`broker_ssl`), or
``sentinel://h1:26379,h2:26379,h3:26379/0?master=NAME`` for a master that Sentinel fails
over (``store.SentinelURL``: the broker gets kombu's form of it).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from redis import Redis
from redis.connection import parse_url

from hermes_worker.contract.store import SentinelURL
from hermes_worker.settings import Settings
from hermes_worker.worker.transport import SENTINEL_TRANSPORT, TRANSPORT

TASK_NAME = "hermes.chat"
# The Redis transport emulates priorities with one list per step; ten steps give every
# job priority (0-9) its own list, and "priority" order serves 0 (most urgent) first.
PRIORITY_STEPS = list(range(10))
PRIORITY_SEP = ":"  # a step's list is "<queue>:<step>" (step 0: the queue name alone)
UNACKED_MUTEX_EXPIRE_S = 10
# kombu's record of delivered, unacknowledged messages (its defaults, named here so that the
# reaper, worker/reaper.py, reads the same keys): a hash tag -> [message, exchange, routing
# key] and a sorted set tag -> delivery time.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings both producers and workers use."""
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        # kombu's Redis transport, but one that survives raw garbage pushed on the queue.
        "broker_transport": TRANSPORT,
        "broker_connection_retry_on_startup": True,
        "broker_use_ssl": broker_ssl(settings.redis_url),
        # Pickle would let anyone who can write to Redis run code in the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        # Ack after the job ran; a worker that dies mid-job leaves it to be delivered again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue_name,
        "task_default_priority": 5,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "priority_steps": PRIORITY_STEPS,
            "sep": PRIORITY_SEP,
            "queue_order_strategy": "priority",
            # Sweep for messages whose worker died every few seconds, not every ~100 s
            # (kombu's default interval x throttle), so recovery follows the timeout closely.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            # A sweep holds a mutex in Redis; a worker killed while holding it blocked every
            # sweep on the database for kombu's default 300 s (seen after a kill -9). A sweep
            # takes milliseconds, and restoring one message twice is impossible anyway (each
            # restore is a WATCH transaction), so a dead holder now costs seconds.
            "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
            "unacked_key": UNACKED_KEY,
            "unacked_index_key": UNACKED_INDEX_KEY,
            # Ours (hermes_worker/worker/transport.py): a burst is taken in one call, not one each.
            "delivery_batch": settings.delivery_batch,
        },
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }
    sentinel = SentinelURL.parse(settings.redis_url)
    if sentinel is not None:
        # The same master through kombu's Sentinel channel: its URL form, the master's name
        # as a transport option, the sentinels' credentials (docs/reliability.md, "Failover").
        config["broker_url"] = sentinel.kombu_url()
        config["broker_transport"] = SENTINEL_TRANSPORT
        options = config["broker_transport_options"]
        options["master_name"] = sentinel.master
        options["sentinel_kwargs"] = sentinel.sentinel_kwargs({})
    return config


def broker_ssl(redis_url: str) -> dict[str, Any] | None:
    """kombu's TLS options for a ``rediss://`` URL (None for ``redis://``): the URL's
    ``ssl_*`` query parameters as redis-py reads them, certificates verified unless the URL
    says ``ssl_cert_reqs=none``.

    redis-py takes TLS from the URL alone. kombu, given our transport by name, connects in
    plain TCP to a ``rediss://`` URL that has no ``ssl_*`` parameter (reproduced against a
    TLS-only Redis: the server resets the connection), so the options are passed explicitly,
    and both clients verify the server the same way.
    """
    if urlsplit(redis_url).scheme != "rediss":
        return None
    # redis-py's own parser, so both clients read the parameters alike (it has no annotations).
    parsed: dict[str, Any] = parse_url(redis_url)  # type: ignore[no-untyped-call]
    options = {k: v for k, v in parsed.items() if k.startswith("ssl_")}
    options.setdefault("ssl_cert_reqs", "required")  # redis-py's default; never empty
    return options


def make_celery(settings: Settings, deliveries_key: str | None = None) -> Celery:
    """A Celery app configured for hermes-worker (not set as Celery's current app). A
    worker's app passes ``deliveries_key`` (``Keys.deliveries``): the consumer records there
    the delivery tag of every message it holds, for the reaper (worker/reaper.py)."""
    app = Celery("hermes_worker", set_as_current=False)
    app.conf.update(celery_config(settings))
    if deliveries_key is not None:
        app.conf.broker_transport_options["deliveries_key"] = deliveries_key
    return app


def send_job(app: Celery, body: dict[str, Any], job_id: str, priority: int, queue: str) -> None:
    """Put one job on the queue; the Celery task id is the job id."""
    app.send_task(TASK_NAME, args=[body], task_id=job_id, priority=priority, queue=queue)


def queue_list(queue: str, priority: int) -> str:
    """The Redis list that holds a queue's jobs of one priority (kombu's ``_q_for_pri``)."""
    return f"{queue}{PRIORITY_SEP}{priority}" if priority else queue


def delete_deployment_keys(client: Redis, key_prefix: str, queue: str) -> int:
    """Delete every key of one deployment: its jobs (records, streams, leases) and other keys
    under ``key_prefix``, its queue's lists (one per priority step) and kombu's bindings of
    the queue (Celery's default exchange is named after the queue). For tests, benchmarks
    and the demo, which share a server with others under a prefix and a queue of their
    own; returns how many keys went."""
    keys = list(client.scan_iter(match=_glob_escape(key_prefix) + "*", count=1000))
    keys += [queue_list(queue, step) for step in PRIORITY_STEPS]
    keys += [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
    return int(client.delete(*keys))


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a Redis glob pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def job_message(
    app: Celery, body: dict[str, Any], job_id: str, priority: int, queue: str
) -> tuple[str, str]:
    """The list and the payload that :func:`send_job` would push for this job, built here
    so that a producer can push it itself, in the Lua call that records the job (one round
    trip; see ``contract.scripts.SUBMIT``), rather than through Celery's blocking
    publish in a thread: about half the CPU and latency of ``send_task`` alone (figures:
    docs/benchmarks.md, "Measurements behind design choices").

    Celery builds the task message (protocol 2: headers, properties, args); what kombu's
    Redis transport adds on the way (body encoding, delivery info and tag, priority) is
    added here. ``tests/test_client.py`` holds it field by field against ``send_task``'s."""
    task = app.amqp.as_task_v2(
        job_id, TASK_NAME, args=[body], reply_to=app.thread_oid, ignore_result=None
    )
    properties = {
        # First, in this order, and the properties first of all: the consumer reads them off
        # the start of the message without decoding the body (hermes_worker.worker.transport).
        "delivery_tag": str(uuid.uuid4()),
        # The anonymous exchange: the routing key is the queue (no binding lookup).
        "delivery_info": {"exchange": "", "routing_key": queue},
        **task.properties,
        "delivery_mode": 2,  # persistent, as Celery sends tasks
        "priority": priority,
        "body_encoding": "base64",
    }
    message = {
        "properties": properties,
        "body": base64.b64encode(json.dumps(task.body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": task.headers,
    }
    return queue_list(queue, priority), json.dumps(message)
