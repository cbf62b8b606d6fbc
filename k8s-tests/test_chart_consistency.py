"""The chart agrees with the code and images it deploys.

Every variable in every rendered Deployment is a chatq setting (chatq.settings.env_table),
one the operator reads, or a standard OTEL_*/AWS_* one; the values schema's `config` lists
exactly the settings the chart leaves to the user; images, commands, ports and the user id
match Dockerfile.api and Dockerfile.worker; skaffold.yaml builds what the chart deploys.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart import all_env, all_of, container, find, pod_spec
from conftest import CHART, REPO, Tools
from values_schema import MANAGED

COMBINATIONS: dict[str, dict[str, Any]] = {
    "defaults": {"redis": {"url": "redis://r:6379/0"}},
    "dev-redis": {"dev": {"enabled": True}},
    "dev-sqs-otel": {
        "dev": {"enabled": True},
        "queue": {"backend": "sqs"},
        "otel": {"enabled": True, "endpoint": "http://tempo:4317"},
    },
    "openai-existing-secrets": {
        "llm": {"apiKey": "k"},
        "api": {"keys": ["a"]},
        "redis": {"existingSecret": "r"},
        "metrics": {"dashboard": {"enabled": True}},
        "config": {"llm": {"max_attempts": 2}, "telemetry": {"capture_content": True}},
    },
}


def settings_names() -> set[str]:
    from chatq.settings import env_table

    return {name for name, _default, _doc in env_table()}


def operator_names() -> set[str]:
    """CHATQ_OPERATOR_* variables the operator's code reads."""
    names: set[str] = set()
    for path in (REPO / "operator" / "chatq_operator").glob("*.py"):
        names |= set(re.findall(r"CHATQ_OPERATOR_[A-Z_]+", path.read_text()))
    return names


def dockerfile(name: str) -> str:
    path = REPO / name
    if not path.exists():
        pytest.fail(f"{name} is missing; the chart deploys the image it builds")
    return path.read_text()


def exec_form(text: str, instruction: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith(instruction + " ")]
    assert lines, f"no {instruction} in the Dockerfile"
    return list(json.loads(lines[-1][len(instruction) + 1 :]))


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
def test_every_env_var_is_a_real_setting(tools: Tools, combination: str) -> None:
    objs = tools.template(values=COMBINATIONS[combination])
    known = settings_names() | operator_names()
    assert "CHATQ_REDIS_URL" in known and "CHATQ_OPERATOR_NAMESPACES" in known
    for deployment in [*all_of(objs, "Deployment"), *all_of(objs, "Pod")]:
        for c in pod_spec(deployment)["containers"]:
            if not c["image"].startswith(("chatq-api:", "chatq-worker:")):
                continue  # redis, ElasticMQ: not chatq's settings
            names = (
                set(all_env(objs, deployment)) if c.get("envFrom") else {e["name"] for e in c.get("env", [])}
            )
            unknown = {n for n in names if n not in known and not n.startswith(("OTEL_", "AWS_"))}
            assert not unknown, f"{deployment['metadata']['name']}: {sorted(unknown)} are not chatq settings"
    for cm in all_of(objs, "ConfigMap"):
        if cm["metadata"]["name"] == "chatq":
            assert set(cm["data"]) <= settings_names(), set(cm["data"]) - settings_names()


def test_values_schema_is_generated_from_the_settings() -> None:
    import values_schema

    committed = json.loads((CHART / "values.schema.json").read_text())
    assert committed == values_schema.build(), (
        "charts/chatq/values.schema.json is stale (chatq.settings changed?): "
        "run .venv/bin/python k8s-tests/values_schema.py and commit the result"
    )


def test_values_schema_config_lists_exactly_the_unmanaged_settings() -> None:
    from chatq.settings import Settings
    from pydantic import BaseModel

    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]["properties"]
    expected: dict[str, dict[str, Any]] = {}
    for group, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        fields = {n: f for n, f in model.model_fields.items() if n not in MANAGED.get(group, set())}
        if fields:
            expected[group] = fields
    assert set(config) == set(expected), "values.schema.json's config groups differ from chatq.settings"
    kinds = {int: "integer", float: "number", bool: "boolean", str: "string"}
    for group, fields in expected.items():
        assert set(config[group]["properties"]) == set(fields), f"config.{group} differs from chatq.settings"
        assert config[group]["additionalProperties"] is False
        for name, f in fields.items():
            prop = config[group]["properties"][name]
            if typing.get_origin(f.annotation) is typing.Literal:
                assert prop["enum"] == list(typing.get_args(f.annotation)), f"config.{group}.{name}"
            else:
                assert prop["type"] == kinds[f.annotation], f"config.{group}.{name}"
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    for group, fields in defaults.items():
        assert set(fields) <= set(config[group]["properties"]), f"values.yaml config.{group}"


def test_images_commands_and_ports_match_the_dockerfiles(tools: Tools) -> None:
    api_df, worker_df = dockerfile("Dockerfile.api"), dockerfile("Dockerfile.worker")
    objs = tools.template(values={"dev": {"enabled": True}})
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version and chart["appVersion"] == version.group(1), (
        "appVersion is the image tag: keep it = chatq's version"
    )

    for df, image, command, port in ((api_df, "api", "api", 8000), (worker_df, "worker", "worker", 9100)):
        title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', df)
        assert title and values["image"][image]["repository"] == title.group(1)
        arg_version = re.search(r"^ARG VERSION=(\S+)", df, re.M)
        assert arg_version and arg_version.group(1) == chart["appVersion"]
        assert exec_form(df, "ENTRYPOINT") == ["chatq"]
        assert exec_form(df, "CMD") == [command]
        assert re.search(rf"^EXPOSE {port}\b", df, re.M), f"Dockerfile.{image} exposes {port}"
        deployment = find(objs, "Deployment", f"chatq-{image}")
        c = container(deployment)
        assert c["image"] == f"{title.group(1)}:{chart['appVersion']}"
        assert c["args"] == [command]
        assert c["ports"][0]["containerPort"] == port
        user = re.search(r"^USER (\d+)", df, re.M)
        assert user and pod_spec(deployment)["securityContext"]["runAsUser"] == int(user.group(1))
    assert re.search(r'pip install[^\n]*"\.\[operator\]"', worker_df), (
        "the worker image must carry the operator"
    )
    assert container(find(objs, "Deployment", "chatq-operator"))["image"].startswith("chatq-worker:")
    llmsim = container(find(objs, "Deployment", "chatq-llmsim"))
    assert llmsim["image"].startswith("chatq-api:") and llmsim["args"] == ["llmsim"]


def test_skaffold_builds_what_the_chart_deploys() -> None:
    skaffold = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    assert skaffold["apiVersion"].startswith("skaffold/v4beta")
    artifacts = {a["image"]: a for a in skaffold["build"]["artifacts"]}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(artifacts) == {values["image"]["api"]["repository"], values["image"]["worker"]["repository"]}
    assert artifacts["chatq-api"]["docker"]["dockerfile"] == "Dockerfile.api"
    assert artifacts["chatq-worker"]["docker"]["dockerfile"] == "Dockerfile.worker"
    release = skaffold["deploy"]["helm"]["releases"][0]
    assert Path(REPO / release["chartPath"]).resolve() == CHART.resolve()
    overrides = json.dumps(release["setValueTemplates"])
    for image in ("chatq-api", "chatq-worker"):
        assert (
            f"IMAGE_REPO_{image.replace('-', '_')}" in overrides
            and f"IMAGE_TAG_{image.replace('-', '_')}" in overrides
        )
