"""The one settings object of chatq, read from `CHATQ_*` environment variables.

Fields are grouped by topic (api, worker, queue, redis, llm, llmsim, telemetry, log); a
field `port` of the group `api` is set by `CHATQ_API_PORT`. Settings are built in the entry
point (`chatq.cli`) and passed down; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

#: The model name llmsim answers to; also what chatq asks for when it falls back to llmsim.
SIMULATOR_MODEL = "chatq-sim-1"


#: Names Kubernetes gives its service-link variables for a Service `chatq-<x>`:
#: CHATQ_<X>_SERVICE_HOST, CHATQ_<X>_SERVICE_PORT[_<port name>],
#: CHATQ_<X>_PORT_<n>_<proto>[_PROTO|_PORT|_ADDR]; CHATQ_<X>_PORT itself is told by its value.
_SERVICE_LINK_NAME = re.compile(
    r"^chatq_(?:\w+_)?(?:service_host|service_port(?:_\w+)?|port_\d+_(?:tcp|udp|sctp)(?:_proto|_port|_addr)?)$",
    re.IGNORECASE,
)
_SERVICE_LINK_VALUE = re.compile(r"^(?:tcp|udp|sctp)://", re.IGNORECASE)


def is_service_link(name: str, value: str | None) -> bool:
    """True for a variable Kubernetes made from a Service named `chatq-...` (enableServiceLinks).

    Every pod gets such variables for each Service in its namespace, so a Service `chatq-api`
    sets CHATQ_API_PORT=tcp://10.96.0.7:8000, which would otherwise be read as the API port.
    No setting of ours has such a name, or such a value.
    """
    if _SERVICE_LINK_NAME.match(name):
        return True
    return name.lower().endswith("_port") and bool(_SERVICE_LINK_VALUE.match(value or ""))


class _EnvWithoutServiceLinks(EnvSettingsSource):
    """The environment as pydantic-settings reads it, less Kubernetes' service-link variables."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = super()._load_env_vars()
        return {k: v for k, v in env.items() if not is_service_link(k, v)}


class _Group(BaseModel):
    """A topic of settings; attribute docstrings become the field descriptions."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")


class ApiSettings(_Group):
    """The HTTP API process."""

    host: str = "127.0.0.1"
    """Address uvicorn binds to; `0.0.0.0` in containers. Default 127.0.0.1."""
    port: int = 8000
    """TCP port of the API. Default 8000."""
    keys: str = ""
    """Comma-separated API keys, each plain or as `sha256:<hex digest>`; kept only hashed.
    Empty (the default) leaves the API open, which it logs at start."""
    max_body_bytes: int = 64 * 1024
    """Largest accepted request body in bytes; larger gets 413. Default 65536."""
    header_timeout_seconds: float = Field(10.0, gt=0)
    """How long a client may take to send a request's line and headers, from the
    connection's first byte or the request's; past it, 408 and the connection closes
    (slowloris). Default 10 s."""
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    """Largest request line plus headers in bytes; larger gets 431 and the connection
    closes. Default 32768."""
    send_timeout_seconds: float = Field(30.0, gt=0)
    """How long a response may wait for a client that stopped reading it (its socket's
    buffers full) before the connection is closed, in seconds; an unread SSE stream or
    download then holds nothing. Default 30."""
    max_held_per_key: int = Field(1000, ge=1)
    """Long-polls (`?wait=`, `POST /v1/responses` waiting for its answer) and SSE streams
    one API key may hold open at once on one api process (each process counts its own);
    past it, 429 `too_many_held` with Retry-After. Default 1000."""
    max_wait_seconds: float = 60.0
    """Upper bound of `?wait=` long-polls, in seconds. Default 60."""
    response_wait_seconds: float = 600.0
    """How long `POST /v1/responses` without `background` waits for the answer before it
    returns the response as it stands (status `in_progress`), in seconds. Default 600."""
    public_url: str = ""
    """Base URL used in `Location` headers when behind a proxy; empty means relative."""
    key_rpm: int = Field(0, ge=0)
    """Jobs each API key may create per minute, counted across all api replicas in Redis;
    over it, 429 with Retry-After. Default 0: unlimited."""
    key_tokens_per_day: int = Field(0, ge=0)
    """Tokens each API key may use per UTC day (reserved as prompt + max_tokens, then
    corrected to real usage). Default 0: unlimited."""
    quotas: str = ""
    """Per-key quotas overriding the two above: comma-separated
    `<key or sha256:hex>=<rpm>/<tokens per day>[/<name for metrics>]`, 0 = unlimited."""
    auth_failures_per_minute: int = Field(20, ge=0)
    """Wrong API keys one source address may present per minute to one api process; past
    it, that address's keys are refused with 429 and Retry-After before they are checked,
    except keys that already worked from it (chatq.api.auth). 0 turns the limit off.
    Default 20."""
    forwarded_allow_ips: str = "127.0.0.1"
    """Comma-separated addresses or networks (`10.0.0.0/8`) of proxies whose
    `X-Forwarded-For` names the client, `*` for any: the source address that auth failures
    are counted per, and that logs show. Behind an ingress, name its pods' network, else
    every client counts as the ingress. Default 127.0.0.1 (uvicorn's)."""
    cors_origins: str = ""
    """Comma-separated origins (`https://app.example.com`) whose browser pages may call the
    API (CORS), or `*` for any; empty (the default) sends no CORS headers, so browsers
    refuse every cross-origin call."""


class WorkerSettings(_Group):
    """The worker process."""

    concurrency: int = Field(32, ge=1)
    """Jobs one worker process runs at once (one semaphore). Default 32."""
    batch_size: int = Field(10, ge=1, le=10)
    """Messages taken per receive call (SQS allows at most 10). Default 10."""
    grace_seconds: float = 25.0
    """On SIGTERM, how long in-flight jobs may run before they are handed back. Default 25 s;
    keep it below the pod's terminationGracePeriodSeconds."""
    heartbeat_seconds: float = 0.0
    """How often leases are renewed while the model runs; 0 means a third of the queue's
    visibility timeout. Default 0."""
    id: str = ""
    """Worker identity (Redis consumer name, busy-count key); empty means hostname-pid-random.
    In Kubernetes the chart sets it to the pod name."""
    busy_report_seconds: float = 5.0
    """How often the worker writes its in-flight count to Redis for the operator. Default 5 s."""
    janitor_seconds: float = Field(30.0, ge=0)
    """How often each worker sweeps for `running` jobs nobody works on (their lease long
    expired, their message gone), in seconds, jittered; 0 turns the sweep off. Default 30."""
    stale_seconds: float = Field(120.0, gt=0)
    """How long past its lease expiry a `running` job must be before the sweep acts on it, in
    seconds; keep it above the visibility timeout plus the long-poll wait, so the queue's own
    redelivery comes first. Default 120."""
    janitor_requeues: int = Field(1, ge=0)
    """Times the sweep puts a stale job back on the queue (a new message) before it fails it
    with the error `abandoned`. Default 1."""


class QueueSettings(_Group):
    """The job queue: Redis Streams (embedded default) or AWS SQS."""

    backend: Literal["redis", "sqs"] = "redis"
    """`redis` (Redis Streams, the default) or `sqs` (AWS SQS or ElasticMQ)."""
    name: str = "chatq-jobs"
    """Stream name (redis) or queue name (sqs); the dead-letter one is `<name>-dlq`."""
    group: str = "chatq-workers"
    """Redis Streams consumer group of the workers (redis only)."""
    url: str = ""
    """SQS queue URL; empty means look it up (or create it) by `name` (sqs only)."""
    region: str = "us-east-1"
    """AWS region (sqs only). Default us-east-1."""
    endpoint: str = ""
    """SQS endpoint override, e.g. ElasticMQ's http://localhost:9324 (sqs only)."""
    create: bool = True
    """Create the queue and its dead-letter queue at start when missing. Default true."""
    visibility_seconds: int = Field(30, ge=1)
    """Lease length: a message not renewed for this long goes to another worker. Default 30."""
    wait_seconds: int = Field(20, ge=0, le=20)
    """Long-poll wait of one receive call, in seconds. Default 20 (the SQS maximum)."""
    max_receives: int = Field(5, ge=1)
    """Deliveries of one message before it is dead-lettered. Default 5."""


class RedisSettings(_Group):
    """Redis, home of job records and token streams (and of the queue when backend=redis)."""

    url: str = "redis://localhost:6379/0"
    """Redis URL. Default redis://localhost:6379/0."""
    results_ttl_seconds: int = Field(24 * 3600, ge=60)
    """How long a job record and its token stream live, in seconds. Default 86400 (24 h)."""
    timeout_seconds: float = 5.0
    """Connect timeout, and the longest a call waits for a free pooled connection; past
    it the API answers 503. Default 5 s."""
    max_connections: int = Field(512, ge=4)
    """Redis connections per process; a long-poll or SSE stream holds none while it waits
    (chatq.wakeups). Default 512."""


class LlmSettings(_Group):
    """The OpenAI-compatible model the workers call."""

    base_url: str = ""
    """Base URL of an OpenAI-compatible API (vLLM, Ollama, llama.cpp, Azure...). With neither
    this nor `api_key` set, chatq uses llmsim at `CHATQ_LLMSIM_HOST:PORT`."""
    api_key: str = ""
    """API key sent as a bearer token; empty for local servers that need none."""
    model: str = ""
    """Default model name; empty means gpt-4o-mini on OpenAI, chatq-sim-1 on llmsim."""
    first_token_seconds: float = Field(120.0, gt=0)
    """Longest wait, in seconds, from sending a model call to its first token: connecting,
    the server's own queue and reading the prompt. Default 120."""
    idle_seconds: float = Field(60.0, gt=0)
    """Longest silence, in seconds, between two pieces of a streaming answer; a slow but
    steady model is never cut off by it. Default 60."""
    timeout_seconds: float = Field(0.0, ge=0)
    """Longest a whole answer may take, in seconds, however steadily it streams; 0 (the
    default) sets no bound beyond the two above."""
    max_attempts: int = Field(4, ge=1)
    """Attempts of one job's model call on 429, 5xx, cut streams and timeouts. Default 4."""
    retry_streamed_tokens: int = Field(0, ge=0)
    """An attempt that fails after this many streamed tokens is not retried (the job fails
    and keeps the partial answer), so a long answer is not regenerated from scratch; 0 (the
    default) retries whatever was streamed."""
    backoff_base_seconds: float = 0.5
    """First retry delay in seconds, doubled each attempt, jittered, capped. Default 0.5."""
    backoff_max_seconds: float = 30.0
    """Longest retry delay in seconds, `retry-after` included. Default 30."""
    max_tokens: int = 1024
    """Default max_tokens when a request names none. Default 1024."""
    breaker_failures: int = Field(5, ge=1)
    """Server errors (5xx) from the model, counted across all workers within
    `breaker_window_seconds`, that mark the model down; an unreachable model (connection
    refused, 502/503/504) is marked down at once. Default 5."""
    breaker_window_seconds: float = Field(30.0, gt=0)
    """The window, in seconds, in which `breaker_failures` are counted. Default 30."""
    probe_seconds: float = Field(5.0, gt=0)
    """While the model is down, how often one worker asks it (GET /models) whether it is back,
    in seconds; the others wait. Default 5."""
    outage_window_seconds: float = Field(6 * 3600, gt=0)
    """How long, in seconds, the model may be down before jobs that wait for it fail with
    `model_unavailable`; until then they stay queued. Default 21600 (6 h)."""
    handback_delay_seconds: float = Field(5.0, ge=0)
    """A job running when the model went down goes back to the queue, visible again after
    this many seconds. Default 5."""
    rpm: int = Field(0, ge=0)
    """Requests per minute the model endpoint allows, shared by all workers through Redis;
    0 (the default) means learnt from `x-ratelimit-*` headers and 429s (unlimited until then)."""
    tpm: int = Field(0, ge=0)
    """Tokens per minute (prompt + max_tokens reserved, corrected by usage) the endpoint
    allows, shared by all workers; 0 (the default) means learnt, as for rpm."""
    budget: bool = True
    """Take the shared rate budget before each model call. Default true; false leaves the
    workers to the provider's 429s alone (for comparison)."""


class LlmsimSettings(_Group):
    """llmsim, the built-in OpenAI-compatible simulator."""

    host: str = "127.0.0.1"
    """Address llmsim binds to. Default 127.0.0.1."""
    port: int = 8100
    """TCP port of llmsim. Default 8100."""
    ttft_ms: float = 200.0
    """Time to first token in milliseconds. Default 200."""
    itl_ms: float = 20.0
    """Time between tokens in milliseconds. Default 20."""
    tokens: int = 24
    """Tokens per answer, unless max_tokens is lower. Default 24."""
    error_rate_429: float = 0.0
    """Share of requests answered 429 with `retry-after`. Default 0."""
    error_rate_500: float = 0.0
    """Share of requests answered 500. Default 0."""
    hang_rate: float = 0.0
    """Share of requests that never answer (to test timeouts). Default 0."""
    retry_after_seconds: float = 0.2
    """The `retry-after` value of injected 429s, in seconds. Default 0.2."""
    rpm: int = Field(0, ge=0)
    """Requests per minute llmsim allows before it answers 429 (a bucket of one minute's
    worth, refilled continuously), with OpenAI's `x-ratelimit-*` headers. Default 0: no limit."""
    tpm: int = Field(0, ge=0)
    """Tokens per minute llmsim allows (prompt + max_tokens held while the call runs, then
    the real usage). Default 0: no limit."""


class WebhookSettings(_Group):
    """Signed webhooks (Standard Webhooks) when jobs end; delivered at least once."""

    endpoints: str = ""
    """Endpoints set by configuration, a JSON list: `[{"key": "<API key, or sha256:<hex>; empty
    when the API is open>", "url": "https://...", "secret": "whsec_...", "events": [...]}]`
    (`events` optional: all). Endpoints made with `/v1/webhook_endpoints` live in Redis."""
    dispatch: bool = True
    """Run the delivery dispatcher in this api process (several api processes share the
    work through a Redis consumer group). Default true."""
    allow_private: bool = False
    """Allow deliveries to loopback, link-local and private addresses (a receiver on the
    same host or network). Default false: such targets are refused (SSRF guard)."""
    timeout_seconds: float = Field(10.0, gt=0)
    """Longest one delivery attempt may take, in seconds. Default 10."""
    retry_base_seconds: float = Field(5.0, gt=0)
    """First retry delay of a failed delivery in seconds, doubled each attempt, jittered.
    Default 5."""
    retry_max_seconds: float = Field(1800.0, gt=0)
    """Longest delay between two attempts, in seconds. Default 1800 (30 min)."""
    max_age_seconds: float = Field(86400.0, gt=0)
    """How long a delivery is retried before it goes to the dead-letter list, in seconds.
    Default 86400 (24 h)."""
    concurrency: int = Field(64, ge=1)
    """Deliveries one dispatcher makes at once. Default 64."""
class FilesSettings(_Group):
    """The file store of /v1/files: batch input and output files (only metadata is in Redis)."""

    store: Literal["local", "s3"] = "local"
    """`local` (a directory, the embedded default) or `s3` (AWS S3 or an S3-compatible server)."""
    dir: str = ""
    """Directory of the `local` store; empty means `$XDG_CACHE_HOME/chatq/files` (the data
    directory `chatq up` uses, ~/.cache/chatq/files)."""
    s3_bucket: str = ""
    """S3 bucket of the `s3` store (it must exist)."""
    s3_prefix: str = "chatq/files/"
    """Key prefix of the files in the bucket. Default chatq/files/."""
    s3_endpoint: str = ""
    """S3 endpoint override for S3-compatible servers (MinIO, moto...); empty means AWS."""
    s3_region: str = "us-east-1"
    """AWS region of the bucket. Default us-east-1."""
    max_bytes: int = Field(200 * 1024 * 1024, ge=1)
    """Largest upload in bytes; larger gets 413. Default 209715200 (200 MB, OpenAI's limit)."""
    max_lines: int = Field(50_000, ge=1)
    """Most requests in one batch input file. Default 50000 (OpenAI's limit)."""


class BatchSettings(_Group):
    """Batches: how their lines are fed to the workers beside interactive work."""

    completion_window_seconds: int = Field(24 * 3600, ge=1)
    """How long a batch's `completion_window: "24h"` lasts, in seconds; the lines not done
    by then are reported expired. Default 86400 (tests shorten it)."""
    queue_suffix: str = "-batch"
    """The batch lane is its own queue, named `<CHATQ_QUEUE_NAME><suffix>`. Default -batch."""
    lane_window: int = Field(256, ge=1)
    """Most batch lines (of all batches) queued or running at once; the feeder adds more as
    they finish, sharing the room round-robin among API keys. Default 256."""
    feed_seconds: float = 0.2
    """How often the feeder looks at the active batches, in seconds. Default 0.2."""
    reserve: int = Field(2, ge=0)
    """Slots of each worker kept free for interactive work: a worker takes batch lines only
    while more than this many of its `CHATQ_WORKER_CONCURRENCY` slots are free. Default 2."""


class FairSettings(_Group):
    """Fair shares among API keys of interactive work (`/v1/chat`, `/v1/responses`)."""

    enabled: bool = True
    """Hold a key's new jobs in Redis while the queue's window is full, and release them
    round-robin by key (chatq.fair); false sends every job to the queue in arrival order.
    Default true."""
    spare: int = Field(8, ge=1)
    """Jobs released beyond the live workers' slots (at least this, or a quarter of the
    slots), so a worker that frees a slot finds the next job waiting; with no worker
    reporting, the whole window. Default 8."""
    round_seconds: float = Field(0.05, gt=0)
    """How often the feeder releases held jobs into freed room, in seconds. Default 0.05."""


class TelemetrySettings(_Group):
    """Metrics and traces; OTLP export itself is configured by the standard OTEL_* vars."""

    metrics_host: str = "127.0.0.1"
    """Address the worker's /metrics and /healthz server binds to; `0.0.0.0` in containers,
    so probes and Prometheus reach it. Default 127.0.0.1."""
    metrics_port: int = 0
    """Port of the worker's /healthz and /metrics server; 0 means 9100 (chatq.probe). Default 0."""
    capture_content: bool = False
    """Put question and answer text into traces (GenAI prompt capture); logs never hold it.
    Default false: no user text leaves the job."""


class LogSettings(_Group):
    """Logging, configured only in the entry point."""

    level: str = "INFO"
    """Log level name. Default INFO."""
    json_format: bool = False
    """One JSON object per line (for Loki) instead of plain text. Default false."""


class Settings(BaseSettings):
    """All of chatq's settings; `CHATQ_<GROUP>_<FIELD>` sets `<group>.<field>`."""

    model_config = SettingsConfigDict(
        env_prefix="CHATQ_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
    )

    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    queue: QueueSettings = QueueSettings()
    redis: RedisSettings = RedisSettings()
    llm: LlmSettings = LlmSettings()
    llmsim: LlmsimSettings = LlmsimSettings()
    webhook: WebhookSettings = WebhookSettings()
    files: FilesSettings = FilesSettings()
    batch: BatchSettings = BatchSettings()
    fair: FairSettings = FairSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Read the environment without Kubernetes' service-link variables (see is_service_link)."""
        return init_settings, _EnvWithoutServiceLinks(settings_cls), dotenv_settings, file_secret_settings

    @property
    def uses_simulator(self) -> bool:
        """True when no model is configured, so llmsim answers."""
        return not self.llm.base_url and not self.llm.api_key

    @property
    def llm_base_url(self) -> str | None:
        """Where the openai client points; None means the SDK's default (OpenAI)."""
        if self.uses_simulator:
            return f"http://{self.llmsim.host}:{self.llmsim.port}/v1"
        return self.llm.base_url or None

    @property
    def llm_model(self) -> str:
        """The model asked for when a request names none."""
        if self.llm.model:
            return self.llm.model
        return SIMULATOR_MODEL if self.uses_simulator else "gpt-4o-mini"


def data_dir() -> Path:
    """Where `chatq up` keeps its data (Redis's files, the local file store), read when called."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatq"


def env_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting: the README table and `--help`."""
    rows = []
    for group, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for name, sub in model.model_fields.items():
            default = sub.default
            shown = (str(default).lower() if isinstance(default, bool)
                     else "" if default is None else str(default))
            rows.append((f"CHATQ_{group}_{name}".upper(), shown, (sub.description or "").strip()))
    return rows


def markdown_table() -> str:
    """The README's settings table (`python -m chatq.settings` prints it)."""
    lines = ["| variable | default | what it sets |", "|---|---|---|"]
    for name, default, doc in env_table():
        shown = f"`{default}`" if default else ""
        lines.append(f"| `{name}` | {shown} | {' '.join(doc.split()).replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
