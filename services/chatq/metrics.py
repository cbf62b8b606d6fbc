"""The Prometheus metrics of chatq's processes (prometheus-client, default registry).

Labels never hold a job id or user text: only routes, statuses and reasons.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

# The _created series double every counter for little use.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MODEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)

# --- api ---
http_requests = Counter("chatq_http_requests", "HTTP requests answered.",
                        ["method", "route", "status"])
http_latency = Histogram("chatq_http_request_duration_seconds", "HTTP request latency.",
                         ["method", "route", "status"], buckets=LATENCY_BUCKETS)
http_send_timeouts = Counter("chatq_http_send_timeouts",
                             "Connections aborted because the client stopped reading its "
                             "response for CHATQ_API_SEND_TIMEOUT_SECONDS.")
http_held = Gauge("chatq_http_held", "Long-polls and SSE streams open in this api process.")
http_held_refused = Counter("chatq_http_held_refused",
                            "Long-polls and SSE streams refused (429): their key held "
                            "CHATQ_API_MAX_HELD_PER_KEY already.")
jobs_enqueued = Counter("chatq_jobs_enqueued", "Jobs put on the queue.", ["queue"])
fair_held_jobs = Counter("chatq_fair_held_jobs",
                         "Interactive jobs held back at creation (the queue's fair window was "
                         "full, or their key had jobs held), released later by key.")
fair_held = Gauge("chatq_fair_held", "Interactive jobs held back now, all keys (feeder's view).")
queue_messages = Gauge("chatq_queue_messages",
                       "Messages in the queue at the last scrape: visible (waiting) or in flight.",
                       ["queue", "state"])

# --- worker ---
jobs_finished = Counter("chatq_jobs_finished", "Jobs that reached a terminal status.",
                        ["status", "reason"])
queue_wait = Histogram("chatq_queue_wait_seconds", "Time from enqueue to a worker's claim.",
                       buckets=LATENCY_BUCKETS)
job_overhead = Histogram("chatq_job_overhead_seconds",
                         "Time from enqueue to answer written, minus the model's time.",
                         buckets=LATENCY_BUCKETS)
model_latency = Histogram("chatq_model_request_duration_seconds", "One model call, end to end.",
                          ["model", "outcome"], buckets=MODEL_BUCKETS)
model_ttft = Histogram("chatq_model_time_to_first_token_seconds", "Model time to first token.",
                       ["model"], buckets=MODEL_BUCKETS)
model_retries = Counter("chatq_model_retries", "Model calls retried.", ["reason"])
tokens = Counter("chatq_tokens", "Tokens used by model calls.", ["model", "kind"])
in_flight = Gauge("chatq_worker_in_flight", "Jobs this worker is running now.")
concurrency = Gauge("chatq_worker_concurrency", "Jobs this worker may run at once.")
dead_letters = Counter("chatq_dead_letters", "Messages moved to the dead-letter queue.",
                       ["reason"])
model_up = Gauge("chatq_model_up",
                 "1 while the model answers, 0 while the shared circuit breaker says it is down.")
model_handbacks = Counter("chatq_model_handbacks",
                          "Jobs handed back to the queue because the model was down.")
deliveries = Counter("chatq_deliveries", "Messages received from the queue.", ["queue"])
janitor_actions = Counter("chatq_janitor_actions",
                          "Stale running jobs the janitor requeued or failed.", ["action"])

# --- the rate budget (worker) and quotas (api); `endpoint` is budget.endpoint_id, a hash ---
budget_limit = Gauge("chatq_budget_limit_per_minute",
                     "The endpoint's effective limit (configured or learnt, after 429 cuts).",
                     ["endpoint", "kind"])
budget_used = Counter("chatq_budget_used", "Budget taken: requests, and tokens (corrected by usage).",
                      ["endpoint", "kind"])
budget_returned = Counter("chatq_budget_returned_tokens",
                          "Reserved tokens given back after the call used fewer.", ["endpoint"])
budget_wait = Histogram("chatq_budget_wait_seconds", "Time a model call waited for budget.",
                        ["priority"], buckets=LATENCY_BUCKETS)
budget_waiting = Gauge("chatq_budget_waiting", "Calls of this worker waiting for budget now.")
provider_429s = Counter("chatq_provider_rate_limited", "Model calls the provider answered 429.",
                        ["endpoint"])
quota_refusals = Counter("chatq_quota_refusals",
                         "Requests refused for an API key's quota (key: its digest's first 12 "
                         "hex digits, or the configured name).", ["key", "kind"])
