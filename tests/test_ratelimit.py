"""Token-bucket rate limiting: burst, refill, headers, overrides, shared buckets, fail-open."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings as django_settings
from django.test import AsyncClient, RequestFactory
from django.urls import include, path
from prometheus_client import REGISTRY
from rest_framework.exceptions import Throttled
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.throttling import BaseThrottle
from rest_framework.views import APIView

from gateway import ratelimit
from gateway.asyncviews import APIView as AsyncAPIView
from gateway.models import SecurityEvent
from gateway.ratelimit import Policy, acheck, check
from tests.conftest import requires_redis


class SyncProbe(APIView):
    """A plain DRF view with the default authentication, permission and throttle."""

    def get(self, request: Request) -> Response:
        return Response({"ok": True})


class OpenProbe(SyncProbe):
    permission_classes = [AllowAny]


class AsyncProbe(AsyncAPIView):
    """An async view (adrf, as the API's are) with the same defaults."""

    permission_classes = [AllowAny]

    async def get(self, request: Request) -> Response:
        return Response({"ok": True})


urlpatterns = [
    path("probe", SyncProbe.as_view()),
    path("open-probe", OpenProbe.as_view()),
    path("async-probe", AsyncProbe.as_view()),
    path("", include("gateway.urls")),
]

pytestmark = pytest.mark.urls(__name__)


@pytest.fixture
def limits(settings: Any) -> Callable[..., None]:
    """Override rate-limit configuration for one test (restored afterwards)."""

    def _set(**values: Any) -> None:
        settings.CONFIG = settings.CONFIG.model_copy(update=values)

    return _set


def _rl(response: Any) -> dict[str, str]:
    return {name: response[name] for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")}


def test_burst_then_refill_with_headers(client_with: Callable[..., APIClient], limits: Callable) -> None:
    limits(RATE_LIMIT_BURST=3, RATE_LIMIT_REQUESTS=1, RATE_LIMIT_WINDOW=1)
    client = client_with("read")
    first = [client.get("/probe") for _ in range(3)]
    assert [r.status_code for r in first] == [200, 200, 200]
    assert [r["RateLimit-Remaining"] for r in first] == ["2", "1", "0"]
    assert _rl(first[0]) == {"RateLimit-Limit": "3", "RateLimit-Remaining": "2", "RateLimit-Reset": "1"}
    assert first[0]["RateLimit-Policy"] == "1;w=1;burst=3"
    assert first[2]["RateLimit-Reset"] == "3"

    refused = client.get("/probe")
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert set(refused.json()) == {"detail", "code"}
    assert refused["Retry-After"] == "1"
    assert refused["RateLimit-Remaining"] == "0"
    assert refused["RateLimit-Limit"] == "3"

    time.sleep(1.05)  # one token back at 1 per second
    again = client.get("/probe")
    assert again.status_code == 200
    assert again["RateLimit-Remaining"] == "0"


def test_each_client_has_its_own_bucket(client_with: Callable[..., APIClient], limits: Callable) -> None:
    limits(RATE_LIMIT_BURST=2, RATE_LIMIT_REQUESTS=1, RATE_LIMIT_WINDOW=3600)
    first, second = client_with("read"), client_with("read")
    assert [first.get("/probe").status_code for _ in range(3)] == [200, 200, 429]
    assert second.get("/probe").status_code == 200
    # Anonymous callers are limited by IP, separately from keys.
    anonymous = APIClient()
    codes = [anonymous.get("/open-probe", REMOTE_ADDR="10.20.0.1").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert anonymous.get("/open-probe", REMOTE_ADDR="10.20.0.2").status_code == 200


def test_key_override_replaces_the_refill_rate(make_key: Callable, limits: Callable) -> None:
    limits(RATE_LIMIT_BURST=1, RATE_LIMIT_REQUESTS=1, RATE_LIMIT_WINDOW=60)
    _, fast_raw = make_key(["read"], rate_limit_override=120)  # 2 per second
    _, slow_raw = make_key(["read"])
    fast, slow = APIClient(), APIClient()
    fast.credentials(HTTP_AUTHORIZATION=f"Bearer {fast_raw}")
    slow.credentials(HTTP_AUTHORIZATION=f"Bearer {slow_raw}")
    for client in (fast, slow):
        assert client.get("/probe").status_code == 200
        assert client.get("/probe").status_code == 429
    assert fast.get("/probe")["RateLimit-Policy"] == "120;w=60;burst=1"
    time.sleep(0.6)
    assert fast.get("/probe").status_code == 200
    refused = slow.get("/probe")
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 58


def test_disabled_flag_turns_limiting_off(client_with: Callable[..., APIClient], limits: Callable) -> None:
    limits(RATE_LIMITING_ENABLED=False, RATE_LIMIT_BURST=1, RATE_LIMIT_REQUESTS=1, RATE_LIMIT_WINDOW=3600)
    client = client_with("read")
    responses = [client.get("/probe") for _ in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert not responses[-1].has_header("RateLimit-Limit")


def test_rejection_writes_security_event_and_metric(make_key: Callable, limits: Callable) -> None:
    limits(RATE_LIMIT_BURST=1, RATE_LIMIT_REQUESTS=1, RATE_LIMIT_WINDOW=3600)
    row, raw = make_key(["read"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    before = REGISTRY.get_sample_value("polyagents_rate_limit_rejections_total", {"scope": "api"}) or 0
    client.get("/probe", REMOTE_ADDR="10.30.0.7")
    assert client.get("/probe", REMOTE_ADDR="10.30.0.7").status_code == 429
    assert client.get("/probe", REMOTE_ADDR="10.30.0.7").status_code == 429
    after = REGISTRY.get_sample_value("polyagents_rate_limit_rejections_total", {"scope": "api"})
    assert after == before + 2
    # One row per client per minute, however many rejections: a flood cannot fill the table.
    event = SecurityEvent.objects.get(kind="rate_limited")
    assert event.ip == "10.30.0.7"
    assert event.api_key_id == row.pk
    assert event.path == "/probe"
    assert event.detail["client"] == f"key:{row.pk}"


def test_token_endpoint_is_limited_per_ip(db: None, api_client: APIClient, limits: Callable) -> None:
    limits(TOKEN_RATE_LIMIT_REQUESTS=2, TOKEN_RATE_LIMIT_WINDOW=3600)
    codes = [api_client.post("/auth/token", {}, format="json").status_code for _ in range(3)]
    assert codes == [400, 400, 429]
    refused = api_client.post("/auth/token", {}, format="json")
    assert refused.json()["code"] == "rate_limited"
    assert refused["RateLimit-Policy"] == "2;w=3600;burst=2"
    other_ip = api_client.post("/auth/token", {}, format="json", REMOTE_ADDR="10.40.0.1")
    assert other_ip.status_code == 400


@pytest.mark.django_db(transaction=True)
async def test_async_view_is_limited_and_carries_headers(
    limits: Callable, thread_connections_closed: None
) -> None:
    limits(RATE_LIMIT_BURST=2, RATE_LIMIT_REQUESTS=1, RATE_LIMIT_WINDOW=3600)
    client = AsyncClient()
    first = await client.get("/async-probe", headers={"X-Request-ID": "async-1"})
    assert first.status_code == 200
    assert first["RateLimit-Remaining"] == "1"
    assert first["X-Request-ID"] == "async-1"
    await client.get("/async-probe")
    refused = await client.get("/async-probe")
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert refused["Retry-After"] == "3600"
    assert refused["RateLimit-Remaining"] == "0"


@pytest.mark.django_db(transaction=True)
async def test_an_async_view_checks_its_throttles_without_a_trip_back_to_the_loop(
    limits: Callable, monkeypatch: pytest.MonkeyPatch, thread_connections_closed: None
) -> None:
    """adrf runs async_to_sync over no async throttles at all; the API's views do not."""
    import adrf.views

    trips: list[object] = []

    def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(function)
        return async_to_sync(function, *args, **kwargs)

    monkeypatch.setattr(adrf.views, "async_to_sync", counted)
    limits(RATE_LIMIT_BURST=1, RATE_LIMIT_REQUESTS=1, RATE_LIMIT_WINDOW=3600)
    client = AsyncClient()
    assert (await client.get("/async-probe")).status_code == 200
    assert (await client.get("/async-probe")).status_code == 429  # the sync throttle still ran
    assert trips == []


def test_an_async_throttle_still_goes_through_adrf() -> None:
    class Later(BaseThrottle):
        async def allow_request(self, request: Any, view: Any) -> bool:  # type: ignore[override]
            return False

        def wait(self) -> float:
            return 7.0

    view = AsyncProbe()
    view.throttle_classes = [Later]
    with pytest.raises(Throttled) as refused:
        view.check_throttles(Request(RequestFactory().get("/async-probe")))
    assert refused.value.wait == 7  # type: ignore[attr-defined]


def test_bucket_function_burst_then_refill() -> None:
    policy = Policy(capacity=2, requests=5, window=1)
    client = uuid.uuid4().hex
    assert [check("unit", client, policy).allowed for _ in range(3)] == [True, True, False]
    time.sleep(0.25)  # 1.25 tokens back
    assert check("unit", client, policy).allowed
    assert not check("unit", client, policy).allowed


async def test_async_bucket_function_agrees_with_sync() -> None:
    policy = Policy(capacity=2, requests=1, window=3600)
    client = uuid.uuid4().hex
    results = [(await acheck("unit", client, policy)).allowed for _ in range(2)]
    assert results == [True, True]
    assert not check("unit", client, policy).allowed
    denied = await acheck("unit", client, policy)
    assert not denied.allowed
    assert denied.retry_after >= 3599


@pytest.fixture
def dead_redis(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the rate limiter at a port where no Redis listens."""
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    monkeypatch.setattr(ratelimit, "_last_warning", 0.0)
    monkeypatch.setattr(ratelimit, "_down_until", {})


def test_redis_unavailable_fails_open(
    client_with: Callable[..., APIClient],
    limits: Callable,
    dead_redis: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits(RATE_LIMIT_BURST=1, RATE_LIMIT_REQUESTS=1, RATE_LIMIT_WINDOW=3600)
    client = client_with("read")
    before = REGISTRY.get_sample_value("polyagents_rate_limit_backend_errors_total", {"scope": "api"}) or 0
    with caplog.at_level(logging.WARNING, logger="polyagents.ratelimit"):
        codes = [client.get("/probe").status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    after = REGISTRY.get_sample_value("polyagents_rate_limit_backend_errors_total", {"scope": "api"})
    assert after == before + 3
    warnings = [r for r in caplog.records if r.name == "polyagents.ratelimit"]
    assert len(warnings) == 1  # one warning, not one per request
    assert "failing open" in warnings[0].getMessage()


async def test_async_check_fails_open_too(dead_redis: None) -> None:
    decision = await acheck("unit", uuid.uuid4().hex, Policy(capacity=1, requests=1, window=60))
    assert decision.allowed
    assert decision.degraded


@requires_redis
def test_bucket_in_redis_is_shared_by_two_processes() -> None:
    from bench.ratelimit import run_shared_bucket

    url = str(django_settings.REDIS_URL)
    key = f"{django_settings.REDIS_KEY_PREFIX}:rl:shared:{uuid.uuid4().hex[:8]}"
    run = run_shared_bucket(url, key, capacity=5, requests=10, window=1, duration=1.0, processes=2)
    print(
        f"\nshared bucket, 2 processes: allowed {run.allowed}, expected {run.expected:.2f} "
        f"(burst 5 + 10/s over {run.elapsed:.2f}s), {run.checks} checks, "
        f"p50 {run.p50_ms:.3f} ms p99 {run.p99_ms:.3f} ms"
    )
    assert run.checks > run.allowed * 2  # the workers really competed past the limit
    assert run.elapsed > 0.8
    assert abs(run.allowed - run.expected) <= 1
