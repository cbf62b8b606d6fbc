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


def service_links(service: str, ip: str, port: int, port_name: str = "http") -> dict[str, str]:
    """The variables Kubernetes puts into every pod for one Service (enableServiceLinks)."""
    p = service.upper().replace("-", "_")
    url = f"tcp://{ip}:{port}"
    return {
        f"{p}_SERVICE_HOST": ip, f"{p}_SERVICE_PORT": str(port),
        f"{p}_SERVICE_PORT_{port_name.upper().replace('-', '_')}": str(port),
        f"{p}_PORT": url, f"{p}_PORT_{port}_TCP": url, f"{p}_PORT_{port}_TCP_PROTO": "tcp",
        f"{p}_PORT_{port}_TCP_PORT": str(port), f"{p}_PORT_{port}_TCP_ADDR": ip,
    }


def test_kubernetes_service_links_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Services a release of the chart (and a user's own `chatq-...` Services) make.
    links = {
        **service_links("chatq-api", "10.96.0.7", 8000),
        **service_links("chatq-redis", "10.96.0.8", 6379, "redis"),
        **service_links("chatq-llmsim", "10.96.0.9", 8100),
        **service_links("chatq-worker-metrics", "10.96.0.10", 9100, "metrics"),
        **service_links("chatq-queue", "10.96.0.11", 9324),
        **service_links("chatq-log", "10.96.0.12", 3100),
        **service_links("chatq", "10.96.0.13", 80),
    }
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CHATQ_LLMSIM_PORT", "8101")  # an explicit setting still wins
    monkeypatch.setenv("CHATQ_LLMSIM_HOST", "chatq-llmsim")
    s = settings_mod.Settings()
    assert s.api.port == 8000 and s.api.host == "127.0.0.1"
    assert (s.llmsim.host, s.llmsim.port) == ("chatq-llmsim", 8101)
    assert s.redis.url == "redis://localhost:6379/0"


@pytest.mark.parametrize(("name", "value", "link"), [
    ("CHATQ_API_SERVICE_HOST", "10.96.0.7", True),
    ("CHATQ_API_SERVICE_PORT", "8000", True),
    ("CHATQ_API_SERVICE_PORT_HTTP", "8000", True),
    ("CHATQ_WORKER_METRICS_SERVICE_PORT_METRICS", "9100", True),
    ("CHATQ_API_PORT", "tcp://10.96.0.7:8000", True),
    ("CHATQ_REDIS_PORT", "tcp://10.96.0.8:6379", True),
    ("CHATQ_LLMSIM_PORT", "udp://10.96.0.9:53", True),
    ("CHATQ_API_PORT_8000_TCP", "tcp://10.96.0.7:8000", True),
    ("CHATQ_API_PORT_8000_TCP_ADDR", "10.96.0.7", True),
    ("CHATQ_API_PORT_8000_TCP_PORT", "8000", True),
    ("CHATQ_API_PORT_8000_TCP_PROTO", "tcp", True),
    ("CHATQ_DNS_PORT_53_UDP_ADDR", "10.96.0.10", True),
    ("chatq_api_service_host", "10.96.0.7", True),  # pydantic-settings lowercases names
    ("CHATQ_API_PORT", "8000", False),
    ("CHATQ_LLMSIM_PORT", "8100", False),
    ("CHATQ_TELEMETRY_METRICS_PORT", "9100", False),
    ("CHATQ_API_HOST", "0.0.0.0", False),
    ("CHATQ_REDIS_URL", "redis://chatq-redis:6379/0", False),
    ("CHATQ_QUEUE_ENDPOINT", "http://chatq-elasticmq:9324", False),
    ("CHATQ_API_PORT", "", False),
])
def test_is_service_link(name: str, value: str, link: bool) -> None:
    assert settings_mod.is_service_link(name, value) is link


def test_the_clients_variables_are_not_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatq import client

    monkeypatch.setenv(client.URL_VAR, "http://chatq:8000")
    monkeypatch.setenv(client.API_KEY_VAR, "secret")
    settings_mod.Settings()  # would raise "Extra inputs are not permitted" inside a group
    assert not client.URL_VAR.startswith(tuple(f"CHATQ_{g}_".upper()
                                               for g in settings_mod.Settings.model_fields))
    assert not client.API_KEY_VAR.startswith(tuple(f"CHATQ_{g}_".upper()
                                                   for g in settings_mod.Settings.model_fields))
