"""IP blocking, security events, client IP, request ids and hostile input at the gateway."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib import admin
from django.contrib.auth.models import User
from django.db import connection
from django.test import AsyncClient, RequestFactory
from django.urls import include, path
from rest_framework.request import Request
from rest_framework.test import APIClient

from gateway.blocking import ais_blocked, block_ip, is_blocked, record_auth_failure
from gateway.models import ApiKey, BlockedIP, SecurityEvent
from gateway.net import RequestIdFilter, client_ip, request_id_var
from gateway.security import alog_security_event, log_security_event

urlpatterns = [
    path("django-admin/", admin.site.urls),
    path("", include("gateway.urls")),
]

pytestmark = pytest.mark.urls(__name__)

ATTACKER = "198.51.100.23"
BAD_KEY = "pk_" + "x" * 43


@pytest.fixture
def config(settings: Any) -> Callable[..., None]:
    """Override configuration values for one test (restored afterwards)."""

    def _set(**values: Any) -> None:
        settings.CONFIG = settings.CONFIG.model_copy(update=values)

    return _set


@pytest.fixture
def attacker() -> APIClient:
    client = APIClient(REMOTE_ADDR=ATTACKER)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {BAD_KEY}")
    return client


def _kinds(ip: str = ATTACKER) -> list[str]:
    return list(SecurityEvent.objects.filter(ip=ip).order_by("id").values_list("kind", flat=True))


# --- blocking -------------------------------------------------------------------------------


def test_repeated_bad_keys_block_the_ip(db: None, attacker: APIClient, config: Callable) -> None:
    config(IP_BLOCK_THRESHOLD=3, IP_BLOCK_WINDOW=300, IP_BLOCK_DURATION=600)
    failures = [attacker.get("/auth/whoami") for _ in range(3)]
    assert [r.status_code for r in failures] == [401, 401, 401]
    assert all(r.has_header("WWW-Authenticate") for r in failures)

    blocked = attacker.get("/auth/whoami")
    assert blocked.status_code == 403
    assert blocked.json() == {
        "detail": "Your IP address is blocked after repeated authentication failures.",
        "code": "ip_blocked",
    }
    row = BlockedIP.objects.get(ip=ATTACKER)
    assert row.expires_at is not None
    assert 590 <= (row.expires_at - row.created_at).total_seconds() <= 610
    assert _kinds() == ["auth_failed", "auth_failed", "auth_failed", "ip_blocked", "blocked_request"]
    # Other addresses are unaffected.
    assert APIClient(REMOTE_ADDR="198.51.100.24").get("/auth/whoami").status_code == 401


def test_blocked_ip_is_refused_on_every_path_before_any_work(
    db: None, client_with: Callable[..., APIClient], config: Callable
) -> None:
    block_ip(ATTACKER, seconds=600, reason="test")
    good = client_with("read", "write", "admin")
    requests = [
        good.get("/health", REMOTE_ADDR=ATTACKER),
        good.get("/auth/whoami", REMOTE_ADDR=ATTACKER),
        good.post("/auth/token", {"api_key": BAD_KEY}, format="json", REMOTE_ADDR=ATTACKER),
        good.get("/no/such/path", REMOTE_ADDR=ATTACKER),
        good.get("/django-admin/", REMOTE_ADDR=ATTACKER),
        good.delete("/conversations/x", REMOTE_ADDR=ATTACKER),
    ]
    assert [r.status_code for r in requests] == [403] * len(requests)
    assert all(r.json()["code"] == "ip_blocked" for r in requests)
    # A valid key does not help, and the refused requests did no other work: no auth events,
    # no rate-limit headers, and only one "blocked_request" row per minute.
    assert not any(r.has_header("RateLimit-Limit") for r in requests)
    assert _kinds() == ["ip_blocked", "blocked_request"]


def test_deleting_the_block_in_the_admin_restores_access_at_once(
    db: None, client_with: Callable[..., APIClient], attacker: APIClient, config: Callable
) -> None:
    config(IP_BLOCK_THRESHOLD=2)
    attacker.get("/auth/whoami")
    attacker.get("/auth/whoami")
    assert attacker.get("/auth/whoami").status_code == 403
    block = BlockedIP.objects.get(ip=ATTACKER)

    staff = User.objects.create_superuser("root", "root@example.com", "pw-not-used")
    admin_client = APIClient()
    admin_client.force_login(staff)
    listing = admin_client.get("/django-admin/gateway/blockedip/")
    assert listing.status_code == 200
    assert ATTACKER in listing.content.decode()
    deleted = admin_client.post(f"/django-admin/gateway/blockedip/{block.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302
    assert not BlockedIP.objects.filter(ip=ATTACKER).exists()

    assert attacker.get("/auth/whoami").status_code == 401  # answered again, not 403
    good = client_with("read")
    assert good.get("/auth/whoami", REMOTE_ADDR=ATTACKER).status_code == 200


@pytest.mark.urls("polyagents_site.urls")
def test_health_of_the_real_site_is_refused_then_restored(db: None, client: Any) -> None:
    block_ip(ATTACKER, seconds=600, reason="test")
    refused = client.get("/health", REMOTE_ADDR=ATTACKER)
    assert refused.status_code == 403
    assert refused.json()["code"] == "ip_blocked"
    assert client.get("/health").status_code == 200  # other addresses are served
    BlockedIP.objects.filter(ip=ATTACKER).delete()
    restored = client.get("/health", REMOTE_ADDR=ATTACKER)
    assert restored.status_code == 200
    assert restored.has_header("X-Request-ID")


@pytest.mark.urls("polyagents_site.urls")
def test_block_check_fails_open_when_the_database_cannot_answer(
    db: None, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with connection.cursor() as cursor:  # inside the test transaction: rolled back afterwards
        cursor.execute(f"DROP TABLE {BlockedIP._meta.db_table}")
    with caplog.at_level(logging.WARNING, logger="polyagents.security"):
        response = client.get("/health", REMOTE_ADDR=ATTACKER)
    assert response.status_code == 200
    assert any("IP block check failed" in r.getMessage() for r in caplog.records)


def test_block_expires_after_its_duration(db: None, attacker: APIClient, config: Callable) -> None:
    config(IP_BLOCK_THRESHOLD=1, IP_BLOCK_DURATION=1)
    assert attacker.get("/auth/whoami").status_code == 401
    assert attacker.get("/auth/whoami").status_code == 403
    assert is_blocked(ATTACKER)
    time.sleep(1.1)
    assert not is_blocked(ATTACKER)
    assert attacker.get("/auth/whoami").status_code == 401


def test_failures_outside_the_window_do_not_add_up(db: None, config: Callable) -> None:
    config(IP_BLOCK_THRESHOLD=3, IP_BLOCK_WINDOW=1)
    assert not record_auth_failure(ATTACKER, reason="invalid_key", path="/x")
    assert not record_auth_failure(ATTACKER, reason="invalid_key", path="/x")
    time.sleep(1.1)
    assert not record_auth_failure(ATTACKER, reason="invalid_key", path="/x")
    assert not record_auth_failure(ATTACKER, reason="invalid_key", path="/x")
    assert not is_blocked(ATTACKER)
    assert record_auth_failure(ATTACKER, reason="invalid_key", path="/x")
    assert is_blocked(ATTACKER)
    event = SecurityEvent.objects.get(kind="ip_blocked")
    assert event.detail["failures"] == 3
    assert event.detail["reason"] == "invalid_key"


def test_bad_addresses_are_never_counted_or_blocked(db: None, config: Callable) -> None:
    config(IP_BLOCK_THRESHOLD=1)
    assert not record_auth_failure(None, reason="x", path="/")
    assert not record_auth_failure("not-an-ip'; DROP TABLE gateway_blockedip;--", reason="x", path="/")
    assert not is_blocked("not-an-ip")
    assert BlockedIP.objects.count() == 0


@pytest.mark.django_db(transaction=True)
async def test_async_middleware_refuses_blocked_ip(config: Callable, thread_connections_closed: None) -> None:
    await sync_to_async(block_ip)(ATTACKER, seconds=600, reason="test")
    assert await ais_blocked(ATTACKER)
    assert not await ais_blocked("198.51.100.99")
    # The ASGI test client always connects from 127.0.0.1: come "through a proxy" instead.
    config(TRUST_X_FORWARDED_FOR=True)
    client = AsyncClient()
    first = await client.get("/auth/whoami", headers={"X-Forwarded-For": ATTACKER})
    second = await client.get("/health", headers={"X-Forwarded-For": ATTACKER})
    assert (await client.get("/auth/whoami")).status_code == 401
    assert (first.status_code, second.status_code) == (403, 403)
    assert first.json()["code"] == "ip_blocked"
    kinds = [e.kind async for e in SecurityEvent.objects.filter(ip=ATTACKER).order_by("id")]
    assert kinds == ["ip_blocked", "blocked_request"]
    event = await alog_security_event("auth_failed", ip=ATTACKER, path="/ws", reason="test")
    assert event is not None
    assert event.kind == "auth_failed"


# --- security events ------------------------------------------------------------------------


class _Capture(logging.Handler):
    """Keeps the records of one logger, after the request-id filter (like the console handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def security_log() -> Any:
    handler = _Capture()
    logger = logging.getLogger("polyagents.security")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_auth_failure_writes_event_and_structured_log_line(
    db: None, attacker: APIClient, security_log: _Capture
) -> None:
    response = attacker.get("/auth/whoami", HTTP_X_REQUEST_ID="trace-123")
    assert response.status_code == 401
    event = SecurityEvent.objects.get(kind="auth_failed")
    assert (event.ip, event.path) == (ATTACKER, "/auth/whoami")
    record = next(r for r in security_log.records if getattr(r, "event", None) == "auth_failed")
    fields = vars(record)  # the structured fields, as the JSON formatter writes them
    assert record.levelno == logging.WARNING
    assert (fields["ip"], fields["path"]) == (ATTACKER, "/auth/whoami")
    assert fields["request_id"] == "trace-123"
    assert "reason" in fields["detail"]


def test_security_event_keeps_key_and_safe_detail(db: None, make_key: Callable) -> None:
    row, _ = make_key(["read"])
    event = log_security_event(
        "rate_limited", ip="2001:db8::1", path="/x" * 400, api_key=row, when=time, count=3
    )
    assert event is not None
    event.refresh_from_db()
    assert event.api_key == row
    assert event.ip == "2001:db8::1"
    assert len(event.path) == 500
    assert event.detail["count"] == 3
    assert event.detail["when"].startswith("<module 'time'")  # made JSON-safe, not an error
    assert log_security_event("auth_failed", ip="garbage", path="/").ip is None  # type: ignore[union-attr]


# --- client IP ------------------------------------------------------------------------------


def test_forwarded_for_is_ignored_unless_trusted(db: None, config: Callable) -> None:
    block_ip("203.0.113.9", seconds=600, reason="test")
    spoofing = APIClient(REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert spoofing.get("/auth/whoami").status_code == 401  # not 403: the header is not trusted

    config(TRUST_X_FORWARDED_FOR=True)
    behind_proxy = APIClient(REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.9, 10.0.0.7")
    assert behind_proxy.get("/auth/whoami").status_code == 403


def test_client_ip_of_requests_and_scopes(settings: Any) -> None:
    factory = RequestFactory()
    request = factory.get("/", REMOTE_ADDR="192.0.2.1", HTTP_X_FORWARDED_FOR="203.0.113.5")
    assert client_ip(request) == "192.0.2.1"
    assert client_ip(Request(request)) == "192.0.2.1"
    scope = {
        "type": "websocket",
        "client": ("192.0.2.2", 5000),
        "headers": [(b"x-forwarded-for", b"203.0.113.6")],
    }
    assert client_ip(scope) == "192.0.2.2"
    assert client_ip({"type": "websocket", "headers": []}) is None
    assert client_ip(factory.get("/", REMOTE_ADDR="<script>")) is None

    settings.CONFIG = settings.CONFIG.model_copy(update={"TRUST_X_FORWARDED_FOR": True})
    assert client_ip(request) == "203.0.113.5"
    assert client_ip(scope) == "203.0.113.6"
    garbage = factory.get("/", REMOTE_ADDR="192.0.2.1", HTTP_X_FORWARDED_FOR="<img src=x>, 1.2.3.4")
    assert client_ip(garbage) == "192.0.2.1"  # an unparsable first address falls back to the peer
    assert client_ip(factory.get("/", REMOTE_ADDR="::ffff:192.0.2.1")) == "::ffff:c000:201"


# --- request id -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("abc-123_X.y", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("<script>alert(1)</script>", False),
        ("has space", False),
        ("", False),
    ],
)
def test_request_id_is_echoed_only_when_valid(
    db: None, api_client: APIClient, sent: str, echoed: bool
) -> None:
    response = api_client.get("/auth/whoami", HTTP_X_REQUEST_ID=sent)
    returned = response["X-Request-ID"]
    if echoed:
        assert returned == sent
    else:
        assert returned != sent
        assert len(returned) == 32
        assert returned.isalnum()


def test_request_id_reaches_django_request_log_lines_then_is_cleared(db: None, attacker: APIClient) -> None:
    handler = _Capture()
    logger = logging.getLogger("django.request")
    logger.addHandler(handler)
    try:
        response = attacker.get("/auth/whoami", HTTP_X_REQUEST_ID="trace-9")
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 401
    assert [vars(r).get("request_id") for r in handler.records] == ["trace-9"]
    assert request_id_var.get() is None


def test_each_request_gets_its_own_id(db: None, api_client: APIClient) -> None:
    ids = {api_client.get("/auth/whoami")["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3


# --- hostile input --------------------------------------------------------------------------

HOSTILE_TOKEN_BODIES: list[tuple[str, bytes | str, str]] = [
    ("oversized key", json.dumps({"api_key": "pk_" + "A" * 100_000}), "application/json"),
    ("3 MB body", json.dumps({"api_key": "x", "pad": "A" * 3_000_000}), "application/json"),
    ("key is a number", json.dumps({"api_key": 12345678901234567890}), "application/json"),
    ("key is a list", json.dumps({"api_key": ["pk_a", "pk_b"]}), "application/json"),
    ("key is an object", json.dumps({"api_key": {"$ne": None}}), "application/json"),
    ("key is null", json.dumps({"api_key": None}), "application/json"),
    ("body is a list", json.dumps([{"api_key": "x"}]), "application/json"),
    ("body is a string", json.dumps("api_key"), "application/json"),
    ("body is null", "null", "application/json"),
    ("empty object", "{}", "application/json"),
    ("both credentials", json.dumps({"api_key": "x", "username": "u", "password": "p"}), "application/json"),
    ("not JSON", "api_key=pk_abc", "application/json"),
    ("truncated JSON", '{"api_key": "pk_', "application/json"),
    ("invalid UTF-8", b"\xff\xfe\x00{", "application/json"),
    ("form encoded", "api_key=pk_abc", "application/x-www-form-urlencoded"),
    ("plain text", "pk_abc", "text/plain"),
    ("NUL in key", json.dumps({"api_key": "pk_abc\x00def"}), "application/json"),
    ("escape in username", json.dumps({"username": "bob\x1b[31m", "password": "p"}), "application/json"),
    ("SQL in key", json.dumps({"api_key": "' OR '1'='1' --"}), "application/json"),
    (
        "SQL in username",
        json.dumps({"username": "admin'; DROP TABLE auth_user;--", "password": "x"}),
        "application/json",
    ),
    (
        "HTML in username",
        json.dumps({"username": "<script>alert(1)</script>", "password": "x"}),
        "application/json",
    ),
    ("huge password", json.dumps({"username": "bob", "password": "p" * 10_000}), "application/json"),
]


# DRF's JSONParser catches ValueError only; json.loads raises RecursionError on deep nesting.
# gateway.parsers.SafeJSONParser turns it into a 400.
DEEP_JSON = pytest.param("[" * 100_000 + "]" * 100_000, "application/json", id="deeply nested JSON")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [pytest.param(*case[1:], id=case[0]) for case in HOSTILE_TOKEN_BODIES] + [DEEP_JSON],
)
def test_hostile_token_requests_get_json_4xx(
    db: None, api_client: APIClient, config: Callable, body: bytes | str, content_type: str
) -> None:
    config(TOKEN_RATE_LIMIT_REQUESTS=1000)
    users_before = User.objects.count()
    response: Any = api_client.generic("POST", "/auth/token", body, content_type=content_type)  # type: ignore[arg-type]
    assert 400 <= response.status_code < 500, response.content[:300]
    assert response["Content-Type"] == "application/json"
    error = response.json()
    assert isinstance(error["detail"], str)
    assert isinstance(error["code"], str)
    assert User.objects.count() == users_before


@pytest.mark.parametrize(
    "header",
    [
        "Bearer " + "A" * 10_000,
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer two tokens",
        "Bearer pk_' OR 1=1 --",
        "Bearer <script>alert(1)</script>",
        "Bearer pk_\u00e9\u00e8",
    ],
)
def test_hostile_authorization_headers_get_json_401(db: None, api_client: APIClient, header: str) -> None:
    response = api_client.get("/auth/whoami", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert response.json()["code"]
    assert response.has_header("WWW-Authenticate")


def test_sql_and_html_payloads_are_stored_inert(db: None, client_with: Callable[..., APIClient]) -> None:
    admin_client = client_with("admin")
    names = ["'; DROP TABLE gateway_apikey; --", "<script>alert('x')</script>", "Robert'); DELETE FROM x;--"]
    for name in names:
        created = admin_client.post("/auth/keys", {"name": name, "permissions": ["read"]}, format="json")
        assert created.status_code == 201
        assert created.json()["name"] == name
        assert created["Content-Type"] == "application/json"
    stored = set(ApiKey.objects.values_list("name", flat=True))
    assert set(names) <= stored
    listed = admin_client.get("/auth/keys").json()["keys"]
    assert set(names) <= {key["name"] for key in listed}
