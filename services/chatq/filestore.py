"""Where file bodies live: a local directory (the embedded default) or S3.

A small Protocol with two real implementations, like the queue. Bodies are written through
a `Writer` as they arrive (an upload is never held whole in memory: the local store appends
to a temporary file, the S3 store sends multipart-upload parts of `S3_PART_BYTES`) and read
back as a stream of chunks from any byte offset, which is how the batch feeder resumes in
the middle of an input file. Only metadata goes to Redis (`chatq.catalog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import aiobotocore.session
import botocore.config
import botocore.exceptions

from chatq import errors
from chatq import settings as settings_mod

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 256 * 1024
# S3 wants parts of at least 5 MiB (all but the last); 8 MiB keeps an upload's memory flat.
S3_PART_BYTES = 8 * 1024 * 1024
# A local write goes to a thread once this much is buffered, not once per small chunk.
LOCAL_FLUSH_BYTES = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

P = ParamSpec("P")
R = TypeVar("R")


def _check(name: str) -> str:
    # Names come from our own ids, but a path must never climb out of the store.
    if not _NAME.match(name) or name.startswith("."):
        raise errors.PermanentError(f"not a file name: {name!r}", code="bad_file_name")
    return name


class Writer(Protocol):
    """One file being written; nothing is visible under its name before `commit()`."""

    async def write(self, data: bytes) -> None:
        """Append bytes."""

    async def commit(self) -> None:
        """Make the file visible under its name."""

    async def abort(self) -> None:
        """Throw away what was written."""


class FileStore(Protocol):
    """What /v1/files and the batch feeder need of a file store."""

    kind: str

    async def writer(self, name: str) -> Writer:
        """A writer for a new file called `name`."""

    def read(self, name: str, start: int = 0) -> AsyncIterator[bytes]:
        """The file's bytes from offset `start`, in chunks."""

    async def delete(self, name: str) -> None:
        """Remove the file (no error when it is already gone)."""

    async def close(self) -> None:
        """Release connections."""


# --- local directory ------------------------------------------------------------------


class _LocalWriter:
    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.part")
        self._fh = self.tmp.open("wb")
        self._buf = bytearray()

    async def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= LOCAL_FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        data, self._buf = bytes(self._buf), bytearray()
        await asyncio.to_thread(self._fh.write, data)

    async def commit(self) -> None:
        await self._flush()

        def finish() -> None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.tmp, self.final)

        await asyncio.to_thread(finish)

    async def abort(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class LocalFileStore:
    """Files in one directory; a write lands under a temporary name, then is renamed."""

    kind = "local"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    async def writer(self, name: str) -> Writer:
        return _LocalWriter(self.dir / _check(name))

    async def read(self, name: str, start: int = 0) -> AsyncIterator[bytes]:
        path = self.dir / _check(name)
        try:
            fh = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise errors.PermanentError(f"file {name} is not in the store", code="file_missing") from None
        try:
            await asyncio.to_thread(fh.seek, start)
            while chunk := await asyncio.to_thread(fh.read, READ_CHUNK_BYTES):
                yield chunk
        finally:
            fh.close()

    async def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread((self.dir / _check(name)).unlink)

    async def close(self) -> None:
        return None


# --- S3 ---------------------------------------------------------------------------------


def _s3_error(exc: Exception) -> errors.ChatqError | None:
    """botocore errors become ours: outages are StoreUnavailable, the rest permanent."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if status >= 500 or "Throttl" in code or code == "SlowDown":
            return errors.StoreUnavailable(f"S3 {code}: {exc}")
        if code in ("NoSuchKey", "404"):
            return errors.PermanentError(f"S3 has no such file: {exc}", code="file_missing")
        return errors.PermanentError(f"S3 {code}: {exc}", code="s3_" + code)
    if isinstance(exc, TimeoutError | botocore.exceptions.BotoCoreError | OSError):
        return errors.StoreUnavailable(f"S3 is unreachable: {exc}")
    return None


_translate = errors.translated(_s3_error)


class _S3Writer:
    """A multipart upload: parts of S3_PART_BYTES go out as they fill; small files are one PUT."""

    def __init__(self, store: S3FileStore, key: str) -> None:
        self.store = store
        self.key = key
        self._buf = bytearray()
        self._upload_id = ""
        self._parts: list[dict[str, Any]] = []

    @_translate
    async def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= S3_PART_BYTES:
            await self._send_part()

    async def _send_part(self) -> None:
        s3 = await self.store.client()
        if not self._upload_id:
            reply = await s3.create_multipart_upload(Bucket=self.store.bucket, Key=self.key)
            self._upload_id = reply["UploadId"]
        number = len(self._parts) + 1
        body, self._buf = bytes(self._buf), bytearray()
        reply = await s3.upload_part(Bucket=self.store.bucket, Key=self.key, PartNumber=number,
                                     UploadId=self._upload_id, Body=body)
        self._parts.append({"PartNumber": number, "ETag": reply["ETag"]})

    @_translate
    async def commit(self) -> None:
        s3 = await self.store.client()
        if not self._upload_id:
            await s3.put_object(Bucket=self.store.bucket, Key=self.key, Body=bytes(self._buf))
            return
        if self._buf:
            await self._send_part()
        await s3.complete_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                           UploadId=self._upload_id,
                                           MultipartUpload={"Parts": self._parts})

    async def abort(self) -> None:
        self._buf = bytearray()
        if self._upload_id:
            with contextlib.suppress(errors.ChatqError):
                await self._abort()

    @_translate
    async def _abort(self) -> None:
        s3 = await self.store.client()
        await s3.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                        UploadId=self._upload_id)


class S3FileStore:
    """Files as objects under `prefix` in one bucket, through aiobotocore.

    Credentials come the standard AWS way (environment, IRSA web identity in the chart).
    """

    kind = "s3"

    def __init__(self, cfg: settings_mod.FilesSettings) -> None:
        if not cfg.s3_bucket:
            raise errors.PermanentError("CHATQ_FILES_STORE=s3 needs CHATQ_FILES_S3_BUCKET",
                                        code="no_bucket")
        self.cfg = cfg
        self.bucket = cfg.s3_bucket
        self.prefix = cfg.s3_prefix
        self._session = aiobotocore.session.get_session()
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def client(self) -> Any:
        """The S3 client, made on first use."""
        async with self._lock:
            if self._client is None:
                config = botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"},
                                                connect_timeout=5, read_timeout=60,
                                                s3={"addressing_style": "path"})
                self._client = await self._stack.enter_async_context(self._session.create_client(
                    "s3", region_name=self.cfg.s3_region, endpoint_url=self.cfg.s3_endpoint or None,
                    config=config))
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.prefix}{_check(name)}"

    async def writer(self, name: str) -> Writer:
        return _S3Writer(self, self._key(name))

    async def read(self, name: str, start: int = 0) -> AsyncIterator[bytes]:
        body = await self._open(name, start)
        try:
            while True:
                chunk = await self._chunk(body)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    @_translate
    async def _open(self, name: str, start: int) -> Any:
        s3 = await self.client()
        kwargs: dict[str, Any] = {"Range": f"bytes={start}-"} if start else {}
        try:
            reply = await s3.get_object(Bucket=self.bucket, Key=self._key(name), **kwargs)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return _Empty()  # reading from the very end: nothing left
            raise
        return reply["Body"]

    @_translate
    async def _chunk(self, body: Any) -> bytes:
        return bytes(await body.read(READ_CHUNK_BYTES))

    @_translate
    async def delete(self, name: str) -> None:
        s3 = await self.client()
        await s3.delete_object(Bucket=self.bucket, Key=self._key(name))

    async def close(self) -> None:
        await self._stack.aclose()


class _Empty:
    async def read(self, _n: int) -> bytes:
        return b""

    def close(self) -> None:
        return None


def open_store(cfg: settings_mod.FilesSettings) -> FileStore:
    """The configured file store."""
    if cfg.store == "s3":
        return S3FileStore(cfg)
    directory = Path(cfg.dir) if cfg.dir else settings_mod.data_dir() / "files"
    return LocalFileStore(directory)
