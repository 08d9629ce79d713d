"""The Dockerfile and compose files line up with the services and the settings."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from polyagents_site.config import Config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.prod.yml"]
SERVICES = {"web", "worker", "postgres", "redis", "qdrant"}
# Production runs web and worker replicas: a one-shot schema job before them, a proxy in front.
PROD_SERVICES = SERVICES | {"migrate", "proxy"}
JOBS = {"migrate"}  # run once and exit: no healthcheck
OUR_SERVICES = ("web", "worker")


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_has_every_service_with_a_healthcheck(name):
    services = _compose(name)["services"]
    assert set(services) == (PROD_SERVICES if name == "docker-compose.prod.yml" else SERVICES)
    for service, spec in services.items():
        if service not in JOBS:
            assert spec.get("healthcheck", {}).get("test"), f"{service} has no healthcheck"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_app_services_set_only_known_settings(name):
    services = _compose(name)["services"]
    for service in OUR_SERVICES:
        environment = services[service]["environment"]
        assert isinstance(environment, dict)
        unknown = set(environment) - set(Config.model_fields)
        assert not unknown, f"{name}: {service} sets {sorted(unknown)}, which settings do not read"
        assert environment["DATABASE_URL"].startswith("postgresql://")
        assert environment["DATABASE_URL"].split("@", 1)[1].startswith("postgres:5432/")
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
        assert environment["QDRANT_URL"] == "http://qdrant:6333"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_app_waits_for_healthy_backends(name):
    services = _compose(name)["services"]
    web_deps = services["web"]["depends_on"]
    for backend in ("postgres", "redis", "qdrant"):
        assert web_deps[backend]["condition"] == "service_healthy"
    assert "daphne" in services["web"]["command"]
    assert "migrate" in services.get("migrate", services["web"])["command"]
    assert services["worker"]["command"] == "python manage.py worker"
    # Crash-only: a worker process that ends is started again.
    assert services["worker"]["restart"] == "unless-stopped"


def test_prod_requires_secrets_and_turns_debug_off():
    environment = _compose("docker-compose.prod.yml")["services"]["web"]["environment"]
    assert environment["DEBUG"] == "false"
    for secret in ("SECRET_KEY", "JWT_SECRET_KEY"):
        assert re.fullmatch(r"\$\{" + secret + r":\?[^}]+\}", environment[secret]), secret
    prod = _compose("docker-compose.prod.yml")["services"]
    for backend in ("postgres", "redis", "qdrant"):
        assert "ports" not in prod[backend], f"{backend} must not be published in production"


def test_compose_values_are_valid_settings():
    """The literal values the dev stack sets pass the same validation as at start-up."""
    environment = _compose("docker-compose.yml")["services"]["web"]["environment"]
    literal = {k: v for k, v in environment.items() if "${" not in str(v)}
    config = Config(_env_file=None, **literal)  # type: ignore[call-arg]
    assert config.DEBUG is True
    assert config.REDIS_URL == "redis://redis:6379/0"


def test_dockerfile_runs_daphne_as_non_root_on_python_311_slim():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")
    assert re.search(r'^CMD \["daphne", .*"polyagents_site\.asgi:application"\]', dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile
    assert "requirements.txt" in dockerfile


def test_dockerignore_keeps_secrets_and_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".env", ".venv", ".git", "db.sqlite3"):
        assert entry in ignored


def test_pre_commit_runs_ruff_and_mypy():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"] for repo in config["repos"] for hook in repo["hooks"]}
    assert {"ruff", "mypy"} <= hooks


def _daphne_endpoints() -> dict[str, str]:
    """The endpoint string each way of running the web process gives daphne (`-e`), run.sh's
    with an IPv6 host to show its escaping."""
    found = {"Dockerfile": re.search(r'"-e", "([^"]+)"', (ROOT / "Dockerfile").read_text())}
    for name in COMPOSE_FILES:
        found[name] = re.search(r"daphne -e (\S+)", _compose(name)["services"]["web"]["command"])
    line = re.search(r'daphne -e ("[^"]+")', (ROOT / "scripts/run.sh").read_text())
    assert line is not None
    echoed = subprocess.run(
        ["bash", "-c", f"HOST=:: PORT=8000; echo {line.group(1)}"], capture_output=True, text=True, check=True
    )
    endpoints = {name: match.group(1) for name, match in found.items() if match is not None}
    assert len(endpoints) == 3, found
    return {**endpoints, "scripts/run.sh": echoed.stdout.strip()}


def test_daphne_listens_with_a_deep_accept_queue():
    """daphne's -b/-p listen with a backlog of 50: a burst of more new connections waits on SYN
    retries, a second or more. Every run command gives an endpoint with a deep queue instead."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    endpoints = _daphne_endpoints()
    for name, description in endpoints.items():
        endpoint = serverFromString(reactor, description)
        assert endpoint._backlog >= 1024, name
        assert endpoint._port == 8000, name
    assert serverFromString(reactor, endpoints["scripts/run.sh"])._interface == "::"
