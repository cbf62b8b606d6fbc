"""Settings: CHATQ_<GROUP>_<FIELD> variables, defaults, the simulator fallback."""

from __future__ import annotations

import pytest
from chatq import settings as settings_mod
from pydantic import ValidationError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_mod.Settings()
    assert s.queue.backend == "redis"
    assert s.worker.concurrency == 32
    assert s.redis.results_ttl_seconds == 24 * 3600
    assert s.uses_simulator
    assert s.llm_base_url == "http://127.0.0.1:8100/v1"
    assert s.llm_model == settings_mod.SIMULATOR_MODEL


def test_env_sets_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATQ_QUEUE_BACKEND", "sqs")
    monkeypatch.setenv("CHATQ_LLM_BASE_URL", "http://vllm:8000/v1")
    monkeypatch.setenv("CHATQ_LLM_MODEL", "qwen")
    monkeypatch.setenv("CHATQ_WORKER_GRACE_SECONDS", "7.5")
    monkeypatch.setenv("CHATQ_LOG_JSON_FORMAT", "true")
    s = settings_mod.Settings()
    assert s.queue.backend == "sqs"
    assert s.worker.grace_seconds == 7.5
    assert s.log.json_format is True
    assert not s.uses_simulator
    assert (s.llm_base_url, s.llm_model) == ("http://vllm:8000/v1", "qwen")


def test_openai_key_alone_means_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATQ_LLM_API_KEY", "sk-test")
    s = settings_mod.Settings()
    assert s.llm_base_url is None and s.llm_model == "gpt-4o-mini"


@pytest.mark.parametrize(("name", "value"), [
    ("CHATQ_QUEUE_BACKEND", "kafka"), ("CHATQ_WORKER_CONCURRENCY", "0"),
    ("CHATQ_QUEUE_WAIT_SECONDS", "21"), ("CHATQ_API_PORT", "http")])
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        settings_mod.Settings()


def test_env_table_covers_every_field_with_a_description() -> None:
    rows = settings_mod.env_table()
    names = [r[0] for r in rows]
    assert len(names) == len(set(names))
    assert "CHATQ_LLM_BASE_URL" in names and "CHATQ_QUEUE_VISIBILITY_SECONDS" in names
    assert all(doc for _, _, doc in rows), [n for n, _, d in rows if not d]
    total = sum(len(type(g).model_fields) for g in settings_mod.Settings().__dict__.values())
    assert len(rows) == total


def test_readme_settings_table_is_current() -> None:
    from tests.servers import REPO

    readme = (REPO / "README.md").read_text()
    begin = readme.index("-->", readme.index("<!-- settings:begin")) + 4
    table = readme[begin:readme.index("<!-- settings:end -->")].strip()
    assert table == settings_mod.markdown_table(), (
        "the README's settings table is stale: paste in `python -m chatq.settings`")
