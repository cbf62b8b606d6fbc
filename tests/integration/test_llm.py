"""process_query against a real llmsim process: the stream's endings, errors and clocks.

Each case is one llmsim directive (see chatq.llmsim) that does what a real server was seen
doing; tests/integration/test_llamacpp.py meets the real server itself.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from chatq import errors, jobs, llm
from chatq import settings as settings_mod

from tests import servers
from tests.conftest import StackFactory


class Recorder:
    """A Sink that keeps what it was sent."""

    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.restarts: list[int] = []
        self.failures: list[tuple[int, str]] = []

    async def delta(self, text: str) -> None:
        self.deltas.append(text)

    async def restart(self, attempt: int) -> None:
        self.restarts.append(attempt)
        self.deltas = []

    def attempt_failed(self, attempt: int, error: errors.ChatqError) -> None:
        self.failures.append((attempt, getattr(error, "code", "")))


Make = Callable[..., llm.Llm]


@pytest.fixture
async def make_llm(llmsim: servers.Server) -> AsyncIterator[Make]:
    made: list[llm.Llm] = []

    def make(**cfg: object) -> llm.Llm:
        fields: dict[str, object] = {"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05,
                                     **cfg}
        settings = settings_mod.Settings(
            llmsim=settings_mod.LlmsimSettings(port=llmsim.port),
            llm=settings_mod.LlmSettings.model_validate(fields))
        model = llm.Llm(settings)
        made.append(model)
        return model

    yield make
    for model in made:
        await model.close()


def question(text: str, **extra: object) -> jobs.ChatRequest:
    """A request unique to the test, so llmsim counts its calls apart."""
    return jobs.ChatRequest.model_validate({"message": f"{text} [{uuid.uuid4().hex[:8]}]", **extra})


async def test_an_error_event_mid_stream_is_retried(make_llm: Make) -> None:
    sink = Recorder()
    answer = await llm.process_query(make_llm(), question(
        "llmsim:fail=midstream llmsim:times=1 llmsim:after=4"), sink)
    assert sink.failures == [(1, "model_server_error")] and sink.restarts == [2]
    assert answer.finish_reason == "stop" and answer.text == "".join(sink.deltas)


@pytest.mark.parametrize(("failure", "code"), [("cut", "model_stream_cut"),
                                                ("empty", "model_empty_stream")])
async def test_a_stream_without_a_finish_is_retried_not_an_empty_success(
        make_llm: Make, failure: str, code: str) -> None:
    sink = Recorder()
    answer = await llm.process_query(make_llm(), question(
        f"llmsim:fail={failure} llmsim:times=2"), sink)
    assert sink.failures == [(1, code), (2, code)]
    assert answer.text and answer.finish_reason == "stop"
    with pytest.raises(errors.TemporaryError) as caught:
        await llm.process_query(make_llm(max_attempts=2), question(
            f"llmsim:fail={failure}"), Recorder())
    assert caught.value.code == code


async def test_max_tokens_truncation_keeps_finish_reason_length(make_llm: Make) -> None:
    sink = Recorder()
    answer = await llm.process_query(make_llm(), question("llmsim:tokens=10", max_tokens=3), sink)
    assert answer.finish_reason == "length" and len(sink.deltas) == 3
    assert answer.usage["completion_tokens"] == 3 and not answer.usage_estimated


async def test_missing_usage_is_counted_and_marked_estimated(make_llm: Make) -> None:
    request = question("llmsim:usage=none llmsim:tokens=7")
    answer = await llm.process_query(make_llm(), request, Recorder())
    assert answer.usage_estimated
    # Counted by the server's /tokenize (llmsim's: one token a word), plus the template's turn.
    words = len(answer.text.split())
    assert answer.usage["completion_tokens"] == words
    assert answer.usage["prompt_tokens"] == len(request.message.split()) + 4  # type: ignore[union-attr]
    assert answer.usage["total_tokens"] == answer.usage["prompt_tokens"] + words


async def test_a_prompt_over_the_context_fails_at_once(make_llm: Make) -> None:
    sink = Recorder()
    with pytest.raises(errors.PermanentError) as caught:
        await llm.process_query(make_llm(), question("far too long llmsim:context=3"), sink)
    assert caught.value.code == "context_length_exceeded" and sink.failures == [
        (1, "context_length_exceeded")]
    assert "maximum context length is 3 tokens" in str(caught.value)
    # An answer that runs into the context is cut, not failed.
    answer = await llm.process_query(make_llm(), question("fits llmsim:context=12 llmsim:tokens=50"),
                                     Recorder())
    assert answer.finish_reason == "length"


async def test_a_long_partial_answer_is_not_regenerated_when_so_set(make_llm: Make) -> None:
    sink = Recorder()
    with pytest.raises(errors.PermanentError) as caught:
        await llm.process_query(make_llm(retry_streamed_tokens=3), question(
            "llmsim:fail=midstream llmsim:tokens=20 llmsim:after=6"), sink)
    assert caught.value.code == "model_server_error" and sink.restarts == []
    assert caught.value.partial == "".join(sink.deltas) and len(sink.deltas) == 6
    assert "not retried: 6 pieces had been streamed" in str(caught.value)
    # Fewer pieces than the setting: retried as usual.
    answer = await llm.process_query(make_llm(retry_streamed_tokens=3), question(
        "llmsim:fail=midstream llmsim:times=1 llmsim:after=2"), Recorder())
    assert answer.finish_reason == "stop"


async def test_a_slow_but_steady_model_is_not_cut_off(make_llm: Make) -> None:
    # 15 tokens 150 ms apart: the answer takes over 2 s, longer than either clock.
    model = make_llm(first_token_seconds=1.0, idle_seconds=1.0, max_attempts=1)
    sink = Recorder()
    answer = await llm.process_query(model, question(
        "llmsim:ttft_ms=100 llmsim:itl_ms=150 llmsim:tokens=15"), sink)
    assert answer.finish_reason == "stop" and len(sink.deltas) == 15


@pytest.mark.parametrize(("cfg", "directives", "code"), [
    ({"first_token_seconds": 0.3}, "llmsim:ttft_ms=5000", "model_first_token_timeout"),
    ({"idle_seconds": 0.3}, "llmsim:itl_ms=5000 llmsim:tokens=3", "model_idle_timeout"),
    ({"timeout_seconds": 0.5}, "llmsim:itl_ms=100 llmsim:tokens=40", "model_answer_timeout"),
])
async def test_each_clock_says_which_ran_out(make_llm: Make, cfg: dict[str, float],
                                             directives: str, code: str) -> None:
    sink = Recorder()
    with pytest.raises(errors.TemporaryError) as caught:
        await llm.process_query(make_llm(max_attempts=1, **cfg), question(directives), sink)
    assert caught.value.code == code and sink.failures == [(1, code)]
    name = {"first_token_seconds": "FIRST_TOKEN", "idle_seconds": "IDLE",
            "timeout_seconds": "TIMEOUT"}[next(iter(cfg))]
    assert f"CHATQ_LLM_{name}_SECONDS" in str(caught.value)


async def test_an_unreachable_model_is_unavailable_not_a_failure() -> None:
    settings = settings_mod.Settings(llm=settings_mod.LlmSettings(
        base_url=f"http://127.0.0.1:{servers.free_port()}/v1", max_attempts=1))
    model = llm.Llm(settings)
    try:
        with pytest.raises(errors.ModelUnavailable):
            await llm.process_query(model, question("anyone?"), Recorder())
        with pytest.raises(errors.ModelUnavailable):
            await model.probe()
    finally:
        await model.close()


def test_the_job_keeps_finish_reason_estimated_usage_and_partial_answers(
        stack_factory: StackFactory) -> None:
    from tests.servers import ask, wait_done

    stack = stack_factory("redis", CHATQ_LLM_RETRY_STREAMED_TOKENS="3")
    with stack.client() as http:
        cut = wait_done(http, ask(http, "llmsim:tokens=10 llmsim:usage=none", max_tokens=4))
        long = wait_done(http, ask(http, "llmsim:fail=midstream llmsim:tokens=20 llmsim:after=6"))
    assert cut["status"] == "succeeded" and cut["finish_reason"] == "length"
    assert cut["usage_estimated"] is True and cut["usage"]["completion_tokens"] > 0
    # Not regenerated: failed, with what was streamed kept and the attempt explained.
    assert long["status"] == "failed" and long["attempts"] == 1 and long["answer"]
    assert long["error"]["code"] == "model_server_error"
    assert long["attempt_errors"][0]["code"] == "model_server_error"
