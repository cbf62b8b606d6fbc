"""What a batch does next, how the lane's room is shared, and what its output lines say.

Pure code only, table-tested: `next_action()` is the status machine the feeder follows
(validating → in_progress → finalizing → completed; expiry and cancel keep what finished),
`fair_shares()` hands the batch lane's free room to API keys so that two keys' batches
progress at the same rate, and `result_line()` renders one finished line as OpenAI's
output/error JSONL line, the body a chat.completion or a Response object.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from chatq import batchfile, catalog

FINAL = ("completed", "failed", "expired", "cancelled")
CANCELLABLE = ("validating", "in_progress")


class Action(StrEnum):
    """The feeder's next step for one batch."""

    START = "start"
    """validating → in_progress: the input was checked at upload; count and go."""
    FEED = "feed"
    """Hand more lines to the queue (as the lane's share allows)."""
    WAIT = "wait"
    """Every line is fed; some are still running."""
    FINISH = "finish"
    """Every line has an outcome: → finalizing (outcome completed)."""
    EXPIRE = "expire"
    """The completion window passed: → finalizing (outcome expired)."""
    WRITE = "write"
    """finalizing or cancelling: stop what is unfinished, write the files, take the outcome."""
    RETIRE = "retire"
    """A final status: the feeder forgets the batch."""


def next_action(batch: catalog.BatchRecord, now: int) -> Action:
    """The one decision of the feeder's loop for a batch (rules in order)."""
    status = batch.status
    if status in FINAL:
        return Action.RETIRE
    if status in ("finalizing", "cancelling"):
        return Action.WRITE
    if status == "validating":
        return Action.START
    if batch.expires_at is not None and now >= batch.expires_at:
        return Action.EXPIRE
    if batch.fed < batch.total:
        return Action.FEED
    if batch.done >= batch.total:
        return Action.FINISH
    return Action.WAIT


def fair_shares(free: int, wants: list[tuple[str, str, int, int]]) -> dict[str, int]:
    """Split `free` lane slots among batches: (owner, batch id, lines left, in flight).

    Each slot goes to the API key with the fewest lines in flight (then to that key's batch
    with the fewest), so keys converge on equal shares of the lane whatever their batch
    sizes, and a new key's batch catches up with one that started earlier.
    """
    left = {b: n for _, b, n, _ in wants if n > 0}
    flying = {b: f for _, b, _, f in wants}
    owners: dict[str, list[str]] = {}
    for owner, b, n, _ in wants:
        if n > 0:
            owners.setdefault(owner, []).append(b)
    load = {o: sum(flying[b] for b in bs) for o, bs in owners.items()}
    shares: dict[str, int] = {}
    for _ in range(max(0, free)):
        candidates = [o for o, bs in owners.items() if any(left[b] > 0 for b in bs)]
        if not candidates:
            break
        owner = min(candidates, key=lambda o: (load[o], o))
        batch = min((b for b in owners[owner] if left[b] > 0), key=lambda b: (flying[b], b))
        shares[batch] = shares.get(batch, 0) + 1
        left[batch] -= 1
        flying[batch] += 1
        load[owner] += 1
    return shares


def chat_completion(record: Mapping[str, Any]) -> dict[str, Any]:
    """A finished line's answer as OpenAI's chat.completion object."""
    usage = record.get("usage") or {}
    return {
        "id": f"chatcmpl-{record['id']}", "object": "chat.completion",
        "created": int(record.get("finished_at") or record.get("created_at") or 0),
        "model": record.get("model"),
        "choices": [{"index": 0, "logprobs": None,
                     "finish_reason": record.get("finish_reason") or "stop",
                     "message": {"role": "assistant", "content": record.get("answer") or "",
                                 "refusal": None}}],
        "usage": {"prompt_tokens": usage.get("prompt_tokens", 0),
                  "completion_tokens": usage.get("completion_tokens", 0),
                  "total_tokens": usage.get("total_tokens", 0)},
    }


def response_object(record: Mapping[str, Any]) -> dict[str, Any]:
    """A finished line's answer as OpenAI's Response object."""
    usage = record.get("usage") or {}
    return {
        "id": f"resp_{record['id']}", "object": "response",
        "created_at": int(record.get("created_at") or 0), "status": "completed",
        "model": record.get("model"), "error": None, "incomplete_details": None,
        "output": [{"type": "message", "id": f"msg_{record['id']}", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": record.get("answer") or "",
                                 "annotations": []}]}],
        "parallel_tool_calls": False, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": usage.get("prompt_tokens", 0),
                  "output_tokens": usage.get("completion_tokens", 0),
                  "total_tokens": usage.get("total_tokens", 0),
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }


def result_line(custom_id: str, job_id: str, record: Mapping[str, Any] | None,
                outcome: str) -> tuple[bool, dict[str, Any]]:
    """(goes to the output file, the JSONL line) for one input line.

    `record` is the line's job (None when it was never fed); `outcome` is the batch's end
    (completed, expired, cancelled), which names what happened to lines without an answer.
    """
    line: dict[str, Any] = {"id": f"batch_req_{job_id}", "custom_id": custom_id,
                            "response": None, "error": None}
    status = record.get("status") if record else None
    if record is not None and status == "succeeded":
        body = (response_object(record) if record.get("url") == batchfile.RESPONSES_URL
                else chat_completion(record))
        line["response"] = {"status_code": 200, "request_id": job_id, "body": body}
        return True, line
    if record is not None and status == "failed":
        error = record.get("error") or {}
        line["error"] = {"code": error.get("code", "error"),
                         "message": error.get("message", "the request failed")}
        return False, line
    if record is None and outcome == "completed":
        line["error"] = {"code": "result_expired", "message": "the line's result is no longer kept"}
        return False, line
    code = "batch_expired" if outcome == "expired" else "batch_cancelled"
    line["error"] = {"code": code, "message": f"the batch was {outcome} before this request ran"}
    return False, line
