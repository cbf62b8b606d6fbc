"""How model errors are classified (a pure function, table-driven) and the streaming clocks."""

from __future__ import annotations

import httpx
import openai
import pytest
from chatq import errors, llm

LLAMA_PROMPT_TOO_LONG = ("request (1552 tokens) exceeds the available context size (256 tokens), "
                         "try increasing it")
VLLM_PROMPT_TOO_LONG = ("This model's maximum context length is 4096 tokens. However, you "
                        "requested 5000 tokens")


@pytest.mark.parametrize(("status", "code", "kind", "message", "expected"), [
    # llama.cpp's error event inside a 200 stream: the code is in the body
    (None, "500", "server_error", "boom", ("temporary", "model_server_error")),
    (None, "500", "server_error", "Context size has been exceeded.",
     ("temporary", "model_context_full")),
    (None, None, None, "An error occurred during streaming", ("temporary", "model_stream_error")),
    (None, "503", "unavailable_error", "Loading model", ("unavailable", "model_unavailable")),
    (None, "400", "invalid_request_error", "bad", ("permanent", "model_error_400")),
    # a prompt over the context, as llama.cpp, OpenAI and vLLM say it
    (400, "400", "exceed_context_size_error", LLAMA_PROMPT_TOO_LONG,
     ("context", "context_length_exceeded")),
    (400, "context_length_exceeded", "invalid_request_error", "too long",
     ("context", "context_length_exceeded")),
    (400, None, "BadRequestError", VLLM_PROMPT_TOO_LONG, ("context", "context_length_exceeded")),
    # statuses
    (429, None, "rate_limit_error", "slow down", ("temporary", "model_rate_limited")),
    (429, None, None, "tokens per minute: context window busy", ("temporary", "model_rate_limited")),
    (500, None, None, "oops", ("temporary", "model_server_error")),
    (408, None, None, "timeout", ("temporary", "model_server_error")),
    (502, None, None, "bad gateway", ("unavailable", "model_unavailable")),
    (503, None, None, "loading", ("unavailable", "model_unavailable")),
    (504, None, None, "gateway timeout", ("unavailable", "model_unavailable")),
    (401, None, None, "no key", ("permanent", "model_error_401")),
    (404, "model_not_found", None, "no such model", ("permanent", "model_error_404")),
])
def test_classify(status: int | None, code: str | None, kind: str | None, message: str,
                  expected: tuple[str, str]) -> None:
    assert llm.classify(status, code, kind, message) == expected


def _request() -> httpx.Request:
    return httpx.Request("POST", "http://x/v1/chat/completions")


def test_a_stream_error_event_is_translated_by_its_code() -> None:
    # What the SDK raises for `data: {"error": {"code": 500, ...}}`: a bare APIError.
    body = {"code": 500, "message": "Context size has been exceeded.", "type": "server_error"}
    err = llm.translate(openai.APIError(body["message"], _request(), body=body))
    assert isinstance(err, errors.TemporaryError) and err.code == "model_context_full"
    assert "Context size has been exceeded" in str(err)


def test_a_prompt_over_the_context_is_permanent_and_says_what_to_do() -> None:
    body = {"error": {"code": 400, "message": LLAMA_PROMPT_TOO_LONG,
                      "type": "exceed_context_size_error", "n_prompt_tokens": 1552, "n_ctx": 256}}
    resp = httpx.Response(400, request=_request(), json=body)
    err = llm.translate(openai.BadRequestError("x", response=resp, body=body))
    assert isinstance(err, errors.PermanentError) and err.code == "context_length_exceeded"
    assert "1552 tokens" in str(err) and "shorten it" in str(err)


def test_connection_refused_is_model_unavailable() -> None:
    err = llm.translate(openai.APIConnectionError(request=_request()))
    assert isinstance(err, errors.ModelUnavailable) and err.code == "model_unavailable"
    # A timeout is a TemporaryError of its own, not an outage.
    assert not isinstance(llm.translate(openai.APITimeoutError(_request())),
                          errors.ModelUnavailable)


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("abc", 1), ("a" * 40, 10)])
def test_estimated_tokens(text: str, tokens: int) -> None:
    assert llm.estimate_tokens(text) == tokens


@pytest.mark.parametrize(("chunks", "texts", "finish", "usage", "model"), [
    # OpenAI's shape: text deltas, then the finish_reason, then usage with no choices
    ([{"model": "gpt-x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
      {"choices": [{"delta": {"content": "Hel"}, "finish_reason": None}], "usage": None},
      {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
      {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}],
     ["Hel", "lo"], "stop", {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
     "gpt-x"),
    # llama.cpp: usage and timings on the last chunk, beside the finish_reason
    ([{"choices": [{"delta": {"content": "x"}}], "model": "qwen"},
      {"choices": [{"delta": {}, "finish_reason": "length"}], "timings": {"predicted_n": 1},
       "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}],
     ["x"], "length", {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}, "qwen"),
    # what is not OpenAI's shape says nothing (and breaks nothing)
    ([[1, 2], "text", {"choices": ["a", {"delta": "b"}, {"delta": {"content": 3}}]},
      {"choices": None, "model": 7, "usage": "n/a"}, {"choices": 5},
      {"choices": [], "usage": {"prompt_tokens": "x", "completion_tokens": None}}],
     [], None, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, "asked"),
])
def test_a_stream_is_read_from_its_json_chunks(chunks: list[object], texts: list[str],
                                               finish: str | None, usage: dict[str, int],
                                               model: str) -> None:
    got = llm._Reading("asked")
    assert [t for chunk in chunks for t in got.take(chunk)] == texts
    assert (got.finish, got.usage, got.model) == (finish, usage, model)


def test_a_chunk_object_reads_as_its_json() -> None:
    # Traced, the SDK's chunk objects come in (the instrumentation reads them): the same.
    from openai.types.chat import ChatCompletionChunk

    chunk = ChatCompletionChunk.model_validate({
        "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
    got = llm._Reading("asked")
    assert got.take(chunk.to_dict()) == ["hi"] and (got.finish, got.model) == ("stop", "m")
