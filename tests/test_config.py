"""Start-up configuration: bad values stop the service with one line naming the variable.

Each case starts a fresh Python process with a controlled environment (and a working
directory without a `.env`) and runs `django.setup()` with the production settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = (
    "import django; django.setup(); from django.conf import settings; print('ok', settings.CONFIG.NUM_AGENTS)"
)
GOOD_SECRETS = {
    "SECRET_KEY": "a-real-secret-key-0123456789abcdef",
    "JWT_SECRET_KEY": "a-real-jwt-secret-0123456789abcdef",
}
SAMPLE_KEYS = (
    '[{"name":"admin_user","key":"pk_admin_1234567890abcdef","permissions":["read","write","admin"],'
    '"rate_limit_override":1000}]'
)


def start(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run django.setup() in a new process with exactly `env` (plus PATH and PYTHONPATH)."""
    full = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "polyagents_site.settings",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", SETUP], env=full, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def assert_refused(result: subprocess.CompletedProcess[str], variable: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("PolyAgents configuration error:")
    assert variable in lines[0]
    assert "ok" not in result.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEFAULT_API_KEYS", '[{"name": "x",'),
        ("AGENT_MODELS_CONFIG", "not json"),
        ("NUM_AGENTS", "-1"),
        ("DEFAULT_TURNS", "zero"),
        ("DEFAULT_API_KEYS", '[{"name":"x","key":"pk_0123456789abcdefgh","permissions":["root"]}]'),
        ("AGENT_MODELS_CONFIG", '[{"agent_id":"a","model":"m","temperature":5}]'),
        ("CORS_ALLOWED_ORIGINS", "localhost:3000"),
        ("CORS_ALLOWED_ORIGINS", "https://example.com/"),
        ("RATE_LIMIT_BURST", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("DATABASE_URL", "mysql://db/x"),
    ],
)
def test_bad_value_stops_start_up_naming_the_variable(variable: str, value: str, tmp_path: Path) -> None:
    assert_refused(start({"DEBUG": "true", variable: value}, tmp_path), variable)


def test_defaults_start_in_debug(tmp_path: Path) -> None:
    result = start({"DEBUG": "true"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 3"


def test_good_production_configuration_starts(tmp_path: Path) -> None:
    result = start(
        {**GOOD_SECRETS, "NUM_AGENTS": "4", "CORS_ALLOWED_ORIGINS": "https://a.example,http://b:3000"},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 4"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JWT_SECRET_KEY", "your_very_secure_secret_key_here"),
        ("SECRET_KEY", "your_django_secret_key_here"),
        ("DEFAULT_API_KEYS", SAMPLE_KEYS),
    ],
)
def test_sample_secrets_refused_outside_debug(variable: str, value: str, tmp_path: Path) -> None:
    assert_refused(start({**GOOD_SECRETS, variable: value}, tmp_path), variable)


def test_sample_secrets_accepted_in_debug(tmp_path: Path) -> None:
    env = {
        "DEBUG": "true",
        "JWT_SECRET_KEY": "your_very_secure_secret_key_here",
        "SECRET_KEY": "your_django_secret_key_here",
        "DEFAULT_API_KEYS": SAMPLE_KEYS,
    }
    result = start(env, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", ["SECRET_KEY", "JWT_SECRET_KEY"])
def test_missing_secret_refused_outside_debug(missing: str, tmp_path: Path) -> None:
    env = {k: v for k, v in GOOD_SECRETS.items() if k != missing}
    assert_refused(start(env, tmp_path), missing)


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DEBUG=true\nNUM_AGENTS=5\n")
    result = start({}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 5"
