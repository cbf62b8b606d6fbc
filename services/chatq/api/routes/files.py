"""OpenAI's Files API: upload (checked as it streams), list, get, content, delete.

The upload is parsed part by part with python-multipart's push parser straight from the
request stream: each chunk of the `file` part is checked (`batchfile.LineChecker`) and
written to the file store before the next one is read, so a 200 MB upload needs memory
for one line, and a bad line is answered (400, with its number) without reading the rest.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from python_multipart.multipart import MultipartParser, parse_options_header

from chatq import batchfile, catalog, errors
from chatq.api.deps import OwnerDep, Services, ServicesDep
from chatq.api.openai_errors import OpenAIError, not_found
from chatq.filestore import Writer

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/files", tags=["files"])

FileId = Annotated[str, Path(max_length=80, pattern=r"^[A-Za-z0-9_-]+$")]
MAX_FIELD_BYTES = 4096
PURPOSES = ("batch",)


class _Parts:
    """python-multipart's callbacks, gathered into (event, name, filename, bytes) items."""

    def __init__(self, boundary: bytes) -> None:
        self.events: list[tuple[str, str, str, bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._name = ""
        self._filename = ""
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._hfield,
            "on_header_value": self._hvalue, "on_header_end": self._hend,
            "on_headers_finished": self._hdone, "on_part_data": self._data,
            "on_part_end": self._end})

    def feed(self, chunk: bytes) -> list[tuple[str, str, str, bytes]]:
        """Parse a chunk; the events it produced."""
        self.events = []
        self.parser.write(chunk)
        return self.events

    def _begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _hend(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _hdone(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode(errors="replace")
        self._filename = params.get(b"filename", b"").decode(errors="replace")
        self.events.append(("begin", self._name, self._filename, b""))

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(("data", self._name, self._filename, data[start:end]))

    def _end(self) -> None:
        self.events.append(("end", self._name, self._filename, b""))


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise OpenAIError(400, "upload the file as multipart/form-data with fields 'purpose' "
                          "and 'file'", code="invalid_content_type")
    return boundary


def _bad(exc: batchfile.BadFile) -> OpenAIError:
    status = 413 if isinstance(exc, batchfile.TooLarge) and exc.line == 0 else 400
    return OpenAIError(status, str(exc), code=exc.code, param=exc.param)


class _Upload:
    """One upload in progress: the file part checked and written chunk by chunk."""

    def __init__(self, svc: Services, file_id: str) -> None:
        self.svc = svc
        self.file_id = file_id
        self.checker = batchfile.LineChecker(svc.settings.files.max_bytes,
                                             svc.settings.files.max_lines)
        self.fields: dict[str, bytes] = {}
        self.writer: Writer | None = None
        self.filename = ""

    async def event(self, event: str, name: str, fname: str, data: bytes) -> None:
        if name != "file" or not fname:  # a plain form field
            if event == "data":
                self.fields[name] = self.fields.get(name, b"") + data
                if len(self.fields[name]) > MAX_FIELD_BYTES:
                    raise OpenAIError(400, f"field {name!r} is too long", param=name)
            return
        if event == "begin":
            if self.writer is not None:
                raise OpenAIError(400, "send one file per upload", param="file")
            self.filename = fname
            self.writer = await self.svc.file_store.writer(self.file_id)
        elif event == "data" and self.writer is not None:
            self.checker.feed(data)
            await self.writer.write(data)
        elif event == "end":
            self.checker.finish()

    def purpose(self) -> str:
        if self.writer is None:
            raise OpenAIError(400, "the upload has no 'file' part", param="file",
                              code="missing_file")
        purpose = self.fields.get("purpose", b"").decode(errors="replace")
        if purpose not in PURPOSES:
            raise OpenAIError(400, f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}",
                              param="purpose", code="invalid_purpose")
        return purpose


@router.post("", summary="Upload a file (purpose=batch: a JSONL batch input)")
async def create_file(request: Request, owner: OwnerDep, svc: ServicesDep) -> dict[str, Any]:
    cfg = svc.settings.files
    length = request.headers.get("content-length", "")
    # Multipart framing adds a little; the file itself is held to max_bytes as it streams.
    if length.isdigit() and int(length) > cfg.max_bytes + 64 * 1024:
        raise OpenAIError(413, f"the file is over {cfg.max_bytes} bytes", code="file_too_large",
                          param="file")
    parts = _Parts(_boundary(request))
    upload = _Upload(svc, catalog.new_file_id())
    committed = False
    try:
        async for chunk in request.stream():
            for event in parts.feed(chunk):
                await upload.event(*event)
        purpose = upload.purpose()
        assert upload.writer is not None
        await upload.writer.commit()
        committed = True
    except batchfile.BadFile as exc:
        raise _bad(exc) from None
    finally:
        if upload.writer is not None and not committed:
            await upload.writer.abort()
    record = catalog.FileRecord(id=upload.file_id, owner=owner, filename=upload.filename[:255],
                                purpose=purpose, bytes=upload.checker.size,
                                created_at=catalog.now(), lines=upload.checker.lines,
                                urls=sorted(upload.checker.urls))
    try:
        await svc.catalog.put_file(record)
    except errors.ChatqError:
        await svc.file_store.delete(record.id)
        raise
    log.info("file %s stored: %d bytes, %d lines", record.id, record.bytes, record.lines)
    return record.public()


async def _owned(svc: ServicesDep, file_id: str, owner: str) -> catalog.FileRecord:
    record = await svc.catalog.get_file(file_id)
    if record is None or record.owner != owner:
        raise not_found("file", file_id)
    return record


@router.get("", summary="The caller's files, newest first by default")
async def list_files(
    owner: OwnerDep, svc: ServicesDep,
    after: Annotated[str | None, Query(max_length=80)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    purpose: Annotated[str | None, Query(max_length=40)] = None,
) -> dict[str, Any]:
    records, more = await svc.catalog.list_files(owner, after, limit, order == "desc", purpose)
    data = [r.public() for r in records]
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/{file_id}", summary="A file's metadata")
async def get_file(file_id: FileId, owner: OwnerDep, svc: ServicesDep) -> dict[str, Any]:
    return (await _owned(svc, file_id, owner)).public()


@router.get("/{file_id}/content", summary="A file's bytes", response_class=StreamingResponse)
async def file_content(file_id: FileId, owner: OwnerDep, svc: ServicesDep) -> StreamingResponse:
    record = await _owned(svc, file_id, owner)
    chunks = svc.file_store.read(record.id)
    try:
        first = await anext(chunks, b"")  # a missing body is an error now, not mid-stream
    except errors.PermanentError as exc:
        raise OpenAIError(404, f"the content of file {file_id!r} is gone: {exc}",
                          code="file_missing") from None

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"Content-Length": str(record.bytes)})


@router.delete("/{file_id}", summary="Delete a file")
async def delete_file(file_id: FileId, owner: OwnerDep, svc: ServicesDep) -> dict[str, Any]:
    record = await _owned(svc, file_id, owner)
    await svc.catalog.delete_file(record)
    await svc.file_store.delete(record.id)
    return {"id": record.id, "object": "file", "deleted": True}
