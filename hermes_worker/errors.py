"""One error hierarchy for hermes-worker.

Every error a job can end with is a :class:`HermesError`. Each class carries the
OpenAI-style ``type`` string that lands in the job's ``error`` object and says
whether a retry could help (``retryable``). Mapping errors to a job status
happens in one place, from these two attributes, never from ``isinstance``
chains scattered through the worker.
"""

from __future__ import annotations


class HermesError(Exception):
    """Raised for any failure that hermes-worker reports to a client."""

    type: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The ``error`` object written into a failed job's result."""
        return {"type": self.type, "message": self.message}


class PermanentError(HermesError):
    """Raised when the job itself is at fault: running it again gives the same failure."""


class RetryableError(HermesError):
    """Raised when the failure lies outside the job (engine, Redis): a later attempt may succeed."""

    retryable = True


class InvalidRequest(PermanentError):
    """Raised when a job body fails validation; the message names the offending field."""

    type = "invalid_request_error"


class TemplateError(PermanentError):
    """Raised when a chat template cannot render the job's messages."""

    type = "template_error"


class ContextLengthExceeded(PermanentError):
    """Raised when the rendered prompt plus the tokens asked for exceed the model's context."""

    type = "context_length_exceeded"


class ModelLoadError(PermanentError):
    """Raised when a checkpoint directory cannot be read (missing tokenizer, bad config)."""

    type = "model_load_error"


class EngineError(RetryableError):
    """Raised when the inference engine fails or dies while a job runs."""

    type = "engine_error"


class JobCancelled(PermanentError):
    """Raised when a client cancelled the job (before it started or while it ran)."""

    type = "cancelled"


class JobExpired(PermanentError):
    """Raised when a job's deadline passed before it could start; the engine never saw it."""

    type = "expired"


class JobTimeout(PermanentError):
    """Raised when a job's deadline (or the worker's maximum generation time) hit mid-generation."""

    type = "timeout"


class StoreUnavailable(RetryableError):
    """Raised when Redis fails while a job runs (restart, dropped connection)."""

    type = "redis_error"


class InternalError(PermanentError):
    """Raised when the worker itself failed unexpectedly on a job (a bug, not the job's fault)."""

    type = "internal_error"


class PoisonMessage(PermanentError):
    """A job whose deliveries kept ending their worker (``HERMES_MAX_DELIVERIES``)."""

    type = "poison"


class ForgedMessage(PermanentError):
    """A delivered message whose body is not the one its job's record holds: it is dropped
    and the real job is left as it is."""

    type = "forged_message"


class ConfigurationError(PermanentError):
    """Raised when the settings cannot work on this machine (a KV cache that cannot fit)."""

    type = "configuration_error"


class UnsafeRedis(ConfigurationError):
    """Raised at worker start under ``HERMES_REDIS_CHECK=refuse`` when the Redis would lose
    jobs (an evicting ``maxmemory-policy``, no persistence, an ACL without what the worker
    needs, a server too old); ``hermes-worker doctor`` reports the same checks."""

    type = "unsafe_redis"


# --- producers, the CLI and local services -------------------------------------------------


class JobNotFound(HermesError):
    """Raised when a job id has no record: never submitted, or its keys have expired."""

    type = "not_found"


class JobLost(JobNotFound):
    """Raised to a producer waiting on a job whose record it had seen and which is gone:
    Redis lost it (restarted without persistence, evicted the key) or it expired. The job
    will not end where the producer can see it; submitting it again under the same id is
    safe (one id, one execution). An id never seen with a record is still waited for."""

    type = "job_lost"


class JobAlreadyEnded(HermesError):
    """Raised when a job to cancel has already ended; ``status`` says how."""

    type = "already_ended"

    def __init__(self, job_id: str, status: str) -> None:
        from hermes_worker.contract.jobs import JobStatus  # the wire models import this module

        super().__init__(f"job {job_id!r} already ended ({status})")
        self.status = JobStatus(status)


class QueueFull(RetryableError):
    """Raised when a submit finds ``max_queue_depth`` jobs already waiting; nothing is queued.

    Retryable: the queue drains as workers take jobs, so the same submit may succeed later.
    """

    type = "queue_full"


class NotInDeadLetters(HermesError):
    """Raised when a job to requeue is not in the dead letters."""

    type = "not_in_dlq"


class ServiceError(HermesError):
    """Raised when a local service (redis-server, a worker) cannot be started or found."""

    type = "service_error"


class DemoFailed(HermesError):
    """Raised when a demo job does not succeed; the message says how it ended."""

    type = "demo_failed"


# --- batches and files ----------------------------------------------------------------------


class FileNotFound(JobNotFound):
    """Raised when a file id is not in the file store."""

    type = "file_not_found"


class BatchNotFound(JobNotFound):
    """Raised when a batch id has no record."""

    type = "batch_not_found"


class BatchAlreadyEnded(HermesError):
    """Raised when a batch to cancel has already ended; ``status`` says how."""

    type = "already_ended"
