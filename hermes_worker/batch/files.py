"""The file store: batch input files and the output and error files a batch writes.

A directory (``HERMES_FILES_DIR``) holding, for each file, its bytes (``{id}``) and its
OpenAI file object (``{id}.json``). Every process that creates or runs batches (the CLI, the
gateway, ``hermes-worker batch run``) reads the same directory: on one host, a plain
directory; across hosts, a shared volume (compose mounts one). Files are written under a
temporary name and renamed, so a reader never sees half an input file; output and error
files grow by appends of whole lines (:meth:`FileStore.appender`).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from hermes_worker.errors import FileNotFound, InvalidRequest

FILE_ID_PREFIX = "file-"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileObject:
    """A stored file as OpenAI's Files API shows it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str  # "batch" (an input), "batch_output" (an output or error file)
    object: str = "file"
    status: str = "processed"
    owner: str | None = None  # the gateway tenant that stored it (None: no tenants)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FileStore:
    """Files under ``root`` (created when missing)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        """Where a file's bytes are (:class:`FileNotFound` when there is no such file)."""
        if not _valid_id(file_id) or not (self.root / file_id).is_file():
            raise FileNotFound(f"no file {file_id!r}")
        return self.root / file_id

    def get(self, file_id: str) -> FileObject:
        path = self.path(file_id)
        meta = json.loads((self.root / f"{file_id}.json").read_text())
        meta["bytes"] = path.stat().st_size  # an output file grows until its batch ends
        return FileObject(**meta)

    def create(
        self,
        content: bytes | Iterable[bytes],
        *,
        filename: str,
        purpose: str,
        max_bytes: int | None = None,
        owner: str | None = None,
    ) -> FileObject:
        """Store ``content`` (bytes, or chunks of them, read once) as a new file."""
        file_id = new_file_id()
        tmp = self.root / f".{file_id}.part"
        size = 0
        try:
            with tmp.open("wb") as out:
                for chunk in [content] if isinstance(content, bytes) else content:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise InvalidRequest(
                            f"file: over the {max_bytes}-byte limit of a batch input file"
                        )
                    out.write(chunk)
            tmp.rename(self.root / file_id)
        finally:
            tmp.unlink(missing_ok=True)
        return self._describe(file_id, filename, purpose, size, owner)

    def create_empty(self, *, filename: str, purpose: str, owner: str | None = None) -> FileObject:
        """A new empty file, for :meth:`appender`."""
        return self.create(b"", filename=filename, purpose=purpose, owner=owner)

    def import_path(self, source: Path, *, purpose: str, max_bytes: int | None) -> FileObject:
        """Store a local file (read in chunks)."""
        with source.open("rb") as f:
            return self.create(
                iter(lambda: f.read(CHUNK_BYTES), b""),
                filename=source.name,
                purpose=purpose,
                max_bytes=max_bytes,
            )

    def lines(self, file_id: str, *, partial_last: bool = False) -> Iterator[bytes]:
        """The file's lines, read as it is now. A last line without its newline is left out
        (a writer may be in the middle of it) unless ``partial_last`` (an input file)."""
        with self.path(file_id).open("rb") as f:
            for line in f:
                if partial_last or line.endswith(b"\n"):
                    yield line

    def appender(self, file_id: str) -> IO[bytes]:
        """The file opened for appending whole lines. A partial last line (a writer that
        died mid-write) is cut first, so the file holds only whole lines."""
        path = self.path(file_id)
        f = path.open("r+b")
        end = _whole_lines_end(f)
        f.truncate(end)
        f.seek(end)
        return f

    def list(self, purpose: str | None = None) -> list[FileObject]:
        found = []
        for meta in self.root.glob(f"{FILE_ID_PREFIX}*.json"):
            file = self.get(meta.name.removesuffix(".json"))
            if purpose is None or file.purpose == purpose:
                found.append(file)
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink()
        (self.root / f"{file_id}.json").unlink(missing_ok=True)

    def _describe(
        self, file_id: str, filename: str, purpose: str, size: int, owner: str | None
    ) -> FileObject:
        file = FileObject(
            id=file_id,
            bytes=size,
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
            owner=owner,
        )
        meta = self.root / f"{file_id}.json"
        tmp = self.root / f".{file_id}.json.part"
        tmp.write_text(json.dumps(file.to_dict()))
        tmp.rename(meta)
        return file


def new_file_id() -> str:
    return f"{FILE_ID_PREFIX}{secrets.token_hex(12)}"


def _valid_id(file_id: str) -> bool:
    rest = file_id.removeprefix(FILE_ID_PREFIX)
    return file_id.startswith(FILE_ID_PREFIX) and len(rest) == 24 and rest.isalnum()


def _whole_lines_end(f: IO[bytes]) -> int:
    """The offset just past the file's last newline (0 if it has none)."""
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
        step = min(CHUNK_BYTES, pos)
        f.seek(pos - step)
        chunk = f.read(step)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return pos - step + newline + 1
        pos -= step
    return 0
