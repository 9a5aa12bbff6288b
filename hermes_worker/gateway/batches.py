"""The gateway's Files and Batches endpoints, as OpenAI's: ``POST /v1/files`` (purpose
``batch``), ``GET /v1/files/{id}`` and ``/content``, ``POST /v1/batches``, ``GET
/v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel``.

Batches made here go to the gateway's default deployment (``HERMES_QUEUE_NAME`` under
``HERMES_KEY_PREFIX``) and run wherever a batch runner is: each gateway runs one
(``HERMES_GATEWAY_RUN_BATCHES``, on by default) beside ``hermes-worker batch run``; one runs
a given batch at a time. With tenants, a tenant sees only its own files and batches (another
tenant's id is a 404, as for jobs). The file store is ``HERMES_FILES_DIR``, which every
gateway and runner must share.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hermes_worker.batch.files import CHUNK_BYTES
from hermes_worker.batch.runner import BatchService
from hermes_worker.errors import (
    BatchAlreadyEnded,
    BatchNotFound,
    FileNotFound,
    InvalidRequest,
)
from hermes_worker.gateway.errors import (
    NO_RETRY,
    GatewayError,
    from_invalid_request,
    invalid,
    not_found,
)
from producers.batches import Batches
from producers.client import HermesClient

if TYPE_CHECKING:
    from hermes_worker.gateway.app import Gateway
    from hermes_worker.gateway.tenants import Caller

BATCH_ENDPOINT = "/v1/chat/completions"
MAX_LIST = 100


class BatchEndpoints:
    """The endpoints, on a blocking client of the default deployment (each call runs in a
    thread), and this gateway's batch runner."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self._stop = threading.Event()
        self._runner: threading.Thread | None = None

    def start(self) -> None:
        self.client = HermesClient(self.settings)
        self.batches = Batches(self.client)
        if self.settings.gateway_run_batches:
            service = BatchService(self.client, self.batches.files)
            self._runner = threading.Thread(
                target=service.run, args=(self._stop,), name="batch-runner", daemon=True
            )
            self._runner.start()

    def stop(self) -> None:
        """Stop running batches (what runs is left for any runner to resume) and close."""
        self._stop.set()
        if self._runner is not None:
            self._runner.join(timeout=10)
        self.client.close()

    def register(self, app: FastAPI) -> None:
        app.add_api_route("/v1/files", self.create_file, methods=["POST"])
        app.add_api_route("/v1/files", self.list_files, methods=["GET"])
        app.add_api_route("/v1/files/{file_id}", self.get_file, methods=["GET"])
        app.add_api_route("/v1/files/{file_id}/content", self.file_content, methods=["GET"])
        app.add_api_route("/v1/batches", self.create_batch, methods=["POST"])
        app.add_api_route("/v1/batches", self.list_batches, methods=["GET"])
        app.add_api_route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"])
        app.add_api_route("/v1/batches/{batch_id}/cancel", self.cancel_batch, methods=["POST"])

    # --- files ----------------------------------------------------------------------------

    async def create_file(self, request: Request) -> Response:
        caller = await self.gateway._caller(request)
        limit = self.settings.batch_max_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
            raise _too_large(limit)
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get("file")
            purpose = form.get("purpose")
            if purpose != "batch":
                raise invalid("purpose: only 'batch' files are taken here", param="purpose")
            if upload is None or isinstance(upload, str):
                raise invalid("file: a file part is required", param="file")
            filename = upload.filename or "batch.jsonl"
            chunks: Iterator[bytes] = iter(lambda: upload.file.read(CHUNK_BYTES), b"")
            stored = await asyncio.to_thread(
                self.batches.files.create,
                chunks,
                filename=filename,
                purpose="batch",
                max_bytes=limit,
                owner=caller.tenant if caller.scoped else None,
            )
        except InvalidRequest as exc:
            if "limit" in exc.message:
                raise _too_large(limit) from exc
            raise from_invalid_request(exc, {}) from exc
        finally:
            await form.close()
        return JSONResponse(stored.to_dict())

    async def list_files(self, request: Request) -> Response:
        caller = await self.gateway._caller(request)
        found = await asyncio.to_thread(self.batches.files.list)
        data = [f.to_dict() for f in found if _visible(caller, f.owner)]
        return JSONResponse({"object": "list", "data": data, "has_more": False})

    async def get_file(self, file_id: str, request: Request) -> Response:
        caller = await self.gateway._caller(request)
        return JSONResponse((await self._file(caller, file_id)).to_dict())

    async def file_content(self, file_id: str, request: Request) -> Response:
        caller = await self.gateway._caller(request)
        await self._file(caller, file_id)
        lines = self.batches.content(file_id)
        return StreamingResponse(_in_thread(lines), media_type="application/jsonl")

    async def _file(self, caller: Caller, file_id: str) -> Any:
        try:
            stored = await asyncio.to_thread(self.batches.files.get, file_id)
        except FileNotFound as exc:
            raise not_found(exc.message, "file_not_found") from exc
        if not _visible(caller, stored.owner):
            raise not_found(f"no file {file_id!r}", "file_not_found")
        return stored

    # --- batches --------------------------------------------------------------------------

    async def create_batch(self, request: Request) -> Response:
        caller = await self.gateway._caller(request)
        body = await _json_object(request)
        known = {"input_file_id", "endpoint", "completion_window", "metadata"}
        for name in body:
            if name not in known:
                raise invalid(f"{name}: Unknown field", param=name)
        if body.get("endpoint") != BATCH_ENDPOINT:
            raise invalid(f"endpoint: only {BATCH_ENDPOINT} is supported", param="endpoint")
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str):
            raise invalid("input_file_id: a file id is required", param="input_file_id")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise invalid("metadata: at most 16 string keys and values", param="metadata")
        window = body.get("completion_window", "24h")
        if not isinstance(window, str):
            raise invalid("completion_window: a duration such as 24h", param="completion_window")
        stored = await self._file(caller, input_file_id)
        try:
            made = await asyncio.to_thread(
                self.batches.create,
                input_file_id=stored.id,
                completion_window=window,
                metadata=metadata,
                tenant=caller.tenant if caller.scoped else None,
            )
        except InvalidRequest as exc:
            raise from_invalid_request(exc, {}) from exc
        return JSONResponse(made)

    async def list_batches(self, request: Request) -> Response:
        caller = await self.gateway._caller(request)
        limit_raw = request.query_params.get("limit", "20")
        if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= MAX_LIST:
            raise invalid(f"limit: a whole number from 1 to {MAX_LIST}", param="limit")
        after = request.query_params.get("after")
        tenant = caller.tenant if caller.scoped else None
        data = await asyncio.to_thread(
            self.batches.store.page, int(limit_raw) + 1, after, tenant=tenant
        )
        page = data[: int(limit_raw)]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(data) > len(page),
            }
        )

    async def get_batch(self, batch_id: str, request: Request) -> Response:
        caller = await self.gateway._caller(request)
        return JSONResponse(await self._batch(caller, batch_id))

    async def cancel_batch(self, batch_id: str, request: Request) -> Response:
        caller = await self.gateway._caller(request)
        await self._batch(caller, batch_id)
        try:
            return JSONResponse(await asyncio.to_thread(self.batches.cancel, batch_id))
        except BatchAlreadyEnded as exc:
            raise GatewayError(409, exc.message, code="already_ended") from exc

    async def _batch(self, caller: Caller, batch_id: str) -> dict[str, Any]:
        try:
            record = await asyncio.to_thread(self.batches.store.record, batch_id)
        except BatchNotFound as exc:
            raise not_found(exc.message, "batch_not_found") from exc
        if not _visible(caller, record.get("tenant") or None):
            raise not_found(f"no batch {batch_id!r}", "batch_not_found")
        return await asyncio.to_thread(self.batches.store.get, batch_id)


def _visible(caller: Caller, owner: str | None) -> bool:
    """Whether ``caller`` may see what ``owner`` made (without tenants, everyone sees all)."""
    return not caller.scoped or owner == caller.tenant


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"file: over the {limit}-byte limit of a batch input file",
        param="file",
        code="request_too_large",
        headers=NO_RETRY,
    )


async def _json_object(request: Request) -> dict[str, Any]:
    from hermes_worker.gateway.openai_shapes import decode_body

    return decode_body(await request.body())


async def _in_thread(lines: Iterator[bytes]) -> Any:
    """A file's lines, read in a thread a batch of lines at a time."""

    def more() -> list[bytes]:
        return [line for _, line in zip(range(256), lines, strict=False)]

    while chunk := await asyncio.to_thread(more):
        yield b"".join(chunk)
