"""Per-key API quotas, counted in Redis and so shared by two api processes."""

from __future__ import annotations

import time

import httpx
import pytest

from tests import servers
from tests.conftest import StackFactory

pytestmark = pytest.mark.integration

KEYS = {"a": "key-a-secret", "b": "key-b-secret", "c": "key-c-secret"}


def _post(url: str, key: str, text: str = "hello") -> httpx.Response:
    return httpx.post(f"{url}/v1/chat", json={"message": text, "max_tokens": 64},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_requests_per_minute_are_shared_by_two_api_replicas(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=0, CHATQ_API_KEYS=",".join(KEYS.values()),
                          CHATQ_API_QUOTAS=f"{KEYS['a']}=3/0/team-a")
    env = {**stack.env, "CHATQ_API_PORT": str(servers.free_port())}
    with servers.chatq_process("api", env, port_var="CHATQ_API_PORT", tmp=stack.tmp) as api2:
        urls = [stack.url, api2.url]
        answers = [_post(urls[i % 2], KEYS["a"]) for i in range(4)]
        assert [r.status_code for r in answers] == [202, 202, 202, 429]
        ok, refused = answers[2], answers[3]
        assert ok.headers["x-ratelimit-limit-requests"] == "3"
        assert ok.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.json()["error"]["code"] == "quota_exceeded_requests"
        assert 1 <= int(refused.headers["retry-after"]) <= 20
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        # Another key has no quota; the first key's refusal is counted under its name.
        assert all(_post(u, KEYS["b"]).status_code == 202 for u in urls * 3)
        assert "x-ratelimit-limit-requests" not in _post(stack.url, KEYS["b"]).headers
        metrics = httpx.get(f"{api2.url}/metrics").text
        assert 'chatq_quota_refusals_total{key="team-a",kind="requests"} 1.0' in metrics
        assert KEYS["a"] not in metrics


def test_tokens_per_day_reserve_then_count_real_usage(stack_factory: StackFactory) -> None:
    # "hello" + 64 max_tokens reserves 3 + 4 + 2 + 64 = 73 tokens: two fit in 200.
    stack = stack_factory("redis", workers=0, CHATQ_API_KEYS=",".join(KEYS.values()),
                          CHATQ_API_KEY_TOKENS_PER_DAY="200")
    first = [_post(stack.url, KEYS["c"]) for _ in range(3)]
    assert [r.status_code for r in first] == [202, 202, 429]
    refused = first[2]
    assert refused.json()["error"]["code"] == "quota_exceeded_tokens"
    assert refused.headers["x-ratelimit-limit-tokens"] == "200"
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) == 200 - 146
    assert int(refused.headers["retry-after"]) <= 86400
    # The quota is per key: another key still has its day.
    assert _post(stack.url, KEYS["b"]).status_code == 202
    # A worker runs the jobs; each used far fewer tokens than it reserved, and the day
    # counts what was used, so the key may ask again.
    stack.start_worker()
    with stack.client(KEYS["c"]) as c:
        for r in first[:2]:
            job = c.get(f"/v1/chat/{r.json()['id']}", params={"wait": 20}).json()
            assert job["status"] == "succeeded" and job["usage"]["total_tokens"] < 73
    servers.poll(lambda: _post(stack.url, KEYS["c"]).status_code, lambda status: status == 202,
                 "the day quota to be corrected by real usage", 10, interval=0.2)


def test_a_bad_quota_entry_stops_the_api_at_start(tmp_path: object) -> None:
    from chatq import quotas
    from chatq.api import deps

    with pytest.raises(ValueError, match="whole numbers"):
        quotas.parse("key-a=lots/5", deps.owner_of_entry)
    with pytest.raises(ValueError, match="want"):
        quotas.parse("key-a", deps.owner_of_entry)
    parsed = quotas.parse(f"{KEYS['a']}=3/0/team-a, sha256:{'ab' * 32}=0/9", deps.owner_of_entry)
    assert parsed[deps.owner_of_entry(KEYS["a"])] == quotas.Quota(3, 0, "team-a")
    assert parsed["ab" * 16] == quotas.Quota(0, 9, "")


def test_responses_and_batch_creation_take_from_the_same_quota(stack_factory: StackFactory) -> None:
    """/v1/responses and POST /v1/batches count against the key's minute as /v1/chat does,
    and their refusal is OpenAI's 429 (the SDK's RateLimitError), with the headers."""
    import openai

    from tests.integration.test_batches import batch_file

    stack = stack_factory("redis", workers=0, CHATQ_API_KEYS=",".join(KEYS.values()),
                          CHATQ_API_QUOTAS=f"{KEYS['a']}=3/0/team-a")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEYS["a"], max_retries=0,
                           timeout=30)
    upload = client.files.create(file=("in.jsonl", batch_file(2)), purpose="batch")  # free
    assert _post(stack.url, KEYS["a"]).status_code == 202
    answered = client.responses.with_raw_response.create(model="chatq-sim-1", input="hi",
                                                         background=True)
    assert answered.headers["x-ratelimit-remaining-requests"] == "1"
    made = client.batches.with_raw_response.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert made.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model="chatq-sim-1", input="one too many", background=True)
    assert refused.value.code == "quota_exceeded_requests"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError) as refused_batch:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert refused_batch.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert refused_batch.value.response.headers["x-ratelimit-limit-requests"] == "3"
    # Another key is untouched.
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEYS["b"], max_retries=0) as other:
        assert other.responses.create(model="chatq-sim-1", input="hi", background=True).id
    client.close()


def test_a_batch_counts_its_lines_real_usage_against_the_day(
        stack_factory: StackFactory, redis_server: servers.Server) -> None:
    """A batch reserves one token at creation; its lines add what they used when they ran,
    so the next batch is refused once the day is spent."""
    import openai
    import redis as sync_redis
    from chatq import quotas
    from chatq.api import deps

    from tests.integration.test_batches import batch_file, finished, jsonl, wait_batch

    stack = stack_factory("redis", workers=1, CHATQ_API_KEYS=",".join(KEYS.values()),
                          CHATQ_API_KEY_TOKENS_PER_DAY="40")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEYS["c"], max_retries=0,
                           timeout=30)
    upload = client.files.create(file=("in.jsonl", batch_file(4)), purpose="batch")
    made = client.batches.with_raw_response.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert made.headers["x-ratelimit-remaining-tokens"] == "39"
    batch = wait_batch(client, made.parse().id, finished)
    assert batch.request_counts.completed == 4
    used = sum(line["response"]["body"]["usage"]["total_tokens"]
               for line in jsonl(client, batch.output_file_id))
    assert used > 40  # four answers: more than the day holds
    r = sync_redis.Redis.from_url(redis_server.url, decode_responses=True)
    day = f"chatq:quota:{deps.owner_of_entry(KEYS['c'])}:tpd:{quotas.utc_day(time.time())}"
    try:
        servers.wait_for(lambda: int(r.get(day) or 0) == 1 + used,
                         "the lines' usage counted against the day", 10)
    finally:
        r.close()
    with pytest.raises(openai.RateLimitError) as refused:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert refused.value.code == "quota_exceeded_tokens"
    client.close()
