"""GET /health/detailed: every component with a graded status, timings and a summary."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.conf import settings
from django.core.cache import cache

from agents.providers.registry import reset_providers
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

    # The other checks get the same bound: a second, so a busy machine does not cut them too
    # (0.2 s once cut a critical check as well in CI, on a busy machine: "unhealthy").
    settings.CONFIG = settings.CONFIG.model_copy(update={"HEALTH_CHECK_TIMEOUT": 1.0})

    def slow(self: checks.SystemCheck) -> CheckResult:
        time.sleep(1.5)
        return CheckResult("healthy")

    monkeypatch.setattr(checks.SystemCheck, "probe", slow)
    started = time.perf_counter()
    body = client_with("read").get("/health/detailed").json()
    assert time.perf_counter() - started < 1.5 + 0.5
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


class _FakeGeminiModels(BaseHTTPRequestHandler):
    """Speaks Gemini's models.list wire format (GET /v1beta/models); 403 for a wrong key."""

    def do_GET(self) -> None:
        body: dict[str, object]
        if self.headers.get("x-goog-api-key") != "good-gemini-key-1234":
            status, body = (
                403,
                {"error": {"code": 403, "message": "API key not valid", "status": "PERMISSION_DENIED"}},
            )
        elif self.path.startswith("/v1beta/models"):
            names = ["gemini-2.5-flash", "gemini-2.5-pro", "gemini-embedding-001"]
            status, body = 200, {"models": [{"name": f"models/{n}", "displayName": n} for n in names]}
        else:
            status, body = 404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_gemini(settings) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGeminiModels)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cache.delete(checks.GEMINI_CACHE_KEY)
    reset_providers()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    reset_providers()
    server.shutdown()


@pytest.mark.parametrize(
    ("key", "status"), [("good-gemini-key-1234", "healthy"), ("bad-gemini-key-12345", "unhealthy")]
)
def test_gemini_models_listed_through_the_provider(client_with, settings, fake_gemini, key, status):
    settings.CONFIG = settings.CONFIG.model_copy(
        update={"GEMINI_API_KEY": key, "GEMINI_BASE_URL": fake_gemini}
    )
    body = client_with("read").get("/health/detailed").json()
    gemini = body["components"]["gemini_api"]
    assert gemini["status"] == status
    assert gemini["details"]["api_key_configured"] is True
    if status == "healthy":
        assert gemini["details"]["available_models"] == 3
    else:
        assert "error" in gemini["details"]
        assert body["status"] != "unhealthy"  # Gemini is not critical: the simulated/fallback path remains


def test_checks_run_concurrently(client_with, monkeypatch):
    import time

    def slow(result: CheckResult) -> object:
        def probe(self: ComponentCheck) -> CheckResult:
            time.sleep(0.4)
            return result

        return probe

    monkeypatch.setattr(checks.SystemCheck, "probe", slow(CheckResult("healthy")))
    monkeypatch.setattr(checks.WorkersCheck, "probe", slow(CheckResult("healthy")))
    monkeypatch.setattr(checks.QdrantCheck, "probe", slow(CheckResult("unknown")))
    started = time.perf_counter()
    body = client_with("read").get("/health/detailed").json()
    assert time.perf_counter() - started < 1.0  # three 0.4 s checks, not 1.2 s in a row
    assert body["components"]["workers"]["response_time_ms"] >= 400


@requires_postgres
@pytest.mark.django_db(transaction=True)  # the checks read from their own threads and connections
def test_procrastinate_worker_heartbeats(client_with):
    from django.db import connection

    client = client_with("read")
    assert client.get("/health/detailed").json()["components"]["workers"]["status"] == "degraded"
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now())")
    workers = client.get("/health/detailed").json()["components"]["workers"]
    assert workers["status"] == "healthy"
    assert workers["details"]["alive_workers"] == 1


def test_qdrant_collections_and_vectors(client_with, settings):
    from archive import vectors
    from conversations.models import Conversation, Message

    client = client_with("read")
    assert client.get("/health/detailed").json()["components"]["qdrant"]["status"] == "unknown"
    settings.CONFIG = settings.CONFIG.model_copy(
        update={"QDRANT_LOCAL_PATH": ":memory:", "QDRANT_URL": None, "GEMINI_API_KEY": None}
    )
    vectors.reset_client()
    try:
        conversation = Conversation.objects.create(title="wind power")
        Message.objects.create(conversation=conversation, role=Message.Role.USER, content="wind power?")
        assert vectors.index_conversation(conversation.pk)
        qdrant = client.get("/health/detailed").json()["components"]["qdrant"]
        assert qdrant["status"] == "healthy"
        assert qdrant["details"]["collections"] == 1
        assert qdrant["details"]["vectors"] == 1
    finally:
        vectors.reset_client()
