"""docker-compose.prod.yml runs any number of web and worker replicas behind one port."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROD = "docker-compose.prod.yml"
# What the production file requires from the environment (`${NAME:?...}`), for `config` to render.
REQUIRED = {
    "SECRET_KEY": "s",
    "JWT_SECRET_KEY": "j",
    "ALLOWED_HOSTS": "example.com",
    "POSTGRES_PASSWORD": "p",
}


def _compose_cli() -> list[str] | None:
    """`docker compose` (the plugin) or `docker-compose`, whichever answers here."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            done = subprocess.run([*command, "version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return command
    return None


def _render(cli: list[str], name: str, **env: str) -> dict[str, Any]:
    done = subprocess.run(
        [*cli, "-f", name, "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **REQUIRED, **env},
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize("name", ["docker-compose.yml", PROD])
def test_compose_files_pass_docker_compose_config(name: str) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI on this machine")
    rendered = _render(cli, name)
    assert {"web", "worker", "postgres", "redis"} <= set(rendered["services"])


def test_prod_replicas_render_from_the_environment() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI on this machine")
    services = _render(cli, PROD, WEB_REPLICAS="3", WORKER_REPLICAS="5")["services"]
    assert services["web"]["deploy"]["replicas"] == 3
    assert services["worker"]["deploy"]["replicas"] == 5


def test_prod_scales_web_and_worker_behind_one_published_port() -> None:
    services = yaml.safe_load((ROOT / PROD).read_text())["services"]
    published = {name: spec["ports"] for name, spec in services.items() if "ports" in spec}
    assert list(published) == ["proxy"]  # one port for every web replica
    assert len(published["proxy"]) == 1
    assert published["proxy"][0].endswith(":8000")
    for name in ("web", "worker"):
        assert re.fullmatch(r"\$\{[A-Z]+_REPLICAS:-\d+\}", str(services[name]["deploy"]["replicas"])), name
        # The schema is migrated once, by the job, never by each replica at once.
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "migrate" not in str(services[name]["command"])
    assert "container_name" not in services["web"]
    assert services["web"]["expose"] == ["8000"]
    assert "tcp:port=8000:" in services["web"]["command"]


def test_the_proxy_sends_to_every_web_replica() -> None:
    services = yaml.safe_load((ROOT / PROD).read_text())["services"]
    assert "./deploy/Caddyfile:/etc/caddy/Caddyfile:ro" in services["proxy"]["volumes"]
    caddyfile = (ROOT / "deploy" / "Caddyfile").read_text()
    # The upstreams are the service's DNS A records (one per replica), read again as it scales.
    assert re.search(r"dynamic a web 8000 \{\s*refresh \d+s", caddyfile)
    assert re.search(r"^:8000 \{", caddyfile, re.MULTILINE)
