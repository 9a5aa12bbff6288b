"""Batches from Python: ``client.batches`` on :class:`~producers.client.HermesClient`
(and :class:`~producers.client.AsyncHermesClient`), shaped like the OpenAI SDK's
``client.batches`` and ``client.files``.

    batch = client.batches.create("requests.jsonl")           # the OpenAI Batch JSONL format
    batch = client.batches.wait(batch["id"])                  # runs it here unless another does
    for line in client.batches.results(batch["id"]):          # output lines, then error lines
        ...

A batch runs wherever a runner is: ``hermes-worker batch run`` (a service), the gateway, or
:meth:`Batches.wait` in this process. Files go to the file store (``HERMES_FILES_DIR``),
which every process that creates or runs batches shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hermes_worker.batch.files import FileObject, FileStore
from hermes_worker.batch.runner import BatchService
from hermes_worker.batch.store import ENDED, BatchStore
from hermes_worker.errors import InvalidRequest

if TYPE_CHECKING:
    from producers.client import AsyncHermesClient, HermesClient

Lines = list[dict[str, Any]]


class Batches:
    """The batches of one deployment (the client's key prefix and queue)."""

    def __init__(self, client: HermesClient) -> None:
        self.client = client
        self.files = FileStore(client.settings.files_dir)
        self.store = BatchStore(client.redis, client.keys)

    def upload(self, source: str | os.PathLike[str] | bytes) -> FileObject:
        """Store an input file (a path, or its bytes) in the file store, within the
        ``HERMES_BATCH_MAX_BYTES`` limit."""
        limit = self.client.settings.batch_max_bytes
        if isinstance(source, bytes):
            if len(source) > limit:
                raise InvalidRequest(f"file: over the {limit}-byte limit of a batch input file")
            return self.files.create(source, filename="batch.jsonl", purpose="batch")
        return self.files.import_path(Path(source), purpose="batch", max_bytes=limit)

    def create(
        self,
        source: str | os.PathLike[str] | bytes | None = None,
        *,
        input_file_id: str | None = None,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """A batch of an input file (a path or bytes, uploaded here; or the id of a file
        already stored): its batch object, ``validating`` until a runner takes it."""
        if (source is None) == (input_file_id is None):
            raise InvalidRequest("give an input file or an input_file_id, not both or neither")
        stored = self.upload(source) if source is not None else self.files.get(str(input_file_id))
        if stored.purpose != "batch":
            raise InvalidRequest(f"input_file_id: {stored.id} is not a batch input file")
        output = self.files.create_empty(
            filename=f"{stored.id}_output.jsonl", purpose="batch_output"
        )
        errors = self.files.create_empty(
            filename=f"{stored.id}_error.jsonl", purpose="batch_output"
        )
        return self.store.create(
            input_file_id=stored.id,
            output_file_id=output.id,
            error_file_id=errors.id,
            completion_window=completion_window,
            metadata=metadata,
            priority=self.client.settings.batch_priority,
            tenant=tenant,
        )

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self.store.get(batch_id)

    def list(self, limit: int = 20, after: str | None = None) -> Lines:
        """Batches, newest first."""
        return self.store.page(limit, after)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop a batch: ``cancelling`` until its runner has cancelled what runs and written
        the rest off (``cancelled``); :class:`~hermes_worker.errors.BatchAlreadyEnded` once
        it has ended."""
        return self.store.cancel(batch_id)

    def wait(
        self, batch_id: str, timeout: float | None = None, *, run: bool = True
    ) -> dict[str, Any]:
        """Wait for a batch to end and return it. ``run``: run it in this process meanwhile
        (a runner elsewhere that holds it keeps it; this one takes over if that one dies).
        ``TimeoutError`` after ``timeout`` seconds; the batch goes on either way."""
        running: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if run:
            running = BatchService(self.client, self.files).in_background(batch_id)
        end = None if timeout is None else time.monotonic() + timeout
        with running:
            while True:
                batch = self.store.get(batch_id)
                if batch["status"] in ENDED:
                    return batch
                if end is not None and time.monotonic() >= end:
                    raise TimeoutError(f"batch {batch_id} did not end within {timeout} s")
                time.sleep(self.client.settings.batch_poll_s)

    def results(self, batch_id: str, *, errors: bool = True) -> Iterator[dict[str, Any]]:
        """The lines written so far: the output file's, then (``errors``) the error file's."""
        batch = self.store.get(batch_id)
        ids = [batch["output_file_id"]] + ([batch["error_file_id"]] if errors else [])
        for file_id in ids:
            for raw in self.files.lines(file_id):
                yield json.loads(raw)

    def content(self, file_id: str) -> Iterator[bytes]:
        """A stored file's whole lines (as ``GET /v1/files/{id}/content`` gives them)."""
        return self.files.lines(file_id, partial_last=self.files.get(file_id).purpose == "batch")


class AsyncBatches:
    """:class:`Batches` for the asyncio client: the same calls, awaited (each runs in a
    thread on a blocking client of the same settings)."""

    def __init__(self, client: AsyncHermesClient) -> None:
        from producers.client import HermesClient

        self._sync = Batches(HermesClient(client.settings))

    async def create(
        self, source: str | os.PathLike[str] | bytes | None = None, **kw: Any
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.create, source, **kw)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.retrieve, batch_id)

    async def list(self, limit: int = 20, after: str | None = None) -> Lines:
        return await asyncio.to_thread(self._sync.list, limit, after)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.cancel, batch_id)

    async def wait(
        self, batch_id: str, timeout: float | None = None, *, run: bool = True
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.wait, batch_id, timeout, run=run)

    async def results(self, batch_id: str, *, errors: bool = True) -> Lines:
        return await asyncio.to_thread(lambda: list(self._sync.results(batch_id, errors=errors)))

    def close(self) -> None:
        self._sync.client.close()
