"""DEFAULT_API_KEYS take effect when a web process starts, idempotently, even several at once."""

from __future__ import annotations

import logging
import threading

import pytest
from django.conf import settings
from django.db import DatabaseError, connections

from gateway import keys
from gateway.auth import authenticate_bearer
from gateway.keys import keys_load_defaults, load_default_keys_at_start
from gateway.models import ApiKey
from polyagents_site.config import ApiKeySpec
from tests.conftest import requires_postgres

RAW = "pk_env_start_0123456789abcdef"


@pytest.fixture
def default_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = [ApiKeySpec(name="ops", key=RAW, permissions=["read", "admin"])]
    monkeypatch.setattr(settings.CONFIG, "DEFAULT_API_KEYS", specs)


@pytest.mark.django_db(transaction=True)  # the hook loads from a thread with its own connection
def test_the_start_up_hook_loads_the_keys_once(default_keys: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="polyagents.keys"):
        load_default_keys_at_start()
        load_default_keys_at_start()
    assert ApiKey.objects.filter(name="ops", source=ApiKey.Source.ENV).count() == 1
    assert authenticate_bearer(RAW).has("admin")
    loaded = [r.getMessage() for r in caplog.records if "DEFAULT_API_KEYS loaded" in r.getMessage()]
    assert loaded == ["DEFAULT_API_KEYS loaded: ops created", "DEFAULT_API_KEYS loaded: ops unchanged"]


def test_a_failed_load_is_logged_loudly_and_the_server_still_starts(
    default_keys: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def not_migrated() -> list[tuple[str, str]]:
        raise DatabaseError("no such table: gateway_apikey")

    monkeypatch.setattr(keys, "keys_load_defaults", not_migrated)
    with caplog.at_level(logging.WARNING, logger="polyagents.keys"):
        load_default_keys_at_start()
    (record,) = [r for r in caplog.records if r.name == "polyagents.keys"]
    assert record.levelno == logging.WARNING
    assert "were NOT loaded" in record.getMessage()
    assert "load_api_keys" in record.getMessage()


def test_nothing_configured_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.CONFIG, "DEFAULT_API_KEYS", [])
    load_default_keys_at_start()  # no database access (this test has none)


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_processes_starting_together_create_one_row(default_keys: None) -> None:
    barrier = threading.Barrier(4)
    results: list[list[tuple[str, str]]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            results.append(keys_load_defaults())
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(action for done in results for _, action in done) == ["created"] + ["unchanged"] * 3
    assert ApiKey.objects.filter(name="ops").count() == 1
