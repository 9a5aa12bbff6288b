"""Running a batch: validate its file, feed its lines to the queue in a window, write each
finished line to the output or error file, and finalise; stop and resume at any point.

Any number of processes may run batches (``hermes-worker batch run``, the gateway, ``batch
create --wait``): one runs a given batch at a time, the holder of its lease
(``{prefix}batch:{id}:runner``, renewed each round); a runner that dies leaves the lease to
expire, and the next one resumes. Nothing is done twice or skipped on a resume:

* each line's job id comes from the batch id and the line number, so submitting a line
  again (a runner that died between its submit and its cursor write) queues nothing;
* the output and error files are the record of what is written: a resuming runner reads
  them back (cutting a half-written last line) and writes only the lines they lack, and
  sets the batch's counts from them. ``output + error lines = total`` once a batch ends.

Memory stays flat whatever the file's size: the input is read as a stream, at most
``window`` requests are held, and what is written is a bitmap of one bit a line.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import structlog

from hermes_worker.batch.files import FileStore
from hermes_worker.batch.lines import (
    BadLine,
    BatchRequest,
    encode_line,
    is_output,
    line_job_id,
    read_request,
    result_line,
    unrun_line,
    validate,
)
from hermes_worker.batch.store import ACTIVE, ENDED, BatchStore
from hermes_worker.contract import scripts
from hermes_worker.contract.jobs import TERMINAL_STATUSES
from hermes_worker.contract.queue import job_message
from hermes_worker.errors import (
    FileNotFound,
    HermesError,
    InvalidRequest,
    JobAlreadyEnded,
    JobNotFound,
    QueueFull,
)
from hermes_worker.settings import Settings
from producers.client import HermesClient
from producers.control import queue_lists

log = structlog.get_logger(__name__)

ENDED_STATUSES = frozenset(status.value for status in TERMINAL_STATUSES)
WIND_DOWN_S = 60.0  # how long a cancelled or expired batch waits for its running jobs


@dataclass
class _Progress:
    """What a runner knows of its batch between rounds."""

    total: int
    fed: int
    written: bytearray  # one bit per line
    lines: Iterator[tuple[int, bytes]]  # the input from line ``fed`` on
    outstanding: dict[str, BatchRequest] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    held: tuple[int, bytes] | None = None  # a line the queue had no room for yet
    queued_since: dict[str, float] = field(default_factory=dict)  # job id -> monotonic

    def mark(self, index: int) -> None:
        self.written[index // 8] |= 1 << (index % 8)

    def is_written(self, index: int) -> bool:
        return bool(self.written[index // 8] & (1 << (index % 8)))

    @property
    def done(self) -> int:
        return self.completed + self.failed


class BatchRunner:
    """Runs batches of one deployment to their end."""

    def __init__(
        self,
        client: HermesClient,
        files: FileStore,
        settings: Settings | None = None,
        *,
        lease_s: float | None = None,
    ) -> None:
        self.client = client
        self.files = files
        self.settings = settings or client.settings
        self.batches = BatchStore(client.redis, client.keys)
        self.lease_s = lease_s if lease_s is not None else self.settings.batch_lease_s
        self._lease = client.redis.register_script(scripts.BATCH_LEASE)
        self._resend = client.redis.register_script(scripts.RESEND)

    # --- the whole run ------------------------------------------------------------------

    def run(self, batch_id: str, stop: threading.Event | None = None) -> bool:
        """Run the batch until it ends (True), or until ``stop`` is set or another runner
        holds it (False: it is left for whoever holds or takes its lease)."""
        stop = stop or threading.Event()
        token = secrets.token_hex(8)
        if not self._hold(batch_id, token):
            return False
        record = self.batches.record(batch_id)
        if record["status"] in ENDED:
            return True
        try:
            if record["status"] == "validating" and not self._validate(batch_id, record):
                return True
            record = self.batches.record(batch_id)
            progress = self._resume(record)
        except FileNotFound as exc:  # the file store lost it, or is not the one it was made in
            error = {"code": "file_not_found", "message": exc.message, "param": None, "line": None}
            self.batches.move(batch_id, "failed", allowed=ACTIVE, errors=[error])
            log.error("batch failed: a file is missing", batch_id=batch_id, error=exc.message)
            return True
        with (
            self.files.appender(record["output_file_id"]) as output,
            self.files.appender(record["error_file_id"]) as errors,
        ):
            while not stop.is_set():
                if not self._hold(batch_id, token):
                    log.warning("batch lease lost", batch_id=batch_id)
                    return False
                record = self.batches.record(batch_id)
                status = record["status"]
                if status in ENDED:
                    return True
                # The completion window ends on Redis's clock, which every runner shares.
                if status == "cancelling" or self.batches.now() >= int(record["expires_at"]):
                    self._wind_down(batch_id, record, progress, output, errors, stop)
                    return not stop.is_set()
                self._feed(batch_id, record, progress, output, errors)
                self._collect(batch_id, progress, output, errors)
                if progress.done >= progress.total:
                    self.batches.move(batch_id, "finalizing", allowed=("in_progress",))
                    self.batches.move(batch_id, "completed", allowed=("finalizing",))
                    log.info("batch completed", batch_id=batch_id, total=progress.total)
                    return True
                stop.wait(self.settings.batch_poll_s)
        return False

    def _hold(self, batch_id: str, token: str) -> bool:
        key = self.batches.keys.batch_runner(batch_id)
        return bool(self._lease(keys=[key], args=[token, int(self.lease_s * 1000)]))

    # --- validating ---------------------------------------------------------------------

    def _validate(self, batch_id: str, record: dict[str, str]) -> bool:
        found = validate(
            self.files.lines(record["input_file_id"], partial_last=True),
            batch_id=batch_id,
            priority=int(record["priority"]),
            max_body_bytes=self.settings.max_body_bytes,
            max_lines=self.settings.batch_max_lines,
            reserved_metadata=not record.get("tenant"),
        )
        if found.error_count:
            errors = [e.to_dict() for e in found.errors or []]
            self.batches.move(batch_id, "failed", allowed=("validating",), errors=errors)
            log.info("batch failed validation", batch_id=batch_id, bad_lines=found.error_count)
            return False
        moved = self.batches.move(
            batch_id, "in_progress", allowed=("validating",), total=str(found.total)
        )
        log.info("batch in progress", batch_id=batch_id, total=found.total, moved=moved)
        return True

    # --- resuming -----------------------------------------------------------------------

    def _resume(self, record: dict[str, str]) -> _Progress:
        """Where the batch stands, read back from its files (see the module's docstring)."""
        total, fed = int(record["total"]), int(record["fed"])
        written_ids: set[str] = set()
        counts = []
        for file_id in (record["output_file_id"], record["error_file_id"]):
            n = 0
            for raw in self.files.lines(file_id):
                written_ids.add(json.loads(raw)["custom_id"])
                n += 1
            counts.append(n)
        numbered = enumerate(self.files.lines(record["input_file_id"], partial_last=True))
        requests = ((i, raw) for i, raw in numbered if raw.strip())  # trailing blank lines
        progress = _Progress(total, fed, bytearray(total // 8 + 1), requests)
        progress.completed, progress.failed = counts
        for index, raw in progress.lines if fed else ():
            if _custom_id(raw) in written_ids:
                progress.mark(index)
            else:  # submitted before, not yet written: follow it again
                request = self._request(record, index, raw)
                if request is not None:
                    progress.outstanding[request.job["id"]] = request
            if index + 1 >= fed:
                break
        self.batches.set(record["id"], completed=progress.completed, failed=progress.failed)
        return progress

    def _request(self, record: dict[str, str], index: int, raw: bytes) -> BatchRequest | None:
        try:
            request = read_request(
                raw,
                index,
                batch_id=record["id"],
                priority=int(record["priority"]),
                max_body_bytes=self.settings.max_body_bytes,
                reserved_metadata=not record.get("tenant"),
                check_job=False,  # validated as a whole file first; the submit checks it again
            )
        except BadLine:  # validated before: only a file changed under the batch gets here
            return None
        # The completion window, on Redis's clock: the worker compares it with Redis's now.
        request.job["deadline"] = float(record["expires_at"])
        return request

    # --- feeding and collecting -----------------------------------------------------------

    def _feed(
        self,
        batch_id: str,
        record: dict[str, str],
        progress: _Progress,
        output: IO[bytes],
        errors: IO[bytes],
    ) -> None:
        """Submit lines until ``window`` are outstanding or the queue is full."""
        fed_before = progress.fed
        while len(progress.outstanding) < self.settings.batch_window:
            item = progress.held or next(progress.lines, None)
            progress.held = None
            if item is None:
                break
            index, raw = item
            request = self._request(record, index, raw)
            if request is None:
                progress.fed = index + 1
                continue
            try:
                self.client.submit(request.job)
            except QueueFull:
                progress.held = item  # the queue is full: this line waits for the next round
                break
            except InvalidRequest as exc:  # only a file changed since it was validated
                job_id = request.job["id"]
                line = unrun_line(request.custom_id, job_id, "invalid_request", exc.message)
                self._write(batch_id, progress, index, line, output, errors)
                progress.fed = index + 1
                continue
            progress.outstanding[request.job["id"]] = request
            progress.fed = index + 1
        if progress.fed != fed_before:
            self.batches.set(batch_id, fed=progress.fed)

    def _collect(
        self, batch_id: str, progress: _Progress, output: IO[bytes], errors: IO[bytes]
    ) -> None:
        """Write the line of every outstanding job that has ended."""
        if not progress.outstanding:
            return
        job_ids = list(progress.outstanding)
        pipe = self.client.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.client.keys.job(job_id), "status")
        for job_id, raw_status in zip(job_ids, pipe.execute(), strict=True):
            request = progress.outstanding[job_id]
            if raw_status is None:  # the record is gone (Redis lost it): queue it again
                log.warning("batch line lost, submitted again", batch_id=batch_id, job_id=job_id)
                self.client.submit(request.job)
                continue
            status = raw_status.decode() if isinstance(raw_status, bytes) else raw_status
            if status == "queued":
                self._check_queued(batch_id, progress, request)
                continue
            progress.queued_since.pop(job_id, None)
            if status not in ENDED_STATUSES:
                continue
            result = self.client.job(job_id).poll()
            if result is None:
                continue
            line = result_line(request.custom_id, job_id, result, request.model)
            tokens = result.usage.completion_tokens if result.usage is not None else 0
            self._write(batch_id, progress, request.index, line, output, errors, tokens)
            del progress.outstanding[job_id]

    def _check_queued(self, batch_id: str, progress: _Progress, request: BatchRequest) -> None:
        """Send a line's message again if it was lost: queued for ``batch_resend_s``, never
        delivered, and on none of the queue's lists. Kombu's consumer pops a message (BRPOP)
        before it records it as unacknowledged; a worker killed between the two loses that
        one message (the visibility sweep and the reaper restore only recorded ones), and
        its job would wait, queued, until the batch's window ends."""
        job_id = request.job["id"]
        since = progress.queued_since.setdefault(job_id, time.monotonic())
        if time.monotonic() - since < self.settings.batch_resend_s:
            return
        progress.queued_since[job_id] = time.monotonic()
        needle = f'"{job_id}"'.encode()
        lists = queue_lists(self.settings)
        pipe = self.client.redis.pipeline(transaction=False)
        for name in lists:
            pipe.lrange(name, 0, -1)
        if any(needle in item for items in pipe.execute() for item in items):
            return  # waiting its turn
        queue_key, message = job_message(
            self.client.celery,
            request.job,
            job_id,
            int(request.job["priority"]),
            self.settings.queue_name,
        )
        keys = [self.client.keys.job(job_id), queue_key]
        if self._resend(keys=keys, args=[message]):
            log.warning(
                "batch line's message was lost: sent again", batch_id=batch_id, job_id=job_id
            )

    def _write(
        self,
        batch_id: str,
        progress: _Progress,
        index: int,
        line: dict[str, Any],
        output: IO[bytes],
        errors: IO[bytes],
        tokens: int = 0,
    ) -> None:
        ok = is_output(line)
        target = output if ok else errors
        target.write(encode_line(line))
        target.flush()
        progress.mark(index)
        pipe = self.client.redis.pipeline(transaction=False)
        if ok:
            progress.completed += 1
            pipe.hincrby(self.batches.keys.batch(batch_id), "completed", 1)
        else:
            progress.failed += 1
            pipe.hincrby(self.batches.keys.batch(batch_id), "failed", 1)
        if tokens:
            pipe.hincrby(self.batches.keys.batch(batch_id), "tokens", tokens)
        pipe.execute()

    # --- cancelled or expired --------------------------------------------------------------

    def _wind_down(
        self,
        batch_id: str,
        record: dict[str, str],
        progress: _Progress,
        output: IO[bytes],
        errors: IO[bytes],
        stop: threading.Event,
    ) -> None:
        """Stop feeding, cancel what is outstanding, write what finished, write the rest
        off as cancelled or expired, and end the batch so."""
        cancelled = record["status"] == "cancelling"
        code, message = (
            ("batch_cancelled", "the batch was cancelled before this request ran")
            if cancelled
            else ("batch_expired", "the batch's completion window ended before this request ran")
        )
        for job_id in list(progress.outstanding):
            with contextlib.suppress(JobAlreadyEnded, JobNotFound):
                self.client.job(job_id).cancel()
        give_up = time.monotonic() + WIND_DOWN_S
        while progress.outstanding and time.monotonic() < give_up and not stop.is_set():
            self._collect(batch_id, progress, output, errors)
            if progress.outstanding:
                stop.wait(self.settings.batch_poll_s)
        if stop.is_set():
            return
        for request in list(progress.outstanding.values()):
            line = unrun_line(request.custom_id, request.job["id"], code, message)
            self._write(batch_id, progress, request.index, line, output, errors)
        progress.outstanding.clear()
        pending = [progress.held] if progress.held else []
        for index, raw in [*pending, *progress.lines]:
            if progress.is_written(index):
                continue
            job_id = line_job_id(batch_id, index)
            line = unrun_line(_custom_id(raw) or f"line-{index + 1}", job_id, code, message)
            self._write(batch_id, progress, index, line, output, errors)
        progress.held = None
        if cancelled:
            self.batches.move(batch_id, "cancelled", allowed=("cancelling",))
        else:
            self.batches.move(batch_id, "expired", allowed=("in_progress", "cancelling"))
        log.info("batch ended early", batch_id=batch_id, status=code.removeprefix("batch_"))


def _custom_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# --- running every batch --------------------------------------------------------------------


class BatchService:
    """Runs every active batch of a deployment, each in a thread of its own, until
    ``stop``; safe beside any number of other services (each batch has one runner)."""

    def __init__(self, client: HermesClient, files: FileStore) -> None:
        self.runner = BatchRunner(client, files)
        self.threads: dict[str, threading.Thread] = {}

    def run(self, stop: threading.Event, only: str | None = None) -> None:
        """Run batches until ``stop`` (or, with ``only``, until that batch has ended)."""
        poll_s = self.runner.settings.batch_poll_s
        while not stop.is_set():
            active = self.runner.batches.active() if only is None else [only]
            for batch_id in active:
                thread = self.threads.get(batch_id)
                if thread is None or not thread.is_alive():
                    self.threads[batch_id] = self._start(batch_id, stop)
            if only is not None and self.runner.batches.record(only)["status"] in ENDED:
                return
            stop.wait(max(poll_s, 1.0) if only is None else poll_s)
        for thread in self.threads.values():
            thread.join(timeout=10)

    @contextlib.contextmanager
    def in_background(self, only: str | None = None) -> Iterator[threading.Event]:
        """:meth:`run` in a thread of its own for the ``with`` block; setting the event it
        yields stops it early, leaving the block stops it and waits for it."""
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop, only), daemon=True)
        thread.start()
        try:
            yield stop
        finally:
            stop.set()
            thread.join(timeout=30)

    def _start(self, batch_id: str, stop: threading.Event) -> threading.Thread:
        def run() -> None:
            try:
                self.runner.run(batch_id, stop)
            except HermesError as exc:
                log.error("batch runner failed", batch_id=batch_id, error=exc.message)

        thread = threading.Thread(target=run, name=f"batch-{batch_id}", daemon=True)
        thread.start()
        return thread
