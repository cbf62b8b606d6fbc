"""A QueueScaler's status: the observed numbers and its conditions.

Conditions follow the Kubernetes convention (type, status "True"/"False", reason,
message, lastTransitionTime); the time changes only when the status does.

- `Ready`: the scaler is scaling its target. False with reason `TargetNotFound`,
  `TargetConflict` (another QueueScaler owns the Deployment), `InvalidSpec` or
  `SourceError` (the queue cannot be read: holding or on fallback).
- `Active`: messages are waiting or being worked on.
- `Fallback`: True while `fallbackReplicas` is in use because the queue cannot be read.
- `RateLimited`: True while the model's rate budget caps the replicas (`spec.budget`).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Condition:
    """One condition as this poll sees it."""

    type: str
    status: bool
    reason: str
    message: str = ""


def now_iso(now: datetime.datetime | None = None) -> str:
    """A timestamp as Kubernetes writes them (RFC 3339, UTC, whole seconds)."""
    moment = now or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(old: Sequence[Mapping[str, Any]] | None, new: Iterable[Condition], at: str) -> list[dict[str, str]]:
    """The conditions list: `new` ones replace theirs, others stay; times move on change only."""
    before = {str(c.get("type")): dict(c) for c in (old or ()) if c.get("type")}
    merged = dict(before)
    for cond in new:
        status = "True" if cond.status else "False"
        prior = before.get(cond.type, {})
        since = prior.get("lastTransitionTime") if prior.get("status") == status else None
        merged[cond.type] = {"type": cond.type, "status": status, "reason": cond.reason,
                             "message": cond.message, "lastTransitionTime": str(since or at)}
    return [merged[k] for k in sorted(merged)]


def changed(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `wanted` that differ from `current` (a merge patch of the status)."""
    return {k: v for k, v in wanted.items() if current.get(k) != v}
