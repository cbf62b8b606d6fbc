"""The batch feeder: moves batches through their statuses and feeds their lines to the queue.

One feeder runs at a time (a Redis lease; every API process runs a candidate, so a killed
one is replaced within `LEASE_SECONDS`). Each round it reads the active batches, takes the
step `batches.next_action()` names, and shares the batch lane's free room
(`CHATQ_BATCH_LANE_WINDOW` minus the lines in flight) among API keys with
`batches.fair_shares()`. Lines are read from the input file at the batch's saved byte
cursor, written as job records (fixed ids: feeding a line twice finds the same job) and sent
on the batch lane; the cursor is saved after each chunk, so killing every process loses
nothing and duplicates at most one chunk's messages, which the workers' claim absorbs.
Memory is one chunk of lines, whatever the batch's size.

While it holds the lease, the feeder also runs chatq.fair's `Releaser`: interactive jobs
held back while the queue's window is full go onto the queue key by key, fairly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from chatq import batches, batchfile, catalog, errors, fair, jobs, results, telemetry
from chatq import settings as settings_mod
from chatq.filestore import FileStore
from chatq.queues import Queue

log = logging.getLogger(__name__)

LEASE_SECONDS = 10.0
# Lines read, written and sent per step; also the most a crash can send twice.
FEED_CHUNK = 200
# Records read per round trip while the output files are written.
WRITE_CHUNK = 500

#: Called with (event type, batch) when a batch reaches a final status (webhooks).
Notify = Callable[[str, catalog.BatchRecord], Awaitable[None]]


def output_file_id(batch_id: str) -> str:
    """The output file's id: fixed, so writing it again after a crash replaces it."""
    return f"file-{batch_id.removeprefix('batch_')}-output"


def error_file_id(batch_id: str) -> str:
    """The error file's id."""
    return f"file-{batch_id.removeprefix('batch_')}-errors"


class Feeder:
    """The loop that runs batches; `run()` until cancelled."""

    def __init__(self, settings: settings_mod.Settings, store: results.Store,
                 cat: catalog.Catalog, files: FileStore, lane: Queue,
                 notify: Notify | None = None, releaser: fair.Releaser | None = None) -> None:
        self.settings = settings
        self.cfg = settings.batch
        self.store = store
        self.catalog = cat
        self.files = files
        self.lane = lane
        self.notify = notify
        self.releaser = releaser
        self.holder = uuid.uuid4().hex
        self._leading_until = 0.0
        self._lane_ready = False

    async def run(self) -> None:
        """Hold the lease and take rounds; on trouble, log and try again."""
        releasing = (asyncio.create_task(self.releaser.run(self.leading), name="fair-release")
                     if self.releaser is not None else None)
        try:
            await self._rounds()
        finally:
            if releasing is not None:
                releasing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await releasing

    def leading(self) -> bool:
        """Whether this process holds the feeder's lease (with a margin before it lapses)."""
        return time.monotonic() < self._leading_until

    async def _rounds(self) -> None:
        async def step() -> None:
            taken = time.monotonic()
            if await self.catalog.take_feeder_lease(self.holder, LEASE_SECONDS):
                self._leading_until = taken + LEASE_SECONDS / 2
                await self.round()
            else:
                self._leading_until = 0.0

        await errors.rounds(step, self.cfg.feed_seconds, "batch feeder", log)

    async def round(self) -> None:
        """One look at every active batch."""
        now = catalog.now()
        feeding: list[catalog.BatchRecord] = []
        in_flight = 0
        for batch_id in await self.catalog.active_batches():
            batch = await self.catalog.get_batch(batch_id)
            if batch is None:
                await self.catalog.retire(batch_id)
                continue
            action = batches.next_action(batch, now)
            if batch.status == "in_progress":
                in_flight += max(0, batch.fed - batch.done)
            if action is batches.Action.FEED:
                feeding.append(batch)
            else:
                await self._step(batch, action, now)
        free = self.cfg.lane_window - in_flight
        if feeding and free > 0:
            wants = [(b.owner, b.id, b.total - b.fed, max(0, b.fed - b.done)) for b in feeding]
            shares = batches.fair_shares(free, wants)
            for batch in feeding:
                if shares.get(batch.id):
                    await self.feed(batch, shares[batch.id])

    async def _step(self, batch: catalog.BatchRecord, action: batches.Action, now: int) -> None:
        if action is batches.Action.START:
            await self._start(batch, now)
        elif action is batches.Action.FINISH:
            await self.catalog.transition(batch.id, ("in_progress",), status="finalizing",
                                          finalizing_at=now, outcome="completed")
        elif action is batches.Action.EXPIRE:
            await self.catalog.transition(batch.id, ("in_progress",), status="finalizing",
                                          finalizing_at=now, outcome="expired")
        elif action is batches.Action.WRITE:
            await self.write_results(batch)
        elif action is batches.Action.RETIRE:
            await self.catalog.retire(batch.id)

    async def _start(self, batch: catalog.BatchRecord, now: int) -> None:
        source = await self.catalog.get_file(batch.input_file_id)
        if source is None:
            failure = {"code": "file_missing", "message": "the input file was deleted",
                       "param": "input_file_id", "line": None}
            state = await self.catalog.transition(batch.id, ("validating",), status="failed",
                                                  failed_at=now, errors=json.dumps([failure]))
            if state == "ok":
                await self._announce("batch.failed", batch.id)
            return
        await self.catalog.save_progress(batch.id, total=source.lines)
        await self.catalog.transition(batch.id, ("validating",), status="in_progress",
                                      in_progress_at=now)

    async def feed(self, batch: catalog.BatchRecord, count: int) -> None:
        """Send up to `count` more lines of the batch, chunk by chunk, saving the cursor."""
        if not self._lane_ready:
            await self.lane.setup()
            self._lane_ready = True
        cursor, line_no, fed = batch.cursor, batch.line_no, batch.fed
        buffer = bytearray()
        pending: list[tuple[int, int, dict[str, str]]] = []  # (cursor after, line_no, line)
        async for chunk in self.files.read(batch.input_file_id, cursor):
            for raw in batchfile.iter_lines(buffer, chunk):
                line_no += 1
                after = cursor + len(raw) + 1
                cursor = after
                if not raw.strip():
                    continue
                pending.append((after, line_no, self._line(batch, fed + len(pending), raw)))
                if len(pending) >= min(count, FEED_CHUNK):
                    break
            if len(pending) >= min(count, FEED_CHUNK):
                break
        if not pending and buffer.strip():  # a last line without a newline
            line_no += 1
            cursor += len(buffer)
            pending.append((cursor, line_no, self._line(batch, fed, bytes(buffer))))
        if not pending:
            return
        await self._send(batch, [p[2] for p in pending])
        fed += len(pending)
        await self.catalog.save_progress(batch.id, cursor=pending[-1][0], line_no=pending[-1][1],
                                         fed=fed)
        batch.cursor, batch.line_no, batch.fed = pending[-1][0], pending[-1][1], fed
        if count > len(pending) and fed < batch.total:
            await self.feed(batch, count - len(pending))

    def _line(self, batch: catalog.BatchRecord, index: int, raw: bytes) -> dict[str, str]:
        line = json.loads(raw)  # checked at upload: a valid request line
        request = batchfile.chat_request(line["url"], line["body"])
        return {"id": catalog.line_job_id(batch.id, index), "custom_id": line["custom_id"],
                "url": line["url"], "line": str(index),
                "request": request.model_dump_json(exclude_none=True),
                "model": request.model or self.settings.llm_model}

    async def _send(self, batch: catalog.BatchRecord, lines: list[dict[str, str]]) -> None:
        states = await self.store.create_lines(batch.owner, batch.id, lines,
                                               self.settings.uses_simulator)
        sends = []
        for line, state in zip(lines, states, strict=True):
            if state in ("created", jobs.Status.QUEUED.value):
                with telemetry.producer_span(self.lane.backend, self.lane.name, line["id"]) as carrier:
                    sends.append(self.lane.send(jobs.encode_message(line["id"]), carrier))
        for i in range(0, len(sends), 32):
            await asyncio.gather(*sends[i:i + 32])

    async def write_results(self, batch: catalog.BatchRecord) -> None:
        """finalizing/cancelling: stop unfinished lines, write both files, take the outcome."""
        outcome = batch.outcome or ("cancelled" if batch.status == "cancelling" else "completed")
        out_id, err_id = output_file_id(batch.id), error_file_id(batch.id)
        out, err = await self.files.writer(out_id), await self.files.writer(err_id)
        counts = {"out": 0, "err": 0, "out_bytes": 0, "err_bytes": 0}
        try:
            for start in range(0, batch.fed, WRITE_CHUNK):
                ids = [catalog.line_job_id(batch.id, i)
                       for i in range(start, min(batch.fed, start + WRITE_CHUNK))]
                records = await self._stopped(ids, await self.store.get_many(ids))
                for job_id, record in zip(ids, records, strict=True):
                    custom_id = (record.custom_id or "") if record else ""
                    # The result-line builders (chatq.batches) read records as mappings.
                    await self._emit(out, err, counts, custom_id, job_id,
                                     record.model_dump(mode="json") if record else None, outcome)
            if batch.fed < batch.total:
                await self._emit_unfed(batch, out, err, counts, outcome)
            await out.commit()
            await err.commit()
        except BaseException:
            await out.abort()
            await err.abort()
            raise
        now = catalog.now()
        fields: dict[str, Any] = {"status": outcome, f"{outcome}_at": now}
        for kind, file_id, name in (("out", out_id, "output"), ("err", err_id, "error")):
            if counts[kind]:
                await self.catalog.put_file(catalog.FileRecord(
                    id=file_id, owner=batch.owner, filename=f"{batch.id}_{name}.jsonl",
                    purpose="batch_output", bytes=counts[f"{kind}_bytes"], created_at=now,
                    lines=counts[kind]))
                fields[f"{name}_file_id"] = file_id
            else:
                await self.files.delete(file_id)
        state = await self.catalog.transition(batch.id, ("finalizing", "cancelling"), **fields)
        if state == "ok":
            await self.catalog.retire(batch.id)
            log.info("batch %s %s: %d answered, %d errors", batch.id, outcome, counts["out"],
                     counts["err"])
            await self._announce(f"batch.{outcome}", batch.id)

    async def _stopped(self, ids: list[str], records: list[jobs.JobRecord | None]
                       ) -> list[jobs.JobRecord | None]:
        """Cancel the lines not yet terminal (the batch is ending); their records after."""
        changed = False
        for job_id, record in zip(ids, records, strict=True):
            if record is not None and not record.status.terminal:
                await self.store.cancel(job_id)
                changed = True
        return await self.store.get_many(ids) if changed else records

    async def _emit(self, out: Any, err: Any, counts: dict[str, int], custom_id: str,
                    job_id: str, record: dict[str, Any] | None, outcome: str) -> None:
        good, line = batches.result_line(custom_id, job_id, record, outcome)
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        kind = "out" if good else "err"
        await (out if good else err).write(data)
        counts[kind] += 1
        counts[f"{kind}_bytes"] += len(data)

    async def _emit_unfed(self, batch: catalog.BatchRecord, out: Any, err: Any,
                          counts: dict[str, int], outcome: str) -> None:
        """The lines never fed (cancel, expiry): read their custom_ids from the input file."""
        buffer = bytearray()
        index = batch.fed
        async for chunk in self.files.read(batch.input_file_id, batch.cursor):
            raws = batchfile.iter_lines(buffer, chunk)
            for raw in raws:
                if raw.strip():
                    await self._emit(out, err, counts, json.loads(raw)["custom_id"],
                                     catalog.line_job_id(batch.id, index), None, outcome)
                    index += 1
        if buffer.strip():
            await self._emit(out, err, counts, json.loads(bytes(buffer))["custom_id"],
                             catalog.line_job_id(batch.id, index), None, outcome)

    async def _announce(self, event: str, batch_id: str) -> None:
        if self.notify is None:
            return
        batch = await self.catalog.get_batch(batch_id)
        if batch is not None:
            with contextlib.suppress(errors.ChatqError):
                await self.notify(event, batch)
