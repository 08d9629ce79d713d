"""GET /health/detailed: every component with a graded status, timings and a summary."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.cache import cache

from monitoring import checks
from monitoring.checks import CheckResult, ComponentCheck
from monitoring.health import overall_status
from tests.conftest import requires_postgres, requires_redis

pytestmark = pytest.mark.django_db

STATUSES = {"healthy", "degraded", "unhealthy", "unknown"}


def test_detailed_health_needs_read_permission(api_client, client_with):
    assert api_client.get("/health/detailed").status_code == 401
    response = client_with("write").get("/health/detailed")
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"


def test_detailed_health_reports_every_component(client_with):
    response = client_with("read").get("/health/detailed")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] in {"healthy", "degraded"}
    assert body["timestamp"].endswith("Z")
    components = body["components"]
    database = "postgresql" if settings.USING_POSTGRES else "sqlite"
    for name in (database, "redis", "qdrant", "gemini_api", "workers", "system", "cache"):
        assert name in components, name
        assert components[name]["status"] in STATUSES
        assert isinstance(components[name]["response_time_ms"], float)
        assert isinstance(components[name]["details"], dict)
    assert components[database]["status"] == "healthy"
    assert components["system"]["details"]["cpu_count"] >= 1
    summary = body["summary"]
    assert summary["total_components"] == len(components)
    assert sum(summary[s] for s in STATUSES) == len(components)
    assert summary["healthy"] == sum(1 for c in components.values() if c["status"] == "healthy")


@requires_postgres
def test_postgresql_details(client_with):
    details = client_with("read").get("/health/detailed").json()["components"]["postgresql"]["details"]
    assert details["database_size_bytes"] > 0
    assert details["active_connections"] >= 1


@requires_redis
def test_redis_details(client_with):
    redis = client_with("read").get("/health/detailed").json()["components"]["redis"]
    assert redis["status"] == "healthy"
    assert redis["details"]["memory_usage_bytes"] > 0
    assert redis["details"]["connected_clients"] >= 1


def test_redis_unknown_without_redis_url(client_with, settings):
    settings.REDIS_URL = None
    redis = client_with("read").get("/health/detailed").json()["components"]["redis"]
    assert redis["status"] == "unknown"
    assert redis["details"]["configured"] is False


def test_unreachable_redis_makes_the_service_unhealthy(client_with, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    response = client_with("read").get("/health/detailed")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["components"]["redis"]["status"] == "unhealthy"
    assert body["summary"]["unhealthy"] >= 1


def test_gemini_skipped_without_key_or_when_external_checks_are_off(client_with, settings):
    settings.CONFIG = settings.CONFIG.model_copy(update={"GEMINI_API_KEY": None})
    gemini = client_with("read").get("/health/detailed").json()["components"]["gemini_api"]
    assert gemini["status"] == "unknown"
    assert gemini["details"]["api_key_configured"] is False
    settings.CONFIG = settings.CONFIG.model_copy(
        update={"GEMINI_API_KEY": "k" * 20, "HEALTH_CHECK_EXTERNAL_SERVICES": False}
    )
    gemini = client_with("read").get("/health/detailed").json()["components"]["gemini_api"]
    assert gemini["status"] == "unknown"
    assert gemini["details"] == {
        "api_key_configured": True,
        "reason": "HEALTH_CHECK_EXTERNAL_SERVICES is false",
    }


def test_gemini_result_is_cached(client_with, settings, monkeypatch):
    settings.CONFIG = settings.CONFIG.model_copy(update={"GEMINI_API_KEY": "k" * 20})
    calls: list[int] = []

    def fake_list() -> list[str]:
        calls.append(1)
        return ["models/gemini-2.5-flash", "models/gemini-2.5-pro"]

    monkeypatch.setattr(checks, "_gemini_list_models", fake_list)
    cache.delete(checks.GEMINI_CACHE_KEY)
    client = client_with("read")
    first = client.get("/health/detailed").json()["components"]["gemini_api"]
    second = client.get("/health/detailed").json()["components"]["gemini_api"]
    assert first["details"] == {"available_models": 2, "api_key_configured": True, "cached": False}
    assert second["details"]["cached"] is True
    assert len(calls) == 1


def test_slow_check_is_cut_by_the_timeout(client_with, settings, monkeypatch):
    import time

    settings.CONFIG = settings.CONFIG.model_copy(update={"HEALTH_CHECK_TIMEOUT": 0.2})

    def slow(self: checks.SystemCheck) -> CheckResult:
        time.sleep(0.6)
        return CheckResult("healthy")

    monkeypatch.setattr(checks.SystemCheck, "probe", slow)
    started = time.perf_counter()
    body = client_with("read").get("/health/detailed").json()
    assert time.perf_counter() - started < 0.6 + 0.5
    system = body["components"]["system"]
    assert system["status"] == "unhealthy"
    assert "HEALTH_CHECK_TIMEOUT" in system["details"]["error"]
    assert body["status"] == "degraded"  # the system check is not critical


def test_public_when_configured(api_client, settings):
    settings.CONFIG = settings.CONFIG.model_copy(update={"HEALTH_CHECK_PUBLIC": True})
    assert api_client.get("/health/detailed").status_code == 200


def test_overall_status_rules():
    critical = {"db": True, "qdrant": False}
    ok = {"status": "healthy"}
    assert overall_status({"db": ok, "qdrant": ok}, critical) == "healthy"
    assert overall_status({"db": ok, "qdrant": {"status": "unhealthy"}}, critical) == "degraded"
    assert overall_status({"db": ok, "qdrant": {"status": "unknown"}}, critical) == "healthy"
    assert overall_status({"db": {"status": "unhealthy"}, "qdrant": ok}, critical) == "unhealthy"


def test_component_check_maps_to_health_check_errors():
    class Broken(ComponentCheck):
        component = "broken"

        def probe(self) -> CheckResult:
            return CheckResult("unhealthy", {"error": "down"})

    plugin = Broken()
    plugin.run_check()
    assert plugin.status == 0
    assert str(plugin.errors[0]) == "unavailable: down"
